"""The shapes student on the validation split (issue 8): which tower, batches, curriculum and objective teach it?

    python benchmarks/student_probe.py [--root outputs/ablation] [--objective mcad] [--overrides '{alpha: 1}'] \
        [--epochs 6] [--canonical_epochs 2] [--random_batches] [--negatives] [--text_tower clip|bert] \
        [--train_images 10000] [--batch_size 64] [--lr 5e-4] [--seed 0] [--eval_every 0]
    python benchmarks/student_probe.py --regress text|image [--text_tower clip|bert] [--epochs 5]

Needs the teachers, data and teacher cache of `python benchmarks/distill_table.py` (ROOT/teacher, ROOT/data,
ROOT/cache). The distill stage's training with every input preprocessed once (the `shapes` processor over every
image and caption): batches from `TrainingPairs.epoch_batches` (whole families unless `--random_batches`, canonical
captions for the first `--canonical_epochs`), `MCADLoss` on the cached teacher targets, AdamW with warm-up and cosine
decay, gradients clipped at 1, the logit scale capped at 100. `--negatives` adds each caption's colour swap (and,
after the canonical epochs, its relation flip) as NegCLIP negatives. Prints validation RSUM and swap / flip accuracy
every `--eval_every` epochs and at the end, as JSON lines.

`--regress text|image`: one tower alone regresses the dual teacher's embeddings (cosine, through a linear map to
d_T), then is scored against the dual teacher's other tower: which tower fails to bind. `--text_tower bert` is the
`shapes` preset's text tower before issue 8's fourth round (BERT 96 × 2).
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
import yaml
from transformers import get_cosine_schedule_with_warmup

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import train_mcad  # noqa: E402
from modeling_mcad import MCADConfig, MCADModel, MCADProcessor  # noqa: E402
from modeling_mcad.evaluation import evaluate_model  # noqa: E402
from modeling_mcad.objectives import MCADLoss  # noqa: E402
from modeling_mcad.teacher_cache import CACHE_COLUMNS, TeacherCache  # noqa: E402
from modeling_mcad.teacher_training import TrainingPairs  # noqa: E402
from modeling_mcad.teachers import MCADTeacher  # noqa: E402

BERT_TEXT_TOWER = {"model_type": "bert", "hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 3,
                   "intermediate_size": 384, "max_position_embeddings": 32}


def student_config(text_tower: str) -> MCADConfig:
    config = MCADConfig.from_preset("shapes")
    if text_tower == "bert":
        config = MCADConfig.from_preset("shapes", text_config={**BERT_TEXT_TOWER,
                                                               "vocab_size": config.text_config.vocab_size})
    return config


def subset(pairs: TrainingPairs, targets: dict, images: int) -> tuple[TrainingPairs, dict]:
    """The pairs (and their cached targets) of the first `images` training images."""
    keep = torch.nonzero(pairs.image_index < images).flatten()
    per_pair = {field: getattr(pairs, field)[keep]
                for field in ("image_index", "canonical", "caption_row", "swapped_row", "flipped_row")}
    return dataclasses.replace(pairs, **per_pair), {name: value[keep] for name, value in targets.items()}


def scores(encoders, split) -> dict:
    metrics = evaluate_model(*encoders, split)
    return {key: round(metrics[key], 1) for key in ("rsum", "swap_accuracy", "flip_accuracy")}


def optimizer(parameters: list, lr: float, total_steps: int):
    adamw = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05)
    return adamw, get_cosine_schedule_with_warmup(adamw, 20, total_steps)


def train_student(args, pairs: TrainingPairs, targets: dict, validation, log) -> None:
    torch.manual_seed(args.seed)
    student = MCADModel(student_config(args.text_tower))
    processor = MCADProcessor.from_preset("shapes")
    loss = MCADLoss.from_preset(args.objective, student.config.projection_dim,
                                targets["teacher_image_embeds"].shape[1], **args.overrides)
    parameters = [*student.parameters(), *loss.parameters()]
    steps_per_epoch = len(pairs.epoch_batches(0, args.batch_size, args.seed))
    adamw, schedule = optimizer(parameters, args.lr, args.epochs * steps_per_epoch)
    pixels, table = pairs.pixel_values["student"], pairs.tables["student"]
    for epoch in range(args.epochs):
        canonical = epoch < args.canonical_epochs
        student.train()
        for index in pairs.epoch_batches(epoch, args.batch_size, args.seed, 0.0 if canonical else 1.0,
                                         group_families=not args.random_batches):
            input_ids, attention_mask = table.rows(pairs.caption_row[index])
            output = student(input_ids=input_ids, attention_mask=attention_mask,
                             pixel_values=pixels[pairs.image_index[index]])
            negatives = None
            if args.negatives:  # as the distill stage: no relation flips while the captions are canonical
                rows = torch.cat([pairs.swapped_row[index], *([] if canonical else [pairs.flipped_row[index]])])
                negatives = F.normalize(student.get_text_features(*table.rows(rows[rows >= 0])), dim=-1)
            batch_targets = {name: value[index] for name, value in targets.items()}
            value = loss(output.image_embeds, output.text_embeds, student.logit_scale, negative_text_embeds=negatives,
                         **(batch_targets if loss.settings.uses_teacher else {})).loss
            adamw.zero_grad()
            value.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            adamw.step()
            schedule.step()
            with torch.no_grad():
                student.logit_scale.clamp_(0, math.log(100))
        if (args.eval_every and (epoch + 1) % args.eval_every == 0) or epoch + 1 == args.epochs:
            student.eval()
            log({"epoch": epoch + 1, **scores(train_mcad.student_encoders(student, processor), validation)})


def train_tower(args, pairs: TrainingPairs, targets: dict, validation, teacher: MCADTeacher, log) -> None:
    torch.manual_seed(args.seed)
    student = MCADModel(student_config(args.text_tower))
    processor = MCADProcessor.from_preset("shapes")
    to_teacher = torch.nn.Linear(student.config.projection_dim, targets["teacher_image_embeds"].shape[1], bias=False)
    tower, projection = ((student.text_model, student.text_projection) if args.regress == "text"
                         else (student.vision_model, student.visual_projection))
    parameters = [*tower.parameters(), *projection.parameters(), *to_teacher.parameters()]
    steps_per_epoch = len(pairs.epoch_batches(0, args.batch_size, args.seed))
    adamw, schedule = optimizer(parameters, args.lr, args.epochs * steps_per_epoch)
    pixels, table = pairs.pixel_values["student"], pairs.tables["student"]
    for epoch in range(args.epochs):
        student.train()
        for index in pairs.epoch_batches(epoch, args.batch_size, args.seed, group_families=not args.random_batches):
            if args.regress == "text":
                embeds = student.get_text_features(*table.rows(pairs.caption_row[index]))
                target = targets["teacher_text_embeds"][index]
            else:
                embeds = student.get_image_features(pixels[pairs.image_index[index]])
                target = targets["teacher_image_embeds"][index]
            value = 1 - F.cosine_similarity(to_teacher(F.normalize(embeds, dim=-1)), target).mean()
            adamw.zero_grad()
            value.backward()
            adamw.step()
            schedule.step()
    student.eval()
    image_encoder, text_encoder = train_mcad.student_encoders(student, processor)
    teacher_image, teacher_text = train_mcad.dual_teacher_encoders(teacher)

    def mapped(encoder):
        return lambda inputs: to_teacher(F.normalize(encoder(inputs), dim=-1))

    encoders = ((teacher_image, mapped(text_encoder)) if args.regress == "text"
                else (mapped(image_encoder), teacher_text))
    with torch.no_grad():
        log({"epoch": args.epochs, **scores(encoders, validation)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="outputs/ablation")
    parser.add_argument("--objective", default="mcad")
    parser.add_argument("--overrides", type=yaml.safe_load, default={}, help="objective knobs, e.g. '{alpha: 1}'")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--canonical_epochs", type=int, default=2)
    parser.add_argument("--random_batches", action="store_true", help="random batches instead of whole families")
    parser.add_argument("--negatives", action="store_true", help="NegCLIP: swap (and flip) captions as negatives")
    parser.add_argument("--text_tower", choices=("clip", "bert"), default="clip")
    parser.add_argument("--regress", choices=("text", "image"), default=None)
    parser.add_argument("--train_images", type=int, default=10000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_every", type=int, default=0, help="epochs between validation scores (0: the end)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    started = time.perf_counter()
    root = Path(args.root)
    data = datasets.load_from_disk(str(next((root / "data").iterdir())))
    pairs = TrainingPairs.from_split(data["train"], {"student": MCADProcessor.from_preset("shapes")})
    rows = TeacherCache.for_run(root, root / "teacher", data["train"]).rows[:]
    pairs, targets = subset(pairs, {name: rows[name].float() for name in CACHE_COLUMNS}, args.train_images)

    def log(row: dict) -> None:
        print(json.dumps({**{k: v for k, v in vars(args).items() if k not in ("root", "threads")}, **row,
                          "seconds": round(time.perf_counter() - started)}, ensure_ascii=False), flush=True)

    if args.regress:
        train_tower(args, pairs, targets, data["validation"], MCADTeacher.from_pretrained(root / "teacher"), log)
    else:
        train_student(args, pairs, targets, data["validation"], log)


if __name__ == "__main__":
    main()
