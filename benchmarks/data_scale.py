"""Loading at real scale: `load_image_text_dataset` + `flatten_pairs` on replicas of Flickr30K and COCO in the
layouts of their Hub copies -> markdown for BENCHMARKS.md.

    python benchmarks/data_scale.py                      # Flickr30K size
    python benchmarks/data_scale.py --replicas flickr30k coco web

- `flickr30k`: nlphuji/flickr30k's Parquet export — one split of 31,783 JPEG images (500 x 375) embedded in Parquet
  shards, 5 captions each in `caption`, Karpathy's split in a `split` column (29,000 train).
- `coco`: yerevann/coco-karpathy's layout — Parquet metadata (`sentences`, `filepath`, `filename`) with the images as
  JPEG files (640 x 480) under COCO's folders on disk: 82,783 train + 30,504 restval + 5,000 + 5,000.
- `web`: a web-style set of 3,000,000 rows, one alt text per row and an image path each (the files are not written:
  it is read with `check_images=False` only, as such a set would be).

Every replica is also streamed (`stream_image_text_pairs`, as `train_mcad.py --streaming` reads it, with every image
checked but the web set's: one pass through a shuffle buffer of 10,000).

Replicas are generated once into `--work_dir` (smooth random images, about the JPEG size of photos). Each
measurement runs in a fresh process: the training split as `train_mcad.py` loads it (configs/flickr30k_clip_blip.yaml
and configs/coco_karpathy_clip_blip.yaml: `where`, `image_column`, `image_root`), with every image checked
(`check_images=True`, the default) and without, then `flatten_pairs`; wall time and peak RSS (VmHWM). The streamed
row: the time to the first pair, to the end of one pass, and the peak RSS.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPLICAS = {
    "flickr30k": {"splits": {"train": 29000, "val": 1014, "test": 1769}, "size": (500, 375), "captions": 5},
    "coco": {"splits": {"train": 82783, "restval": 30504, "validation": 5000, "test": 5000}, "size": (640, 480),
             "captions": 5},
    "web": {"rows": 3_000_000},
}
ROWS_PER_SHARD = 2000


def jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """A smooth random picture (a few colours, bicubically upscaled): about a photo's JPEG size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def flickr30k_shard(args: tuple) -> None:
    import datasets

    path, start, stop, splits, size, captions = args
    features = datasets.Features({
        "image": datasets.Image(), "caption": datasets.List(datasets.Value("string")),
        "sentids": datasets.List(datasets.Value("string")), "split": datasets.Value("string"),
        "img_id": datasets.Value("string"), "filename": datasets.Value("string")})
    rows = range(start, stop)
    datasets.Dataset.from_dict({
        "image": [{"bytes": jpeg(row, size), "path": None} for row in rows],
        "caption": [[f"a picture {row} described the {j}th way" for j in range(captions)] for row in rows],
        "sentids": [[str(captions * row + j) for j in range(captions)] for row in rows],
        "split": [splits[row] for row in rows], "img_id": [str(row) for row in rows],
        "filename": [f"{row}.jpg" for row in rows]}, features=features).to_parquet(path)


def coco_files(args: tuple) -> None:
    folder, names, seeds, size = args
    folder.mkdir(parents=True, exist_ok=True)
    for name, seed in zip(names, seeds):
        (folder / name).write_bytes(jpeg(seed, size))


def make_replica(name: str, folder: Path) -> Path:
    """The replica's folder (generated once; a `complete` marker says it is whole)."""
    spec = REPLICAS[name]
    if (folder / "complete").exists():
        return folder
    import datasets

    started = time.perf_counter()
    if name == "web":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = spec["rows"]
        (folder / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"image": [f"images/{i // 1000:04d}/{i:08d}.jpg" for i in range(rows)],
                                 "caption": [f"alt text of web image {i}" for i in range(rows)]}),
                       folder / "data" / "train-00000-of-00001.parquet")
        (folder / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                          "    path: data/train-*\n---\n")
        (folder / "complete").write_text(f"{time.perf_counter() - started:.0f} s to generate\n")
        return folder
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        if name == "flickr30k":
            splits = [split for split, count in spec["splits"].items() for _ in range(count)]
            order = np.random.default_rng(0).permutation(len(splits))
            splits = [splits[i] for i in order]
            jobs = [(str(folder / "TEST" / "test" / f"{start // ROWS_PER_SHARD:04d}.parquet"), start,
                     min(start + ROWS_PER_SHARD, len(splits)), splits, spec["size"], spec["captions"])
                    for start in range(0, len(splits), ROWS_PER_SHARD)]
            (folder / "TEST" / "test").mkdir(parents=True, exist_ok=True)
            list(pool.map(flickr30k_shard, jobs))
        else:
            number, features = 0, datasets.Features({
                "filepath": datasets.Value("string"), "filename": datasets.Value("string"),
                "split": datasets.Value("string"), "sentences": datasets.List(datasets.Value("string")),
                "cocoid": datasets.Value("int64")})
            jobs, cards = [], []
            for split, count in spec["splits"].items():
                source = "train2014" if split == "train" else "val2014"
                names = [f"COCO_{source}_{number + i:012d}.jpg" for i in range(count)]
                datasets.Dataset.from_dict({
                    "filepath": [source] * count, "filename": names, "split": [split] * count,
                    "sentences": [[f"a picture {number + i} described the {j}th way" for j in range(spec["captions"])]
                                  for i in range(count)],
                    "cocoid": list(range(number, number + count))}, features=features).to_parquet(
                    str(folder / "hub" / "data" / f"{split}-00000-of-00001.parquet"))
                cards.append(f"  - split: {split}\n    path: data/{split}-*")
                jobs += [(folder / "images" / source, names[i : i + 1000], range(number + i, number + i + 1000),
                          spec["size"]) for i in range(0, count, 1000)]
                number += count
            (folder / "hub" / "README.md").write_text(
                "---\nconfigs:\n- config_name: default\n  data_files:\n" + "\n".join(cards) + "\n---\n")
            list(pool.map(coco_files, jobs))
    (folder / "complete").write_text(f"{time.perf_counter() - started:.0f} s to generate\n")
    return folder


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


