"""Bad inputs of publishing a model and its gallery index: `train_mcad.py push --dry_run` and `mcad-search`. Each ends
in `<prog>: error: <message>` naming the input and the fix, with status 2 and no traceback, and changes nothing on
disk. `BAD_INPUT_CASES` names them for the corpus of tests/test_bad_inputs.py and README's Troubleshooting table.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import safetensors
import torch

from modeling_mcad import MCADModel, MCADProcessor
from modeling_mcad.errors import UserError
from modeling_mcad.gallery_index import _serialize
from modeling_mcad.search import (
    PROBE_TEXTS,
    CorruptIndexError,
    GalleryIndex,
    IndexModel,
    SearchError,
    embed_gallery,
)
from modeling_mcad.search import main as mcad_search

from .conftest import REPO_ROOT, caption_split, random_images, snapshot, train_script_error

BAD_INPUT_CASES = {
    "dry_run_into_a_model_folder": "`train_mcad.py push --dry_run DIR` where DIR holds other files (a trained student)",
    "damaged_index_header_key": "an index whose header lacks a key (block_rows, ...), checksum recomputed",
    "index_header_outside_checksum": "an index with a damaged header byte, or of the older MCADIDX format",
    "empty_gallery": "`mcad-search index` of a folder without images; an index file of zero images",
    "nan_query_or_probe": "a model whose text encoder makes NaN; an index whose probe embeddings hold NaN",
    "batch_size_zero": "`mcad-search index --batch-size 0` (or negative)",
    "teacher_repo_id_of_the_student": "`push --teacher_repo_id` naming the student's `--repo_id`, or with `--teacher`",
    "teacher_and_the_teachers_stage": "`--teacher DIR` with the teachers stage, which would train another teacher",
    "teacher_that_cannot_be_fetched": "`--teacher user/name` of a repository that cannot be fetched (offline)",
}
REBUILD = r"rebuild it with `mcad-search index IMAGES_DIR --model MODEL_DIR --out \S+`\.$"


def search_error(capsys, *arguments) -> str:
    """Run `mcad-search` in this process; assert status 2 without a traceback and return its one-line error."""
    try:
        status = mcad_search([str(argument) for argument in arguments])
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    stderr = capsys.readouterr().err
    assert status == 2 and "Traceback" not in stderr, stderr
    error = stderr.strip().splitlines()[-1]
    assert error.startswith(("mcad-search: error: ", "mcad-search index: error: ")), error
    return error


# --- index files, written field by field ------------------------------------------------------------------------


def small_index(folder: Path, name: str = "gallery.mcadidx") -> Path:
    model = IndexModel("student", None, probe_embeddings=np.full((len(PROBE_TEXTS), 8), 8**-0.5, np.float32))
    return GalleryIndex.from_embeddings(np.eye(5, 8, dtype=np.float32), list("abcde"), model).save(folder / name)


def read_index(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(the index's metadata record, its tensors) of a saved index."""
    with safetensors.safe_open(path, "numpy") as reader:
        return (json.loads(reader.metadata()["mcad_search_index"]),
                {name: reader.get_tensor(name) for name in reader.keys()})


def write_index(path: Path, record: dict, tensors: dict[str, np.ndarray]) -> None:
    """An index file as `save` writes it (checksum included), from its parts."""
    path.write_bytes(_serialize(tensors, record))


def without_key(header: dict, key: str) -> dict:
    """`header` with `key` (`model.KEY` inside the model's record) renamed, as a damaged header would have it."""
    header = json.loads(json.dumps(header))
    record = header["model"] if key.startswith("model.") else header
    key = key.removeprefix("model.")
    record[key[:-1] + chr(ord(key[-1]) ^ 1)] = record.pop(key)
    return header


HEADER_KEYS = ["format_version", "dimension", "count", "block_rows", "model", "model.name",
               "model.path", "model.weights_sha256", "model.probe_texts", "model.probe_embeddings"]


# --- damaged_index_header_key -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", HEADER_KEYS)
def test_damaged_index_header_key(key, tmp_path, capsys):
    path = small_index(tmp_path)
    header, tensors = read_index(path)
    write_index(path, without_key(header, key), tensors)  # a checksum that matches: only the key is wrong
    before = snapshot(tmp_path)
    error = search_error(capsys, "query", path, "a red circle")
    assert re.search(rf"gallery\.mcadidx has a damaged header \(KeyError\('{key.split('.')[-1]}'\)\); {REBUILD}",
                     error), error
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("value", [-1, 2.5, "5", None, True])
def test_a_header_size_of_the_wrong_type_is_a_damaged_header(value, tmp_path):
    path = small_index(tmp_path)
    header, tensors = read_index(path)
    write_index(path, {**header, "count": value}, tensors)
    with pytest.raises(CorruptIndexError, match=rf"damaged header .*expected non-negative integers, got "
                                                rf"count={re.escape(repr(value))}.*{REBUILD}"):
        GalleryIndex.load(path)


