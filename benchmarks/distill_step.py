"""Distillation step time: a plain contrastive step, an MCAD step reading cached targets, an MCAD step with the
teachers online (β > 0), side by side on the same batch.

    python benchmarks/distill_step.py [--batch_size 128] [--rounds 5]

Each step is forward + backward + AdamW update of the `shapes` student (and W); the cached step also reads its
targets by pair index from an on-disk teacher cache (Arrow, memory-mapped); the online step also runs both
`shapes` teachers (`teacher.targets`, β = 0.5, k = 8). The batch is collated once, beforehand: data loading is the
same for every variant. Times are the median over rounds, interleaved so that machine load hits all alike.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from modeling_mcad import MCADModel, MCADProcessor
from modeling_mcad.data import ImageTextCollator, flatten_pairs
from modeling_mcad.distillation import DistillationModule
from modeling_mcad.objectives import MCADLoss, objective_settings
from modeling_mcad.optimization import TrainingStep, adamw_with_cosine
from modeling_mcad.shapes import make_shapes, shapes_teachers
from modeling_mcad.teacher_cache import TeacherCache, build_teacher_cache


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    split = make_shapes(seed=0, image_size=64, train=args.batch_size, validation=0, test=0)["train"]
    pairs = flatten_pairs(split)
    teacher = shapes_teachers(seed=0).to_mcad_teacher()
    student_processor = MCADProcessor.from_preset("shapes")
    # One caption per image, as the distillation sampler draws them.
    batch_rows = [pairs[i] for i in range(0, len(pairs), 5)][: args.batch_size]
    batch = ImageTextCollator({"student": student_processor, **teacher.processors})(batch_rows)

    with tempfile.TemporaryDirectory() as folder:
        teacher.save_pretrained(Path(folder) / "teacher")
        cache = TeacherCache(build_teacher_cache(teacher, Path(folder) / "teacher", split, folder,
                                                 Accelerator(cpu=True), batch_size=64))
        runs = {
            "contrastive": make_step("contrastive", teacher, lambda: None),
            "mcad_feature, cached targets (β = 0)": make_step("mcad_feature", teacher,
                                                               lambda: cache.targets(batch["pair_index"])),
            "mcad, teachers online (β = 0.5, k = 8)": make_step(
                "mcad", teacher, lambda: online_targets(teacher, batch), beta=0.5),
        }
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, step in runs.items():
                start = time.perf_counter()
                step(batch)
                times[name].append(time.perf_counter() - start)

    base = statistics.median(times["contrastive"])
    print(f"| step (batch {args.batch_size}, `shapes` student, {args.threads} threads) | median s | × contrastive |")
    print("| --- | ---: | ---: |")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.3f} | {statistics.median(values) / base:.2f} |")


def online_targets(teacher, batch) -> dict:
    return teacher.targets(batch["dual"], batch["fusion"], objective_settings("mcad", beta=0.5, top_k=8)).loss_inputs()


def make_step(objective: str, teacher, targets_of, **overrides):
    torch.manual_seed(0)
    student = MCADModel.from_preset("shapes")
    module = DistillationModule(student, MCADLoss.from_preset(objective, student.config.projection_dim,
                                                              teacher.config.teacher_dim, **overrides)).train()
    training_step = TrainingStep(module, *adamw_with_cosine(module, lr=1e-4, total_steps=1000))

    def step(batch):
        training_step(module(batch["student"], targets_of()).loss)

    return step


if __name__ == "__main__":
    main()
