"""Deployable variants of a trained MCAD student, each checked against fp32 torch before it may ship.

`export_variants` turns a saved student folder into the folder that lands on the Hub:

    model.safetensors              fp32 (save_pretrained): loads as CLIPModel, or MCADModel with trust_remote_code
    model.fp16.safetensors         fp16 (`variant="fp16"`)
    onnx/text_model.onnx           text encoder:  input_ids, attention_mask (int64) -> text_embeds
    onnx/vision_model.onnx         image encoder: pixel_values (float32)           -> image_embeds
    onnx/model.onnx                both encoders and the scaled similarities in one graph, with CLIPModel's
                                   input and output names: what transformers.js's CLIP pipelines run
    onnx/*_quantized.onnx          int8 MatMul weights, per channel (onnxruntime dynamic quantization;
                                   transformers.js naming)
    executorch/*.pte               both encoders lowered to XNNPACK (optional: `pip install executorch`)
    parity.json                    every variant against fp32 torch on an evaluation split
    modules.json, sentence_bert_config.json, config_sentence_transformers.json
                                   `SentenceTransformer(folder)` embeds texts and images (its CLIP route)

Every encoder graph outputs the *L2-normalised* projected embedding, so a torch-free query runtime only needs a dot
product. Batch and sequence axes are dynamic (ExecuTorch programs: batch at most `EXECUTORCH_MAX_BATCH`).

Why not torch's own int8 (`torch.ao` dynamic quantization, torchao) or optimum (DESIGN §8.3): barely faster here,
not serialisable with save_pretrained, or downgrading transformers.
"""

import copy
import json
import logging
import os
import shutil
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Through the package, which registers the auto classes (save_pretrained then writes the remote code).
from . import MCADModel, MCADProcessor
from .errors import UserError
from .evaluation import flatten_captions, metrics_from_ranks, retrieval_ranks
from .utils import atomic_directory, atomic_write_text, progress

logger = logging.getLogger(__name__)