# --- index_header_outside_checksum --------------------------------------------------------------------------------


def test_index_header_outside_checksum(tmp_path, capsys):
    path = small_index(tmp_path)
    data = bytearray(path.read_bytes())
    digit = data.index(b'\\"probe_embeddings\\": [[0.') + len(b'\\"probe_embeddings\\": [[0.')
    data[digit] = ord("9") if data[digit] != ord("9") else ord("8")  # still valid JSON, another number
    path.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    error = search_error(capsys, "query", path, "a red circle")
    assert re.search(rf"gallery\.mcadidx is truncated or damaged \(its checksum does not match\); {REBUILD}", error)
    assert snapshot(tmp_path) == before


def test_every_header_byte_is_checked(tmp_path):
    path = small_index(tmp_path)
    original = path.read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    for position in range(header_end):  # the header's length, and the header (safetensors' JSON, our metadata)
        data = bytearray(original)
        data[position] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptIndexError, match=rf"gallery\.mcadidx .*{REBUILD}"):
            GalleryIndex.load(path)


def test_an_index_of_a_newer_format_is_named_so_whatever_its_checksum(tmp_path, capsys):
    path = small_index(tmp_path)
    header, tensors = read_index(path)
    write_index(path, {**header, "format_version": 4}, tensors)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a newer format may checksum otherwise: its version is read first
    path.write_bytes(bytes(data))
    error = search_error(capsys, "query", path, "a red circle")
    assert re.search(rf"gallery\.mcadidx has index format 4, newer than the one this mcad reads \(3\): upgrade mcad, "
                     rf"or {REBUILD}", error), error


def test_an_index_of_the_older_format_is_refused_with_a_rebuild_hint(tmp_path, capsys):
    path = tmp_path / "gallery.mcadidx"
    path.write_bytes(b"MCADIDX\x00" + bytes(200))  # formats 1 and 2 began so
    error = search_error(capsys, "query", path, "a red circle")
    assert re.search(rf"gallery\.mcadidx has an index format \(MCADIDX\) this mcad no longer reads; {REBUILD}", error)
    assert small_index(tmp_path) == path  # an index of ours, however old: replacing it is allowed


# --- empty_gallery --------------------------------------------------------------------------------------------------


def test_empty_gallery(saved_tiny_student, tmp_path, capsys):
    (tmp_path / "photos" / "trip").mkdir(parents=True)
    (tmp_path / "photos" / "notes.txt").write_text("no image here")
    before = snapshot(tmp_path)
    error = search_error(capsys, "index", tmp_path / "photos", "--model", saved_tiny_student, "--out",
                         tmp_path / "gallery.mcadidx")
    assert re.search(r"photos holds no image files \(searched recursively\); pass the gallery's folder\.$", error)
    assert snapshot(tmp_path) == before

    # An index of zero images: refused when made, and when read from a file.
    model = IndexModel("m", None, probe_embeddings=np.zeros((len(PROBE_TEXTS), 8), np.float32))
    with pytest.raises(UserError, match="An index needs at least one embedding"):
        GalleryIndex(np.zeros((0, 8), np.int8), np.zeros(0, np.float32), [], model)
    path = small_index(tmp_path)
    header, _ = read_index(path)
    empty = {"scales": np.zeros(0, np.float32), "id_offsets": np.zeros(1, np.int64), "id_bytes": np.zeros(0, np.uint8)}
    write_index(path, {**header, "count": 0}, empty)
    error = search_error(capsys, "query", path, "a red circle")
    assert re.search(rf"gallery\.mcadidx is inconsistent \(An index needs at least one embedding.*; {REBUILD}", error)


# --- nan_query_or_probe ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_text_student(saved_tiny_student, tmp_path_factory):
    """The tiny student with NaN in its text projection: images embed, texts come out NaN."""
    folder = tmp_path_factory.mktemp("nan_student") / "student"
    model = MCADModel.from_pretrained(saved_tiny_student)
    with torch.no_grad():
        model.text_projection.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    MCADProcessor.from_pretrained(saved_tiny_student).save_pretrained(folder)
    return folder


