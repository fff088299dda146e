"""A training split streamed (`stream_image_text_pairs`, `train_mcad.py --streaming`): the same pairs as the split
loaded whole, in the Hub's layouts; bad rows named or left out as they stream by; a streamed distill run that is
resumable and the same on two processes; what a stream cannot do refused by name."""

import json
import logging
import shutil

import datasets
import pytest
import torch
from safetensors.torch import load_file

from modeling_mcad.data import flatten_pairs, load_image_text_dataset, stream_image_text_pairs
from modeling_mcad.errors import UserError
from modeling_mcad.shapes import make_shapes, to_imagefolder

from .conftest import random_images, train_script_error
from .test_data import _folder_with_one_bad_image, png, write_imagefolder
from .test_hub_layouts import IMAGE, image_bytes, write_parquet, write_readme_configs
from .test_train import NO_DROPOUT_STUDENT, losses, run_script, write_run


def image_identity(value: dict) -> str:
    """An undecoded image value by what identifies it: its bytes, or its file."""
    return value["bytes"].hex()[:64] if value.get("bytes") else value["path"]


def loaded_pairs(folder, **options) -> list[tuple[str, str]]:
    """The (image, caption) pairs of the split loaded whole, in `flatten_pairs` order."""
    pairs = flatten_pairs(load_image_text_dataset(folder, **options)).with_format(None)
    images = load_image_text_dataset(folder, **options).cast_column("image", datasets.Image(decode=False))["image"]
    return [(image_identity(images[index]), caption) for index, caption in zip(pairs["image_index"], pairs["caption"])]


def streamed_pairs(folder, **options) -> list[tuple[str, str]]:
    return [(image_identity(row["image"]), row["caption"]) for row in stream_image_text_pairs(folder, **options)]


# --- the stream -----------------------------------------------------------------------------------------------------


def test_a_stream_gives_the_pairs_of_the_split_loaded_whole(tmp_path):
    """Flickr30K's Parquet export (Karpathy's split in a column), caption columns, COCO's metadata with images on
    disk under image_root."""
    karpathy = ["train", "val", "train", "test", "train"]
    images = random_images(len(karpathy), seed=3)
    features = datasets.Features({"image": IMAGE, "caption": datasets.List(datasets.Value("string")),
                                  "split": datasets.Value("string")})
    write_parquet(tmp_path / "flickr" / "TEST" / "test" / "0000.parquet",
                  {"image": [{"bytes": image_bytes(image), "path": None} for image in images],
                   "caption": [[f"image {i} caption {j}" for j in range(3)] for i in range(len(images))],
                   "split": karpathy}, features)
    flickr = {"split": "test", "caption_column": "caption", "where": {"split": "train"}, "data_dir": "TEST"}
    expected = loaded_pairs(tmp_path / "flickr", **flickr)
    assert len(expected) == 9 and streamed_pairs(tmp_path / "flickr", **flickr) == expected

    columns = [f"caption_{j}" for j in range(3)]
    rows = {"image": [{"bytes": image_bytes(image), "path": None} for image in images[:2]],
            **{column: [f"picture {i} wording {column}" for i in range(2)] for column in columns}}
    rows["caption_2"][0] = None  # a missing caption is left out
    write_parquet(tmp_path / "eight" / "data" / "train-00000-of-00001.parquet", rows,
                  datasets.Features({"image": IMAGE, **{column: datasets.Value("string") for column in columns}}))
    write_readme_configs(tmp_path / "eight", ["train"])
    expected = loaded_pairs(tmp_path / "eight", caption_column=columns)
    assert len(expected) == 5 and streamed_pairs(tmp_path / "eight", caption_column=columns) == expected

    (tmp_path / "coco" / "train2014").mkdir(parents=True)
    for number, image in enumerate(images[:3]):
        image.save(tmp_path / "coco" / "train2014" / f"{number}.jpg")
    write_parquet(tmp_path / "meta" / "data" / "train-00000-of-00001.parquet",
                  {"filepath": ["train2014"] * 3, "filename": [f"{number}.jpg" for number in range(3)],
                   "sentences": [["a", "b"], ["c"], ["d", "e"]]},
                  datasets.Features({"filepath": datasets.Value("string"), "filename": datasets.Value("string"),
                                     "sentences": datasets.List(datasets.Value("string"))}))
    write_readme_configs(tmp_path / "meta", ["train"])
    coco = {"image_column": ["filepath", "filename"], "image_root": tmp_path / "coco", "caption_column": "sentences"}
    expected = loaded_pairs(tmp_path / "meta", **coco)
    assert [caption for _, caption in expected] == ["a", "b", "c", "d", "e"]
    assert streamed_pairs(tmp_path / "meta", **coco) == expected