ONNX_DIR = "onnx"
EXECUTORCH_DIR = "executorch"
PARITY_FILE = "parity.json"
FP16_VARIANT = "fp16"
# ExecuTorch plans memory ahead of time, so its dynamic batch axis needs an upper bound.
EXECUTORCH_MAX_BATCH = 64
# Variant name -> files, relative to the export folder. The reference variant comes first.
VARIANT_FILES = {
    "torch-fp32": ("model.safetensors",),
    "torch-fp16": (f"model.{FP16_VARIANT}.safetensors",),
    "onnx-fp32": (f"{ONNX_DIR}/text_model.onnx", f"{ONNX_DIR}/vision_model.onnx"),
    "onnx-int8": (f"{ONNX_DIR}/text_model_quantized.onnx", f"{ONNX_DIR}/vision_model_quantized.onnx"),
    "onnx-joint-fp32": (f"{ONNX_DIR}/model.onnx",),
    "onnx-joint-int8": (f"{ONNX_DIR}/model_quantized.onnx",),
    "executorch-xnnpack": (f"{EXECUTORCH_DIR}/text_model.pte", f"{EXECUTORCH_DIR}/vision_model.pte"),
}
REFERENCE_VARIANT = "torch-fp32"
# Files of the model card (`hub.render_model_card`), which describes the variants.
CARD_FILES = ("README.md", "recall.png", "examples")
# sentence-transformers' files for a CLIP-style model: one Transformer module at the folder's root, embedding texts and
# images with get_text_features / get_image_features (their `pooler_output`), compared by cosine.
SENTENCE_TRANSFORMERS_FILES = {
    "modules.json": [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
    ],
    "sentence_bert_config.json": {
        "transformer_task": "feature-extraction",
        "modality_config": {
            "text": {"method": "get_text_features", "method_output_name": "pooler_output"},
            "image": {"method": "get_image_features", "method_output_name": "pooler_output"},
        },
        "module_output_name": "sentence_embedding",
    },
    "config_sentence_transformers.json": {
        "model_type": "SentenceTransformer", "prompts": {"query": "", "document": ""}, "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    },
}
# Outputs of an earlier export that must not survive into a new one: variants would ship unchecked, and a card
# would describe the old ones.
_EXPORT_OUTPUTS = (ONNX_DIR, EXECUTORCH_DIR, PARITY_FILE, f"model.{FP16_VARIANT}.safetensors", *CARD_FILES,
                   *SENTENCE_TRANSFORMERS_FILES)
RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
# How `quantize_dynamic` makes the int8 graphs (docs/experiments/2026-12-01-int8-recipe.md). MatMul only:
# onnxruntime's CPU ConvInteger runs the patch convolution slower than fp32 Conv (the `mobile` image encoder: 5.7
# against 3.1 ms at batch 1), and an int8 Gather (the embedding tables) saves bytes but no time. Per-channel weight
# scales: on nine trained `shapes` students (4000 validation images) they halved the mean image->text R@1 loss (0.14
# against 0.30) at the same speed.
QUANTIZED_OP_TYPES = ["MatMul"]
QUANTIZE_PER_CHANNEL = True
# The parity gate allows for the evaluation split's own noise: a variant fails only when its Recall@1 drop exceeds
# `max_r1_drop` by more than this many paired standard errors. On near-duplicate captions, perturbations the size of
# int8's (cosine 0.9993) move image->text R@1 on 1000 images by ±0.7 points from one student to the next.
PARITY_NOISE_SIGMAS = 2.0


def variant_paths(folder: str | os.PathLike, variant: str) -> list[Path]:
    """The files of a variant (a key of `VARIANT_FILES`) in an export folder."""
    return [Path(folder) / file for file in VARIANT_FILES[variant]]


class ParityError(UserError):
    """A variant lost more Recall@1 than allowed; `report` holds every variant's measurements."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class TextEncoder(nn.Module):
    """`get_text_features`, L2-normalised: the graph a query runtime runs. BERT-like towers fill token_type_ids
    with zeros themselves, so the graph takes ids and mask only."""

    def __init__(self, model: MCADModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
                           .pooler_output, dim=-1)


class VisionEncoder(nn.Module):
    """`get_image_features`, L2-normalised."""

    def __init__(self, model: MCADModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)


class JointModel(nn.Module):
    """Both encoders and the scaled similarities, as `CLIPModel`'s forward: inputs `input_ids`, `pixel_values`,
    `attention_mask`; outputs `logits_per_image`, `logits_per_text`, `text_embeds`, `image_embeds` (normalised)."""

    output_names = ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds")

    def __init__(self, model: MCADModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor):
        outputs = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
        return tuple(outputs[name] for name in self.output_names)


def _example_inputs(model: MCADModel, processor: MCADProcessor) -> tuple[dict, dict]:
    """Inputs to trace with: batch 2 and several tokens, since torch.export specialises axes of size 0 or 1."""
    text = processor(text=["a photo", "a small red circle to the left of a large blue square"], padding=True,
                     return_tensors="pt")
    vision = model.config.vision_config
    pixels = torch.zeros(2, vision.num_channels, vision.image_size, vision.image_size)
    return ({"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}, {"pixel_values": pixels})


def _dynamic_shapes(model: MCADModel, max_batch: int | None = None) -> tuple[dict, dict]:
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch", min=1)
    sequence = torch.export.Dim("sequence", min=1, max=model.config.text_config.max_position_embeddings)
    text = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
    return text, {"pixel_values": {0: batch}}


def export_onnx(model: MCADModel, processor: MCADProcessor, output_dir: str | os.PathLike) -> dict[str, Path]:
    """
    Export the text and the image encoder as two ONNX graphs, and for a CLIP student (`is_clip_student`) both in one
    graph with `CLIPModel`'s names (`JointModel`, for transformers.js), with the torch.export-based exporter (one
    self-contained file each), and their int8 versions.

    Args:
        model ([`MCADModel`]): the fp32 student.
        processor ([`MCADProcessor`]): its processor (example inputs are made with it).
        output_dir (`str` or `os.PathLike`): where `text_model.onnx`, `vision_model.onnx`, `model.onnx` and their
            `*_quantized.onnx` versions are written.

    Returns:
        `dict[str, Path]`: `{"text_model": ..., "vision_model": ..., "model": ...}` and each one's
        `"*_quantized"` version.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text_inputs, vision_inputs = _example_inputs(model, processor)
    text_shapes, vision_shapes = _dynamic_shapes(model)
    # The joint graph's two batch axes are distinct: its example has 3 images against 2 texts, since the exporter
    # gives axes of equal example size one symbol. Its shapes are listed in the order of its inputs: the exporter
    # names the axes by position, and in another order it named the image axis after the texts'.
    joint_inputs = {"input_ids": text_inputs["input_ids"], "pixel_values": vision_inputs["pixel_values"][[0, 1, 1]],
                    "attention_mask": text_inputs["attention_mask"]}
    joint_shapes = {"input_ids": text_shapes["input_ids"], "pixel_values": {0: torch.export.Dim("image_batch", min=1)},
                    "attention_mask": text_shapes["attention_mask"]}
    graphs = {
        "text_model": (TextEncoder(model), text_inputs, text_shapes, ["text_embeds"]),
        "vision_model": (VisionEncoder(model), vision_inputs, vision_shapes, ["image_embeds"]),
    }
    if is_clip_student(model):  # only transformers.js reads the joint graph, and only for CLIP's model type
        graphs["model"] = (JointModel(model), joint_inputs, joint_shapes, list(JointModel.output_names))
    paths = {}
    for name, (encoder, inputs, shapes, output_names) in graphs.items():
        paths[name] = output_dir / f"{name}.onnx"
        program = torch.onnx.export(
            encoder.eval(),  # the exporter keeps the wrapper's mode: in train mode dropout would be exported
            kwargs=inputs,
            input_names=list(inputs),
            output_names=output_names,
            dynamic_shapes=shapes,
            dynamo=True,
            verbose=False,
        )
        # The exporter records each node's Python stack trace, whose file paths are this machine's: a published
        # graph must not carry them (the int8 graph, made from this file, then carries none either).
        for node in program.model.graph.all_nodes():
            node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)
        program.save(paths[name], external_data=False)  # one file per graph: what transformers.js, onnxruntime-web use
        paths[f"{name}_quantized"] = output_dir / f"{name}_quantized.onnx"
        quantize_dynamic(paths[name], paths[f"{name}_quantized"], weight_type=QuantType.QInt8,
                         op_types_to_quantize=QUANTIZED_OP_TYPES, per_channel=QUANTIZE_PER_CHANNEL)
    return paths


