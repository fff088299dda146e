"""
Where retrieval's first answers go on a transfer setting's test split (mcad-shapes): for each image the caption a
model ranks first, and for each caption the image, sorted by how the answer relates to the right one.

    python benchmarks/retrieval_errors.py --settings tiny --rows mcad_feature_rank_sharp clip_kd [--seeds 0 1 2 3 4]

Kinds of first answer (percent of the queries; R@1 is `right`):
- `right`: a caption of the image (image→text), the caption's own image (text→image);
- `places swapped`, `colours swapped`, `attribute changed`, `two edits`: the answer belongs to an image of the
  query's family (mcad-shapes' near-duplicates) that differs from it so (`near_duplicate_kind`): its objects in each
  other's places (the relation flipped), the objects' colours traded, one attribute of one object changed, or two of
  those;
- `other family, true`: it belongs to an image of another family (on the same axis), and the caption is still true
  of the image it was paired with (a retrieval protocol counts it wrong; no model is to blame);
- `other family, false`: the rest; mostly an object's shape mistaken.

Rows: the dual teacher, the fusion teacher re-ranking the dual teacher's top 10 (as in the teachers' gates), and the
students `transfer_table.py` trained for each named row (`OUTPUT_DIR/<setting>/runs/<row>_s<seed>/student`),
averaged over the seeds found. Writes `benchmarks/results/retrieval_errors.json` (a row this invocation did not read
keeps its earlier entry, each student row the command that wrote it) and prints the tables; `--write` also
replaces their section of BENCHMARKS.md.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_table import REPO_ROOT, invocation, run_folder, shapes_split, write_section  # noqa: E402
from transfer_table import SETTINGS, in_settings_order, student_base  # noqa: E402

from modeling_mcad import MCADModel, MCADProcessor  # noqa: E402
from modeling_mcad.evaluation import embed_split, flatten_captions, student_encoders  # noqa: E402
from modeling_mcad.shapes import caption_is_true, teacher_gates  # noqa: E402
from modeling_mcad.utils import atomic_write_text  # noqa: E402

KINDS = ("right", "places swapped", "colours swapped", "attribute changed", "two edits", "other family, true",
         "other family, false")
RESULTS = REPO_ROOT / "benchmarks" / "results" / "retrieval_errors.json"
SECTION = "## Transfer: where the first answers go"


def near_duplicate_kind(scene: dict, other: dict) -> str:
    """
    How another image of a scene's family differs from it, object by object in scene order (mcad-shapes' families:
    a base scene and three one-edit variants of it, so two variants are two edits apart).

    Args:
        scene, other (`dict`): the two images' parsed `scene` columns.

    Returns:
        `places swapped` (the same objects in another order: the relation flipped; with two objects of one shape and
        size this is also their colours swapped), `colours swapped` (each place keeps its shape and size, the colours
        are reordered), `attribute changed` (one size, colour or shape differs) or `two edits`.
    """
    objects, others = ([(o["shape"], o["size"], o["colour"]) for o in s["objects"]] for s in (scene, other))
    if sorted(objects) == sorted(others):
        return "places swapped"
    if ([o[:2] for o in objects] == [o[:2] for o in others]
            and sorted(o[2] for o in objects) == sorted(o[2] for o in others)):
        return "colours swapped"
    if len(objects) == len(others):
        changed = sum(a != b for pair in zip(objects, others) for a, b in zip(*pair))
        if changed == 1:
            return "attribute changed"
    return "two edits"


def pair_kind(image: int, caption_image: int, caption: str, family: list[int], scenes: list[dict]) -> str:
    """
    The kind of a retrieved pair (one of `KINDS`).

    Args:
        image (`int`): the pair's image.
        caption_image (`int`): the image the pair's caption was written for.
        caption (`str`): the caption.
        family (`list[int]`), scenes (`list[dict]`): each image's family and parsed scene.
    """
    if image == caption_image:
        return "right"
    if family[image] == family[caption_image]:
        return near_duplicate_kind(scenes[image], scenes[caption_image])
    # caption_is_true reads objects and their order, not the axis: "left of" is not true of a column.
    true = caption_is_true(caption, scenes[image]) and scenes[image]["axis"] == scenes[caption_image]["axis"]
    return "other family, true" if true else "other family, false"


def first_answer_kinds(first_caption: torch.Tensor, first_image: torch.Tensor, captions: list[str],
                       text_to_image: list[int], family: list[int], scenes: list[dict]) -> dict[str, dict]:
    """
    Percent of the queries whose first answer is of each kind (`KINDS`), both ways.

    Args:
        first_caption (`torch.LongTensor` of shape `(images,)`): each image's first caption (an index of `captions`).
        first_image (`torch.LongTensor` of shape `(captions,)`): each caption's first image.
        captions (`list[str]`), text_to_image (`list[int]`): the split's captions and each one's image.
        family (`list[int]`), scenes (`list[dict]`): each image's family and parsed scene.
    """
    i2t = Counter(pair_kind(image, text_to_image[caption], captions[caption], family, scenes)
                  for image, caption in enumerate(first_caption.tolist()))
    t2i = Counter(pair_kind(image, text_to_image[caption], captions[caption], family, scenes)
                  for caption, image in enumerate(first_image.tolist()))
    return {direction: {kind: 100.0 * counts[kind] / sum(counts.values()) for kind in KINDS}
            for direction, counts in (("i2t", i2t), ("t2i", t2i))}


def teacher_first_answers(teacher, split) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """
    The dual teacher's first answers both ways, and the fusion teacher's after re-ranking the dual teacher's top k:
    read off the teachers' gates (`shapes.teacher_gates`), which score those candidates.

    Args:
        teacher ([`MCADTeacher`]): the teachers.
        split (`datasets.Dataset`): an mcad-shapes split.
    """
    gates = teacher_gates(teacher, split)
    candidates, logits = gates["candidates"], gates["candidate_logits"]
    directions = ("i2t", "t2i")
    dual = tuple(candidates[direction][:, 0] for direction in directions)  # best first
    reranked = tuple(candidates[direction].gather(1, logits[direction].argmax(1, keepdim=True)).squeeze(1)
                     for direction in directions)
    return {"dual teacher": dual, f"fusion teacher (re-ranks dual top-{gates['top_k']})": reranked}


def student_first_answers(student_dir: Path, split, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """
    A saved student's first answers both ways.

    Args:
        student_dir (`Path`): the student's folder (`MCADModel` and `MCADProcessor`).
        split (`datasets.Dataset`): the split whose images are searched.
        captions (`list[str]`): the split's captions (`flatten_captions`).
    """
    student = MCADModel.from_pretrained(student_dir).eval()
    image_embeds, text_embeds = embed_split(*student_encoders(student, MCADProcessor.from_pretrained(student_dir)),
                                            split, captions)
    similarity = image_embeds @ text_embeds.t()
    return similarity.argmax(1), similarity.argmax(0)


def markdown(report: dict) -> str:
    """BENCHMARKS.md's section: per setting the commands that wrote its rows and per direction the kinds of first
    answer."""
    lines = [SECTION, "",
             "For each test query of a transfer setting, the first answer of the teachers and of the students "
             "`transfer_table.py` trained (students averaged over the seeds listed), sorted by how the answer's image "
             "relates to the query's: its own (R@1), a near-duplicate of its family (the objects' places swapped, "
             "i.e. the relation flipped; their colours swapped; one attribute changed; two of those), or an image of "
             "another family of which the caption is true (no model's fault) or false (mostly an object's shape "
             "mistaken, or a row taken for a column).", ""]
    for setting, rows in report["settings"].items():
        commands = list(dict.fromkeys(row["command"] for row in rows.values() if "command" in row))
        if commands:
            lines += ["```", *commands, "```", ""]
        for direction, label in (("i2t", "image → text"), ("t2i", "text → image")):
            lines += [f"`{setting}`, {label}: the first answer (percent of the queries)", "",
                      "| model | seeds | " + " | ".join(KINDS) + " |", "|---|---|" + "---|" * len(KINDS)]
            for name, row in rows.items():
                lines.append(f"| {name} | {', '.join(map(str, row['seeds'])) or '–'} | "
                             + " | ".join(f"{row[direction][kind]:.1f}" for kind in KINDS) + " |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/transfer"),
                        help="transfer_table.py's output folder")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["tiny"])
    parser.add_argument("--rows", nargs="*", default=[], help="transfer_table.py rows whose students to read")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md's section")
    args = parser.parse_args()
    from modeling_mcad.teachers import MCADTeacher

    teacher_dir = args.output_dir / "pretraining" / "teacher"
    if not (teacher_dir / "config.json").exists():
        raise SystemExit(f"No teacher in {teacher_dir}: run benchmarks/transfer_table.py first (it trains them).")
    teacher = MCADTeacher.from_pretrained(teacher_dir)
    report = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"settings": {}}
    for setting in args.settings:
        root = args.output_dir / setting
        split = shapes_split(student_base(root, setting, teacher_dir))
        captions, text_to_image = flatten_captions(split)
        family, scenes = split["family"], [json.loads(scene) for scene in split["scene"]]

        def kinds(first_caption, first_image):
            return first_answer_kinds(first_caption, first_image, captions, text_to_image, family, scenes)

        rows = {name: {"seeds": [], **kinds(*answers)}
                for name, answers in teacher_first_answers(teacher, split).items()}
        for row in args.rows:
            folders = {seed: run_folder(root, row, seed) / "student" for seed in args.seeds}
            found = {seed: folder for seed, folder in folders.items() if (folder / "config.json").exists()}
            if not found:
                raise SystemExit(f"No student of row {row!r} in {root / 'runs'} for seeds {args.seeds}: train them "
                                 f"with `python benchmarks/transfer_table.py --settings {setting} --rows {row}`.")
            per_seed = [kinds(*student_first_answers(folder, split, captions)) for folder in found.values()]
            shares = {direction: {kind: sum(s[direction][kind] for s in per_seed) / len(per_seed) for kind in KINDS}
                      for direction in ("i2t", "t2i")}
            rows[row] = {"seeds": sorted(found), "command": invocation(), **shares}
        report["settings"][setting] = {**report["settings"].get(setting, {}), **rows}  # other rows kept
    report["settings"] = in_settings_order(report["settings"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(report, indent=2))
    text = markdown(report)
    print(text)
    if args.write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
