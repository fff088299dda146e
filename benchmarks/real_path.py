"""Every stage at real size: CLIP ViT-B/32 and BLIP ITM base as teachers, the `mobile` student at 224 px, on a
Flickr30K-layout replica -> markdown for BENCHMARKS.md.

    python benchmarks/real_path.py [--images 256 16 16] [--work_dir outputs/real_path]

No network and no pretrained weights: the teachers are `CLIPModel(CLIPConfig())` and
`BlipForImageTextRetrieval(BlipConfig())` — transformers' defaults are the published configurations of
openai/clip-vit-base-patch32 (151M parameters, 224 px) and Salesforce/blip-itm-base-coco (224M, 384 px) — with
random weights, and tokenizers trained offline with `tokenizers` on the replica's captions (CLIP's byte-pair scheme
with `</w>`, BERT's WordPiece), each in its model's vocabulary size. The data is nlphuji/flickr30k's Parquet-export
layout (one `test` split, Karpathy's split in a `split` column, five captions per image of 8-20 words, JPEG photos of
500 x 375) with `--images` train / val / test images. The run is configs/flickr30k_clip_blip.yaml with only the
names changed (the replica, the teacher folders) and fewer epochs; bf16 only where the CPU computes it natively.

Each stage runs as `train_mcad.py STAGE` in its own process: teachers (the adapter fit: the published teachers are
used as they are), cache, distill, evaluate, export, push --dry_run. Per stage: wall time, peak RSS, the items it
processed, and the time per item; then the cost extrapolated to the Flickr30K Karpathy train split (29,000 images,
145,000 pairs, the config's 10 epochs) on this CPU, and from counted FLOPs (torch's FlopCounterMode on one batch of
each model) on one GPU at an assumed sustained throughput (`--gpu_tflops`, bf16); the evaluate stage to Flickr30K's
1,000 test images. Each stage's time includes its fixed cost (starting, loading the models), so the per-item times
of a small run are upper bounds.
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from data_scale import jpeg  # noqa: E402

from modeling_mcad.optimization import native_bf16  # noqa: E402

FLICKR30K_TRAIN = {"images": 29_000, "pairs": 145_000, "epochs": 10}
FLICKR30K_TEST_IMAGES = 1000
RERANK_TOP_K = 10  # the evaluate stage's fusion teacher re-ranks the dual teacher's top 10 of each query
CAPTIONS_PER_IMAGE = 5
STAGES = ("teachers", "cache", "distill", "evaluate", "export", "push")


# --- the replica and the teachers ------------------------------------------------------------------------------------


def captions_of(image: int, words: list[str]) -> list[str]:
    """Five captions of 8-20 words (Flickr30K's are 12.3 on average), Zipf-distributed over `words`."""
    rng = random.Random(image)
    weights = [1 / (rank + 1) for rank in range(len(words))]
    return [" ".join(rng.choices(words, weights, k=rng.randint(8, 20))) for _ in range(CAPTIONS_PER_IMAGE)]


def make_replica(folder: Path, counts: dict[str, int], words: list[str]) -> list[str]:
    """nlphuji/flickr30k's Parquet export layout in `folder` (TEST/test/0000.parquet); returns every caption."""
    import datasets

    splits = [split for split, count in counts.items() for _ in range(count)]
    random.Random(0).shuffle(splits)
    captions = [captions_of(row, words) for row in range(len(splits))]
    if not (folder / "complete").exists():
        (folder / "TEST" / "test").mkdir(parents=True, exist_ok=True)
        features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string")),
                                      "split": datasets.Value("string"), "filename": datasets.Value("string")})
        datasets.Dataset.from_dict({
            "image": [{"bytes": jpeg(row, (500, 375)), "path": None} for row in range(len(splits))],
            "caption": captions, "split": splits, "filename": [f"{row}.jpg" for row in range(len(splits))],
        }, features=features).to_parquet(str(folder / "TEST" / "test" / "0000.parquet"))
        (folder / "complete").write_text("\n")
    return [caption for row in captions for caption in row]