def export_executorch(model: MCADModel, processor: MCADProcessor, output_dir: str | os.PathLike) -> dict[str, Path]:
    """
    Lower the text and the image encoder to ExecuTorch programs for phones (XNNPACK backend, fp32), batch axis
    dynamic up to `EXECUTORCH_MAX_BATCH`, sequence axis up to the text tower's positions.

    Needs the optional `executorch` package (`pip install mcad[executorch]`).

    Args:
        model ([`MCADModel`]): the fp32 student.
        processor ([`MCADProcessor`]): its processor (example inputs are made with it).
        output_dir (`str` or `os.PathLike`): where `text_model.pte` and `vision_model.pte` are written.

    Returns:
        `dict[str, Path]`: `{"text_model": ..., "vision_model": ...}`.
    """
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as error:
        raise ImportError(
            "ExecuTorch export needs the optional `executorch` package: pip install 'mcad[executorch]' "
            "(or pip install executorch==1.5.1), or export without executorch=True."
        ) from error

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text_inputs, vision_inputs = _example_inputs(model, processor)
    text_shapes, vision_shapes = _dynamic_shapes(model, max_batch=EXECUTORCH_MAX_BATCH)
    paths = {}
    for name, encoder, inputs, shapes in (
        ("text_model", TextEncoder(model), text_inputs, text_shapes),
        ("vision_model", VisionEncoder(model), vision_inputs, vision_shapes),
    ):
        program = torch.export.export(encoder.eval(), args=(), kwargs=inputs, dynamic_shapes=shapes)
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
        paths[name] = output_dir / f"{name}.pte"
        paths[name].write_bytes(lowered.buffer)
    return paths


# --- runners: one interface over torch, onnxruntime and ExecuTorch, numpy in and out ---------------------------


class TorchEncoders:
    """Runs the student in torch (in its own dtype) through the same wrappers that are exported."""

    def __init__(self, model: MCADModel):
        self.dtype = model.dtype
        self.text, self.vision = TextEncoder(model).eval(), VisionEncoder(model).eval()

    @torch.inference_mode()
    def encode_texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.text(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).float().numpy()

    @torch.inference_mode()
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.vision(torch.from_numpy(pixel_values).to(self.dtype)).float().numpy()


def is_clip_student(model: MCADModel) -> bool:
    """Whether the student saves as a `CLIPModel` (two CLIP towers): the joint graph (transformers.js) and
    sentence-transformers' files are written for such students only, the clients that read them knowing no other."""
    return model.config.plain_model_type() == "clip"


