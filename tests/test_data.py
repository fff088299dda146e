import io
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import BertTokenizer, BlipProcessor, CLIPProcessor, CLIPTokenizer
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from modeling_mcad import MCADProcessor
from modeling_mcad.configuration_mcad import PRESET_VOCABULARY
from modeling_mcad.data import (
    ImageTextCollator,
    OneCaptionPerImageSampler,
    flatten_pairs,
    load_image_text_dataset,
    stream_image_text_pairs,
    to_rgb,
)
from modeling_mcad.shapes import make_shapes, to_imagefolder


def png(colour=(200, 30, 30), size=(12, 10), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_imagefolder(root: Path, files: dict[str, bytes], rows: list[dict], split: str = "train") -> Path:
    """An imagefolder with the given files and metadata rows, as a user would lay it out."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return root


@pytest.fixture(scope="module")
def shapes():
    return make_shapes(seed=0, image_size=32, train=12, validation=4, test=4)


# --- loading -------------------------------------------------------------------------------------------------------


def test_imagefolder_save_to_disk_and_a_saved_split_load_the_same(shapes, tmp_path):
    to_imagefolder(shapes, tmp_path / "folder")
    shapes.save_to_disk(str(tmp_path / "dict"))
    shapes["test"].save_to_disk(str(tmp_path / "single"))
    for source in ("folder", "dict", "single"):
        loaded = load_image_text_dataset(tmp_path / source, split="test")
        assert loaded.column_names == ["image", "captions"]
        assert loaded["captions"] == shapes["test"]["captions"]
        for ours, theirs in zip(shapes["test"]["image"], loaded["image"]):
            assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    with pytest.raises(ValueError, match="has splits .* not 'dev'"):
        load_image_text_dataset(tmp_path / "dict", split="dev")


def test_one_caption_per_row_is_grouped_by_image(tmp_path):
    files = {"a.png": png((255, 0, 0)), "b.png": png((0, 255, 0)), "c.png": png((0, 0, 255))}
    rows = [{"file_name": "a.png", "text": "red one"}, {"file_name": "b.png", "text": "green one"},
            {"file_name": "a.png", "text": "  red again "}, {"file_name": "c.png", "text": "blue one"}]
    loaded = load_image_text_dataset(write_imagefolder(tmp_path / "folder", files, rows), caption_column="text")
    assert loaded["captions"] == [["red one", "red again"], ["green one"], ["blue one"]]
    assert [image.getpixel((0, 0)) for image in loaded["image"]] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]

    # Images embedded as bytes (a Hub dataset, a saved dataset) are grouped by content, under renamed columns.
    embedded = datasets.Dataset.from_dict(
        {"picture": [{"bytes": files[row["file_name"]], "path": None} for row in rows],
         "sentence": [row["text"] for row in rows]},
        features=datasets.Features({"picture": datasets.Image(), "sentence": datasets.Value("string")}))
    embedded.save_to_disk(str(tmp_path / "embedded"))
    grouped = load_image_text_dataset(tmp_path / "embedded", image_column="picture", caption_column="sentence")
    assert grouped["captions"] == loaded["captions"]


def test_missing_column_is_named(shapes, tmp_path):
    shapes.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"no column \['caption'\].*columns are \[.*'captions'"):
        load_image_text_dataset(tmp_path / "dict", caption_column="caption")
    # A column that holds neither images nor paths is named with the fix, loaded or streamed.
    with pytest.raises(ValueError, match=r"column 'family' holds Value\('int64'\), not images or image file paths; "
                                        r"pass image_column="):
        load_image_text_dataset(tmp_path / "dict", image_column="family")
    with pytest.raises(ValueError, match=r"image columns \['family', 'scene'\] must hold file paths"):
        stream_image_text_pairs(tmp_path / "dict", image_column=["family", "scene"])


# --- pairs and sampling --------------------------------------------------------------------------------------------


def test_flatten_pairs_has_one_row_per_caption_and_fetches_images(shapes):
    grouped = shapes["train"]
    pairs = flatten_pairs(grouped)
    captions = grouped["captions"]
    assert len(pairs) == sum(len(c) for c in captions)
    assert pairs["caption"] == [caption for row in captions for caption in row]  # a column query: the column only
    assert pairs["image_index"] == [index for index, row in enumerate(captions) for _ in row]
    assert pairs["pair_index"] == list(range(len(pairs)))
    assert pairs["canonical"] == [flag for row in grouped["canonical"] for flag in row]
    assert pairs["swapped_caption"][7] == grouped["swapped_captions"][1][2]
    row = pairs[7]
    assert row["caption"] == captions[1][2] and row["image_index"] == 1
    assert np.array_equal(np.asarray(row["image"]), np.asarray(grouped[1]["image"]))
    assert flatten_pairs(grouped)._fingerprint == pairs._fingerprint  # deterministic: a cache can key on it


def test_sampler_draws_each_image_once_per_epoch_with_a_fresh_caption():
    image_index = [i // 5 for i in range(100)]  # 20 images, 5 captions each
    sampler = OneCaptionPerImageSampler(image_index, seed=3)
    epochs = []
    for epoch in range(30):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        assert len(drawn) == len(sampler) == 20
        assert sorted(image_index[pair] for pair in drawn) == list(range(20))
        epochs.append(drawn)
    assert epochs[0] != epochs[1]  # a new order and new captions
    assert {pair for drawn in epochs for pair in drawn} == set(range(100))  # every caption comes up
    again = OneCaptionPerImageSampler(image_index, seed=3)
    again.set_epoch(4)
    assert list(again) == epochs[4]  # seed + epoch decide everything
    ordered = OneCaptionPerImageSampler(image_index, seed=3, shuffle=False)
    assert [image_index[pair] for pair in ordered] == list(range(20))


def test_sampler_batches_whole_groups_in_a_fresh_group_order():
    image_index = [i // 3 for i in range(60)]  # 20 images, 3 captions each
    groups = [image // 4 for image in range(20)]  # 5 groups of 4 images
    sampler = OneCaptionPerImageSampler(image_index, seed=1, image_groups=groups)
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        images = [image_index[pair] for pair in sampler]
        assert sorted(images) == list(range(20))
        batches = [images[start : start + 4] for start in range(0, 20, 4)]
        assert all(len({groups[image] for image in batch}) == 1 for batch in batches)  # a batch is one group
        orders.append([groups[batch[0]] for batch in batches])
    assert len({tuple(order) for order in orders}) > 1  # groups come in a new order each epoch
    with pytest.raises(ValueError, match="image_groups must give a group id"):
        OneCaptionPerImageSampler(image_index, image_groups=groups[:10])


def test_sampler_draws_canonical_captions_only_in_the_curriculum_epochs():
    image_index = [i // 4 for i in range(40)]  # 10 images, 4 captions each
    canonical = [caption % 4 < 2 for caption in range(40)]  # the first two captions of each image
    canonical[36:40] = [False] * 4  # image 9 has no canonical caption: it draws from all of them
    sampler = OneCaptionPerImageSampler(image_index, seed=0, canonical=canonical, canonical_epochs=3)
    early, late = set(), set()
    for epoch in range(40):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        assert sorted(image_index[pair] for pair in drawn) == list(range(10))
        (early if epoch < 3 else late).update(drawn)
    assert {pair for pair in early if pair < 36} <= {pair for pair in range(36) if canonical[pair]}
    assert late == set(range(40))  # afterwards every wording comes up
    sampler.set_epoch(0)
    image_nine = [pair for pair in sampler if image_index[pair] == 9]
    assert len(image_nine) == 1
    with pytest.raises(ValueError, match="canonical_epochs needs"):
        OneCaptionPerImageSampler(image_index, canonical_epochs=1)
    with pytest.raises(ValueError, match="canonical has 3 flags for 40 pairs"):
        OneCaptionPerImageSampler(image_index, canonical=[True] * 3)


def test_sampler_under_accelerate_shards_the_same_batches_across_processes(shapes):
    """Two processes (simulated with accelerate's `prepare_data_loader`), each a half of every global batch: together
    they see what one process sees, each image at most once per batch, and `set_epoch` reaches the sampler."""
    from accelerate.data_loader import prepare_data_loader

    pairs = flatten_pairs(shapes["train"])

    def loader(num_processes, process_index):
        plain = DataLoader(pairs, batch_size=4, drop_last=True, sampler=OneCaptionPerImageSampler(pairs, seed=0),
                           collate_fn=lambda examples: [example["pair_index"] for example in examples])
        return prepare_data_loader(plain, num_processes=num_processes, process_index=process_index,
                                   split_batches=True)

    single, first, second = loader(1, 0), loader(2, 0), loader(2, 1)
    seen = []
    for epoch in range(2):
        for prepared in (single, first, second):
            prepared.set_epoch(epoch)
        batches = list(single)
        assert [a + b for a, b in zip(first, second)] == batches
        for batch in batches:
            images = [pairs["image_index"][pair] for pair in batch]
            assert len(set(images)) == len(images) == 4
        seen.append(batches)
    assert seen[0] != seen[1]


# --- collation -----------------------------------------------------------------------------------------------------


def tiny_clip_processor() -> CLIPProcessor:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in "abcdefghijklmnopqrstuvwxyz":
        vocab[character] = len(vocab)
        vocab[character + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=24)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_blip_processor() -> BlipProcessor:
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(PRESET_VOCABULARY)}, model_max_length=8)
    return BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 48, "width": 48}), tokenizer=tokenizer)


def test_collator_builds_every_models_inputs_from_the_same_examples(shapes, monkeypatch):
    processors = {"student": MCADProcessor.from_preset("tiny"), "dual": tiny_clip_processor(),
                  "fusion": tiny_blip_processor()}
    pairs = flatten_pairs(shapes["train"])
    examples = [pairs[i] for i in (0, 7, 21)]
    examples[1]["caption"] = "a small red circle to the left of a large blue square and a tiny green star"  # long
    # Images given undecoded (bytes): each must be opened once, not once per processor.
    raw = shapes["train"].cast_column("image", datasets.Image(decode=False))
    for example in examples:
        example["image"] = raw[example["image_index"]]["image"]
    opened = []
    original_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: opened.append(1) or original_open(*args, **kwargs))

    batch = ImageTextCollator(processors, processor_kwargs={"fusion": {"max_length": 6}})(examples)
    assert len(opened) == 3
    assert batch["pair_index"].tolist() == [0, 7, 21] and batch["image_index"].tolist() == [0, 1, 4]
    assert batch["student"]["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["dual"]["pixel_values"].shape == (3, 3, 40, 40)
    assert batch["fusion"]["pixel_values"].shape == (3, 3, 48, 48)
    # Each tokenizer pads to its own longest caption and cuts at its own limit (CLIP: 24, BLIP: max_length=6).
    for name, processor in processors.items():
        reference = processor.tokenizer([e["caption"] for e in examples], padding=True, truncation=True,
                                        max_length=6 if name == "fusion" else None, return_tensors="pt")
        assert torch.equal(batch[name]["input_ids"], reference["input_ids"]), name
    assert batch["dual"]["input_ids"].shape[1] == 24 and batch["fusion"]["input_ids"].shape[1] == 6
    # The same image reaches every processor: the student's and the fusion teacher's pixels agree once resized.
    student_view = torch.nn.functional.interpolate(batch["fusion"]["pixel_values"], size=32, mode="area")
    assert torch.corrcoef(torch.stack([student_view.flatten(), batch["student"]["pixel_values"].flatten()]))[0, 1] > 0.9


def test_collator_names_the_example_at_fault():
    collator = ImageTextCollator({"student": MCADProcessor.from_preset("tiny")})
    with pytest.raises(KeyError, match="pair 5 has no \\['caption'\\]"):
        collator([{"pair_index": 5, "image": Image.new("RGB", (4, 4))}])
    with pytest.raises(ValueError, match="pair 6: the image cannot be used"):
        collator([{"pair_index": 6, "image": {"bytes": b"not an image", "path": None}, "caption": "a"}])
    with pytest.raises(ValueError, match="not processors"):
        ImageTextCollator({"student": MCADProcessor.from_preset("tiny")}, processor_kwargs={"dual": {}})


# --- bad input -----------------------------------------------------------------------------------------------------


def _truncated_png() -> bytes:
    data = png(size=(64, 64), colour=(10, 200, 30))
    return data[: len(data) // 2]


BAD_IMAGES = {
    "zero_byte": (lambda: b"", "the file is empty"),
    "truncated": (_truncated_png, "the image cannot be decoded \\(image file is truncated\\)"),
    "not_an_image": (lambda: b"this is a text file, not a PNG", "not an image file"),
    "huge": (lambda: png(size=(120, 100)), "the image is 120x100 = 12000 pixels, more than max_image_pixels=5000"),
    "absent_on_disk": (None, "the file does not exist \\(listed in the metadata but absent on disk\\)"),
}


def _folder_with_one_bad_image(root: Path, case: str) -> Path:
    make_bad, _ = BAD_IMAGES[case]
    files = {"good0.png": png(), "good1.png": png((0, 0, 200))}
    if make_bad is not None:
        files["bad.png"] = make_bad()
    rows = [{"file_name": "good0.png", "captions": ["a red thing"]},
            {"file_name": "bad.png", "captions": ["the bad one"]},
            {"file_name": "good1.png", "captions": ["a blue thing", "blue"]}]
    return write_imagefolder(root, files, rows)


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_image_raises_naming_row_and_file(case, tmp_path):
    folder = _folder_with_one_bad_image(tmp_path / "data", case)
    with pytest.raises(ValueError, match=rf"1 bad example\(s\):\n  row 1 \(.*bad\.png\): {BAD_IMAGES[case][1]}"):
        load_image_text_dataset(folder, max_image_pixels=5000)


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_image_is_skipped_and_counted_when_opted_in(case, tmp_path, caplog):
    folder = _folder_with_one_bad_image(tmp_path / "data", case)
    with caplog.at_level(logging.WARNING, logger="modeling_mcad.data"):
        loaded = load_image_text_dataset(folder, max_image_pixels=5000, skip_bad_examples=True)
    assert loaded["captions"] == [["a red thing"], ["a blue thing", "blue"]]
    assert "left out 1 row(s) with a bad image, 0 bad caption(s) and 0 image(s) left without a caption" in caplog.text
    # A whole epoch runs through the collator.
    pairs = flatten_pairs(loaded)
    batches = list(DataLoader(pairs, batch_size=2, sampler=OneCaptionPerImageSampler(pairs),
                              collate_fn=ImageTextCollator({"student": MCADProcessor.from_preset("tiny")})))
    assert sum(len(batch["pair_index"]) for batch in batches) == 2


def _image_in_mode(mode: str) -> tuple[bytes, tuple]:
    """An image file in `mode` and the RGB colour its (0, 0) pixel should convert to."""
    buffer = io.BytesIO()
    if mode == "I;16":
        Image.fromarray(np.full((6, 6), 32896, dtype=np.uint16)).save(buffer, format="PNG")  # 32896 / 257 = 128
        return buffer.getvalue(), (128, 128, 128)
    if mode == "RGBA":  # fully transparent red: white once composited, not red
        Image.new("RGBA", (6, 6), (255, 0, 0, 0)).save(buffer, format="PNG")
        return buffer.getvalue(), (255, 255, 255)
    if mode == "CMYK":
        Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(buffer, format="JPEG", quality=100)
        return buffer.getvalue(), Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").getpixel((0, 0))
    if mode == "P":
        Image.new("RGB", (6, 6), (0, 0, 255)).convert("P").save(buffer, format="PNG")
        return buffer.getvalue(), (0, 0, 255)
    if mode == "1":
        Image.new("1", (6, 6), 1).save(buffer, format="PNG")
        return buffer.getvalue(), (255, 255, 255)
    Image.new("L", (6, 6), 77).save(buffer, format="PNG")
    return buffer.getvalue(), (77, 77, 77)


@pytest.mark.parametrize("mode", ["L", "1", "RGBA", "P", "CMYK", "I;16"])
def test_image_modes_are_converted_to_rgb(mode, tmp_path):
    content, colour = _image_in_mode(mode)
    name = "image.jpg" if mode == "CMYK" else "image.png"
    folder = write_imagefolder(tmp_path / "data", {name: content}, [{"file_name": name, "captions": ["x"]}])
    loaded = load_image_text_dataset(folder)
    assert loaded[0]["image"].mode == mode
    batch = ImageTextCollator({"student": MCADProcessor.from_preset("tiny")})([flatten_pairs(loaded)[0]])
    converted = to_rgb(loaded[0]["image"])
    assert converted.mode == "RGB" and converted.getpixel((0, 0)) == colour
    expected = (torch.tensor(colour) / 255 - 0.5) / 0.5  # the tiny processor's normalisation
    assert torch.allclose(batch["student"]["pixel_values"][0, :, 0, 0], expected, atol=0.02)


def test_float_images_have_no_safe_conversion():
    with pytest.raises(ValueError, match="mode F"):
        to_rgb(Image.new("F", (4, 4), 0.5))


@pytest.mark.parametrize("captions, problem", [
    (["fine", ""], "caption 1 is empty"),
    (["fine", "   "], "caption 1 is empty"),
    (["fine", None], "caption 1 is not a string"),
])
def test_bad_caption_raises_or_is_dropped(captions, problem, tmp_path, caplog):
    rows = [{"file_name": "a.png", "captions": ["ok"]}, {"file_name": "b.png", "captions": captions}]
    folder = write_imagefolder(tmp_path / "data", {"a.png": png(), "b.png": png()}, rows)
    with pytest.raises(ValueError, match=rf"row 1 \(.*b\.png\): {problem}"):
        load_image_text_dataset(folder)
    with caplog.at_level(logging.WARNING, logger="modeling_mcad.data"):
        loaded = load_image_text_dataset(folder, skip_bad_examples=True)
    assert loaded["captions"] == [["ok"], ["fine"]]
    assert "left out 0 row(s) with a bad image, 1 bad caption(s) and 0 image(s)" in caplog.text


def test_non_string_captions_are_refused_with_the_reason(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.List(datasets.Value("int64"))})
    numbers = datasets.Dataset.from_dict({"image": [png()], "captions": [[1, 2]]}, features=features)
    numbers.save_to_disk(str(tmp_path / "numbers"))
    with pytest.raises(ValueError, match="column 'captions' holds .*int64.*not captions"):
        load_image_text_dataset(tmp_path / "numbers")
    # A metadata.jsonl mixing strings and numbers in one column cannot even be read by datasets: say why.
    rows = [{"file_name": "a.png", "captions": ["a"]}, {"file_name": "b.png", "captions": [3]}]
    folder = write_imagefolder(tmp_path / "mixed", {"a.png": png(), "b.png": png()}, rows)
    with pytest.raises(ValueError, match="each caption a string"):
        load_image_text_dataset(folder)


def test_collator_tokenizes_hard_negatives_for_negclip(shapes):
    pairs = flatten_pairs(shapes["train"])
    processor = MCADProcessor.from_preset("tiny")
    examples = [pairs[i] for i in range(3)]
    collate = ImageTextCollator({"student": processor}, negative_columns=("swapped_caption", "flipped_caption"))
    negatives = collate(examples)["negatives"]
    expected = [example[column] for example in examples for column in ("swapped_caption", "flipped_caption")]
    assert processor.tokenizer.batch_decode(negatives["input_ids"], skip_special_tokens=True) == expected
    examples[1] = {**examples[1], "flipped_caption": None}
    with pytest.raises(ValueError, match=r"has no 'flipped_caption' negative"):
        collate(examples)