def make_teachers(folder: Path, corpus: list[str]) -> dict[str, Path]:
    """CLIP ViT-B/32 and BLIP ITM base (random weights) with offline tokenizers, saved as a user's folders would be."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    paths = {"dual": folder / "clip-vit-base-patch32", "fusion": folder / "blip-itm-base-coco"}
    if all((path / "config.json").exists() for path in paths.values()):
        return paths
    torch.manual_seed(0)
    # CLIP: byte-pair merges learned on the captions, words ending in </w>, as CLIP's vocab.json / merges.txt.
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                                        end_of_word_suffix="</w>", vocab_size=49408))
    state = json.loads(bpe.to_str())["model"]
    clip_tokenizer = CLIPTokenizer(vocab=state["vocab"], merges=[tuple(pair) for pair in state["merges"]],
                                   model_max_length=77)
    clip = CLIPModel(CLIPConfig(text_config={"bos_token_id": clip_tokenizer.bos_token_id,
                                             "eos_token_id": clip_tokenizer.eos_token_id,
                                             "pad_token_id": clip_tokenizer.pad_token_id}))
    clip.save_pretrained(paths["dual"])
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=clip_tokenizer).save_pretrained(paths["dual"])
    # BLIP: BERT's WordPiece over the captions' words (BLIP's text encoder is a BERT).
    words = sorted({word for caption in corpus for word in caption.split()})
    blip_tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]", *words])}, model_max_length=512)
    blip = BlipForImageTextRetrieval(BlipConfig(text_config={"pad_token_id": 0, "bos_token_id": 5,
                                                             "sep_token_id": 3, "eos_token_id": 3}))
    blip.save_pretrained(paths["fusion"])
    BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=blip_tokenizer).save_pretrained(paths["fusion"])
    return paths


# --- FLOPs per item ---------------------------------------------------------------------------------------------------


def flops_per_item(paths: dict[str, Path], student_folder: Path, caption: str) -> dict[str, float]:
    """Forward FLOPs of one image / one caption / one pair through each model (FlopCounterMode on a batch of 8)."""
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel, AutoProcessor, BlipForImageTextRetrieval

    def counted(function) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            function()
        return counter.get_total_flops() / 8

    images = [Image.new("RGB", (500, 375))] * 8
    # Eager attention: FlopCounterMode does not count the CPU's fused attention kernel (its products are FLOPs too).
    clip = AutoModel.from_pretrained(paths["dual"], attn_implementation="eager")
    clip_processor = AutoProcessor.from_pretrained(paths["dual"])
    blip = BlipForImageTextRetrieval.from_pretrained(paths["fusion"], attn_implementation="eager")
    blip_processor = AutoProcessor.from_pretrained(paths["fusion"])
    student = AutoModel.from_pretrained(student_folder, attn_implementation="eager")
    student_processor = AutoProcessor.from_pretrained(student_folder)
    clip_inputs = clip_processor(images=images, text=[caption] * 8, return_tensors="pt", padding=True)
    blip_inputs = blip_processor(images=images, text=[caption] * 8, return_tensors="pt", padding=True)
    student_inputs = student_processor(images=images, text=[caption] * 8, return_tensors="pt", padding=True)
    blip_image_states = blip.vision_model(pixel_values=blip_inputs["pixel_values"])[0]
    return {
        "dual_image": counted(lambda: clip.get_image_features(pixel_values=clip_inputs["pixel_values"])),
        "dual_text": counted(lambda: clip.get_text_features(input_ids=clip_inputs["input_ids"],
                                                             attention_mask=clip_inputs["attention_mask"])),
        "fusion_image": counted(lambda: blip.vision_model(pixel_values=blip_inputs["pixel_values"])),
        "fusion_pair": counted(lambda: blip.text_encoder(
            input_ids=blip_inputs["input_ids"], attention_mask=blip_inputs["attention_mask"],
            encoder_hidden_states=blip_image_states)),
        "student_pair": counted(lambda: student(**student_inputs)),
    }


# --- the run ----------------------------------------------------------------------------------------------------------


def run_stage(stage: str, config_file: Path, extra: list[str]) -> dict:
    """`train_mcad.py STAGE` in its own process: wall time, and the peak RSS its closing table reports."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO_ROOT / "train_mcad.py"), stage, "--config", str(config_file),
                             *extra], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"train_mcad.py {stage} failed (exit {result.returncode}):\n{result.stderr[-5000:]}")
    row = re.search(rf"^\| {stage} \| [^|]+ \| (\d+) MiB \|", result.stdout, flags=re.MULTILINE)
    return {"seconds": seconds, "peak_rss_mib": int(row.group(1)) if row else None, "log": result.stderr[-20000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs=3, default=[256, 16, 16], metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=256, help="the distill batch (the recipe's: 256)")
    parser.add_argument("--work_dir", type=Path, default=Path("outputs/real_path"))
    parser.add_argument("--gpu_tflops", type=float, default=400.0,
                        help="sustained bf16 TFLOP/s assumed for one GPU (an H100 at about 40%% of its dense peak)")
    args = parser.parse_args()
    work = args.work_dir.resolve()
    counts = dict(zip(("train", "val", "test"), args.images))
    if counts["train"] < args.batch_size:
        parser.error(f"--images: {counts['train']} training images give no batch of {args.batch_size}: the distill "
                     "stage draws one caption per image per epoch (pass at least --batch_size training images)")
    vocabulary = [f"w{index}" for index in range(3000)]  # distinct made-up words; token counts are what matter
    corpus = make_replica(work / "flickr30k-{train}-{val}-{test}".format(**counts), counts, vocabulary)
    paths = make_teachers(work / "teachers", corpus)

    config = yaml.safe_load((REPO_ROOT / "configs" / "flickr30k_clip_blip.yaml").read_text())
    config.update(
        output_dir=str(work / "run"), dataset=str(work / "flickr30k-{train}-{val}-{test}".format(**counts)),
        dataset_options={"data_dir": "TEST"},
        dual_teacher=str(paths["dual"]), fusion_teacher=str(paths["fusion"]), epochs=args.epochs,
        batch_size=args.batch_size,
        warmup_steps=2, checkpoint_every_steps=1000, num_workers=1, overwrite_output_dir=True,
        mixed_precision="bf16" if native_bf16("cpu") else "no", repo_id="you/mcad-flickr30k-mobile",
        dry_run=str(work / "hub_folder"),
    )
    config_file = work / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    pairs = counts["train"] * CAPTIONS_PER_IMAGE
    test_items = counts["test"] * (1 + CAPTIONS_PER_IMAGE)
    items = {"teachers": (counts["train"], "train images (one caption each)"), "cache": (pairs, "train pairs"),
             "distill": (pairs * args.epochs, "pairs seen"), "evaluate": (test_items, "test images + captions"),
             "export": (1, "model"), "push": (1, "model")}
    stages = {}
    for stage in STAGES:
        print(f"{stage} ...", file=sys.stderr, flush=True)
        stages[stage] = run_stage(stage, config_file, [])
    flops = flops_per_item(paths, work / "run" / "student", corpus[0])

    # Extrapolation: the stages whose cost grows with the data, at Flickr30K's size (the test split: 1,000 images).
    full = {"teachers": FLICKR30K_TRAIN["images"], "cache": FLICKR30K_TRAIN["pairs"],
            "distill": FLICKR30K_TRAIN["pairs"] * FLICKR30K_TRAIN["epochs"],
            "evaluate": FLICKR30K_TEST_IMAGES * (1 + CAPTIONS_PER_IMAGE)}
    # FLOPs per item of each stage's work: forward passes (x3 for a training step: forward and backward); evaluate
    # embeds every image and caption with both dual encoders and lets the fusion teacher re-rank each query's top 10.
    per_item_flops = {
        "teachers": flops["dual_image"] + flops["dual_text"] + flops["fusion_image"] + flops["fusion_pair"],
        "cache": (flops["dual_image"] + flops["fusion_image"]) / CAPTIONS_PER_IMAGE + flops["dual_text"]
        + flops["fusion_pair"],
        "distill": 3 * flops["student_pair"],
        "evaluate": (flops["dual_image"] + flops["fusion_image"] + CAPTIONS_PER_IMAGE * flops["dual_text"]
                     + (1 + CAPTIONS_PER_IMAGE) * (RERANK_TOP_K * flops["fusion_pair"] + flops["student_pair"]))
        / (1 + CAPTIONS_PER_IMAGE),
    }
    report = {"config": config, "images": counts, "bf16": native_bf16("cpu"), "threads": torch.get_num_threads(),
              "flops_per_item": flops, "stages": {name: {k: v for k, v in row.items() if k != "log"}
                                                  for name, row in stages.items()}}
    (work / "real_path.json").write_text(json.dumps(report, indent=2))
    (work / "logs.txt").write_text("\n\n".join(f"== {name}\n{row['log']}" for name, row in stages.items()))

    print(f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, bf16 native: {native_bf16('cpu')}; "
          f"images train/val/test {counts['train']}/{counts['val']}/{counts['test']}\n")
    print("| stage | wall | peak RSS | items | per item | Flickr30K train, this CPU | Flickr30K train, one GPU |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for stage in STAGES:
        row, (count, unit) = stages[stage], items[stage]
        per_item = row["seconds"] / count
        cpu, gpu = "", ""
        if stage in full:
            cpu = f"{per_item * full[stage] / 3600:.1f} h"
            gpu = f"{per_item_flops[stage] * full[stage] / (args.gpu_tflops * 1e12) / 60:.1f} min"
        print(f"| {stage} | {row['seconds']:.0f} s | {row['peak_rss_mib']} MiB | {count} {unit} | "
              f"{per_item * 1e3:.0f} ms | {cpu} | {gpu} |")
    print("\nForward GFLOPs per item: " + ", ".join(f"{name} {value / 1e9:.1f}" for name, value in flops.items()))


if __name__ == "__main__":
    main()
