import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_mcad import MCADModel, MCADProcessor
from modeling_mcad.search import (
    PROBE_TEXTS,
    CorruptIndexError,
    GalleryIndex,
    GallerySearch,
    IndexModel,
    IndexModelMismatchError,
    SearchError,
    TextQueryEncoder,
    build_index,
    main,
)

from .conftest import REPO_ROOT, random_images

LONG_QUERY = "a small red circle to the left of a large blue square " * 8


@pytest.fixture(scope="module")
def model_folder(saved_tiny_student, tmp_path_factory):
    """The tiny student's folder with its ONNX graphs (fp32 and int8), as an export folder holds them."""
    from modeling_mcad.export import export_onnx

    folder = tmp_path_factory.mktemp("search_model") / "student"
    shutil.copytree(saved_tiny_student, folder)
    export_onnx(MCADModel.from_pretrained(folder).eval(), MCADProcessor.from_pretrained(folder), folder / "onnx")
    return folder


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A folder of 12 images in two levels, plus a file that is not an image."""
    folder = tmp_path_factory.mktemp("gallery")
    (folder / "trip").mkdir()
    for number, image in enumerate(random_images(12, seed=3)):
        image.save(folder / ("trip" if number % 2 else ".") / f"photo {number:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def built_index(model_folder, gallery):
    """The gallery's index, beside the model folder: it records the model as `student`, and queries find it."""
    path = model_folder.parent / "gallery.mcadidx"
    return build_index(gallery, model_folder, path), path


def torch_scores(model_folder, texts, image_embeddings):
    """The fp32 torch path: get_text_features, normalised, against the gallery."""
    model, processor = MCADModel.from_pretrained(model_folder).eval(), MCADProcessor.from_pretrained(model_folder)
    with torch.no_grad():
        tokens = processor(text=texts, padding=True, truncation=True, return_tensors="pt")
        text = torch.nn.functional.normalize(model.get_text_features(**tokens), dim=-1).numpy()
    return text @ image_embeddings.T