def _cpu_session(path: str | os.PathLike, num_threads: int | None = None):
    """An onnxruntime session of a graph on the CPU, with `num_threads` intra-op threads (default: onnxruntime's)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEncoders:
    """Runs the two ONNX graphs with onnxruntime on the CPU."""

    def __init__(self, text_path: str | os.PathLike, vision_path: str | os.PathLike, num_threads: int | None = None):
        self.text = _cpu_session(text_path, num_threads)
        self.vision = _cpu_session(vision_path, num_threads)

    def encode_texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.text.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.vision.run(None, {"pixel_values": pixel_values})[0]


class JointOnnxEncoders:
    """Runs the joint graph (`JointModel`) with onnxruntime on the CPU, one modality at a time: the other input is a
    single placeholder (one black image, or one empty text) whose embedding is discarded."""

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        self.session = _cpu_session(path, num_threads)
        image_input = next(node for node in self.session.get_inputs() if node.name == "pixel_values")
        image_shape = [dimension if isinstance(dimension, int) else 1 for dimension in image_input.shape]
        self.placeholder_image = np.zeros(image_shape, dtype=np.float32)
        self.placeholder_text = np.ones((1, 1), dtype=np.int64)

    def encode_texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._run("text_embeds", input_ids, self.placeholder_image, attention_mask)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._run("image_embeds", self.placeholder_text, pixel_values, self.placeholder_text)

    def _run(self, output: str, input_ids, pixel_values, attention_mask) -> np.ndarray:
        feeds = {"input_ids": input_ids, "pixel_values": pixel_values, "attention_mask": attention_mask}
        return self.session.run([output], feeds)[0]


class ExecutorchEncoders:
    """Runs the two ExecuTorch programs with the ExecuTorch runtime's Python bindings."""

    def __init__(self, text_path: str | os.PathLike, vision_path: str | os.PathLike):
        from executorch.runtime import Runtime

        runtime = Runtime.get()
        self.text = runtime.load_program(str(text_path)).load_method("forward")
        self.vision = runtime.load_program(str(vision_path)).load_method("forward")

    def encode_texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return _in_chunks(self.text, input_ids, attention_mask)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return _in_chunks(self.vision, pixel_values)


def _in_chunks(method, *arrays: np.ndarray) -> np.ndarray:
    """Run an ExecuTorch method over batches of at most `EXECUTORCH_MAX_BATCH` rows."""
    outputs = []
    for start in range(0, len(arrays[0]), EXECUTORCH_MAX_BATCH):
        chunk = [torch.from_numpy(array[start : start + EXECUTORCH_MAX_BATCH]) for array in arrays]
        outputs.append(method.execute(chunk)[0].numpy())
    return np.concatenate(outputs)


# --- the evaluation split, encoded once per variant --------------------------------------------------------------