def test_one_caption_per_row_streams_each_row_as_a_pair(tmp_path):
    """The web-style layout: one alt text per row; the rows are not grouped by image (the stream is never held)."""
    files = {"a.png": png((255, 0, 0)), "b.png": png((0, 255, 0))}
    rows = [{"file_name": "a.png", "text": "red one"}, {"file_name": "b.png", "text": "green one"},
            {"file_name": "a.png", "text": "  red again "}]
    stream = stream_image_text_pairs(write_imagefolder(tmp_path / "folder", files, rows), caption_column="text")
    assert isinstance(stream, datasets.IterableDataset)
    assert [(row["image"]["path"].rsplit("/", 1)[1], row["caption"]) for row in stream] == [
        ("a.png", "red one"), ("b.png", "green one"), ("a.png", "red again")]
    shuffled = stream.shuffle(seed=0, buffer_size=3)
    orders = []
    for epoch in range(4):
        shuffled.set_epoch(epoch)
        orders.append([row["caption"] for row in shuffled])
    assert all(sorted(order) == ["green one", "red again", "red one"] for order in orders)
    assert len({tuple(order) for order in orders}) > 1  # a fresh order in some pass


def test_a_bad_row_is_named_where_it_streams_by_or_left_out(tmp_path, caplog):
    folder = _folder_with_one_bad_image(tmp_path / "image", "truncated")
    stream = stream_image_text_pairs(folder)  # nothing is read yet
    with pytest.raises(UserError, match=r"a bad example: the row of .*bad\.png \(captions \['the bad one'\]\): the "
                                        r"image cannot be decoded .*pass skip_bad_examples=True"):
        list(stream)
    with caplog.at_level(logging.WARNING, logger="modeling_mcad.data"):
        kept = [row["caption"] for row in stream_image_text_pairs(folder, skip_bad_examples=True)]
    assert kept == ["a red thing", "a blue thing", "blue"] and "left out the row of " in caplog.text

    rows = [{"file_name": "a.png", "captions": ["ok"]}, {"file_name": "b.png", "captions": ["fine", " "]}]
    folder = write_imagefolder(tmp_path / "caption", {"a.png": png(), "b.png": png()}, rows)
    with pytest.raises(UserError, match=r"the row of .*b\.png \(captions \['fine', ' '\]\): caption 1 is empty"):
        list(stream_image_text_pairs(folder))
    assert [row["caption"] for row in stream_image_text_pairs(folder, skip_bad_examples=True)] == ["ok", "fine"]
    with pytest.raises(UserError, match=r"has no column \['text'\]; its columns are \['image', 'captions'\]"):
        stream_image_text_pairs(folder, caption_column="text")


def test_images_by_url_are_fetched_and_a_null_image_is_named(tmp_path):
    """A streamed Hub imagefolder gives images as `hf://` URLs, which PIL cannot open: they are read as their rows
    come (here `file://` URLs, through the same fsspec opener)."""
    (tmp_path / "a.png").write_bytes(png((1, 2, 3)))
    features = datasets.Features({"url": datasets.Value("string"), "alt": datasets.Value("string")})
    write_parquet(tmp_path / "web" / "data" / "train-00000-of-00001.parquet",
                  {"url": [(tmp_path / "a.png").as_uri(), None], "alt": ["a dark one", "nothing"]}, features)
    write_readme_configs(tmp_path / "web", ["train"])
    stream = stream_image_text_pairs(tmp_path / "web", image_column="url", caption_column="alt")
    with pytest.raises(UserError, match=r"the row of no image \(captions nothing\): no image \(neither bytes"):
        list(stream)
    rows = list(stream_image_text_pairs(tmp_path / "web", image_column="url", caption_column="alt",
                                        skip_bad_examples=True))
    assert [row["caption"] for row in rows] == ["a dark one"] and rows[0]["image"]["bytes"] == png((1, 2, 3))


def test_an_evaluation_split_read_as_a_stream_is_the_split_loaded_whole(tmp_path):
    """`stream_source`: the rows `where` keeps, held, without preparing the source's other splits."""
    karpathy = ["train", "val", "train", "val"]
    images = random_images(len(karpathy), seed=9)
    write_parquet(tmp_path / "flickr" / "TEST" / "test" / "0000.parquet",
                  {"image": [{"bytes": image_bytes(image), "path": None} for image in images],
                   "caption": [[f"image {i} caption {j}" for j in range(2)] for i in range(len(images))],
                   "split": karpathy},
                  datasets.Features({"image": IMAGE, "caption": datasets.List(datasets.Value("string")),
                                     "split": datasets.Value("string")}))
    options = {"split": "test", "caption_column": "caption", "where": {"split": "val"}, "data_dir": "TEST"}
    held, loaded = (load_image_text_dataset(tmp_path / "flickr", stream_source=stream, **options)
                    for stream in (True, False))
    assert held["captions"] == loaded["captions"] == [["image 1 caption 0", "image 1 caption 1"],
                                                      ["image 3 caption 0", "image 3 caption 1"]]
    assert [image.tobytes() for image in held["image"]] == [image.tobytes() for image in loaded["image"]]
    with pytest.raises(UserError, match="no row matches where"):
        load_image_text_dataset(tmp_path / "flickr", stream_source=True, **{**options, "where": {"split": "dev"}})


