"""How much Recall@1 does int8 cost trained students, against the noise of the statistic itself?

    python benchmarks/int8_parity.py STUDENT_DIR [STUDENT_DIR ...] [--eval_images 1000] [--threads 2]

For every trained student folder: export the two ONNX graphs (`export_onnx`), quantize them with each recipe of
`RECIPES` (onnxruntime `quantize_dynamic`), and measure each against fp32 torch with the export's own
`measure_parity` on a generated mcad-shapes validation split: the image->text and text->image Recall@1 change with
its paired standard error, and the lowest embedding cosines. Beside the recipes, the noise
floor: the fp32 embeddings plus isotropic Gaussian noise of two sizes (renormalised), the change a perturbation of
int8's size makes on the same near-duplicate captions. Prints one line per student and recipe, then the mean ±
standard deviation over the students.
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from modeling_mcad import MCADModel, MCADProcessor
from modeling_mcad.export import (
    QUANTIZE_PER_CHANNEL,
    QUANTIZED_OP_TYPES,
    OnnxEncoders,
    TorchEncoders,
    export_onnx,
    measure_parity,
    prepare_eval_inputs,
)
from modeling_mcad.shapes import make_shapes

# Recipe name -> quantize_dynamic keyword arguments (int8 weights in every recipe).
RECIPES = {
    "all ops (onnxruntime's default)": {},
    "MatMul only": {"op_types_to_quantize": QUANTIZED_OP_TYPES},
    "MatMul only, per-channel (the export's)": {"op_types_to_quantize": QUANTIZED_OP_TYPES,
                                                "per_channel": QUANTIZE_PER_CHANNEL},
}
NOISE_SCALES = (0.02, 0.03)  # the norm of the added noise, on unit embeddings


class NoisyEncoders:
    """A runner: another runner's embeddings plus isotropic Gaussian noise of norm `scale`, renormalised."""

    def __init__(self, runner, scale: float, seed: int = 0):
        self.runner, self.scale, self.rng = runner, scale, np.random.default_rng(seed)

    def _perturb(self, embeddings: np.ndarray) -> np.ndarray:
        noise = self.rng.standard_normal(embeddings.shape).astype(embeddings.dtype) / np.sqrt(embeddings.shape[1])
        noisy = embeddings + self.scale * noise
        return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)

    def encode_texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._perturb(self.runner.encode_texts(input_ids, attention_mask))

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._perturb(self.runner.encode_images(pixel_values))


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
        reference = TorchEncoders(model)
        with tempfile.TemporaryDirectory() as scratch:
            graphs = export_onnx(model, processor, scratch)
            candidates = {}
            for recipe, options in RECIPES.items():
                quantized = []
                for name in ("text_model", "vision_model"):
                    quantized.append(Path(scratch) / f"{name}_{len(candidates)}.onnx")
                    quantize_dynamic(graphs[name], quantized[-1], weight_type=QuantType.QInt8, **options)
                candidates[recipe] = OnnxEncoders(*quantized, num_threads=args.threads)
            candidates.update({f"fp32 + noise {scale}": NoisyEncoders(reference, scale) for scale in NOISE_SCALES})
            parity = measure_parity(reference, candidates, inputs)
        for recipe in candidates:
            measured = parity[recipe]
            results.setdefault(recipe, []).append(measured)
            change, se = measured["recall_change"], measured["r1_drop_se"]
            print(f"{folder} | {recipe} | ΔR@1 i→t {change['i2t_r1']:+.2f} ± {se['i2t']:.2f} t→i "
                  f"{change['t2i_r1']:+.2f} ± {se['t2i']:.2f} | cosine min {measured['image_cosine']['min']:.5f} / "
                  f"{measured['text_cosine']['min']:.5f}", flush=True)
    print(f"\n{len(args.students)} students, {args.eval_images} validation images, {5 * args.eval_images} captions\n")
    print("| int8 recipe | ΔR@1 i→t | ΔR@1 t→i | worst ΔR@1 | cosine min (image / text) |\n|---|---|---|---|---|")
    for recipe, measured in results.items():
        changes = {direction: [m["recall_change"][f"{direction}_r1"] for m in measured]
                   for direction in ("i2t", "t2i")}
        cells = [f"{statistics.mean(values):+.2f} ± {statistics.pstdev(values):.2f}" for values in changes.values()]
        worst = min(min(values) for values in changes.values())
        cosines = " / ".join(f"{min(m[key]['min'] for m in measured):.5f}" for key in ("image_cosine", "text_cosine"))
        print(f"| {recipe} | {cells[0]} | {cells[1]} | {worst:+.2f} | {cosines} |")


if __name__ == "__main__":
    main()
