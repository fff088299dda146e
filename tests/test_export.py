"""Export: every variant is written, measured against fp32 torch, and refused when it loses recall."""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper

from modeling_mcad import MCADModel, MCADProcessor
from modeling_mcad.errors import UserError
from modeling_mcad.evaluation import retrieval_metrics
from modeling_mcad.export import (
    PARITY_NOISE_SIGMAS,
    VARIANT_FILES,
    EvalInputs,
    ParityError,
    export_variants,
    measure_parity,
    recall_at_1_change,
    variant_paths,
)

from .conftest import caption_split

TEXTS = ["a red circle", "a small blue square left of a large green star", "two", "a purple triangle right of a star"]


def torch_embeddings(model, processor, texts, images):
    """The fp32 student's L2-normalised embeddings, as its forward computes them."""
    tokens = processor(text=list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        text_embeds = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds
        image_embeds = model(**processor(images=list(images), return_tensors="pt")).image_embeds
    return text_embeds, image_embeds


def test_export_writes_every_variant_and_its_measured_parity(exported_student, retrieval_student):
    folder, report = exported_student
    student_folder, split = retrieval_student
    variants = report["variants"]
    assert json.loads((folder / "parity.json").read_text()) == report
    assert list(variants)[:4] == ["torch-fp32", "torch-fp16", "onnx-fp32", "onnx-int8"]
    for name, variant in variants.items():
        assert variant["files"] == list(VARIANT_FILES[name])
        assert variant["size_bytes"] == sum((folder / file).stat().st_size for file in variant["files"])
    # fp16 halves the weights; int8 shrinks the ONNX graphs; the fp32 config keeps its dtype.
    assert 0.45 < variants["torch-fp16"]["size_bytes"] / variants["torch-fp32"]["size_bytes"] < 0.55
    assert variants["onnx-int8"]["size_bytes"] < variants["onnx-fp32"]["size_bytes"]
    # int8 where onnxruntime gains from it: the matmuls, not the patch convolution (ConvInteger runs slower).
    for path in variant_paths(folder, "onnx-int8"):
        op_types = {node.op_type for node in onnx.load(path).graph.node}
        assert "MatMulInteger" in op_types and "ConvInteger" not in op_types, path.name
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"

    # The reference metrics are the trained student's own, far above chance (2.5%), so a lossy variant would show.
    model = MCADModel.from_pretrained(student_folder).eval()
    processor = MCADProcessor.from_pretrained(student_folder)
    captions = [caption for row in split["captions"] for caption in row]
    text_embeds, image_embeds = torch_embeddings(model, processor, captions, list(split["image"]))
    expected = retrieval_metrics(image_embeds, text_embeds, [i for i in range(len(split)) for _ in range(2)])
    reference = variants["torch-fp32"]["metrics"]
    assert reference == pytest.approx({key: float(value) for key, value in expected.items()}, abs=1e-4)
    assert reference["t2i_r1"] > 25 and reference["i2t_r1"] > 25

    floors = {"torch-fp16": 0.999, "onnx-fp32": 0.99999, "onnx-int8": 0.99, "onnx-joint-fp32": 0.99999,
              "onnx-joint-int8": 0.99, "executorch-xnnpack": 0.99999}
    for name, floor in floors.items():
        if name not in variants:
            continue
        variant = variants[name]
        assert min(variant["image_cosine"]["min"], variant["text_cosine"]["min"]) >= floor, name
        change = {key: variant["metrics"][key] - reference[key] for key in variant["recall_change"]}
        assert variant["recall_change"] == pytest.approx(change)
        assert variant["r1_drop"] == pytest.approx(max(-change["i2t_r1"], -change["t2i_r1"]))
        for direction in ("i2t", "t2i"):
            allowed = report["max_r1_drop"] + PARITY_NOISE_SIGMAS * variant["r1_drop_se"][direction]
            assert variant["r1_drop_allowed"][direction] == pytest.approx(allowed)
            assert -change[f"{direction}_r1"] <= allowed, (name, direction)
        assert variant["passed"]


def test_onnx_graphs_take_ids_and_mask_with_dynamic_axes_and_match_torch(exported_student):
    folder, _ = exported_student
    model = MCADModel.from_pretrained(folder).eval()
    processor = MCADProcessor.from_pretrained(folder)
    sessions = {name: onnxruntime.InferenceSession(str(folder / "onnx" / f"{name}.onnx"))
                for name in ("text_model", "vision_model", "text_model_quantized", "vision_model_quantized")}
    assert [i.name for i in sessions["text_model"].get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sessions["text_model"].get_outputs()] == ["text_embeds"]
    assert [i.name for i in sessions["vision_model"].get_inputs()] == ["pixel_values"]
    assert [o.name for o in sessions["vision_model"].get_outputs()] == ["image_embeds"]

    longest = " ".join(["circle"] * 30)  # 32 tokens with [CLS] and [SEP]: the text tower's limit
    images = list(caption_split(5, seed=3)["image"])
    for texts, image_count in ((TEXTS[:1], 1), (TEXTS + [longest], 5)):  # batch 1 and 5; 3 to 32 tokens, padded
        text_embeds, image_embeds = torch_embeddings(model, processor, texts, images[:image_count])
        tokens = processor(text=texts, padding=True, return_tensors="np")
        text_feed = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        image_feed = {"pixel_values": processor(images=images[:image_count], return_tensors="np")["pixel_values"]}
        for suffix, tolerance in (("", 1e-5), ("_quantized", None)):
            onnx_text = sessions[f"text_model{suffix}"].run(None, text_feed)[0]
            onnx_image = sessions[f"vision_model{suffix}"].run(None, image_feed)[0]
            assert onnx_text.shape == tuple(text_embeds.shape) and onnx_image.shape == tuple(image_embeds.shape)
            np.testing.assert_allclose(np.linalg.norm(onnx_text, axis=-1), 1, atol=1e-5)  # normalised in the graph
            if tolerance:
                np.testing.assert_allclose(onnx_text, text_embeds.numpy(), atol=tolerance)
                np.testing.assert_allclose(onnx_image, image_embeds.numpy(), atol=tolerance)
            else:  # int8 weights: compare directions
                assert (onnx_text * text_embeds.numpy()).sum(-1).min() > 0.99
                assert (onnx_image * image_embeds.numpy()).sum(-1).min() > 0.99


def test_the_joint_graph_is_clip_models_forward(exported_student):
    """onnx/model.onnx: CLIPModel's input and output names, text and image batches of their own sizes, and the
    logits of the torch model (the scaled similarities), as transformers.js's CLIP pipelines read them."""
    folder, _ = exported_student
    model, processor = MCADModel.from_pretrained(folder).eval(), MCADProcessor.from_pretrained(folder)
    images = list(caption_split(5, seed=3)["image"])
    for suffix, tolerance in (("", 1e-4), ("_quantized", 0.5)):
        session = onnxruntime.InferenceSession(str(folder / "onnx" / f"model{suffix}.onnx"))
        assert [i.name for i in session.get_inputs()] == ["input_ids", "pixel_values", "attention_mask"]
        assert [o.name for o in session.get_outputs()] == ["logits_per_image", "logits_per_text", "text_embeds",
                                                         "image_embeds"]
        for texts, image_count in ((TEXTS, 1), (TEXTS[:1], 5), (TEXTS[:3], 3)):
            inputs = processor(text=texts, images=images[:image_count], padding=True, return_tensors="np")
            outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {
                "input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"],
                "attention_mask": inputs["attention_mask"]})))
            with torch.no_grad():
                expected = model(**processor(text=texts, images=images[:image_count], padding=True,
                                             return_tensors="pt"))
            assert outputs["logits_per_image"].shape == (image_count, len(texts))
            np.testing.assert_allclose(outputs["logits_per_text"], outputs["logits_per_image"].T)
            np.testing.assert_allclose(outputs["logits_per_image"], expected.logits_per_image.numpy(), atol=tolerance)


