"""Query latency and peak memory of the torch-free search runtime, and the search kernels it was chosen from ->
markdown for BENCHMARKS.md.

    python benchmarks/query_latency.py                                  # trains a quick `shapes` student first
    python benchmarks/query_latency.py --model_dir outputs/demo/student # a trained student

1. The student: `--model_dir`, else a `shapes`-preset student trained here for about two minutes (contrastive, with
   the teachers stage's `train_dual_teacher` loop, on a 3000-image mcad-shapes train split), kept in `--work_dir`.
   Its text encoder is exported with `export_onnx` (int8 by onnxruntime dynamic quantization), as `export_variants`
   does.
2. Retrieval cost of quantizing the index: the mcad-shapes test split (1000 images, 5000 captions) embedded by the
   student (images: torch fp32, as `build_index` does; captions: the int8 ONNX text encoder, the query path),
   searched with an exact float32 gallery and with the int8 index (`GalleryIndex.search`). Besides Recall@K, how
   often a query's top 1 (and its top 10) stays what the reference gives: the exact gallery with the same text
   embeddings for the index, and the fp32 torch text encoder for the int8 ONNX one.
3. Kernels, side by side in this process: the int8 codes of a synthetic gallery (random unit vectors of the
   student's dimension) of each `--sizes`, one query embedding at a time, scored and cut to the top 5 by each
   candidate — numpy (int8 -> float32 per block of rows, then a matrix product: the kernel before this one), the
   chosen onnxruntime MatMulInteger scan (`GalleryIndex.search`), and, where installed (`pip install simsimd
   faiss-cpu usearch`; none is a dependency), simsimd's int8 dot products, FAISS's `IndexScalarQuantizer`
   (its own 8-bit codes, a range per dimension) and usearch's exact int8 search — against the floor: one read of
   the codes (a numpy sum over them as uint64). Also each candidate's top-10 overlap with exact float32 search.
   Repeated at `--kernel_dimensions` (random queries; 256 is the `mobile` preset's dimension).
4. Latency and memory: the same galleries saved as index files, one fresh process per (gallery, path, threads):
   `GallerySearch` (numpy + onnxruntime + tokenizers), and the torch fp32 path (`MCADProcessor` +
   `MCADModel.get_text_features` + a torch matmul and topk over a float32 gallery). Each process answers
   `--queries` mcad-shapes captions per round for `--rounds` rounds; the fastest round's p50 and p95 are reported,
   with the process's peak RSS (VmHWM) at the end.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

K = 5


# --- worker processes: one gallery, one path, a fresh interpreter ----------------------------------------------------


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def heavy_modules() -> list[str]:
    """Which of torch and transformers this process has imported."""
    return sorted({name.split(".")[0] for name in sys.modules} & {"torch", "transformers"})


def time_rounds(answer, queries: list[str], rounds: int) -> dict:
    """Answer every query once per round (after a warm-up); the fastest round by p50."""
    for query in queries[:5]:
        answer(query)
    best = None
    for _ in range(rounds):
        time.sleep(0.2)
        timings = []
        for query in queries:
            start = time.perf_counter()
            answer(query)
            timings.append(1000 * (time.perf_counter() - start))
        result = {"p50_ms": float(np.percentile(timings, 50)), "p95_ms": float(np.percentile(timings, 95))}
        if best is None or result["p50_ms"] < best["p50_ms"]:
            best = result
    return best


def runtime_worker(args) -> dict:
    from modeling_mcad.search import GallerySearch

    started = time.perf_counter()
    engine = GallerySearch(args.gallery, args.model_dir, num_threads=args.threads[0])
    load_s = time.perf_counter() - started
    queries = json.loads(Path(args.queries_file).read_text())
    result = time_rounds(lambda query: engine.search(query, K), queries, args.rounds)
    encode = time_rounds(lambda query: engine.encoder.encode([query]), queries, args.rounds)
    return {**result, "encode_p50_ms": encode["p50_ms"], "load_s": load_s, "peak_rss_mib": peak_rss_mib(),
            "heavy_modules": heavy_modules()}


def torch_worker(args) -> dict:
    import torch

    from modeling_mcad import MCADModel, MCADProcessor

    torch.set_num_threads(args.threads[0])
    started = time.perf_counter()
    model = MCADModel.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    processor = MCADProcessor.from_pretrained(args.model_dir)
    gallery = torch.from_numpy(np.load(args.gallery))
    load_s = time.perf_counter() - started

    @torch.inference_mode()
    def encode(query: str) -> torch.Tensor:
        tokens = processor(text=[query], truncation=True, return_tensors="pt")
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return torch.nn.functional.normalize(text.pooler_output, dim=-1)[0]

    @torch.inference_mode()
    def answer(query: str):
        return torch.topk(gallery @ encode(query), K)

    queries = json.loads(Path(args.queries_file).read_text())
    result = time_rounds(answer, queries, args.rounds)
    encode_result = time_rounds(encode, queries, args.rounds)
    return {**result, "encode_p50_ms": encode_result["p50_ms"], "load_s": load_s, "peak_rss_mib": peak_rss_mib(),
            "heavy_modules": heavy_modules()}


# --- the main process: student, export, recall, galleries ----------------------------------------------------------


def train_quick_student(folder: Path, shapes: dict, epochs: int, seed: int = 0) -> None:
    """A `shapes` student trained contrastively on the mcad-shapes train split with the teachers stage's dual-encoder
    loop (CLIP loss, one caption per image per batch, batches of whole families, warm-up and cosine decay)."""
    import torch

    from modeling_mcad import MCADModel, MCADProcessor
    from modeling_mcad.shapes import make_shapes
    from modeling_mcad.teacher_training import train_dual_teacher

    torch.manual_seed(seed)
    train = make_shapes(seed=seed, **{**shapes, "validation": 0, "test": 0})["train"]
    model, processor = MCADModel.from_preset("shapes"), MCADProcessor.from_preset("shapes")
    history = train_dual_teacher(model, processor, train, epochs=epochs, lr=2e-3, batch_size=128, seed=seed)
    print(f"  trained {epochs} epochs in {history.seconds:.0f} s, last epoch's loss {history.epoch_losses[-1]:.3f}",
          file=sys.stderr)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)


def prepare_model(args) -> Path:
    """The student folder with its ONNX text encoder (exported into `work_dir` when the folder has none)."""
    import shutil

    import torch

    from modeling_mcad import MCADModel, MCADProcessor
    from modeling_mcad.export import export_onnx
    from modeling_mcad.search import DEFAULT_TEXT_MODEL

    folder = args.work_dir / "student"
    if args.model_dir is not None:
        folder = Path(args.model_dir)
        if not (folder / DEFAULT_TEXT_MODEL).is_file():  # export into a copy: the given folder stays as it is
            folder = args.work_dir / "given_student"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(args.model_dir, folder)
    elif not (folder / "config.json").is_file():
        print(f"Training a quick shapes student ({args.train_epochs} epochs) into {folder}", file=sys.stderr)
        train_quick_student(folder, args.shapes, args.train_epochs)
    if not (folder / DEFAULT_TEXT_MODEL).is_file():
        model = MCADModel.from_pretrained(folder, dtype=torch.float32).eval()
        export_onnx(model, MCADProcessor.from_pretrained(folder), folder / Path(DEFAULT_TEXT_MODEL).parent)
    return folder


def quantization_recall(model_dir: Path, test, threads: int) -> tuple[dict, np.ndarray]:
    """Text->image Recall@K on the test split: exact float32 gallery vs the int8 index; plus the fp32 torch text
    encoder on the exact gallery, for the cost of the whole deployed path. Also the median gap between a query's two
    best exact scores: an index can only swap results whose scores are closer than its error. Returns the figures and
    the captions' embeddings by the int8 text encoder."""
    import torch

    from modeling_mcad import MCADModel, MCADProcessor
    from modeling_mcad.evaluation import flatten_captions
    from modeling_mcad.search import GalleryIndex, TextQueryEncoder, embed_gallery

    ids, images, index_model = embed_gallery(test, model_dir)
    captions, text_to_image = flatten_captions(test)
    text_to_image = np.asarray(text_to_image)
    encoder = TextQueryEncoder(model_dir, num_threads=threads)
    texts = np.concatenate([encoder.encode(captions[i : i + 256])[0] for i in range(0, len(captions), 256)])
    model, processor = MCADModel.from_pretrained(model_dir).eval(), MCADProcessor.from_pretrained(model_dir)
    with torch.inference_mode():
        tokens = [processor(text=captions[i : i + 256], padding=True, truncation=True, return_tensors="pt")
                  for i in range(0, len(captions), 256)]
        torch_texts = np.concatenate([
            torch.nn.functional.normalize(model.get_text_features(**batch).pooler_output, dim=-1).numpy()
            for batch in tokens])

    def recall(ranked: np.ndarray, exact: np.ndarray, scores: np.ndarray | None = None) -> dict:
        hits = ranked == text_to_image[:, None]
        row = {**{f"t2i_r{k}": 100 * float(hits[:, :k].any(axis=1).mean()) for k in (1, 5, 10)},
               "top1_agreement": 100 * float((ranked[:, 0] == exact[:, 0]).mean()),
               "top10_overlap": 100 * float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ranked, exact)]))}
        if scores is not None:  # how far the index's scores of its top 10 are from the exact ones
            row["max_score_error"] = float(np.abs(scores - np.take_along_axis(exact_scores, ranked, axis=1)).max())
        return row

    exact_scores = texts @ images.T
    exact = np.argsort(-exact_scores, axis=1, kind="stable")[:, :10]
    torch_exact = np.argsort(-(torch_texts @ images.T), axis=1, kind="stable")[:, :10]
    rows = {"fp32 text (torch) + exact fp32 gallery": recall(torch_exact, torch_exact),
            "int8 text (ONNX) + exact fp32 gallery": recall(exact, torch_exact)}
    indices, scores = GalleryIndex.from_embeddings(images, ids, index_model).search(texts, k=10)
    rows["int8 text (ONNX) + int8 index"] = recall(indices, exact, scores)
    best_two = -np.sort(-exact_scores, axis=1)[:, :2]
    return {"rows": rows, "median_top2_gap": float(np.median(best_two[:, 0] - best_two[:, 1]))}, texts


