"""Data and metric speed -> markdown tables for BENCHMARKS.md.

    python benchmarks/data_speed.py

- mcad-shapes generation: `make_shapes` images per second (drawing, PNG encoding, captions and distractors, the
  Arrow table), at 32 and 64 px.
- Loading: `load_image_text_dataset` of a 1000-image `imagefolder` (written by `to_imagefolder`), with the
  up-front check of every image and without it (`check_images=False`), once datasets has cached the folder.
- Retrieval metrics: `retrieval_metrics` on random unit embeddings (dim 256), 1k images × 5k captions (the
  Flickr30K / mcad-shapes test protocol) and 5k × 25k (COCO 5k), and the `evaluate` module on 1k × 5k (its inputs
  pass through Arrow).

Each figure is the fastest of `--repeats` runs (the machine is shared: slower runs measure the neighbours). The
metrics run with each of `--threads`: on a busy 2-core machine every parallel torch operation waits for the second
thread, and one thread can be the faster.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_mcad.data import load_image_text_dataset  # noqa: E402
from modeling_mcad.evaluation import load_retrieval_metric, retrieval_metrics  # noqa: E402
from modeling_mcad.shapes import make_shapes, to_imagefolder  # noqa: E402


def fastest(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def unit_embeddings(count: int, dim: int, seed: int) -> np.ndarray:
    embeds = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return embeds / np.linalg.norm(embeds, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="images generated per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads for the metrics")
    args = parser.parse_args()

    print("| mcad-shapes generation | images/s |\n|---|---|")
    for size in (32, 64):
        seconds = fastest(lambda: make_shapes(image_size=size, train=args.images, validation=0, test=0), args.repeats)
        print(f"| {size} px, {args.images} images | {args.images / seconds:.0f} |")

    with tempfile.TemporaryDirectory() as folder:
        gallery = make_shapes(train=0, validation=0, test=1000)
        to_imagefolder(gallery, Path(folder) / "shapes")
        cache = str(Path(folder) / "cache")
        print("\n| load_image_text_dataset, 1000-image imagefolder (64 px) | images/s |\n|---|---|")
        for check in (True, False):
            load = lambda: load_image_text_dataset(  # noqa: E731
                Path(folder) / "shapes", split="test", check_images=check, cache_dir=cache)
            load()  # datasets builds its Arrow cache of the folder once
            print(f"| check_images={check} | {1000 / fastest(load, args.repeats):.0f} |")

    print("\n| retrieval metrics (dim 256) | " + " | ".join(f"{n} thread(s), s" for n in args.threads) + " |")
    print("|---" * (len(args.threads) + 1) + "|")
    metric = load_retrieval_metric()
    for images, captions, through_evaluate in ((1000, 5000, False), (5000, 25000, False), (1000, 5000, True)):
        image_embeds, text_embeds = unit_embeddings(images, 256, 0), unit_embeddings(captions, 256, 1)
        text_to_image = np.repeat(np.arange(images), captions // images)
        if through_evaluate:
            name = "evaluate module"
            run = lambda: metric.compute(text_embeds=text_embeds, text_to_image=text_to_image,  # noqa: E731
                                         image_embeds=image_embeds)
        else:
            name = "retrieval_metrics"
            run = lambda: retrieval_metrics(image_embeds, text_embeds, text_to_image)  # noqa: E731
        cells = []
        for threads in args.threads:
            torch.set_num_threads(threads)
            cells.append(f"{fastest(run, args.repeats):.3f}")
        print(f"| {name}, {images} × {captions} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
