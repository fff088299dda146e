"""Size, CPU latency and parity of every exported variant -> a markdown table for BENCHMARKS.md.

    python benchmarks/variants.py                                    # random-init `shapes` and `mobile` students
    python benchmarks/variants.py --model_dir outputs/demo/student   # a trained student

Each student goes through `export_variants` (the same code as `train_mcad.py export`), which measures every
variant against fp32 torch on the mcad-shapes validation split and times it (median of repeated calls after a
warm-up) at batch 1 and 32, for texts (captions of the split, padded to the longest) and for images. A random-init
student retrieves at chance, so for it only the cosine columns say anything about parity.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from modeling_mcad import MCADModel, MCADProcessor
from modeling_mcad.export import export_variants
from modeling_mcad.shapes import make_shapes


def markdown_table(name: str, report: dict) -> str:
    variants = report["variants"]
    reference = variants["torch-fp32"]["latency_ms"]
    split = report["eval_split"]
    header = (
        f"**{name}** — eval split: {split['images']} images, {split['texts']} captions; "
        f"{report['num_threads']} threads\n\n"
        "| Variant | Size (MB) | Text b1 (ms) | Image b1 (ms) | Text b32 (ms) | Image b32 (ms) "
        "| Speed-up b1 text / image | Speed-up b32 text / image | Cosine min (image / text) "
        "| ΔR@1 ± SE i→t / t→i |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for variant_name, variant in variants.items():
        latency = variant["latency_ms"]
        speedups = [f"{reference[f'text_b{b}'] / latency[f'text_b{b}']:.2f}× / "
                    f"{reference[f'image_b{b}'] / latency[f'image_b{b}']:.2f}×" for b in (1, 32)]
        change = variant["recall_change"]
        timings = " | ".join(f"{latency[key]:.2f}" for key in ("text_b1", "image_b1", "text_b32", "image_b32"))
        rows.append(
            f"| {variant_name} | {variant['size_bytes'] / 1e6:.2f} | {timings} | {speedups[0]} | {speedups[1]} "
            f"| {variant['image_cosine']['min']:.5f} / {variant['text_cosine']['min']:.5f} "
            f"| {change['i2t_r1']:+.2f} ± {variant['r1_drop_se']['i2t']:.2f} / "
            f"{change['t2i_r1']:+.2f} ± {variant['r1_drop_se']['t2i']:.2f} |"
        )
    return header + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["shapes", "mobile"], help="random-init students to export")
    parser.add_argument("--model_dir", help="a trained student folder instead of --presets")
    parser.add_argument("--eval_images", type=int, default=1000,
                        help="images of the mcad-shapes validation split generated for parity (export's: 1000)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and onnxruntime")
    parser.add_argument("--executorch", action="store_true", help="also export and time the ExecuTorch programs")
    parser.add_argument("--max_r1_drop", type=float, default=1.0)
    parser.add_argument("--json", help="also write the reports here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    split = make_shapes(train=0, validation=args.eval_images, test=0)["validation"]
    print(f"Command: python {' '.join(sys.argv)}\n")
    reports = {}
    with tempfile.TemporaryDirectory() as scratch:
        students = {Path(args.model_dir).name: Path(args.model_dir)} if args.model_dir else {}
        for preset in [] if args.model_dir else args.presets:
            torch.manual_seed(0)
            students[f"{preset} (random init)"] = folder = Path(scratch) / preset
            MCADModel.from_preset(preset).save_pretrained(folder)
            MCADProcessor.from_preset(preset).save_pretrained(folder)
        for name, folder in students.items():
            reports[name] = export_variants(
                folder, Path(scratch) / "export" / folder.name, eval_split=split, max_r1_drop=args.max_r1_drop,
                executorch=args.executorch, latency_batch_sizes=(1, 32), num_threads=args.threads,
            )
            print(markdown_table(name, reports[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()