def synthetic_embeddings(size: int, dimension: int) -> np.ndarray:
    embeddings = np.random.default_rng(size).standard_normal((size, dimension), dtype=np.float32)
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def make_galleries(work_dir: Path, model_dir: Path, sizes: list[int]) -> dict[int, dict[str, Path]]:
    """Synthetic galleries: random unit vectors, as an index file and a float32 .npy."""
    from modeling_mcad.search import GalleryIndex, IndexModel

    index_model = IndexModel.from_model_dir(model_dir)
    dimension = index_model.probe_embeddings.shape[1]
    galleries = {}
    for size in sizes:
        folder = work_dir / "galleries" / f"{(index_model.weights_sha256 or index_model.name)[:12]}-{size}"
        files = {"runtime int8": folder / "gallery.index.safetensors", "torch fp32": folder / "gallery.fp32.npy"}
        if not all(file.is_file() for file in files.values()):
            folder.mkdir(parents=True, exist_ok=True)
            embeddings = synthetic_embeddings(size, dimension)
            ids = [f"DCIM/{i // 1000:04d}/IMG_{i:07d}.jpg" for i in range(size)]
            GalleryIndex.from_embeddings(embeddings, ids, index_model).save(files["runtime int8"])
            np.save(files["torch fp32"], embeddings)
        galleries[size] = files
    return galleries


