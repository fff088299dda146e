"""One training step of each mcad-shapes teacher, float32 against bf16 autocast -> a markdown table for BENCHMARKS.md.

    python benchmarks/teacher_step.py [--images 2048] [--steps 8] [--threads 2]

The demo's teachers (`shapes_teachers()`: a CLIP dual teacher 256 × 4, the fusion stack 128 × 4) on generated
mcad-shapes images: the dual teacher's step (CLIP's loss, batch 128) and the fusion stack's (the listwise loss of
`train_fusion_stack`, batch 64 of whole families, texts encoded in the step), each through the package's one
optimisation step, float32 and bf16 alternating; median of the steps after the first.
"""

import argparse
import statistics
import time

import torch

from modeling_mcad.data import TrainingPairs
from modeling_mcad.objectives import ContrastiveLoss
from modeling_mcad.optimization import TrainingStep, adamw_with_cosine, autocast, native_bf16
from modeling_mcad.shapes import make_shapes, shapes_teachers
from modeling_mcad.shapes.teachers import FusionStackTargets, _fusion_stack_loss, fusion_image_states
from modeling_mcad.teachers import dual_image_embeds, dual_text_embeds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    split = make_shapes(seed=0, image_size=64, train=args.images, validation=0, test=0)["train"]
    teachers = shapes_teachers(seed=0)
    pairs = TrainingPairs.from_split(split, teachers.processors)
    dual, fusion = teachers.dual, teachers.fusion
    fusion.unimodal.requires_grad_(False)
    images = fusion_image_states(fusion, pairs.pixel_values["fusion"])
    targets = FusionStackTargets.from_pairs(pairs, split, teachers.fusion_processor.tokenizer)
    dual_step = TrainingStep(dual, *adamw_with_cosine(dual, 5e-4, 1000, 0.1))
    fusion_step = TrainingStep(fusion, *adamw_with_cosine(fusion, 5e-4, 1000, 0.05))
    dual_batches = pairs.epoch_batches(0, 128, seed=0, group_families=True)
    fusion_batches = pairs.epoch_batches(0, 64, seed=0, group_families=True)

    def train_dual(index):
        images_ = dual_image_embeds(dual, pairs.pixel_values["dual"][pairs.image_index[index]])
        texts = dual_text_embeds(dual, *pairs.tables["dual"].rows(pairs.caption_row[index]))
        return ContrastiveLoss()(images_, texts, dual.logit_scale), dual_step

    def train_fusion(index):
        return _fusion_stack_loss(fusion, images, pairs, targets, index, False, 1.0, 1.0), fusion_step

    dual.train()
    fusion.train()
    fusion.unimodal.eval()
    times = {}
    for name, train, batches in (("dual teacher, batch 128", train_dual, dual_batches),
                                 ("fusion stack, batch 64", train_fusion, fusion_batches)):
        for step in range(args.steps):
            for precision in ("float32", "bf16"):
                started = time.perf_counter()
                with autocast("cpu", torch.bfloat16 if precision == "bf16" else None):
                    loss, optimizer_step = train(batches[step % len(batches)])
                optimizer_step(loss)
                if step:
                    times.setdefault((name, precision), []).append(time.perf_counter() - started)
    print(f"{args.threads} threads; CPU with native bf16: {native_bf16('cpu')}; median of {args.steps - 1} steps\n")
    print("| step | float32 (s) | bf16 autocast (s) | speed-up |\n|---|---|---|---|")
    for name in ("dual teacher, batch 128", "fusion stack, batch 64"):
        fp32, bf16 = (statistics.median(times[(name, precision)]) for precision in ("float32", "bf16"))
        print(f"| {name} | {fp32:.3f} | {bf16:.3f} | {fp32 / bf16:.2f}× |")


if __name__ == "__main__":
    main()