def test_executorch_programs_match_torch(exported_student):
    pytest.importorskip("executorch", reason="ExecuTorch is the optional `executorch` extra")
    from modeling_mcad.export import ExecutorchEncoders

    folder, report = exported_student
    assert "executorch-xnnpack" in report["variants"]
    model = MCADModel.from_pretrained(folder).eval()
    processor = MCADProcessor.from_pretrained(folder)
    images = list(caption_split(3, seed=4)["image"])
    text_embeds, image_embeds = torch_embeddings(model, processor, TEXTS, images)
    tokens = processor(text=TEXTS, padding=True, return_tensors="np")
    runner = ExecutorchEncoders(*variant_paths(folder, "executorch-xnnpack"))
    np.testing.assert_allclose(runner.encode_texts(tokens["input_ids"], tokens["attention_mask"]), text_embeds.numpy(),
                               atol=1e-5)
    pixel_values = processor(images=images, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(runner.encode_images(pixel_values), image_embeds.numpy(), atol=1e-5)


def one_bit_quantizer(real_quantize_dynamic):
    """A quantizer that keeps only each weight's sign (times the tensor's mean magnitude): what a broken int8 path
    could do to a model, and what the parity gate must catch."""

    def quantize(model_input, model_output, **kwargs):
        graph = onnx.load(model_input)
        for index, initializer in enumerate(graph.graph.initializer):
            weights = numpy_helper.to_array(initializer)
            if weights.dtype == np.float32 and weights.ndim == 2:
                binary = np.sign(weights) * np.abs(weights).mean()
                graph.graph.initializer[index].CopyFrom(numpy_helper.from_array(binary.astype(np.float32),
                                                                                initializer.name))
        onnx.save(graph, model_output)
        real_quantize_dynamic(model_output, model_output, **kwargs)

    return quantize


def test_a_variant_that_loses_recall_fails_the_export_and_writes_nothing(retrieval_student, tmp_path, monkeypatch):
    import onnxruntime.quantization

    folder, split = retrieval_student
    output = tmp_path / "export"
    output.mkdir()
    (output / "parity.json").write_text("{}")  # an earlier export
    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic",
                        one_bit_quantizer(onnxruntime.quantization.quantize_dynamic))
    refusal = r"onnx-int8 lost [\d.]+ (i2t|t2i) Recall@1 points .* max_r1_drop=5.0"
    with pytest.raises(ParityError, match=refusal) as error:
        export_variants(folder, output, eval_split=split, max_r1_drop=5.0, latency_batch_sizes=())
    variants = error.value.report["variants"]
    int8 = variants["onnx-int8"]
    assert not int8["passed"]
    assert any(-int8["recall_change"][f"{direction}_r1"] > 5.0 + PARITY_NOISE_SIGMAS * int8["r1_drop_se"][direction]
               for direction in ("i2t", "t2i"))
    assert variants["onnx-fp32"]["passed"] and variants["torch-fp16"]["passed"]
    assert [path.name for path in output.iterdir()] == ["parity.json"]  # the old folder, untouched
    assert [path.name for path in tmp_path.iterdir()] == ["export"]  # no temporary folder left behind


