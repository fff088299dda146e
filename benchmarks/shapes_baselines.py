"""Bag-of-words floors of the mcad-shapes test split -> a markdown table for BENCHMARKS.md.

    python benchmarks/shapes_baselines.py                  # the default benchmark, seeds 0 1 2

Each matcher of `modeling_mcad.shapes.matcher_embeddings` sees every image's scene perfectly but reads captions as
a bag of words: `word_overlap` (all words of a caption against the image's reference description),
`colour_shape` (colour and shape words: no binding, no relation) and `colour_shape_orientation` (plus the
relation's axis, not its direction). A model must beat these for the benchmark to credit it with binding or
relations (DESIGN §6.4). Figures are the mean ± std over the test splits of `--seeds` (`make_shapes(seed=...)` with
the default knobs unless overridden).
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_mcad.evaluation import retrieval_metrics  # noqa: E402
from modeling_mcad.shapes import MATCHERS, make_shapes, matcher_embeddings  # noqa: E402

COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test", type=int, default=1000, help="test images per seed")
    parser.add_argument("--knobs", nargs="*", default=[], metavar="NAME=INT",
                        help="make_shapes difficulty knobs, e.g. num_colors=3 relations=0")
    args = parser.parse_args()
    knobs = {name: int(value) for name, value in (item.split("=") for item in args.knobs)}

    results = {matcher: {column: [] for column in COLUMNS} for matcher in MATCHERS}
    for seed in args.seeds:
        split = make_shapes(seed=seed, train=0, validation=0, test=args.test, **knobs)["test"]
        for matcher in MATCHERS:
            metrics = retrieval_metrics(*matcher_embeddings(split, matcher, seed=seed))
            for column in COLUMNS:
                results[matcher][column].append(metrics[column])

    print(f"seeds {args.seeds}, {args.test} test images ({5 * args.test} captions), knobs {knobs or 'default'}\n")
    print("| matcher | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for matcher, columns in results.items():
        cells = []
        for values in columns.values():
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        print(f"| {matcher} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