def kernel_candidates(codes: np.ndarray, scales: np.ndarray, index, threads: int) -> dict:
    """name -> function(query embedding) -> indices of the top 5, for every candidate that is installed."""
    block_rows = 4096
    block = np.empty((block_rows, codes.shape[1]), np.float32)
    scores = np.empty(len(codes), np.float32)

    def top(values: np.ndarray, k: int) -> np.ndarray:
        best = np.argpartition(-values, k)[:k]
        return best[np.argsort(-values[best], kind="stable")]

    def numpy_blocks(query, k=K):  # the kernel before the current one
        for start in range(0, len(codes), block_rows):
            rows = block[: min(block_rows, len(codes) - start)]
            rows[...] = codes[start : start + len(rows)]
            np.matmul(rows, query, out=scores[start : start + len(rows)])
        return top(scores * scales, k)

    def int8_query(query):
        return np.rint(query / np.abs(query).max() * 127).astype(np.int8)

    candidates = {"numpy, int8 -> float32 per block (before)": numpy_blocks,
                  "onnxruntime MatMulInteger, packed (chosen)": lambda query, k=K: index.search(query, k, threads)[0]}
    try:
        import simsimd

        dots = np.empty((1, len(codes)), np.float32)

        def simsimd_dots(query, k=K):
            simsimd.cdist(int8_query(query)[None], codes, metric="dot", out=dots, threads=threads)
            return top(dots[0] * scales, k)

        candidates["simsimd int8 dot products"] = simsimd_dots
    except ImportError:
        pass
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
        embeddings = index.embeddings()
        trained = faiss.IndexScalarQuantizer(codes.shape[1], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        trained.train(embeddings)  # FAISS's own 8-bit codes: a range per dimension, no per-vector scale
        trained.add(embeddings)
        candidates["FAISS IndexScalarQuantizer, 8-bit"] = lambda query, k=K: trained.search(query[None], k)[1][0]
    except ImportError:
        pass
    try:
        from usearch.index import MetricKind
        from usearch.index import search as usearch_exact

        # Cosine over the codes is the per-vector scaled dot product: each code is its embedding times a constant.
        candidates["usearch exact int8 search (cosine)"] = (
            lambda query, k=K: usearch_exact(codes, int8_query(query), k, MetricKind.Cos, exact=True,
                                             threads=threads).keys)
    except ImportError:
        pass
    return candidates


def compare_kernels(galleries: dict[int, dict[str, Path]], text_queries: np.ndarray, dimensions: list[int],
                    threads: int, rounds: int) -> dict:
    """p50 of each candidate kernel on each gallery (the query embedding given), its top-10 overlap with exact
    float32 search, and the floor: one read of the codes. At the student's dimension the galleries are the index
    files and the queries its caption embeddings; at another dimension, random unit vectors of it, in memory."""
    from modeling_mcad.search import PROBE_TEXTS, GalleryIndex, IndexModel

    results = {}
    for dimension in dimensions:
        for size, files in galleries.items():
            if dimension == text_queries.shape[1]:
                index, queries = GalleryIndex.load(files["runtime int8"]), text_queries
            else:
                model = IndexModel("random", None, probe_embeddings=np.zeros((len(PROBE_TEXTS), dimension), np.float32))
                index = GalleryIndex.from_embeddings(synthetic_embeddings(size, dimension), range(size), model)
                queries = synthetic_embeddings(len(text_queries), dimension)
            codes, scales = np.ascontiguousarray(index.codes), np.asarray(index.scales)
            exact = synthetic_embeddings(size, dimension)
            words = codes.view(np.uint64) if codes.nbytes % 8 == 0 else codes.view(np.uint8)
            floor = time_rounds(lambda _: np.add.reduce(words, axis=None), list(range(20)), rounds)["p50_ms"]
            row = results[f"{size:,} x {dimension}"] = {"read the codes once (floor)": {"p50_ms": floor}}
            for name, kernel in kernel_candidates(codes, scales, index, threads).items():
                timing = time_rounds(lambda position: kernel(queries[position]), list(range(len(queries))), rounds)
                overlap = np.mean([len(set(kernel(query, 10)) & set(np.argsort(-(exact @ query))[:10])) / 10
                                   for query in queries[:20]])
                row[name] = {**timing, "top10_overlap": 100 * float(overlap)}
                print(f"{size:>9,} x {dimension} {name:<50} {row[name]}", file=sys.stderr)
    return results


def run_worker(path_name: str, gallery: Path, model_dir: Path, queries: Path, threads: int, args) -> dict:
    command = [sys.executable, __file__, "--worker", "torch" if path_name.startswith("torch") else "runtime",
               "--gallery", str(gallery), "--model_dir", str(model_dir), "--queries_file", str(queries),
               "--rounds", str(args.rounds), "--threads", str(threads)]
    # numpy/OpenBLAS threads as well: the machine is shared and a query is a single matrix-vector product.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if completed.returncode != 0:
        raise RuntimeError(f"{path_name} worker on {gallery} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def markdown(results: dict, kernels: dict, recall: dict, model_dir: Path, args, load: tuple) -> str:
    lines = [f"Student: {model_dir}; k = {K}; {args.queries} queries x {args.rounds} rounds per process, fastest "
             f"round; load average {load[0]:.2f} before, {load[1]:.2f} after.", "",
             f"Kernels, {args.threads[0]} thread(s), the query embedding given: p50 in ms (top-10 overlap with exact "
             "float32 search, %):", "",
             "| kernel (gallery x dimension) | " + " | ".join(kernels) + " |", "|---|" + "---|" * len(kernels)]
    for name in next(iter(kernels.values())):
        cells = []
        for column in kernels:
            row = kernels[column].get(name)
            overlap = f" ({row['top10_overlap']:.1f})" if row and "top10_overlap" in row else ""
            cells.append(f"{row['p50_ms']:.2f}{overlap}" if row else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| gallery | path | threads | p50 (ms) | p95 (ms) | text encode p50 (ms) | peak RSS (MiB) "
              "| index file (MiB) | load (s) | torch / transformers imported |", "|---" * 10 + "|"]
    for (size, name, threads), row in results.items():
        imported = ", ".join(row["heavy_modules"]) or "no"
        lines.append(f"| {size:,} | {name} | {threads} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} "
                     f"| {row['encode_p50_ms']:.2f} | {row['peak_rss_mib']:.0f} | {row['file_mib']:.1f} "
                     f"| {row['load_s']:.2f} | {imported} |")
    lines += ["", "| text encoder + gallery | t2i R@1 | t2i R@5 | t2i R@10 | top-1 same as reference (%) "
              "| top-10 overlap with reference (%) | largest score error in the top 10 |",
              "|---|---|---|---|---|---|---|"]
    for name, row in recall["rows"].items():
        error = f"{row['max_score_error']:.5f}" if "max_score_error" in row else "—"
        lines.append(f"| {name} | {row['t2i_r1']:.2f} | {row['t2i_r5']:.2f} | {row['t2i_r10']:.2f} "
                     f"| {row['top1_agreement']:.1f} | {row['top10_overlap']:.1f} | {error} |")
    lines += ["", f"Median gap between a query's two best exact scores: {recall['median_top2_gap']:.6f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", help="a trained student folder (default: train a quick one)")
    parser.add_argument("--work_dir", type=Path, default=Path("outputs/bench_query"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--paths", nargs="+", default=["runtime int8", "torch fp32"])
    parser.add_argument("--queries", type=int, default=50, help="distinct queries per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts of the runtime processes; the first also for the kernels and torch")
    parser.add_argument("--kernel_dimensions", type=int, nargs="+", default=[256],
                        help="dimensions besides the student's to compare the kernels at (256: the mobile preset)")
    parser.add_argument("--train_epochs", type=int, default=15, help="of 23 steps (3000 images, batch 128)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--worker", choices=["runtime", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--gallery", help=argparse.SUPPRESS)
    parser.add_argument("--queries_file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps((runtime_worker if args.worker == "runtime" else torch_worker)(args)))
        return

    import torch

    from modeling_mcad.shapes import make_shapes

    # Two threads on a core that another job holds made training steps 10x slower here.
    torch.set_num_threads(args.threads[0])
    args.shapes = {"train": 3000, "test": 1000, "image_size": 64}  # the demo's mcad-shapes settings
    load_before = os.getloadavg()[0]
    model_dir = prepare_model(args)
    test = make_shapes(seed=0, **{**args.shapes, "train": 0, "validation": 0})["test"]
    recall, text_embeddings = quantization_recall(model_dir, test, args.threads[0])
    queries_file = args.work_dir / "queries.json"
    queries = sorted({caption for captions in test["captions"] for caption in captions})
    queries_file.write_text(json.dumps(queries[:: max(1, len(queries) // args.queries)][: args.queries]))
    galleries = make_galleries(args.work_dir, model_dir, args.sizes)
    query_embeddings = text_embeddings[:: max(1, len(text_embeddings) // args.queries)][: args.queries]
    dimensions = [query_embeddings.shape[1], *(d for d in args.kernel_dimensions if d != query_embeddings.shape[1])]
    kernels = compare_kernels(galleries, query_embeddings, dimensions, args.threads[0], args.rounds)
    results = {}
    for size, files in galleries.items():
        for name in args.paths:
            for threads in args.threads if name.startswith("runtime") else args.threads[:1]:
                row = run_worker(name, files[name], model_dir, queries_file, threads, args)
                results[size, name, threads] = {**row, "file_mib": files[name].stat().st_size / 2**20}
                print(f"{size:>9,} {name:<13} {threads} {row}", file=sys.stderr)
    table = markdown(results, kernels, recall, model_dir, args, (load_before, os.getloadavg()[0]))
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"latency": {f"{size} {name} {threads}": row for (size, name, threads), row
                                                     in results.items()},
                                         "kernels": kernels,
                                         "recall": recall}, indent=2))


if __name__ == "__main__":
    main()