def test_bad_arguments_are_refused_before_any_work(retrieval_student, tmp_path):
    folder, split = retrieval_student
    with pytest.raises(ValueError, match="no column .*'captions'.*caption_column="):
        export_variants(folder, tmp_path / "a", eval_split=split.rename_column("captions", "text"))
    with pytest.raises(ValueError, match="max_r1_drop must be >= 0"):
        export_variants(folder, tmp_path / "b", eval_split=split, max_r1_drop=-1)
    with pytest.raises(UserError, match="no config.json"):
        export_variants(tmp_path, tmp_path / "c", eval_split=split)
    with pytest.raises(ValueError, match="inside model_dir=.* or contains it"):
        export_variants(folder, folder / "export", eval_split=split)
    with pytest.raises(ValueError, match="inside model_dir=.* or contains it"):
        export_variants(folder, folder.parent, eval_split=split)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.md").write_text("precious")
    with pytest.raises(ValueError, match="not an earlier export"):
        export_variants(folder, tmp_path / "results", eval_split=split)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results"]
    assert (tmp_path / "results" / "table.md").read_text() == "precious"


def test_exporting_in_place_keeps_other_files_and_drops_stale_outputs(exported_student, retrieval_student, tmp_path):
    import shutil

    exported, _ = exported_student
    _, split = retrieval_student
    folder = tmp_path / "student"
    shutil.copytree(exported, folder)
    (folder / "notes.txt").write_text("kept")
    (folder / "README.md").write_text("a card describing the previous variants")
    (folder / "examples").mkdir()
    (folder / "examples" / "0.png").write_bytes(b"stale")
    report = export_variants(folder, eval_split=split.select(range(20)), max_r1_drop=10.0, latency_batch_sizes=())
    files = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    assert "notes.txt" in files and not {"README.md", "examples/0.png"} & files
    assert not any(name.startswith("executorch/") for name in files)  # not asked for this time
    assert json.loads((folder / "parity.json").read_text()) == report and report["eval_split"]["images"] == 20