def test_tokenizer_matches_the_transformers_tokenizer(model_folder):
    encoder = TextQueryEncoder(model_folder)
    processor = MCADProcessor.from_pretrained(model_folder)
    texts = ["A Red circle, LEFT of a blue square!", "héllo wörld — ünknown tokens ZZZ", "two\tstars\nabove",
             "a", LONG_QUERY]
    input_ids, attention_mask, truncated = encoder.tokenize(texts)
    reference = processor(text=texts, padding=True, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(input_ids, reference["input_ids"])
    np.testing.assert_array_equal(attention_mask, reference["attention_mask"])
    assert input_ids.shape[1] == processor.tokenizer.model_max_length
    assert truncated == [False, False, False, False, True]


def test_index_from_a_folder_ranks_as_the_torch_model_does(model_folder, gallery, built_index):
    index, path = built_index
    files = sorted(p.relative_to(gallery).as_posix() for p in gallery.rglob("*.png"))
    assert sorted(index.ids) == files and index.count == 12 and index.quantization == "int8"

    model, processor = MCADModel.from_pretrained(model_folder).eval(), MCADProcessor.from_pretrained(model_folder)
    from PIL import Image

    with torch.no_grad():
        pixels = processor(images=[Image.open(gallery / file) for file in index.ids], return_tensors="pt")
        exact = torch.nn.functional.normalize(model.get_image_features(**pixels), dim=-1).numpy()
    dequantized = index.codes.astype(np.float32) * index.scales[:, None]
    assert np.abs(dequantized - exact).max() <= 0.5 * index.scales.max() + 1e-6  # int8 rounding, nothing more

    query = "a small red circle to the left of a large blue square"
    result = GallerySearch(path).search(query, k=12)
    scores = dict(zip(index.ids, torch_scores(model_folder, [query], exact)[0]))
    # The int8 text encoder and the int8 index move scores by ~0.01, so only near-ties may change places.
    assert sorted(hit.id for hit in result.hits) == sorted(index.ids)
    assert all(abs(hit.score - scores[hit.id]) < 0.02 for hit in result.hits)
    assert scores[result.hits[0].id] > max(scores.values()) - 0.02
    assert [hit.score for hit in result.hits] == sorted((hit.score for hit in result.hits), reverse=True)


def test_search_finds_each_embedding_and_matches_exact_scores():
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((500, 24)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    model = IndexModel("m", "/nowhere", probe_embeddings=np.zeros((len(PROBE_TEXTS), 24), np.float32))
    for quantization, tolerance in (("int8", 0.02), ("fp16", 1e-3)):
        index = GalleryIndex.from_embeddings(embeddings, [f"image {i}" for i in range(500)], model, quantization)
        indices, scores = index.search(embeddings[:50], k=3)  # a batch of queries
        assert (indices[:, 0] == np.arange(50)).all()
        exact = embeddings[:50] @ embeddings.T
        np.testing.assert_allclose(scores, np.take_along_axis(exact, indices, axis=1), atol=tolerance)
        single_indices, single_scores = index.search(embeddings[7], k=600)  # k above the count: everything
        assert len(single_indices) == 500 and single_indices[0] == 7 and (np.diff(single_scores) <= 0).all()


@pytest.mark.parametrize("quantization", ["int8", "fp16"])
def test_tied_scores_come_lower_index_first(quantization):
    # Six embeddings with four entries of 0.5, overlapping by 0 to 4 entries: every score is computed exactly, so
    # copies of one embedding tie, and so do embeddings at the same overlap.
    distinct = np.zeros((6, 16), np.float32)
    for row in range(6):
        distinct[row, 2 * row : 2 * row + 4] = 0.5
    copies = np.random.default_rng(3).integers(0, 6, 40)  # 40 entries, each a copy of one of the six
    model = IndexModel("m", None, probe_embeddings=np.zeros((len(PROBE_TEXTS), 16), np.float32))
    index = GalleryIndex.from_embeddings(distinct[copies], [str(i) for i in range(40)], model, quantization)
    exact = distinct @ distinct[copies].T
    for query in range(6):
        expected = sorted(range(40), key=lambda i: (-exact[query, i], i))
        for k in (40, 11, 3, 1):  # everything, and cuts that fall inside groups of ties
            indices, _ = index.search(distinct[query], k=k)
            assert list(indices) == expected[:k], (query, k)
        indices, _ = index.search(distinct, k=40)  # a batch
        assert list(indices[query]) == expected


def test_index_round_trip_and_refusals(tmp_path):
    model = IndexModel("m", "/nowhere", probe_embeddings=np.ones((len(PROBE_TEXTS), 4), np.float32) / 2)
    ids = ["a/b.png", "été\nnewline.jpg", "3"]
    index = GalleryIndex.from_embeddings(np.eye(3, 4, dtype=np.float32), ids, model)
    path = index.save(tmp_path / "x.mcadidx")
    loaded = GalleryIndex.load(path)
    assert list(loaded.ids) == ids and loaded.ids[-1] == "3" and loaded.ids[1:] == ids[1:]
    assert (loaded.count, loaded.dimension, loaded.path) == (3, 4, path)
    # A model outside the index's folder is not recorded: the file names no folder but its own.
    assert (loaded.model.name, loaded.model.path, loaded.model.probe_texts) == ("m", None, PROBE_TEXTS)
    np.testing.assert_array_equal(loaded.codes, index.codes)
    np.testing.assert_array_equal(loaded.scales, index.scales)
    np.testing.assert_array_equal(loaded.model.probe_embeddings, model.probe_embeddings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.mcadidx"]  # no temporary left behind
    inside = IndexModel("m", str(tmp_path / "models" / "m"), probe_embeddings=model.probe_embeddings)
    moved = tmp_path / "moved"
    GalleryIndex(index.codes, index.scales, index.ids, inside).save(tmp_path / "y.mcadidx")
    assert str(tmp_path).encode() not in (tmp_path / "y.mcadidx").read_bytes()
    shutil.copytree(tmp_path, moved)  # the index and its model folder, moved together
    assert GalleryIndex.load(moved / "y.mcadidx").model.path == str(moved.resolve() / "models" / "m")

    photo = tmp_path / "photo.png"
    photo.write_bytes(b"precious")
    with pytest.raises(SearchError, match="photo.png exists and is not an mcad-search index"):
        index.save(photo)
    assert photo.read_bytes() == b"precious"
    with pytest.raises(ValueError, match="unique"):
        GalleryIndex.from_embeddings(np.eye(2, 4, dtype=np.float32), ["same", "same"], model)


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "header", "not_an_index", "empty"])
def test_damaged_index_is_refused_with_the_file_named(tmp_path, damage):
    model = IndexModel("m", "/nowhere", probe_embeddings=np.zeros((len(PROBE_TEXTS), 8), np.float32))
    path = GalleryIndex.from_embeddings(np.eye(5, 8, dtype=np.float32), list("abcde"), model).save(tmp_path / "i.idx")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-7]
    elif damage == "flip_payload":
        data[-30] ^= 0xFF
    elif damage == "header":
        data[20:24] = b"\xff\xfe{]"
    elif damage == "not_an_index":
        data = bytearray(b"\x89PNG\r\n\x1a\n" + bytes(100))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptIndexError, match=r"i\.idx.*(rebuild it|mcad-search index)"):
        GalleryIndex.load(path)


