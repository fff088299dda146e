"""How much Recall@1 does int8 cost trained students, against the noise of the statistic itself? (issue 6)

    python benchmarks/int8_parity.py STUDENT_DIR [STUDENT_DIR ...] [--eval_images 1000] [--threads 2]

For every trained student folder: export the two ONNX graphs (`export_onnx`), quantize them with each recipe of
`RECIPES` (onnxruntime `quantize_dynamic`), and measure the image->text and text->image Recall@1 change against fp32
torch on a generated mcad-shapes validation split, with the lowest embedding cosines. Beside the recipes, the noise
floor: the fp32 embeddings plus isotropic Gaussian noise of two sizes (renormalised), the change a perturbation of
int8's size makes on the same near-duplicate captions. Prints one line per student and recipe, then the mean ±
standard deviation over the students.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from modeling_mcad import MCADModel, MCADProcessor  # noqa: E402
from modeling_mcad.evaluation import retrieval_ranks  # noqa: E402
from modeling_mcad.export import (  # noqa: E402
    QUANTIZE_PER_CHANNEL,
    QUANTIZED_OP_TYPES,
    OnnxEncoders,
    TorchEncoders,
    _cosine_summary,
    encode_split,
    export_onnx,
    prepare_eval_inputs,
    recall_at_1_change,
)
from modeling_mcad.shapes import make_shapes  # noqa: E402

# Recipe name -> quantize_dynamic keyword arguments (int8 weights in every recipe).
RECIPES = {
    "all ops (onnxruntime's default)": {},
    "MatMul only": {"op_types_to_quantize": QUANTIZED_OP_TYPES},
    "MatMul only, per-channel (the export's)": {"op_types_to_quantize": QUANTIZED_OP_TYPES,
                                                "per_channel": QUANTIZE_PER_CHANNEL},
}
NOISE_SCALES = (0.02, 0.03)  # the norm of the added noise, on unit embeddings


def row(reference: tuple, reference_ranks: tuple, embeddings: tuple, text_to_image) -> dict:
    """One variant's Recall@1 changes (and their paired standard errors) and lowest cosines against fp32 torch."""
    ranks = retrieval_ranks(*embeddings, text_to_image)
    measured = {}
    for direction, before, after in zip(("i2t", "t2i"), reference_ranks, ranks):
        measured[direction], measured[f"{direction}_se"] = recall_at_1_change(before, after)
    for kind, fp32, variant in zip(("image_cosine", "text_cosine"), reference, embeddings):
        measured[kind] = _cosine_summary(fp32, variant)["min"]
    return measured


def with_noise(embeddings: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    noisy = embeddings + scale * rng.standard_normal(embeddings.shape).astype(embeddings.dtype) / np.sqrt(
        embeddings.shape[1])
    return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def main() -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("students", nargs="+", help="trained student folders (save_pretrained)")
    parser.add_argument("--eval_images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    split = make_shapes(train=0, validation=args.eval_images, test=0)["validation"]
    results = {}
    for folder in args.students:
        model = MCADModel.from_pretrained(folder, dtype=torch.float32).eval()
        processor = MCADProcessor.from_pretrained(folder)
        inputs = prepare_eval_inputs(split, processor)
        reference = encode_split(TorchEncoders(model), inputs)
        reference_ranks = retrieval_ranks(*reference, inputs.text_to_image)
        rows = {}
        with tempfile.TemporaryDirectory() as scratch:
            graphs = export_onnx(model, processor, scratch)
            for recipe, options in RECIPES.items():
                quantized = []
                for name in ("text_model", "vision_model"):
                    quantized.append(Path(scratch) / f"{name}_{len(rows)}.onnx")
                    quantize_dynamic(graphs[name], quantized[-1], weight_type=QuantType.QInt8, **options)
                embeddings = encode_split(OnnxEncoders(*quantized, num_threads=args.threads), inputs)
                rows[recipe] = row(reference, reference_ranks, embeddings, inputs.text_to_image)
        rng = np.random.default_rng(0)
        for scale in NOISE_SCALES:
            noisy = tuple(with_noise(embeddings, scale, rng) for embeddings in reference)
            rows[f"fp32 + noise {scale}"] = row(reference, reference_ranks, noisy, inputs.text_to_image)
        for recipe, measured in rows.items():
            results.setdefault(recipe, []).append(measured)
            print(f"{folder} | {recipe} | ΔR@1 i→t {measured['i2t']:+.2f} ± {measured['i2t_se']:.2f} t→i "
                  f"{measured['t2i']:+.2f} ± {measured['t2i_se']:.2f} | cosine min "
                  f"{measured['image_cosine']:.5f} / {measured['text_cosine']:.5f}", flush=True)
    print(f"\n{len(args.students)} students, {args.eval_images} validation images, {5 * args.eval_images} captions\n")
    print("| int8 recipe | ΔR@1 i→t | ΔR@1 t→i | worst ΔR@1 | cosine min (image / text) |\n|---|---|---|---|---|")
    for recipe, measured in results.items():
        cells = [f"{statistics.mean(m[key] for m in measured):+.2f} ± "
                 f"{statistics.pstdev(m[key] for m in measured):.2f}" for key in ("i2t", "t2i")]
        worst = min(min(m["i2t"], m["t2i"]) for m in measured)
        cosines = " / ".join(f"{min(m[key] for m in measured):.5f}" for key in ("image_cosine", "text_cosine"))
        print(f"| {recipe} | {cells[0]} | {cells[1]} | {worst:+.2f} | {cosines} |")


if __name__ == "__main__":
    main()