# --- training on a stream -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An imagefolder of 10 training images, 5 captions each: 3 batches of 16 pairs per pass (and a bad one)."""
    folder = tmp_path_factory.mktemp("photos")
    return to_imagefolder(make_shapes(seed=0, image_size=32, train=10, validation=4, test=4), folder / "photos")


def streamed_run(folder, photos, **overrides):
    return write_run(folder, **{"dataset": str(photos), "streaming": True, "max_steps": 7, "batch_size": 16,
                                "shuffle_buffer": 16, "batch_groups": None, "canonical_epochs": 0,
                                "checkpoint_every_steps": 2, "keep_checkpoints": 10, **overrides})


def test_a_streamed_run_passes_until_max_steps_and_resumes_to_the_same_student(photos, tmp_path):
    """7 steps over 3-batch passes (the teachers online), the evaluation split read without preparing the training
    split; resumed from the checkpoint of step 4, within the second pass, a student with dropout logs the same
    losses and ends with the same weights."""
    dropout = {**NO_DROPOUT_STUDENT, "text_config": {**NO_DROPOUT_STUDENT["text_config"], "hidden_dropout_prob": 0.3}}
    config = streamed_run(tmp_path / "run", photos, student_config=dropout)
    result = run_script("distill", "evaluate", "--config", config)
    assert "Generating train split" not in result.stderr and "| student (mcad_feature) |" in result.stdout
    summary = json.loads((tmp_path / "run" / "distill_summary.json").read_text())
    assert summary["global_steps"] == 7 and summary["samples_per_process"] == [7 * 16]
    reference = losses(tmp_path / "run")
    assert len(reference) == 7 and reference[-1] < reference[0]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_4" / "training_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)

    run_script("distill", "--config", config, "--output_dir", tmp_path / "resumed", "--teacher",
               tmp_path / "run" / "teacher", "--resume_from_checkpoint", tmp_path / "run" / "checkpoints" / "step_4")
    assert losses(tmp_path / "resumed") == pytest.approx(reference[4:], rel=1e-5)
    expected = load_file(tmp_path / "run" / "student" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "student" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_a_streamed_run_on_two_processes_gives_the_losses_of_one(photos, tmp_path):
    """Every process reads the stream and keeps its slice of each global batch: one process's batches again."""
    config = streamed_run(tmp_path / "run", photos, max_steps=4, objective="contrastive")
    run_script("distill", "--config", config, processes=2)
    two_processes = losses(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "distill_summary.json").read_text())["samples_per_process"] == [32, 32]
    shutil.move(tmp_path / "run" / "distill_log.jsonl", tmp_path / "two_processes.jsonl")
    run_script("distill", "--config", config, "--overwrite_output_dir")
    assert len(two_processes) == 4 and losses(tmp_path / "run") == pytest.approx(two_processes, rel=1e-5)


def test_a_bad_row_met_in_training_ends_the_run_with_its_name(tmp_path):
    """The check runs in the DataLoader's worker process: the run still ends with the one message and status 2."""
    photos = to_imagefolder(make_shapes(seed=0, image_size=32, train=10, validation=4, test=4), tmp_path / "photos")
    (photos / "train" / "3.png").write_bytes(b"not a picture")
    config = streamed_run(tmp_path / "run", photos)
    result = run_script("distill", "--config", config, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("train_mcad.py: error: ") == 1
    message = result.stderr.split("train_mcad.py: error: ")[1].splitlines()[0]  # the bar's last frame follows
    assert message.startswith(str(photos)) and "a bad example: the row of " in message
    assert message.endswith("to leave such examples out.")
    assert "3.png" in message and "not an image file" in message
    run_script("distill", "--config", config, "--skip_bad_examples", "--overwrite_output_dir")


def test_what_a_stream_cannot_do_is_refused_by_name(photos, tmp_path, capsys):
    config = streamed_run(tmp_path / "run", photos)
    assert "a stream has no length" in train_script_error(
        ["distill", "--config", config, "--max_steps", "null"], capsys, leaves_unchanged=tmp_path / "run")
    assert "a streamed run has no cache: set lambda_rank to 0" in train_script_error(
        ["distill", "--config", config, "--objective", "mcad_feature_rank_filter"], capsys)
    assert "leave mined_caption out, or train without --streaming" in train_script_error(
        ["distill", "--config", config, "--negative_captions", "[mined_caption]"], capsys)
    assert "Leave the cache stage out" in train_script_error(["cache", "--config", config], capsys)
    assert "the teachers stage trains the teachers on the whole training split" in train_script_error(
        ["teachers", "--config", config], capsys)
    assert "gave no batch of 16 pairs (--batch_size) in a whole pass: --train_where keeps no row" in train_script_error(
        ["distill", "--config", config, "--train_where", "{family: -1}"], capsys)  # an empty stream, not a hang
    assert "--max_steps must be at least 1" in train_script_error(
        ["distill", "--config", config, "--max_steps", "0"], capsys)
    shapes = write_run(tmp_path / "shapes", streaming=True, max_steps=3)
    assert "streaming apply to a dataset that is read" in train_script_error(["distill", "--config", shapes], capsys)