@dataclass
class EvalInputs:
    """An evaluation split prepared once by the processor: numpy batches every runner accepts."""

    pixel_batches: list[np.ndarray]
    text_batches: list[tuple[np.ndarray, np.ndarray]]
    text_to_image: list[int]

    @property
    def num_images(self) -> int:
        return sum(len(batch) for batch in self.pixel_batches)

    @property
    def num_texts(self) -> int:
        return len(self.text_to_image)

    def images(self, count: int) -> np.ndarray:
        """The first `count` images, repeated if the split has fewer."""
        pixels = np.concatenate(self.pixel_batches)
        return np.resize(pixels, (count, *pixels.shape[1:]))

    def texts(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `count` captions of the first text batch, repeated if it has fewer."""
        input_ids, attention_mask = self.text_batches[0]
        shape = (count, input_ids.shape[1])
        return np.resize(input_ids, shape), np.resize(attention_mask, shape)


def prepare_eval_inputs(
    split,
    processor: MCADProcessor,
    batch_size: int = 64,
    image_column: str = "image",
    caption_column: str = "captions",
) -> EvalInputs:
    """
    Run the processor over an evaluation split once.

    Args:
        split (`datasets.Dataset`): one row per image, with an image column (PIL images) and a caption column
            (a list of captions per image, or one caption).
        processor ([`MCADProcessor`]): the student's processor.
        batch_size (`int`): images (and, separately, captions) per batch.
        image_column (`str`), caption_column (`str`): the column names.
    """
    if image_column not in split.column_names:
        raise UserError(f"The evaluation split has no column {image_column!r} (it has {split.column_names}); "
                        "pass image_column= naming its image column.")
    if len(split) == 0:
        raise UserError("The evaluation split is empty; parity needs at least a few images with captions.")
    captions, text_to_image = flatten_captions(split, caption_column)
    pixel_batches = [
        processor(images=split[start : start + batch_size][image_column], return_tensors="np")["pixel_values"]
        .astype(np.float32)
        for start in range(0, len(split), batch_size)
    ]
    text_batches = []
    for start in range(0, len(captions), batch_size):
        encoded = processor(text=captions[start : start + batch_size], padding=True, truncation=True,
                            return_tensors="np")
        text_batches.append((encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)))
    return EvalInputs(pixel_batches, text_batches, text_to_image)


def encode_split(encoders, inputs: EvalInputs) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings of the whole split, `(num_images, dim)` and `(num_texts, dim)`."""
    images = np.concatenate([encoders.encode_images(batch) for batch in inputs.pixel_batches])
    texts = np.concatenate([encoders.encode_texts(ids, mask) for ids, mask in inputs.text_batches])
    return images, texts


def _cosine_summary(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    cosine = (reference * candidate).sum(axis=-1) / (
        np.linalg.norm(reference, axis=-1) * np.linalg.norm(candidate, axis=-1)
    )
    return {"min": float(cosine.min()), "mean": float(cosine.mean())}


def recall_at_1_change(reference_ranks: np.ndarray, ranks: np.ndarray) -> tuple[float, float]:
    """
    The Recall@1 change (percentage points) from the reference's ranks to a variant's over the same queries, and
    its paired standard error: each query contributes +1 (now right), −1 (now wrong) or 0, so only the queries whose
    top-1 flipped carry noise. Queries count as independent (an image's captions too); population standard
    deviation.
    """
    flips = (np.asarray(ranks) == 1).astype(np.float64) - (np.asarray(reference_ranks) == 1)
    return 100.0 * float(flips.mean()), 100.0 * float(flips.std() / np.sqrt(len(flips)))


def _r1_losses(recall_change: Mapping[str, float], allowed: Mapping[str, float]) -> dict[str, float]:
    """The retrieval directions whose Recall@1 drop exceeds the drop allowed there, with the drop."""
    drops = {direction: 0.0 - recall_change[f"{direction}_r1"] for direction in allowed}  # 0.0 -: never -0.0
    return {direction: drop for direction, drop in drops.items() if drop > allowed[direction]}


def measure_parity(reference, candidates: Mapping[str, object], inputs: EvalInputs, max_r1_drop: float = 1.0) -> dict:
    """
    Compare each candidate runner with the reference on an evaluation split.

    A variant passes unless it loses more than `max_r1_drop` Recall@1 in either direction beyond the split's noise:
    it fails when `drop > max_r1_drop + PARITY_NOISE_SIGMAS · standard error` (`r1_drop_allowed`), the standard
    error being the paired one of `recall_at_1_change`. A broken variant (tens of points) fails on any split; a
    small split cannot fail a variant for a point of near-tie flips — and lets a larger drop through: with every
    flip a loss, 1.8 points on 1000 queries and 2.2 on 500 pass `max_r1_drop=1`.

    Args:
        reference: the fp32 torch runner (`TorchEncoders`).
        candidates (`Mapping[str, runner]`): variant name -> runner (`TorchEncoders`, `OnnxEncoders`,
            `ExecutorchEncoders`).
        inputs ([`EvalInputs`]): the prepared split.
        max_r1_drop (`float`): the most Recall@1 (percentage points, in either retrieval direction) a variant may
            lose beyond the split's noise.

    Returns:
        `dict`: variant name -> `{"image_cosine": {"min", "mean"}, "text_cosine": {...}, "metrics": {...},
        "recall_change": {...}, "r1_drop": float (the worse direction's), "r1_drop_se": {"i2t", "t2i"},
        "r1_drop_allowed": {"i2t", "t2i"}, "passed": bool}`; the reference comes first, with itself as reference.
    """
    runners = {REFERENCE_VARIANT: reference, **candidates}
    embeddings = {name: encode_split(runner, inputs) for name, runner in runners.items()}
    reference_images, reference_texts = embeddings[REFERENCE_VARIANT]
    reference_ranks = retrieval_ranks(reference_images, reference_texts, inputs.text_to_image)
    reference_metrics = metrics_from_ranks(*reference_ranks)
    results = {}
    for name, (images, texts) in embeddings.items():
        ranks = retrieval_ranks(images, texts, inputs.text_to_image)
        metrics = metrics_from_ranks(*ranks)
        recall_change = {key: metrics[key] - reference_metrics[key] for key in RECALL_KEYS}
        standard_errors = {direction: recall_at_1_change(before, after)[1]
                           for direction, before, after in zip(("i2t", "t2i"), reference_ranks, ranks)}
        allowed = {direction: max_r1_drop + PARITY_NOISE_SIGMAS * se for direction, se in standard_errors.items()}
        results[name] = {
            "image_cosine": _cosine_summary(reference_images, images),
            "text_cosine": _cosine_summary(reference_texts, texts),
            "metrics": metrics,
            "recall_change": recall_change,
            "r1_drop": 0.0 - min(recall_change["i2t_r1"], recall_change["t2i_r1"]),
            "r1_drop_se": standard_errors,
            "r1_drop_allowed": allowed,
            "passed": not _r1_losses(recall_change, allowed),
        }
    return results


def measure_latency(
    runners: Mapping[str, object],
    inputs: EvalInputs,
    batch_sizes: Iterable[int] = (1, 32),
    rounds: int = 3,
    min_calls: int = 5,
    min_seconds: float = 0.3,
    pause_seconds: float = 0.2,
) -> dict[str, dict[str, float]]:
    """
    Median wall-clock latency in milliseconds of one text batch and one image batch of each size, per runner.

    The runners take turns in `rounds` blocks of calls, so that load from other processes on a shared machine
    spreads over all of them and their ratios hold even when the absolute figures drift. Blocks rather than
    single calls, each after a short pause and two untimed calls: runtimes keep their worker threads spinning for
    a while after a call, and on a small CPU spinning threads of one runtime slow the next one badly.

    Args:
        runners (`Mapping[str, runner]`): variant name -> runner.
        inputs ([`EvalInputs`]): the texts and images to time with (the split's first ones, repeated if needed).
        batch_sizes (`Iterable[int]`): batch sizes to time.
        rounds (`int`): blocks per runner and measurement.
        min_calls (`int`), min_seconds (`float`): each block times at least this many calls and seconds.
        pause_seconds (`float`): the pause before each block.

    Returns:
        `dict[str, dict[str, float]]`: variant -> `{"text_b1": ..., "image_b1": ..., "text_b32": ..., ...}`.
    """
    latency = {name: {} for name in runners}
    for batch_size in batch_sizes:
        input_ids, attention_mask = inputs.texts(batch_size)
        pixel_values = inputs.images(batch_size)
        calls = {
            f"text_b{batch_size}": lambda runner: runner.encode_texts(input_ids, attention_mask),
            f"image_b{batch_size}": lambda runner: runner.encode_images(pixel_values),
        }
        for key, call in calls.items():
            timings = {name: [] for name in runners}
            for _ in range(rounds):
                for name, runner in runners.items():
                    time.sleep(pause_seconds)
                    call(runner)
                    call(runner)
                    block, started = [], time.perf_counter()
                    while len(block) < min_calls or time.perf_counter() - started < min_seconds:
                        start = time.perf_counter()
                        call(runner)
                        block.append(time.perf_counter() - start)
                    timings[name] += block
            for name in runners:
                latency[name][key] = 1000 * statistics.median(timings[name])
    return latency


def _check_output_dir(model_dir: Path, output_dir: Path) -> None:
    """The export replaces `output_dir` as a whole: refuse a folder whose loss would hurt."""
    source, target = model_dir.resolve(), output_dir.resolve()
    if target == source:
        return
    if source in target.parents or target in source.parents:
        raise UserError(
            f"output_dir={output_dir} is inside model_dir={model_dir} or contains it, and the export replaces "
            "output_dir as a whole: choose a separate folder, or model_dir itself."
        )
    if target.is_dir() and any(target.iterdir()) and not (target / PARITY_FILE).is_file():
        raise UserError(
            f"output_dir={output_dir} is not empty and holds no {PARITY_FILE}, so it is not an earlier export; "
            "the export would replace it as a whole. Choose a new or empty folder."
        )


def export_variants(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    eval_split,
    max_r1_drop: float = 1.0,
    executorch: bool = False,
    batch_size: int = 64,
    latency_batch_sizes: Sequence[int] = (1, 32),
    num_threads: int | None = None,
    image_column: str = "image",
    caption_column: str = "captions",
) -> dict:
    """
    Write every deployable variant of a saved student, measure each against fp32 torch, and refuse to ship one
    that loses retrieval quality.

    The output folder gets the fp32 student (save_pretrained, with its processor and code),
    `model.fp16.safetensors`, `onnx/{text,vision}_model.onnx`, for a CLIP student the joint `onnx/model.onnx`, and
    their `*_quantized.onnx` int8 versions, `executorch/*.pte` when asked, sentence-transformers' files for a CLIP
    student, and `parity.json` (this function's return value). Other files already in `model_dir` are kept, except
    the outputs of an earlier export and its model card, which would describe other variants. The output folder is
    replaced as a whole and atomically: if any step fails — including a variant losing more than `max_r1_drop`
    Recall@1 beyond the split's noise (`measure_parity`) — it is left exactly as it was. So it must be
    `model_dir`, a new or empty folder, or an earlier export (it holds `parity.json`).

    Args:
        model_dir (`str` or `os.PathLike`): a folder written by `MCADModel.save_pretrained` and
            `MCADProcessor.save_pretrained`.
        output_dir (`str` or `os.PathLike`, *optional*): where the export goes; defaults to `model_dir` itself.
        eval_split (`datasets.Dataset`): images and captions to measure parity on (one row per image, an image
            column and a list-of-captions column), e.g. the run's validation split.
        max_r1_drop (`float`, defaults to 1.0): the most Recall@1 (percentage points, image->text or
            text->image) a variant may lose against fp32 torch beyond `PARITY_NOISE_SIGMAS` paired standard errors
            of the change; more raises [`ParityError`].
        executorch (`bool`, defaults to `False`): also lower both encoders to ExecuTorch (needs `executorch`).
        batch_size (`int`, defaults to 64): batch size for encoding the split.
        latency_batch_sizes (`Sequence[int]`, defaults to `(1, 32)`): batch sizes to time each variant at
            (CPU, median ms); `()` skips timing.
        num_threads (`int`, *optional*): CPU threads for torch and onnxruntime while timing (default: torch's
            current setting). ExecuTorch's XNNPACK picks its own thread count.
        image_column (`str`), caption_column (`str`): column names of `eval_split`.

    Returns:
        `dict`: the parity report also saved as `parity.json`: `reference`, `embeddings` ("l2-normalised"),
        `eval_split` sizes, `max_r1_drop`, `noise_sigmas`, `num_threads`, and per variant its `files`, `size_bytes`,
        cosine summaries, metrics, `recall_change`, `r1_drop`, `r1_drop_se`, `r1_drop_allowed`, `passed` and
        `latency_ms`.

    Raises:
        `ParityError`: a variant lost more than `max_r1_drop` Recall@1 beyond the split's noise; its `report`
            attribute holds all figures.
    """
    model_dir = Path(model_dir)
    output_dir = Path(output_dir) if output_dir is not None else model_dir
    if not (model_dir / "config.json").is_file():
        raise UserError(
            f"{model_dir} holds no config.json: pass the folder written by the distill stage "
            "(MCADModel.save_pretrained + MCADProcessor.save_pretrained)."
        )
    if max_r1_drop < 0:
        raise UserError(f"max_r1_drop must be >= 0 Recall@1 points, got {max_r1_drop}.")
    _check_output_dir(model_dir, output_dir)
    model = MCADModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = MCADProcessor.from_pretrained(model_dir)
    inputs = prepare_eval_inputs(
        eval_split, processor, batch_size,
        image_column=image_column, caption_column=caption_column,
    )
    num_threads = num_threads or torch.get_num_threads()
    phases = progress(total=4 + executorch, desc="export")

    with atomic_directory(output_dir) as staging:
        shutil.copytree(model_dir, staging, dirs_exist_ok=True)
        for stale in _EXPORT_OUTPUTS:
            if (staging / stale).is_dir():
                shutil.rmtree(staging / stale)
            else:
                (staging / stale).unlink(missing_ok=True)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if is_clip_student(model):  # sentence-transformers' route needs no custom code then
            for name, content in SENTENCE_TRANSFORMERS_FILES.items():
                atomic_write_text(staging / name, json.dumps(content, indent=2) + "\n")
        # Saved with a copy: save_pretrained also rewrites config.json, whose dtype must stay float32, so the fp32
        # save above comes first and the config is restored after.
        config_text = (staging / "config.json").read_text()
        copy.deepcopy(model).half().save_pretrained(staging, variant=FP16_VARIANT)
        atomic_write_text(staging / "config.json", config_text)
        phases.update()
        logger.info("Exporting ONNX graphs to %s", staging / ONNX_DIR)
        export_onnx(model, processor, staging / ONNX_DIR)
        phases.update()
        if executorch:
            logger.info("Lowering to ExecuTorch (XNNPACK) in %s", staging / EXECUTORCH_DIR)
            export_executorch(model, processor, staging / EXECUTORCH_DIR)
            phases.update()

        reference = TorchEncoders(model)
        fp16_model = MCADModel.from_pretrained(staging, variant=FP16_VARIANT, dtype=torch.float16).eval()
        candidates = {
            "torch-fp16": TorchEncoders(fp16_model),
            "onnx-fp32": OnnxEncoders(*variant_paths(staging, "onnx-fp32"), num_threads=num_threads),
            "onnx-int8": OnnxEncoders(*variant_paths(staging, "onnx-int8"), num_threads=num_threads),
        }
        if is_clip_student(model):
            for name in ("onnx-joint-fp32", "onnx-joint-int8"):
                candidates[name] = JointOnnxEncoders(*variant_paths(staging, name), num_threads=num_threads)
        if executorch:
            candidates["executorch-xnnpack"] = ExecutorchEncoders(*variant_paths(staging, "executorch-xnnpack"))
        logger.info("Measuring parity of %s on %d images / %d captions", ", ".join(candidates), inputs.num_images,
                    inputs.num_texts)
        variants = measure_parity(reference, candidates, inputs, max_r1_drop)
        phases.update()
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            latency = measure_latency({REFERENCE_VARIANT: reference, **candidates}, inputs, latency_batch_sizes)
        finally:
            torch.set_num_threads(previous_threads)
        phases.update()
        phases.close()
        for name in variants:
            files = list(VARIANT_FILES[name])
            variants[name] = {
                "files": files,
                "size_bytes": sum((staging / file).stat().st_size for file in files),
                **variants[name],
                "latency_ms": latency[name],
            }

        report = {
            "reference": REFERENCE_VARIANT,
            "embeddings": "l2-normalised",
            "eval_split": {"images": inputs.num_images, "texts": inputs.num_texts},
            "max_r1_drop": max_r1_drop,
            "noise_sigmas": PARITY_NOISE_SIGMAS,
            "num_threads": num_threads,
            "variants": variants,
        }
        failures = [
            f"{name} lost {drop:.2f} {direction} Recall@1 points (allowed {result['r1_drop_allowed'][direction]:.2f}: "
            f"standard error {result['r1_drop_se'][direction]:.2f})"
            for name, result in variants.items()
            for direction, drop in _r1_losses(result["recall_change"], result["r1_drop_allowed"]).items()
        ]
        if failures:
            raise ParityError(
                f"Export refused: {'; '.join(failures)} against fp32 torch on {inputs.num_images} images, more than "
                f"max_r1_drop={max_r1_drop} plus {PARITY_NOISE_SIGMAS:g} standard errors. Nothing was written to "
                f"{output_dir}. Inspect the error's `report`: a drop this far beyond the split's noise is the "
                "variant's, not the split's.",
                report,
            )
        atomic_write_text(staging / PARITY_FILE, json.dumps(report, indent=2) + "\n")
    logger.info("Exported %s to %s", ", ".join(variants), output_dir)
    return report


__all__ = [
    "CARD_FILES",
    "EXECUTORCH_MAX_BATCH",
    "EvalInputs",
    "ExecutorchEncoders",
    "JointModel",
    "JointOnnxEncoders",
    "OnnxEncoders",
    "ParityError",
    "TextEncoder",
    "TorchEncoders",
    "VisionEncoder",
    "encode_split",
    "export_executorch",
    "export_onnx",
    "export_variants",
    "measure_latency",
    "measure_parity",
    "prepare_eval_inputs",
    "recall_at_1_change",
    "variant_paths",
]