def training_split(name: str, folder: Path) -> tuple[Path, dict]:
    """The replica's source and the options `train_mcad.py` reads its training split with (the shipped configs)."""
    options = {"flickr30k": {"split": "test", "where": {"split": "train"}, "caption_column": "caption",
                             "data_dir": "TEST"},
               "coco": {"split": "train+restval", "image_column": ["filepath", "filename"],
                        "image_root": folder / "images", "caption_column": "sentences"},
               "web": {"caption_column": "caption"}}[name]
    return (folder / "hub" if name == "coco" else folder), {**options,
                                                             "cache_dir": str(folder / f"cache-{time.time_ns()}")}


def load_worker(name: str, folder: Path, check_images: bool) -> dict:
    from modeling_mcad.data import flatten_pairs, load_image_text_dataset

    source, options = training_split(name, folder)
    started = time.perf_counter()
    split = load_image_text_dataset(source, check_images=check_images, **options)
    loaded = time.perf_counter()
    pairs = flatten_pairs(split)
    done = time.perf_counter()
    return {"images": len(split), "pairs": len(pairs), "load_s": loaded - started, "flatten_s": done - loaded,
            "peak_rss_mib": peak_rss_mib()}


def stream_worker(name: str, folder: Path, check_images: bool) -> dict:
    from modeling_mcad.data import stream_image_text_pairs

    source, options = training_split(name, folder)
    started = time.perf_counter()
    stream = stream_image_text_pairs(source, check_images=check_images, **options)
    stream = stream.shuffle(seed=0, buffer_size=10_000)
    pairs, first = 0, None
    for _ in stream:
        pairs += 1
        first = first or time.perf_counter() - started
    return {"pairs": pairs, "first_s": first, "pass_s": time.perf_counter() - started, "peak_rss_mib": peak_rss_mib()}


def run_worker(*args: str) -> dict:
    """A measurement in a fresh process (its own peak RSS)."""
    completed = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True,
                               check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", nargs="+", choices=sorted(REPLICAS), default=["flickr30k"])
    parser.add_argument("--work_dir", type=Path, default=Path("outputs/bench_data"))
    parser.add_argument("--worker", nargs=3, metavar=("NAME", "FOLDER", "CHECK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, folder, check = args.worker
        streamed, check = check.startswith("stream-"), check.removeprefix("stream-")
        worker = stream_worker if streamed else load_worker
        print(json.dumps(worker(name, Path(folder), check == "True")))
        return
    rows, streamed = [], []
    for name in args.replicas:
        folder = make_replica(name, args.work_dir / name)
        print(f"{name}: {(folder / 'complete').read_text().strip()}", file=sys.stderr)
        for check in (True, False) if name != "web" else (False,):
            row = run_worker(name, str(folder), str(check))
            rows.append((name, check, row))
            print(name, check, row, file=sys.stderr)
        # Streamed as train_mcad.py --streaming reads it (every image checked), but the web set, whose images
        # are not written.
        streamed.append((name, name != "web", run_worker(name, str(folder), f"stream-{name != 'web'}")))
        print(name, "streamed", streamed[-1], file=sys.stderr)
    print("| replica | check_images | images | pairs | load + check (s) | flatten_pairs (s) | total (s) "
          "| peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, check, row in rows:
        print(f"| {name} | {check} | {row['images']:,} | {row['pairs']:,} | {row['load_s']:.1f} | "
              f"{row['flatten_s']:.1f} | {row['load_s'] + row['flatten_s']:.1f} | {row['peak_rss_mib']:.0f} |")
    if streamed:
        print("\n| replica, streamed | check_images | pairs | first pair (s) | one pass (s) | pairs / s "
              "| peak RSS (MiB) |")
        print("|---|---|---|---|---|---|---|")
        for name, check, row in streamed:
            print(f"| {name} | {check} | {row['pairs']:,} | {row['first_s']:.1f} | {row['pass_s']:.1f} | "
                  f"{row['pairs'] / row['pass_s']:,.0f} | {row['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