def test_index_from_another_model_is_refused(model_folder, built_index, tmp_path):
    index, _ = built_index
    rng = np.random.default_rng(1)
    other = IndexModel("other", str(model_folder), probe_embeddings=rng.standard_normal((3, index.dimension)))
    other.probe_embeddings[:] /= np.linalg.norm(other.probe_embeddings, axis=1, keepdims=True)
    foreign = GalleryIndex(index.codes, index.scales, index.ids, other, tmp_path / "foreign.mcadidx")
    with pytest.raises(IndexModelMismatchError, match=r"foreign\.mcadidx was built by another model.*cosine"):
        GallerySearch(foreign, model_folder)

    moved = IndexModel("moved", "/nowhere/student", probe_embeddings=index.model.probe_embeddings)
    with pytest.raises(SearchError, match=r"/nowhere/student, which is not there any more.*--model"):
        GallerySearch(GalleryIndex(index.codes, index.scales, index.ids, moved, tmp_path / "moved.mcadidx"))
    unrecorded = IndexModel("student", None, probe_embeddings=index.model.probe_embeddings)
    with pytest.raises(SearchError, match=r"does not record where its model is.*'student'.*--model DIR"):
        GallerySearch(GalleryIndex(index.codes, index.scales, index.ids, unrecorded, tmp_path / "far.mcadidx"))
    GallerySearch(GalleryIndex(index.codes, index.scales, index.ids, unrecorded), model_folder)  # given: it works

    narrow = IndexModel("narrow", str(model_folder), probe_embeddings=np.zeros((3, 16), np.float32))
    narrow_index = GalleryIndex.from_embeddings(np.eye(4, 16, dtype=np.float32), list("abcd"), narrow)
    with pytest.raises(IndexModelMismatchError, match=rf"16-dimensional.*makes {index.dimension}-dimensional"):
        GallerySearch(narrow_index, model_folder)


def test_bad_queries(built_index, caplog):
    _, path = built_index
    engine = GallerySearch(path)
    for query in ("", "   \n\t", "\u200b\x00"):
        with pytest.raises(SearchError, match="empty or only whitespace"):
            engine.search(query)
    with pytest.raises(SearchError, match="k=0"):
        engine.search("a red circle", k=0)
    with caplog.at_level(logging.WARNING, logger="modeling_mcad.search"):
        result = engine.search(LONG_QUERY, k=2)
    assert result.truncated and len(result.hits) == 2
    assert "truncated" in caplog.text
    assert not engine.search("a red circle", k=2).truncated


def test_bad_images_are_listed_and_nothing_is_written(model_folder, gallery, built_index, tmp_path):
    _, good_index = built_index
    photos = tmp_path / "photos"
    shutil.copytree(gallery, photos)
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    output = tmp_path / "index.mcadidx"
    shutil.copy(good_index, output)
    before = output.read_bytes()
    with pytest.raises(SearchError, match=r"(?s)1 image\(s\).*broken\.png.*skip_bad_images"):
        build_index(photos, model_folder, output)
    assert output.read_bytes() == before

    index = build_index(photos, model_folder, output, skip_bad_images=True, quantization="fp16")
    assert index.count == 12 and "broken.png" not in index.ids and index.quantization == "fp16"
    assert GalleryIndex.load(output).quantization == "fp16"


