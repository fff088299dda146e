"""The bad-input corpus: the bad files, captions and options a user can hand the public entry points —
`load_image_text_dataset`, `ImageTextCollator`, `MCADProcessor`, `train_mcad.py` and `mcad-search index` — written
here by the tests (no binary fixture). Each ends in a clear error naming the input and the fix, in a counted skip where
the user opted in, or in a correct conversion: never a traceback from deep inside, and no file of an earlier run
changes. The Troubleshooting table of README.md lists the same cases.

The per-row cases share one imagefolder, so that one load, one training run and one index build meet all of them.
"""

import io
import json
import logging
import os
import re
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from modeling_mcad import MCADProcessor
from modeling_mcad.data import ImageTextCollator, OneCaptionPerImageSampler, flatten_pairs, load_image_text_dataset
from modeling_mcad.search import GalleryIndex
from modeling_mcad.search import main as mcad_search

from .conftest import REPO_ROOT, snapshot, train_script_error
from .test_checkpointing import BAD_INPUT_CASES as RUN_CASES
from .test_publishing_inputs import BAD_INPUT_CASES as PUBLISHING_CASES


def encoded(image: Image.Image, format: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def noise(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` RGB pixels and holds none: 57 bytes that would decode to gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def palette_with_transparency() -> bytes:
    """6x6 palette image: the left half a transparent red, the right half opaque blue."""
    image = Image.new("P", (6, 6), 0)
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.paste(1, (3, 0, 6, 6))
    return encoded(image, transparency=0)


def cut(data: bytes, share: float) -> bytes:
    return data[: int(len(data) * share)]


LONG_CAPTION = ("a small red circle to the left of a large blue square " * 190)[:10_000]
GOOD_IMAGES = 4


@dataclass(frozen=True)
class Case:
    """One metadata row of the corpus: its image file, its captions and what loading makes of it."""

    file_name: str
    content: bytes | None  # None: the row names a file that is not there
    captions: list
    problem: str | None = None  # the row's problem as loading reports it (a regex); None: the row is used
    skipped: str | None = None  # with skip_bad_examples: left out as a bad "image" or a bad "caption"
    corners: tuple | None = None  # the RGB colours of the top-left and bottom-right pixels the models must see


CASES = {
    "zero_byte_image": Case("zero.png", b"", ["a zero-byte file"], r"the file is empty \(0 bytes\)", "image"),
    "truncated_png": Case("truncated.png", cut(encoded(noise(1)), 0.5), ["half a png"],
                          r"the image cannot be decoded \(image file is truncated", "image"),
    "truncated_jpeg": Case("truncated.jpg", cut(encoded(noise(2), "JPEG"), 0.66), ["two thirds of a jpeg"],
                           r"the image cannot be decoded \(image file is truncated", "image"),
    "text_named_jpg": Case("notes.jpg", b"shopping list: milk, eggs\n", ["a text file"],
                           "not an image file PIL can read", "image"),
    "decompression_bomb": Case("bomb.png", header_only_png(20000, 20000), ["a bomb"],
                               r"the image is too large to decode safely \(Image size \(400000000 pixels\)", "image"),
    "missing_image_file": Case("absent.png", None, ["a row without its file"],
                               r"the file does not exist \(listed in the metadata but absent on disk\)", "image"),
    "cmyk_image": Case("cmyk.jpg", encoded(Image.new("CMYK", (6, 6), (0, 255, 255, 0)), "JPEG", quality=100),
                       ["a cmyk jpeg"], corners=((255, 0, 0), (255, 0, 0))),
    "sixteen_bit_image": Case("sixteen.png", encoded(Image.fromarray(np.full((6, 6), 32896, np.uint16))),
                              ["a sixteen bit png"], corners=((128, 128, 128), (128, 128, 128))),  # 32896 / 257
    "palette_with_transparency": Case("palette.png", palette_with_transparency(), ["a palette png"],
                                      corners=((255, 255, 255), (0, 0, 255))),  # transparent: white
    "one_pixel_image": Case("one.png", encoded(Image.new("RGB", (1, 1), (0, 255, 0))), ["one green pixel"],
                            corners=((0, 255, 0), (0, 255, 0))),
    "empty_caption": Case("empty.png", encoded(noise(3)), [""], "caption 0 is empty", "caption"),
    "whitespace_caption": Case("blank.png", encoded(noise(4)), [" \t "], "caption 0 is empty", "caption"),
    "non_string_caption": Case("null.png", encoded(noise(5)), [None], r"caption 0 is not a string \(NoneType\)",
                               "caption"),
    "ten_thousand_character_caption": Case("long.png", encoded(noise(6)), [LONG_CAPTION]),
}
# Cases outside the shared folder, each a whole file or option, tested below with the entry point it concerns.
WHOLE_FILE_CASES = ("invalid_utf8_metadata", "missing_caption_column", "unknown_config_key",
                    "checkpoint_of_another_model", "student_of_another_architecture")
BAD_ROWS = [name for name, case in CASES.items() if case.problem]
BAD_IMAGE_FILES = [case.file_name for case in CASES.values() if case.skipped == "image" and case.content is not None]
USABLE_ROWS = GOOD_IMAGES + sum(case.problem is None for case in CASES.values())
_SKIPPED = [case.skipped for case in CASES.values()]
# What loading logs when it skips: an image whose only caption is bad is left without one.
SKIP_COUNTS = (f"left out {_SKIPPED.count('image')} row(s) with a bad image, "
               f"{_SKIPPED.count('caption')} bad caption(s) and {_SKIPPED.count('caption')} image(s) left without a "
               "caption")


def pixel(colour) -> torch.Tensor:
    """An RGB colour as the tiny processor normalises it (mean = std = 0.5)."""
    return (torch.tensor(colour, dtype=torch.float32) / 255 - 0.5) / 0.5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """An imagefolder (split `train`): the good images, then one metadata row per case of `CASES`."""
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "train"
    folder.mkdir()
    rows = []
    for number in range(GOOD_IMAGES):
        (folder / f"good{number}.png").write_bytes(encoded(noise(10 + number)))
        rows.append({"file_name": f"good{number}.png", "captions": [f"a good image number {number}"]})
    for case in CASES.values():
        if case.content is not None:
            (folder / case.file_name).write_bytes(case.content)
        rows.append({"file_name": case.file_name, "captions": case.captions})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def row_of(name: str) -> int:
    return GOOD_IMAGES + list(CASES).index(name)


def assert_lists_bad_rows(message: str) -> None:
    """`message` counts the bad rows of the corpus and names each one's row, file and problem."""
    assert f"{len(BAD_ROWS)} bad example(s)" in message and "skip_bad_examples=True" in message
    for name in BAD_ROWS:
        case = CASES[name]
        assert re.search(rf"row {row_of(name)} \(\S*{re.escape(case.file_name)}\): {case.problem}", message), name


# --- load_image_text_dataset, ImageTextCollator, MCADProcessor --------------------------------------------------------


def test_loading_names_every_bad_row_or_skips_and_counts_them(corpus, caplog):
    with pytest.raises(ValueError) as refused:
        load_image_text_dataset(corpus)
    message = str(refused.value)
    assert_lists_bad_rows(message)
    with caplog.at_level(logging.WARNING, logger="modeling_mcad.data"):
        loaded = load_image_text_dataset(corpus, skip_bad_examples=True)
    assert SKIP_COUNTS in caplog.text
    usable = [name for name, case in CASES.items() if case.problem is None]
    assert loaded["captions"][GOOD_IMAGES:] == [CASES[name].captions for name in usable]
    assert len(loaded) == USABLE_ROWS


def test_collator_runs_a_whole_epoch_of_what_loading_kept(corpus):
    """Odd modes arrive converted to the right colours, the long caption cut to the model's 32 tokens."""
    pairs = flatten_pairs(load_image_text_dataset(corpus, skip_bad_examples=True))
    loader = DataLoader(pairs, batch_size=5, sampler=OneCaptionPerImageSampler(pairs, shuffle=False),
                        collate_fn=ImageTextCollator({"student": MCADProcessor.from_preset("tiny")}))
    batches = list(loader)
    pixel_values = torch.cat([batch["student"]["pixel_values"] for batch in batches])
    assert pixel_values.shape == (USABLE_ROWS, 3, 32, 32) and torch.isfinite(pixel_values).all()
    usable = [name for name, case in CASES.items() if case.problem is None]
    for position, name in enumerate(usable, start=GOOD_IMAGES):
        if CASES[name].corners:
            top_left, bottom_right = CASES[name].corners
            torch.testing.assert_close(pixel_values[position, :, 0, 0], pixel(top_left), atol=0.03, rtol=0)
            torch.testing.assert_close(pixel_values[position, :, -1, -1], pixel(bottom_right), atol=0.03, rtol=0)
    long_row = GOOD_IMAGES + usable.index("ten_thousand_character_caption")
    batch = batches[long_row // 5]["student"]
    assert batch["input_ids"].shape[1] == 32 and batch["attention_mask"][long_row % 5].sum() == 32


def test_collator_names_the_pair_of_an_unreadable_file(corpus):
    """Given raw files (as when loading skipped its checks), the collator refuses each bad one, the bomb undecoded."""
    collate = ImageTextCollator({"student": MCADProcessor.from_preset("tiny")})
    for number, case in enumerate(case for case in CASES.values() if case.skipped == "image"):
        example = {"pair_index": number, "image": {"path": str(corpus / "train" / case.file_name), "bytes": None},
                   "caption": "a caption"}
        with pytest.raises(ValueError, match=rf"^pair {number}: the image cannot be used \(.+\)\. Load the data"):
            collate([example])
    bomb = {"image": {"bytes": CASES["decompression_bomb"].content, "path": None}, "caption": "a caption"}
    with pytest.raises(ValueError, match=r"example 0: the image cannot be used \(the image is too large"):
        collate([bomb])


def test_processor_converts_what_the_collator_converts_and_refuses_bad_text():
    processor = MCADProcessor.from_preset("tiny")
    collate = ImageTextCollator({"student": processor})
    for name, case in CASES.items():
        if case.corners:
            image = Image.open(io.BytesIO(case.content))
            alone = processor(images=[image], return_tensors="pt")["pixel_values"]
            collated = collate([{"image": {"bytes": case.content, "path": None}, "caption": "x"}])["student"]
            torch.testing.assert_close(alone, collated["pixel_values"], atol=0.01, rtol=0, msg=name)
    with pytest.raises(ValueError, match=r"text\[1\] is NoneType"):
        processor(text=["fine", None])
    with pytest.raises(ValueError, match=r"text\[0\] is \d+ tokens long.*truncation=True"):
        processor(text=[LONG_CAPTION])
    assert processor(text=[LONG_CAPTION], truncation=True, return_tensors="pt")["input_ids"].shape == (1, 32)


def test_invalid_utf8_metadata_names_the_file_and_line(tmp_path):
    write_invalid_utf8(tmp_path / "latin1")
    with pytest.raises(ValueError, match=r"latin1/train/metadata\.jsonl is not valid UTF-8 \(line 2: .*0xe9.*"
                                         r"save the file as UTF-8"):
        load_image_text_dataset(tmp_path / "latin1")


def write_invalid_utf8(root: Path) -> Path:
    (root / "train").mkdir(parents=True)
    for number in range(2):
        (root / "train" / f"{number}.png").write_bytes(encoded(noise(number)))
    (root / "train" / "metadata.jsonl").write_bytes(b'{"file_name": "0.png", "captions": ["a square"]}\n'
                                                    b'{"file_name": "1.png", "captions": ["caf\xe9 au lait"]}\n')
    return root


def write_text_column(root: Path) -> Path:
    """An imagefolder whose captions are in a column `text`, not `captions`."""
    (root / "train").mkdir(parents=True)
    (root / "train" / "0.png").write_bytes(encoded(noise(0)))
    (root / "train" / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a square"}\n')
    return root


# --- train_mcad.py ------------------------------------------------------------------------------------------------


def train_mcad(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "train_mcad.py"), *map(str, arguments)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def corpus_run(corpus: Path, output_dir: Path, *more) -> list:
    """`distill` on the corpus (its only split serves every role), contrastive: no teacher needed."""
    return ["distill", "--dataset", corpus, "--train_split", "train", "--eval_split", "train", "--test_split", "train",
            "--student_preset", "tiny", "--objective", "contrastive", "--epochs", 1, "--batch_size", USABLE_ROWS,
            "--output_dir", output_dir, *more]


def error_of(result: subprocess.CompletedProcess) -> str:
    """The error message of a failed run: status 2, no traceback, the message last on stderr."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.rstrip("\n").splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("train_mcad.py: error: "))
    return "\n".join(lines[start:])


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory) -> Path:
    """A run that opted in to skipping: it leaves out the bad rows, trains one epoch on the rest and saves."""
    run = tmp_path_factory.mktemp("run")
    result = train_mcad(*corpus_run(corpus, run, "--skip_bad_examples"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert SKIP_COUNTS in result.stderr
    return run


def test_train_script_skips_when_asked_and_uses_every_good_pair(trained_run):
    summary = json.loads((trained_run / "distill_summary.json").read_text())
    assert summary["global_steps"] == 1 and summary["samples_per_process"] == [USABLE_ROWS]
    assert (trained_run / "student" / "model.safetensors").is_file()


def test_train_script_lists_the_bad_rows_and_leaves_the_run_alone(corpus, trained_run):
    before = snapshot(trained_run)
    message = error_of(train_mcad(*corpus_run(corpus, trained_run)))
    assert message.startswith("train_mcad.py: error: ")
    assert_lists_bad_rows(message)
    assert message.endswith("pass skip_bad_examples=True (train_mcad.py --skip_bad_examples) to leave them out.")
    assert snapshot(trained_run) == before


def test_train_script_refuses_a_checkpoint_of_another_model(corpus, trained_run):
    before = snapshot(trained_run)
    assert (trained_run / "checkpoints" / "step_1").is_dir()
    message = error_of(train_mcad(*corpus_run(corpus, trained_run, "--skip_bad_examples", "--student_preset",
                                              "shapes", "--resume_from_checkpoint", "latest")))
    assert re.search(r"Checkpoint \S*step_1 was written for another model.*size mismatch for student\..*Resume with "
                     r"the student_preset / student_config", message)
    assert snapshot(trained_run) == before


@pytest.mark.parametrize("case", ["invalid_utf8_metadata", "missing_caption_column", "unknown_config_key"])
def test_train_script_names_a_bad_file_or_option(case, trained_run, tmp_path):
    before = snapshot(trained_run)
    if case == "invalid_utf8_metadata":
        arguments = corpus_run(write_invalid_utf8(tmp_path / "data"), trained_run)
        expected = r"metadata\.jsonl is not valid UTF-8 \(line 2: .*; save the file as UTF-8"
    elif case == "missing_caption_column":
        arguments = corpus_run(write_text_column(tmp_path / "data"), trained_run)
        expected = r"has no column \['captions'\]; its columns are \['image', 'text'\]\. Pass .*caption_column="
    else:
        config = tmp_path / "run.yaml"
        config.write_text(f"output_dir: {trained_run}\nstudent_preset: tiny\nlearning_rat: 0.01\n")
        arguments = ["distill", "--config", config]
        expected = r"Unknown option\(s\) \['learning_rat'\] in \S*run\.yaml; the options are .*'learning_rate'"
    assert re.search(expected, error_of(train_mcad(*arguments)))
    assert snapshot(trained_run) == before


# Options and stages of train_mcad.py, each run in this process and refused before any training: the stage (None: the
# corpus run's distill), the arguments after the corpus run's own, a YAML file's text (None: no --config), and the
# message expected after "error: ".
OPTION_CASES = {
    "fractional_epochs": (None, ["--epochs", "2.5"], None,
                          r"^Option epochs in the command line must be int, got 2\.5 \(float\)\.$"),
    "number_for_a_folder_option": (None, [], "output_dir: 20240101\n",
                                   r"^Option output_dir in \S+run\.yaml must be str, got 20240101 \(int\) \(YAML "
                                   r"reads an unquoted number, yes / no or on / off as a number or a boolean: quote"),
    "yes_no_for_a_string_option": (None, [], "mixed_precision: no\n",
                                   r"^Option mixed_precision in \S+run\.yaml must be str, got False \(bool\) \(YAML"),
    "missing_config_file": (None, ["--config", "absent.yaml"], None,
                            r"^--config absent\.yaml: no such file; pass a YAML file of TrainConfig fields"),
    "invalid_yaml_config": (None, [], "epochs: [6\n", r"^\S+run\.yaml is not a readable YAML file \(.*\); fix it"),
    "unknown_student_preset": (None, ["--student_preset", "huge"], None,
                               r"^Option student_preset: Unknown preset 'huge'; choose one of \["),
    "unknown_key_in_a_dict_option": ("teachers", ["--dual_teacher_training", "{epoch: 3}"], None,
                                     r"^Option dual_teacher_training has unknown key\(s\) \['epoch'\]; "
                                     r"modeling_mcad\.teacher_training\.train_dual_teacher takes \[.*'epochs'"),
    "bad_objective_knob": (None, ["--objective", "mcad", "--objective_overrides", "{alpha: -1}"], None,
                           r"^alpha must be >= 0 \(0: the dual teacher only\), got -1"),
    "missing_dataset": (None, ["--dataset", "no/such/folder"], None,
                        r"^No dataset no/such/folder \(.*\); pass a Hub dataset name, a folder"),
    "missing_split": (None, ["--train_split", "training"], None,
                      r"has no split 'training' \(.*'train'.*\); pass one of its splits"),
    "stage_before_its_inputs": ("evaluate", [], None, r"^No student in \S+student: run the distill stage first\.$"),
    "images_over_max_image_pixels": (None, ["--max_image_pixels", "1000", "--skip_bad_examples", "false"], None,
                                     r"bad example\(s\):\n  row 0 \(\S*good0\.png\): the image is 64x64 = 4096 "
                                     r"pixels, more than max_image_pixels=1000 .*; downscale it or raise "
                                     r"max_image_pixels"),
    "batch_larger_than_the_data": (None, ["--batch_size", "1000"], None,
                                   r"^total_steps must be >= 1, got 0: the data gives no full batch\. Lower "
                                   r"batch_size"),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_train_script_names_a_bad_option_and_changes_nothing(case, corpus, trained_run, tmp_path, capsys):
    stage, extra, config_text, expected = OPTION_CASES[case]
    run = trained_run if stage is None else tmp_path / "fresh"  # the other stages in a folder of their own
    arguments = corpus_run(corpus, run, "--skip_bad_examples", *extra)
    arguments[0] = stage or arguments[0]
    if config_text is not None:
        (tmp_path / "run.yaml").write_text(config_text)
        arguments += ["--config", tmp_path / "run.yaml"]
    before = snapshot(trained_run)
    assert re.search(expected, message := train_script_error(arguments, capsys), re.DOTALL), message
    assert snapshot(trained_run) == before
    assert not list((tmp_path / "fresh").rglob("*.json"))


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only a user's mistake becomes a one-line error: a plain ValueError from inside is a bug and propagates."""
    import train_mcad

    def broken(argv):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(train_mcad, "main", broken)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        train_mcad.cli([])


# --- mcad-search index ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory) -> Path:
    """A saved BLIP retrieval model and processor: a model folder of another architecture than the student's (a CLIP
    folder is not one: the student loads CLIP checkpoints)."""
    from .test_teachers import tiny_blip

    folder = tmp_path_factory.mktemp("blip")
    model, processor = tiny_blip()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_search_index_lists_bad_images_skips_when_asked_and_keeps_the_old_index(corpus, trained_run, blip_folder,
                                                                                  tmp_path, capsys, caplog):
    gallery, student, output = corpus / "train", trained_run / "student", tmp_path / "gallery.mcadidx"
    with caplog.at_level(logging.WARNING, logger="modeling_mcad.search"):
        assert mcad_search(["index", str(gallery), "--model", str(student), "--out", str(output),
                            "--skip-bad-images"]) == 0
    assert f"Left out {len(BAD_IMAGE_FILES)} unreadable image(s)" in caplog.text
    readable = sorted(path.name for path in gallery.iterdir() if path.suffix != ".jsonl"
                      and path.name not in BAD_IMAGE_FILES)
    assert sorted(GalleryIndex.load(output).ids) == readable
    before = output.read_bytes()
    capsys.readouterr()

    for model, expected in ((student, rf"{len(BAD_IMAGE_FILES)} image\(s\) of \S+ cannot be read:.*skip-bad-images"),
                            (blip_folder, r"holds a 'blip' model \(config\.json model_type\), not an MCAD student")):
        assert mcad_search(["index", str(gallery), "--model", str(model), "--out", str(output)]) == 2
        stderr = capsys.readouterr().err
        error = stderr.strip().splitlines()[-1]  # above it only progress bars
        assert error.startswith("mcad-search: error: ") and "Traceback" not in stderr
        assert re.search(expected, error)
        if model == student:
            assert all(name in error for name in BAD_IMAGE_FILES)
            assert "bomb.png: the image is too large to decode safely" in error
    assert output.read_bytes() == before


# --- the README ---------------------------------------------------------------------------------------------------


def test_readme_troubleshooting_table_lists_every_case():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Troubleshooting" in readme
    section = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip().strip("`") for line in section.splitlines() if line.startswith("| `")}
    assert rows == set(CASES) | set(WHOLE_FILE_CASES) | set(OPTION_CASES) | set(RUN_CASES) | set(PUBLISHING_CASES)
    assert len(rows) >= 35
