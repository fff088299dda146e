import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import safetensors
import torch

from modeling_mcad import MCADModel, MCADProcessor, gallery_index
from modeling_mcad.gallery_scan import GROUP_SIZE, QUERY_CODE_MAX, QUERY_ZERO_POINT, quantize_queries, scan_graph
from modeling_mcad.search import (
    PROBE_TEXTS,
    CorruptIndexError,
    GalleryIndex,
    GallerySearch,
    IndexModel,
    IndexModelMismatchError,
    SearchError,
    TextQueryEncoder,
    add_to_index,
    build_index,
    main,
    remove_from_index,
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
    path = model_folder.parent / "gallery.index.safetensors"
    return build_index(gallery, model_folder, path), path


def torch_scores(model_folder, texts, image_embeddings):
    """The fp32 torch path: get_text_features, normalised, against the gallery."""
    model, processor = MCADModel.from_pretrained(model_folder).eval(), MCADProcessor.from_pretrained(model_folder)
    with torch.no_grad():
        tokens = processor(text=texts, padding=True, truncation=True, return_tensors="pt")
        text = torch.nn.functional.normalize(model.get_text_features(**tokens).pooler_output, dim=-1).numpy()
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
    assert sorted(index.ids) == files and index.count == 12

    model, processor = MCADModel.from_pretrained(model_folder).eval(), MCADProcessor.from_pretrained(model_folder)
    from PIL import Image

    with torch.no_grad():
        pixels = processor(images=[Image.open(gallery / file) for file in index.ids], return_tensors="pt")
        exact = torch.nn.functional.normalize(model.get_image_features(**pixels).pooler_output, dim=-1).numpy()
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
    index = GalleryIndex.from_embeddings(embeddings, [f"image {i}" for i in range(500)], model)
    indices, scores = index.search(embeddings[:50], k=3)  # a batch of queries
    assert (indices[:, 0] == np.arange(50)).all()
    exact = embeddings[:50] @ embeddings.T
    np.testing.assert_allclose(scores, np.take_along_axis(exact, indices, axis=1), atol=0.02)
    # Against the codes' own float32 scores the int8 scan (a two-level int8 query) is within 1e-4.
    dequantized = index.codes.astype(np.float32) * index.scales[:, None]
    np.testing.assert_allclose(scores, np.take_along_axis(embeddings[:50] @ dequantized.T, indices, axis=1), atol=1e-4)
    single_indices, single_scores = index.search(embeddings[7], k=600)  # k above the count: everything
    assert len(single_indices) == 500 and single_indices[0] == 7 and (np.diff(single_scores) <= 0).all()


@pytest.mark.parametrize("block_bytes", [1 << 24, 24 * 7])
def test_blocks_of_an_index_search_as_one(monkeypatch, tmp_path, block_bytes):
    """Galleries scanned in blocks (7 entries each here) rank as one block and as float32 search over the same
    codes; an index read from its file ranks as the one in memory."""
    rng = np.random.default_rng(5)
    embeddings = rng.standard_normal((100, 24)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    monkeypatch.setattr(gallery_index, "SCAN_BLOCK_BYTES", block_bytes)
    model = IndexModel("m", None, probe_embeddings=np.zeros((len(PROBE_TEXTS), 24), np.float32))
    index = GalleryIndex.from_embeddings(embeddings, [str(i) for i in range(100)], model)
    assert len(index.blocks) == (1 if block_bytes > 2400 else 15)
    loaded = GalleryIndex.load(index.save(tmp_path / "blocks.index.safetensors"))
    assert len(loaded.blocks) == len(index.blocks)
    queries = rng.standard_normal((30, 24)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    dequantized = index.codes.astype(np.float32) * index.scales[:, None]
    reference = np.argsort(-(queries @ dequantized.T), axis=1, kind="stable")[:, :10]
    for source in (index, loaded):
        indices, _ = source.search(queries, k=10)
        np.testing.assert_array_equal(indices, reference)
        np.testing.assert_array_equal(source.search(queries, k=10, num_threads=2)[0], reference)


def test_query_codes_cannot_saturate_and_rebuild_the_query():
    """The int8 kernels of CPUs without VNNI add pairs of u8 x s8 products in saturating int16: query codes stay
    within 7 bits of the zero point, and two levels of them give the query back to about 1e-4 of its largest value."""
    queries = np.random.default_rng(2).standard_normal((40, 96)).astype(np.float32)
    queries[0] = 0  # no division by zero
    codes, scales = quantize_queries(queries)
    assert codes.shape == (80, 96) and scales.shape == (40, 1, 2)  # linear in the batch
    centred = codes.astype(np.int32) - QUERY_ZERO_POINT
    assert np.abs(centred).max() <= QUERY_CODE_MAX and 2 * QUERY_CODE_MAX * 127 < 2**15
    rebuilt = (scales @ centred.reshape(40, 2, 96))[:, 0]
    assert np.abs(rebuilt - queries).max() <= 1e-4 * np.abs(queries).max()


@pytest.mark.parametrize("external", [False, True])
def test_the_scan_graph_is_valid_onnx(tmp_path, external):
    """The graph is written as protobuf bytes without onnx (a query process does not import it): onnx's checker
    reads it as the model it means."""
    import onnx

    codes, scales = np.arange(-6, 6, dtype=np.int8).reshape(3, 4), np.ones(4, np.float32)
    if external:
        (tmp_path / "data.bin").write_bytes(codes.tobytes() + scales.tobytes())
        blocks = [{"rows": 4, "codes": ("data.bin", 0, 12), "row_scales": ("data.bin", 12, 16)}]
    else:
        blocks = [{"rows": 4, "codes": codes.tobytes(), "row_scales": scales.tobytes()}]
    model = onnx.load_from_string(scan_graph(3, blocks * 2))  # two blocks
    if external:
        onnx.load_external_data_for_model(model, str(tmp_path))
    onnx.checker.check_model(model, full_check=True)
    assert [node.op_type for node in model.graph.node] == (
        ["MatMulInteger", "Cast", "Reshape", "MatMul", "Mul", "Pad", "Reshape", "ReduceMax", "Min", "TopK", "TopK",
         "Unsqueeze", "Expand", "GatherElements", "Reshape", "Min", "TopK", "Div", "Mod", "GatherElements", "Gather",
         "Add"] * 2
        + ["Concat", "Concat", "TopK", "GatherElements"])
    initializers = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    np.testing.assert_array_equal(initializers["codes_0"], codes)
    assert list(initializers["levels_shape_1"]) == [-1, 2, 4]  # negative int64s
    assert list(initializers["group_starts_1"]) == [4] and initializers["minus_infinity"] == -np.inf
    assert list(initializers["pads_1"]) == [0, 0, 0, 0, 0, GROUP_SIZE - 4]
    whole = np.zeros((3, GROUP_SIZE), np.int8).tobytes()  # blocks of whole groups: no padding, no -inf
    model = onnx.load_from_string(scan_graph(3, [{"rows": GROUP_SIZE, "codes": whole,
                                                  "row_scales": np.ones(GROUP_SIZE, np.float32).tobytes()}]))
    onnx.checker.check_model(model, full_check=True)
    assert "Pad" not in {node.op_type for node in model.graph.node}
    assert "minus_infinity" not in {tensor.name for tensor in model.graph.initializer}


@pytest.mark.parametrize("count, block_rows", [(40, None), (700, 150)])
def test_tied_scores_come_lower_index_first(monkeypatch, count, block_rows):
    # Six embeddings with four entries of 0.5, overlapping by 0 to 4 entries: every score is computed exactly, so
    # copies of one embedding tie, and so do embeddings at the same overlap. With 700 entries in blocks of 150, ties
    # fall across groups of the scan and across blocks, and blocks end in partial groups.
    if block_rows:
        monkeypatch.setattr(gallery_index, "SCAN_BLOCK_BYTES", 16 * block_rows)
    distinct = np.zeros((6, 16), np.float32)
    for row in range(6):
        distinct[row, 2 * row : 2 * row + 4] = 0.5
    copies = np.random.default_rng(3).integers(0, 6, count)  # each entry a copy of one of the six
    model = IndexModel("m", None, probe_embeddings=np.zeros((len(PROBE_TEXTS), 16), np.float32))
    index = GalleryIndex.from_embeddings(distinct[copies], [str(i) for i in range(count)], model)
    assert len(index.blocks) == (1 if block_rows is None else -(-count // block_rows))
    exact = distinct @ distinct[copies].T
    for query in range(6):
        expected = sorted(range(count), key=lambda i: (-exact[query, i], i))
        for k in (count, 130, 65, 11, 3, 1):  # everything, and cuts inside groups of ties, beyond one scan group
            indices, _ = index.search(distinct[query], k=min(k, count))
            assert list(indices) == expected[:k], (query, k)
        indices, _ = index.search(distinct, k=count)  # a batch
        assert list(indices[query]) == expected


def test_ties_across_scan_groups_go_to_the_lower_index():
    """The scan takes the groups of 64 entries with the best maxima: a tie between an entry of a group with a lower
    maximum and an entry of a later group with a higher one still goes to the lower index."""
    embeddings = np.tile(np.array([0, 1, 0, 0], np.float32), (192, 1))  # score 0
    embeddings[[0, 65]] = 0.5  # score 0.5, in groups 0 and 1
    embeddings[64] = [1, 0, 0, 0]  # score 1, in group 1
    model = IndexModel("m", None, probe_embeddings=np.zeros((len(PROBE_TEXTS), 4), np.float32))
    index = GalleryIndex.from_embeddings(embeddings, [str(i) for i in range(192)], model)
    query = np.array([1, 0, 0, 0], np.float32)
    assert list(index.search(query, k=3)[0]) == [64, 0, 65]
    assert list(index.search(query, k=2)[0]) == [64, 0]


def test_index_round_trip_and_refusals(tmp_path):
    model = IndexModel("m", "/nowhere", probe_embeddings=np.ones((len(PROBE_TEXTS), 4), np.float32) / 2)
    ids = ["a/b.png", "été\nnewline.jpg", "3"]
    index = GalleryIndex.from_embeddings(np.eye(3, 4, dtype=np.float32), ids, model)
    path = index.save(tmp_path / "x.index.safetensors")
    loaded = GalleryIndex.load(path)
    assert list(loaded.ids) == ids and loaded.ids[-1] == "3" and loaded.ids[1:] == ids[1:]
    assert (loaded.count, loaded.dimension, loaded.path) == (3, 4, path)
    # A model outside the index's folder is not recorded: the file names no folder but its own.
    assert (loaded.model.name, loaded.model.path, loaded.model.probe_texts) == ("m", None, PROBE_TEXTS)
    np.testing.assert_array_equal(loaded.codes, index.codes)
    np.testing.assert_array_equal(loaded.scales, index.scales)
    np.testing.assert_array_equal(loaded.model.probe_embeddings, model.probe_embeddings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.index.safetensors"]  # no temporary left behind
    with safetensors.safe_open(path, "numpy") as reader:  # a plain safetensors file to other tools
        assert sorted(reader.keys()) == ["codes.00000", "id_bytes", "id_offsets", "scales"]
        np.testing.assert_array_equal(reader.get_tensor("codes.00000").T, index.codes)
        assert json.loads(reader.metadata()["mcad_search_index"])["count"] == 3
    inside = IndexModel("m", str(tmp_path / "models" / "m"), probe_embeddings=model.probe_embeddings)
    moved = tmp_path / "moved"
    GalleryIndex(index.codes, index.scales, index.ids, inside).save(tmp_path / "y.index.safetensors")
    assert str(tmp_path).encode() not in (tmp_path / "y.index.safetensors").read_bytes()
    shutil.copytree(tmp_path, moved)  # the index and its model folder, moved together
    assert GalleryIndex.load(moved / "y.index.safetensors").model.path == str(moved.resolve() / "models" / "m")

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
    foreign = GalleryIndex(index.codes, index.scales, index.ids, other, tmp_path / "foreign.index.safetensors")
    with pytest.raises(IndexModelMismatchError, match=r"foreign\.index.safetensors was built by another model.*cosine"):
        GallerySearch(foreign, model_folder)

    moved = IndexModel("moved", "/nowhere/student", probe_embeddings=index.model.probe_embeddings)
    with pytest.raises(SearchError, match=r"/nowhere/student, which is not there any more.*--model"):
        GallerySearch(GalleryIndex(index.codes, index.scales, index.ids, moved, tmp_path / "moved.index.safetensors"))
    unrecorded = IndexModel("student", None, probe_embeddings=index.model.probe_embeddings)
    with pytest.raises(SearchError, match=r"does not record where its model is.*'student'.*--model DIR"):
        GallerySearch(GalleryIndex(index.codes, index.scales, index.ids, unrecorded, tmp_path / "far.idx"))
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
    output = tmp_path / "index.index.safetensors"
    shutil.copy(good_index, output)
    before = output.read_bytes()
    with pytest.raises(SearchError, match=r"(?s)1 image\(s\).*broken\.png.*skip_bad_images"):
        build_index(photos, model_folder, output)
    assert output.read_bytes() == before

    index = build_index(photos, model_folder, output, skip_bad_images=True)
    assert index.count == 12 and "broken.png" not in index.ids
    assert sorted(GalleryIndex.load(output).ids) == sorted(index.ids)


def test_an_index_names_no_folder_of_this_machine(model_folder, gallery, tmp_path, tmp_path_factory):
    path = tmp_path / "shared" / "gallery.index.safetensors"
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
    index = build_index(split, model_folder, tmp_path / "split.index.safetensors", id_column="name")
    assert list(index.ids) == [f"n{i}" for i in range(5)]
    with pytest.raises(SearchError, match="no column 'caption'"):
        build_index(split, model_folder, tmp_path / "other.index.safetensors", id_column="caption")
    assert not (tmp_path / "other.index.safetensors").exists()


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

    damaged = tmp_path / "damaged.index.safetensors"
    damaged.write_bytes(path.read_bytes()[:-10])
    for arguments, message in (
        (("query", str(damaged), "a red circle"), "damaged.index.safetensors is truncated or damaged"),
        (("query", str(path), "   "), "empty or only whitespace"),
        (("query", str(tmp_path / "missing.index.safetensors"), "a red circle"), "No index file"),
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


def test_a_gallery_grows_and_shrinks_without_re_embedding(model_folder, gallery, built_index, tmp_path, monkeypatch,
                                                          caplog):
    from modeling_mcad import data

    _, original = built_index
    path = tmp_path / "photos.index.safetensors"
    shutil.copy(original, path)
    photos = tmp_path / "photos"
    shutil.copytree(gallery, photos)
    for number, image in enumerate(random_images(3, seed=8)):
        image.save(photos / f"new {number}.png")
    opened, open_image = [], data.open_image

    def counting_open_image(value, *args, **kwargs):
        if isinstance(value, (str, os.PathLike)):  # the gallery's files (the processor opens decoded images too)
            opened.append(value)
        return open_image(value, *args, **kwargs)

    monkeypatch.setattr(data, "open_image", counting_open_image)
    before = GalleryIndex.load(path)
    old_codes = dict(zip(before.ids, np.array(before.codes)))

    grown = add_to_index(path, photos, model_folder)
    assert sorted(Path(value).name for value in opened) == ["new 0.png", "new 1.png", "new 2.png"]  # only the new
    assert grown.count == 15 and len(set(grown.ids)) == 15
    loaded = GalleryIndex.load(path)
    assert all((loaded.codes[i] == old_codes[value]).all() for i, value in enumerate(loaded.ids) if value in old_codes)
    assert GallerySearch(path, model_folder).search("a red circle", k=15).hits[-1].id in loaded.ids
    content, opened[:] = path.read_bytes(), []
    with caplog.at_level(logging.INFO, logger="modeling_mcad.search"):
        add_to_index(path, photos, model_folder)  # nothing new: nothing embedded, nothing written
    assert opened == [] and path.read_bytes() == content and "Nothing to add" in caplog.text
    with pytest.raises(SearchError, match=r"1 id\(s\) are already in the index .*\['new 0.png'\].*remove them first"):
        loaded.add(np.eye(1, loaded.dimension, dtype=np.float32), ["new 0.png"])

    shrunk = remove_from_index(path, ["new 1.png", "trip/photo 01.png"])
    assert shrunk.count == 13 and "new 1.png" not in GalleryIndex.load(path).ids
    content = path.read_bytes()
    with pytest.raises(SearchError, match=r"1 id\(s\) are not in the index .*\['no such photo'\]"):
        remove_from_index(path, ["new 0.png", "no such photo"])
    assert path.read_bytes() == content

    # Embeddings of another model are refused before any image is embedded.
    rng = np.random.default_rng(4)
    probes = rng.standard_normal(loaded.model.probe_embeddings.shape).astype(np.float32)
    other = IndexModel("other", None, probe_embeddings=probes / np.linalg.norm(probes, axis=1, keepdims=True))
    GalleryIndex(loaded.codes, loaded.scales, loaded.ids, other).save(path)
    (photos / "new 3.png").write_bytes((photos / "new 0.png").read_bytes())
    with pytest.raises(IndexModelMismatchError, match="not the model the index was built with"):
        add_to_index(path, photos, model_folder)
    assert opened == []


def test_an_interrupted_update_leaves_the_previous_index(built_index, tmp_path, monkeypatch):
    from modeling_mcad import utils

    _, original = built_index
    path = tmp_path / "photos.index.safetensors"
    shutil.copy(original, path)
    content = path.read_bytes()

    def interrupted(source, destination):
        raise KeyboardInterrupt

    monkeypatch.setattr(utils.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        remove_from_index(path, [GalleryIndex.load(path).ids[0]])
    assert path.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_cli_updates_and_exports_an_index(model_folder, gallery, built_index, tmp_path, capsys):
    _, original = built_index
    path = tmp_path / "photos.index.safetensors"
    shutil.copy(original, path)
    photos = tmp_path / "photos"
    photos.mkdir()
    random_images(1, seed=9)[0].save(photos / "extra.png")
    assert main(["add", str(path), str(photos), "--model", str(model_folder)]) == 0
    assert main(["remove", str(path), "trip/photo 03.png"]) == 0
    assert main(["remove", str(path), "trip/photo 03.png"]) == 2
    assert "are not in the index" in capsys.readouterr().err

    index = GalleryIndex.load(path)
    assert index.count == 12 and "extra.png" in index.ids and "trip/photo 03.png" not in index.ids
    assert main(["export", str(path), "--out", str(tmp_path / "photos.parquet")]) == 0
    table = pq.read_table(tmp_path / "photos.parquet")
    assert table.column("id").to_pylist() == list(index.ids)
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist(), np.float32), index.embeddings())
    assert json.loads(table.schema.metadata[b"mcad_search_index"])["model"] == "student"
    note = tmp_path / "notes.txt"
    note.write_text("precious")
    assert main(["export", str(path), "--out", str(note)]) == 2
    assert "is not a Parquet file, so it is not replaced" in capsys.readouterr().err and note.read_text() == "precious"


def test_index_files_others_and_odd_inputs(tmp_path, monkeypatch):
    """Files that are not indexes are never replaced; links, a changed working folder, float64 scales, a string of
    ids, empty and mis-shaped inputs are handled or refused by name."""
    model = IndexModel("m", None, probe_embeddings=np.zeros((len(PROBE_TEXTS), 8), np.float32))
    embeddings = np.eye(12, 8, dtype=np.float32)[[*range(8), 0, 1, 2, 3]] + 0.01
    index = GalleryIndex.from_embeddings(embeddings, [str(i) for i in range(12)], model)
    small = tmp_path / "small.parquet"
    index.to_parquet(small)  # its footer names mcad_search_index
    note = tmp_path / "note.md"
    note.write_text("an index header starts with mcad_search_index, and this is a note")
    for other in (small, note):
        before = other.read_bytes()
        with pytest.raises(SearchError, match="exists and is not an mcad-search index, so it is not replaced"):
            index.save(other)
        assert other.read_bytes() == before

    real = index.save(tmp_path / "real" / "gallery.index.safetensors")
    link = tmp_path / "link.index.safetensors"
    link.symlink_to(real)
    monkeypatch.chdir(tmp_path / "real")
    relative = GalleryIndex.load("gallery.index.safetensors")
    monkeypatch.chdir(tmp_path)
    for loaded in (GalleryIndex.load(link), relative):  # a link elsewhere; a relative path, then another cwd
        assert list(loaded.search(embeddings[3], k=2)[0]) == [3, 11]
    index.remove(["0"]).save(link)  # through the link: the file it points to is replaced, the link stays
    assert link.is_symlink() and GalleryIndex.load(real).count == 11

    wide = GalleryIndex(index.codes, index.scales.astype(np.float64), index.ids, model)
    assert list(wide.search(embeddings[5], k=1)[0]) == [5]
    with pytest.raises(SearchError, match=r"remove takes a list of ids, not the string '11'.*pass \['11'\]"):
        index.remove("11")
    with pytest.raises(SearchError, match=r"shape \(dimension,\) or \(batch >= 1, dimension\).*got \(0, 8\)"):
        index.search(np.zeros((0, 8), np.float32))
    with pytest.raises(SearchError, match=r"holds 8-dimensional embeddings; the ones to add have shape \(1, 4\)"):
        index.add(np.ones((1, 4), np.float32), ["new"])
    with pytest.raises(SearchError, match="dimension 0"):
        GalleryIndex(np.zeros((3, 0), np.int8), np.ones(3, np.float32), list("abc"),
                     IndexModel("m", None, probe_embeddings=np.zeros((len(PROBE_TEXTS), 0), np.float32)))
    # A batch of queries costs what its queries cost one by one (the query scales grow with the batch, not its square).
    batch = np.repeat(embeddings, 100, axis=0)
    np.testing.assert_array_equal(index.search(batch, k=3)[0][::100], index.search(embeddings, k=3)[0])


def test_adding_to_an_index_of_other_probe_texts_and_from_a_split(model_folder, built_index, tmp_path):
    """An index records its own probe texts; a model is compared with it on those. A split needs ids to add."""
    import datasets

    index, _ = built_index
    texts = ("a photo", "three blue circles")
    probes = IndexModel.from_model_dir(model_folder, probe_texts=texts)
    assert probes.probe_texts == texts and probes.probe_embeddings.shape == (2, index.dimension)
    path = GalleryIndex(index.codes, index.scales, index.ids, probes).save(tmp_path / "other.index.safetensors")
    split = datasets.Dataset.from_dict({"image": random_images(2, seed=12), "name": ["x", "y"]})
    split = split.cast_column("image", datasets.Image())
    with pytest.raises(SearchError, match="pass id_column= naming a column of unique ids"):
        add_to_index(path, split, model_folder)
    assert add_to_index(path, split, model_folder, id_column="name").count == index.count + 2


def test_a_clip_checkpoint_indexes_as_a_student_and_other_dual_encoders_are_refused(gallery, tmp_path):
    """A CLIPModel folder holds a student's weights (DESIGN §7.2), so it indexes as one; a dual encoder whose towers
    the student cannot use is refused with its reason, not a traceback."""
    from PIL import Image
    from transformers import VisionTextDualEncoderConfig

    from .test_teachers import tiny_clip

    clip, processor = tiny_clip()
    clip_folder = tmp_path / "clip"
    clip.save_pretrained(clip_folder)
    processor.save_pretrained(clip_folder)
    index = build_index(gallery, clip_folder, tmp_path / "clip.index.safetensors")
    pixels = processor(images=[Image.open(gallery / path) for path in index.ids], return_tensors="pt")
    with torch.no_grad():
        expected = torch.nn.functional.normalize(clip.get_image_features(**pixels).pooler_output, dim=-1).numpy()
    assert np.abs(index.codes.astype(np.float32) * index.scales[:, None] - expected).max() <= 0.5 * index.scales.max()

    foreign = tmp_path / "xlm"
    VisionTextDualEncoderConfig(vision_config={"model_type": "vit"}, text_config={"model_type": "xlm-roberta"}) \
        .save_pretrained(foreign)
    completed = run_cli("index", str(gallery), "--model", str(foreign), "--out", str(tmp_path / "xlm.index"))
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert "holds a 'vision-text-dual-encoder' model that is not an MCAD student" in completed.stderr
    assert "'xlm-roberta', which the MCAD student cannot use as a tower" in completed.stderr