def test_latency_is_measured_per_runner_text_and_image_and_batch_size():
    import time

    from modeling_mcad.export import measure_latency, prepare_eval_inputs

    class SleepingRunner:
        """Takes `seconds` per call and records the batch sizes it was given."""

        def __init__(self, seconds):
            self.seconds, self.batches = seconds, set()

        def encode_texts(self, input_ids, attention_mask):
            assert input_ids.shape == attention_mask.shape
            self.batches.add(("text", len(input_ids)))
            time.sleep(self.seconds)

        def encode_images(self, pixel_values):
            self.batches.add(("image", len(pixel_values)))
            time.sleep(2 * self.seconds)

    inputs = prepare_eval_inputs(caption_split(4, seed=5), MCADProcessor.from_preset("tiny"), batch_size=2)
    runners = {"fast": SleepingRunner(0.002), "slow": SleepingRunner(0.02)}
    latency = measure_latency(runners, inputs, batch_sizes=(1, 8), rounds=2, min_calls=2, min_seconds=0,
                              pause_seconds=0)
    assert runners["fast"].batches == runners["slow"].batches == {("text", 1), ("image", 1), ("text", 8), ("image", 8)}
    for name, seconds in (("fast", 0.002), ("slow", 0.02)):
        assert set(latency[name]) == {"text_b1", "image_b1", "text_b8", "image_b8"}
        assert latency[name]["text_b8"] >= 1000 * seconds and latency[name]["image_b1"] >= 2000 * seconds
    assert all(latency["slow"][key] > latency["fast"][key] + 10 for key in latency["fast"])


def test_recall_at_1_change_is_the_mean_flip_with_its_paired_standard_error():
    # Four queries: unchanged, right -> wrong, wrong -> right, right -> wrong.
    change, standard_error = recall_at_1_change(np.array([1, 1, 2, 1]), np.array([1, 3, 1, 2]))
    flips = np.array([0.0, -1.0, 1.0, -1.0])
    assert change == pytest.approx(-25.0)
    assert standard_error == pytest.approx(100 * flips.std() / 2)
    assert recall_at_1_change(np.array([1, 2, 1]), np.array([1, 2, 1])) == (0.0, 0.0)


class FixedEmbeddings:
    """A runner whose 'pixels' and 'input ids' are row indices into fixed embeddings."""

    def __init__(self, images: np.ndarray, texts: np.ndarray):
        self.images, self.texts = images, texts

    def encode_images(self, pixel_values):
        return self.images[pixel_values[:, 0]]

    def encode_texts(self, input_ids, attention_mask):
        return self.texts[input_ids[:, 0]]


def test_the_parity_gate_fails_a_drop_beyond_the_splits_noise_and_passes_one_within_it():
    size = 100
    inputs = EvalInputs([np.arange(size)[:, None]], [(np.arange(size)[:, None], np.ones((size, 1), np.int64))],
                        list(range(size)))
    exact = np.eye(size, dtype=np.float32)  # image i and caption i: every query right at 1

    def swapped(pairs: int) -> FixedEmbeddings:
        """The reference with the captions of the first `pairs` pairs of images exchanged: 2 · pairs queries wrong."""
        order = np.arange(size)
        order[: 2 * pairs] = order[: 2 * pairs].reshape(pairs, 2)[:, ::-1].reshape(-1)
        return FixedEmbeddings(exact, exact[order])

    results = measure_parity(FixedEmbeddings(exact, exact), {"near": swapped(1), "broken": swapped(15)}, inputs,
                             max_r1_drop=1.0)
    # Two of 100 queries flipped: a 2-point drop, but 2 standard errors are 2.8 points on this split.
    assert results["near"]["r1_drop"] == pytest.approx(2.0)
    assert results["near"]["r1_drop_se"]["i2t"] == pytest.approx(100 * np.sqrt(0.02 - 0.02**2) / 10)
    assert results["near"]["passed"]
    assert results["broken"]["r1_drop"] == pytest.approx(30.0) and not results["broken"]["passed"]
    assert results["torch-fp32"]["passed"] and results["torch-fp32"]["r1_drop"] == 0.0
