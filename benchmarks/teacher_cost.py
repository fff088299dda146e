"""Fusion-teacher cost per batch: the β > 0 path (top-k candidates, DESIGN §3.2) against scoring all B² pairs.

    python benchmarks/teacher_cost.py                       # B = 32, 64, 128, k = 8, 2 threads

A randomly initialised BlipForImageTextRetrieval, small but with real structure (64 px images, 8 px patches:
65 image tokens; vision and text width 128, 4 layers each; 16-token captions), scored through the same code as
`MCADTeacher.targets`: `BlipCrossEncoder` encodes each image once, then runs the text encoder with
cross-attention on every scored pair. The candidate mask comes from `top_k_candidates` on random unit
embeddings, where the top-k of rows and columns rarely overlap: a trained dual teacher's overlap more, so its
pair count (and time) sits lower, towards 2·B·k. The two paths run alternately, `--repeats` times each after a
warm-up call, and each reports its fastest run: on a shared machine the other runs measure the neighbours.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import BlipConfig, BlipForImageTextRetrieval

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_mcad.configuration_mcad import PRESET_VOCABULARY  # noqa: E402
from modeling_mcad.cross_encoders import BlipCrossEncoder  # noqa: E402
from modeling_mcad.teachers import top_k_candidates  # noqa: E402

IMAGE_SIZE, PATCH_SIZE, CAPTION_LENGTH = 64, 8, 16


def small_blip() -> BlipCrossEncoder:
    tower = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}
    config = BlipConfig(
        vision_config={**tower, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE},
        text_config={**tower, "encoder_hidden_size": 128, "vocab_size": len(PRESET_VOCABULARY),
                     "max_position_embeddings": 32, "pad_token_id": 0, "bos_token_id": 2, "sep_token_id": 3,
                     "eos_token_id": 3},
        image_text_hidden_size=128,
    )
    return BlipCrossEncoder(BlipForImageTextRetrieval(config).eval())


def fastest_times(runs: list, repeats: int) -> list[float]:
    """Each run's fastest time over `repeats` rounds, the runs alternating within each round."""
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, run_times in zip(runs, times):
            start = time.perf_counter()
            run()
            run_times.append(time.perf_counter() - start)
    return [min(run_times) for run_times in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pair_batch_size", type=int, default=256, help="pairs per cross-encoder call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = small_blip()
    parameters = sum(p.numel() for p in encoder.parameters()) / 1e6
    with torch.no_grad():  # warm-up: first calls allocate and pick kernels
        encoder(torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE), torch.randint(5, 50, (4, CAPTION_LENGTH)))

    rows = []
    for batch in args.batch_sizes:
        pixel_values = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
        input_ids = torch.randint(5, len(PRESET_VOCABULARY), (batch, CAPTION_LENGTH))
        attention_mask = torch.ones_like(input_ids)
        image_embeds, text_embeds = (F.normalize(torch.randn(batch, 64), dim=-1) for _ in range(2))
        candidate_pairs = top_k_candidates(image_embeds, text_embeds, args.top_k).nonzero()
        all_pairs = torch.cartesian_prod(torch.arange(batch), torch.arange(batch))

        def score(pairs):
            return lambda: encoder(pixel_values, input_ids, attention_mask, pairs=pairs,
                                   batch_size=args.pair_batch_size)

        with torch.no_grad():
            top_k_time, all_time = fastest_times([score(candidate_pairs), score(all_pairs)], args.repeats)
        rows.append((batch, len(candidate_pairs), len(all_pairs), top_k_time, all_time))
        print(f"B={batch}: top-k {len(candidate_pairs)} pairs {top_k_time:.2f} s, all {len(all_pairs)} pairs "
              f"{all_time:.2f} s", file=sys.stderr)

    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"BLIP ITM, random weights, {parameters:.1f}M parameters, {IMAGE_SIZE} px / {PATCH_SIZE} px patches, "
          f"{CAPTION_LENGTH}-token captions; k = {args.top_k}; {args.threads} thread(s); fastest of {args.repeats} "
          f"alternating runs; load average at the end {load}\n")
    print("| B | pairs top-k (≤ B·(2k+1)) | pairs B² | top-k (s / batch) | all B² (s / batch) | B² / top-k time |")
    print("|---|---|---|---|---|---|")
    for batch, top_k_pairs, all_pairs, top_k_time, all_time in rows:
        print(f"| {batch} | {top_k_pairs} | {all_pairs} | {top_k_time:.2f} | {all_time:.2f} | "
              f"{all_time / top_k_time:.1f}× |")


if __name__ == "__main__":
    main()