def test_nan_query_or_probe(nan_text_student, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    for number, image in enumerate(random_images(3, seed=6)):
        image.save(tmp_path / "photos" / f"{number}.png")
    output = small_index(tmp_path)  # an earlier index, kept
    before = snapshot(tmp_path)
    error = search_error(capsys, "index", tmp_path / "photos", "--model", nan_text_student, "--out", output)
    assert re.search(r"The text encoder of \S+student makes NaN or infinite embeddings \(of the probe texts .*\): its "
                     r"weights are broken\. Train or export the model again\.$", error), error
    assert snapshot(tmp_path) == before

    # An index whose probes hold NaN (a file written so), and a NaN query embedding (Python API).
    header, tensors = read_index(output)
    header["model"]["probe_embeddings"][0][0] = float("nan")
    write_index(output, header, tensors)
    error = search_error(capsys, "query", output, "a red circle")
    assert re.search(rf"gallery\.mcadidx is inconsistent \(The probe embeddings of the model student hold NaN or "
                     rf"infinite values.*rebuild the index\.\); {REBUILD}", error), error
    index = GalleryIndex.load(small_index(tmp_path, "other.mcadidx"))
    with pytest.raises(UserError, match="The query embeddings hold NaN or infinite values.*Export the model again"):
        index.search(np.full(index.dimension, np.nan, np.float32))


# --- batch_size_zero ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", ["0", "-1", "many"])
def test_batch_size_zero(batch_size, saved_tiny_student, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    random_images(1)[0].save(tmp_path / "photos" / "0.png")
    before = snapshot(tmp_path)
    error = search_error(capsys, "index", tmp_path / "photos", "--model", saved_tiny_student, "--out",
                         tmp_path / "gallery.mcadidx", "--batch-size", batch_size)
    assert error == f"mcad-search index: error: argument --batch-size: must be a positive integer, got '{batch_size}'"
    assert snapshot(tmp_path) == before
    with pytest.raises(SearchError, match=r"batch_size=0: pass a positive number of images .*--batch-size"):
        embed_gallery(tmp_path / "photos", saved_tiny_student, batch_size=0)


# --- dry_run_into_a_model_folder ------------------------------------------------------------------------------------


def test_dry_run_into_a_model_folder(exported_student, saved_tiny_student, tmp_path):
    run, student = tmp_path / "run", tmp_path / "run" / "student"
    shutil.copytree(exported_student[0], run / "export")
    shutil.copytree(saved_tiny_student, student)  # the trained student: config.json, model.safetensors, ...
    split = caption_split(12, seed=7)
    datasets.DatasetDict({name: split for name in ("train", "validation", "test")}).save_to_disk(tmp_path / "data")
    before = snapshot(student)
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_mcad.py"), "push", "--output_dir", str(run), "--dataset",
         str(tmp_path / "data"), "--repo_id", "mcad-tests/tiny-student", "--dry_run", str(student)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False,
    )
    assert completed.returncode == 2 and "Traceback" not in completed.stderr, completed.stderr[-3000:]
    error = completed.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"train_mcad\.py: error: dry_run={re.escape(str(student))} is not empty and is not an "
                        r"earlier dry run \(which holds exactly the files its \.mcad-dry-run\.json lists\), so it is "
                        r"not replaced: nothing was written\. Pass a new or empty folder \(--dry_run DIR\)\.", error)
    assert snapshot(student) == before


# --- teacher_repo_id_of_the_student, teacher_and_the_teachers_stage, teacher_that_cannot_be_fetched ----------------


def test_teacher_repo_id_of_the_student(exported_student, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(exported_student[0], run / "export")
    (run / "teacher").mkdir()
    (run / "teacher" / "config.json").write_text("{}")  # what the option checks before anything loads
    error = train_script_error(["push", "--output_dir", run, "--repo_id", "you/mcad", "--teacher_repo_id", "You/MCAD",
                                "--dry_run", tmp_path / "hub"], capsys, leaves_unchanged=tmp_path)
    assert error == ("teacher_repo_id and repo_id are both 'you/mcad': the teacher's files would replace the "
                     "student's. Give the teacher its own repository (e.g. you/mcad-teacher).")
    # A run distilling from a shared teacher did not make it: publishing it again would put another run's name on it.
    error = train_script_error(["push", "--output_dir", run, "--repo_id", "you/mcad", "--teacher_repo_id",
                                "you/mcad-teacher", "--teacher", run / "teacher", "--dry_run", tmp_path / "hub"],
                               capsys, leaves_unchanged=tmp_path)
    assert error.startswith("teacher_repo_id publishes the teacher this run trained, and this run distils from "
                            f"teacher={str(run / 'teacher')!r}")


def test_teacher_and_the_teachers_stage(tmp_path, capsys):
    (tmp_path / "shared_teacher").mkdir()
    error = train_script_error(["teachers", "--output_dir", tmp_path / "run", "--teacher", tmp_path / "shared_teacher"],
                               capsys, leaves_unchanged=tmp_path)
    assert error.startswith(f"teacher={str(tmp_path / 'shared_teacher')!r} names a saved teacher to distil from, "
                            "which the teachers stage does not make: leave the teachers stage out")


def test_teacher_that_cannot_be_fetched(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    error = train_script_error(["cache", "--output_dir", tmp_path / "run", "--teacher", "mcad-tests/no-such-teacher"],
                               capsys)
    assert error.startswith("teacher='mcad-tests/no-such-teacher' is neither a folder nor a Hub repository that could "
                            "be fetched (")
    assert error.endswith("Pass the folder of a saved MCADTeacher (e.g. OUTPUT/teacher of another run) or its Hub id, "
                          "with network access.")


def test_every_case_has_a_test():
    assert set(BAD_INPUT_CASES) <= {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