def test_an_index_names_no_folder_of_this_machine(model_folder, gallery, tmp_path, tmp_path_factory):
    path = tmp_path / "shared" / "gallery.mcadidx"
    index = build_index(gallery, model_folder, path)
    content = path.read_bytes()
    for needle in {str(model_folder), str(gallery), str(tmp_path), str(tmp_path_factory.getbasetemp()),
                   str(Path.home()), os.getcwd()}:
        assert needle.encode() not in content, needle
    loaded = GalleryIndex.load(path)
    assert (loaded.model.name, loaded.model.path) == ("student", None)
    assert loaded.model.weights_sha256 == index.model.weights_sha256
    result = GallerySearch(path, model_folder).search("a red circle", k=3)  # the model given: the probes check it
    assert len(result.hits) == 3


def test_index_from_a_dataset_split(model_folder, tmp_path):
    import datasets

    split = datasets.Dataset.from_dict({"image": random_images(5, seed=4), "name": [f"n{i}" for i in range(5)]})
    split = split.cast_column("image", datasets.Image())
    index = build_index(split, model_folder, tmp_path / "split.mcadidx", id_column="name")
    assert list(index.ids) == [f"n{i}" for i in range(5)]
    with pytest.raises(SearchError, match="no column 'caption'"):
        build_index(split, model_folder, tmp_path / "other.mcadidx", id_column="caption")
    assert not (tmp_path / "other.mcadidx").exists()


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modeling_mcad.search", *arguments], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)


@pytest.mark.parametrize("bug", [ValueError("a bug"), KeyError("a bug"), OSError("a bug")])
def test_a_bug_keeps_its_traceback(built_index, monkeypatch, bug):
    """Only a user's mistake (UserError) becomes `mcad-search: error:` and status 2; anything else propagates."""
    _, path = built_index

    def broken(self, query, k=5):
        raise bug

    monkeypatch.setattr(GallerySearch, "search", broken)
    with pytest.raises(type(bug), match="a bug"):
        main(["query", str(path), "a red circle"])


def test_query_imports_neither_torch_nor_transformers(built_index, tmp_path):
    """The query path, as the console script runs it, in a fresh process."""
    _, path = built_index
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from modeling_mcad.search import main
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            status = main(["query", {str(path)!r}, "a blue square above a red circle", "-k", "3", "--json"])
        heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "transformers"))
        print(json.dumps({{"status": status, "result": json.loads(output.getvalue()), "heavy": heavy}}))
    """)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["status"] == 0 and len(report["result"]["results"]) == 3
    assert report["result"]["truncated"] is False


def test_cli_errors_are_one_line_with_status_2(built_index, tmp_path):
    _, path = built_index
    plain = run_cli("query", str(path), "a red circle", "-k", "2")
    assert plain.returncode == 0 and len(plain.stdout.strip().splitlines()) == 2

    damaged = tmp_path / "damaged.mcadidx"
    damaged.write_bytes(path.read_bytes()[:-10])
    for arguments, message in (
        (("query", str(damaged), "a red circle"), "damaged.mcadidx is truncated or damaged"),
        (("query", str(path), "   "), "empty or only whitespace"),
        (("query", str(tmp_path / "missing.mcadidx"), "a red circle"), "No index file"),
        (("query", str(path), "a red circle", "--model", str(tmp_path)), "holds no tokenizer.json"),
        (("index", str(tmp_path / "no_such_dir"), "--model", str(tmp_path), "--out", str(tmp_path / "o")),
         "holds no config.json"),
    ):
        completed = run_cli(*arguments)
        assert completed.returncode == 2, completed.stderr
        assert "Traceback" not in completed.stderr and message in completed.stderr
        assert completed.stderr.strip().splitlines()[-1].startswith("mcad-search: error:")
    assert damaged.stat().st_size == path.stat().st_size - 10  # untouched

    long_query = run_cli("query", str(path), LONG_QUERY, "--json")
    assert long_query.returncode == 0 and "truncated" in long_query.stderr
    assert json.loads(long_query.stdout)["truncated"] is True
