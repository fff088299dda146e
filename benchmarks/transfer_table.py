"""When the teachers know more than the labels: MCAD on transfer settings, paired over seeds.

    python benchmarks/transfer_table.py [--output_dir outputs/transfer] [--settings small noisy]
        [--seeds 0 1 2 3 4] [--jobs 2] [--teacher FOLDER] [--write]

The ablation (distill_table.py) trains teachers and students on the same labelled images, where the labels alone
teach the students what the teachers know. Here the teachers are pretrained once, on images the students never
see (`PRETRAINING`: the demo's recipe on 10 000 mcad-shapes images of data seed 0, with the fusion teacher trained
700 steps instead of 350, long enough to learn relation flips; `OUTPUT_DIR/pretraining/teacher`, trained when
missing; `--teacher` names another). The students learn from a *transfer set* of data seed 7:

- `tiny`: 500 images with clean captions, where a contrastive student stays well below the teachers (about 425
  RSUM against their 470): the labels teach less than the teachers know;
- `tiny_wide`: the same, with a wider and deeper student (`WIDE_STUDENT`: width 128, 4 + 3 layers, against the
  `shapes` preset's 96, 3 + 2; about twice the time per student), enough to hold the dual teacher's shapes and the
  fusion teacher's relations at once;
- `small`: 2000 images with clean captions, where a contrastive student already passes its teachers (about
  500 RSUM);
- `noisy`: 8000 images, 40% of whose captions are wrong as web alt text is (mcad-shapes' `caption_noise`: colours
  swapped, relation flipped, or the caption of an image of another family, alike), tested on clean captions;
- `noisy_long`: the same transfer set for twice as many epochs (16, 2000 steps): at `noisy`'s 8 the ranking of most MCAD
  students is still on its plateau at the end, and the flips are learnt on two seeds of five at most.

Students are the `shapes` preset (`tiny_wide`: `WIDE_STUDENT`) in ordinary random batches (no family batching, no
canonical curriculum: a real transfer set has neither), batch 64, lr 5e-4, about 1000 steps (`noisy_long`: 2000). Every
row runs the same seeds (`--seeds`; a row may be given more), and a seed fixes the student's initialisation and batch
order, so rows are compared by paired differences over the seeds both ran. Rows: `contrastive`, `negclip` (contrastive
with each caption's colour-swap and relation-flip distractors as extra negatives; a wrong caption's are made from its
own text, so undoing its error gives back the true caption as a "negative"), `negclip_filter` (negclip on the pairs the
fusion teacher's ITM head scores at 8 or more: the fusion teacher as BLIP's CapFilt filter, no distillation), `clip_kd`,
`clip_kd_feature`, `clip_kd_feature_negatives` (with NegCLIP's negatives), `fusion_only` and the MCAD variants: `mcad`
(the paper's objective: modified features and similarity distributions, α = 2, λ_dist = 1), `mcad_feature` (the modified
features alone, λ_dist = 0), both with NegCLIP's negatives (`mcad_negatives`, `mcad_feature_negatives`), which `negclip`
has and the other MCAD rows lack, and `mcad_feature_rank`: `mcad_feature_negatives` plus the ranking distillation L_rank
(each caption ranked against its distractors as the fusion teacher scores them, λ_rank = 1), the row through which the
fusion teacher can tell a wrong caption from its true distractor, `mcad_feature_rank_sharp`, the same with the fusion
teacher's scores sharpened (τ_F = 0.1: a caption and its flip differ by a quarter of a logit in its ITM head),
`mcad_feature_rank_sharp_agree`, which ranks only the pairs whose caption the fusion teacher scores above all its
distractors (where it ranks a distractor first on clean labels, the teacher is wrong and NegCLIP's hard target stays),
with λ_rank (`_light`: 0.5, `_heavy`: 2), α (`_alpha3`), λ_feat (`_feat2`) and τ_F (`_tau0.05`, `_tau0.025`, `_tau0.2`)
tuned beside it, and at τ_F = 0.05 a ranking warm-up (`_tau0.05_rankfirst100`, `_rankfirst200`: the first 100 or 200
steps train on L_rank alone) and a lighter feature term (`_tau0.05_feat0.5`: λ_feat = 0.5),
`mcad_feature_rank_sharp_mined`, which also ranks (and contrasts) each caption against another image's caption the dual
teacher ranks high for its image (`mined_caption`: the candidates a retrieval ranks it against, beyond its own
rewrites), `mcad_feature_rank_filter`, which also leaves out of L_con and L_rank the pairs whose caption the fusion
teacher's ITM head scores below 8 (BLIP's CapFilt filter), `mcad_feature_rank_sharp_filter` (the same at τ_F = 0.1) and
`mcad_feature_rank_sharp_filter_correct`, which also corrects a caption the fusion teacher scores 0.1 logits below one
of its distractors to that distractor (`correction_margin`), with λ_rank (`_heavy`: 2) and τ_F (`_tau0.05`) moved beside
it, and its non-distilling control `negclip_filter_correct` (negclip filtered and corrected alike), and
`mcad_feature_rank_sharp_agree_filter_correct`, which after the correction ranks only the pairs whose (corrected)
caption the fusion teacher scores above all its distractors. The teachers' own rows are measured on the same test split;
on a noisy transfer set, what the fusion teacher's scores do to each kind of wrong caption too (`label_audit`). Each
student is evaluated on the validation split, which chooses the MCAD variant (`chosen`, on the seeds every variant ran),
and on the test split, which is reported.

About 18 hours on 2 CPU cores for `tiny`, `small` and `noisy` with the defaults (480 students of about 4.5 minutes on
one thread, two at a time), about 15 more for `tiny_wide` (160 students of about 11 minutes), 12 more for `noisy_long`
(160 of about 9 minutes), and 21 minutes for the teachers when they are not there yet.

Resumable: every finished student leaves `<setting>/runs/<row>_s<seed>/result.json` and is skipped; a killed run
resumes from its last checkpoint. Writes `benchmarks/results/transfer.json` from every student finished so far, each
setting with the last command that wrote it (a setting this invocation did not run keeps its earlier entry); `--write`
also replaces the transfer section of BENCHMARKS.md and writes `benchmarks/transfer_table.png`. The committed
transfer.json resumes too, with an empty `--output_dir`: the seeds it records are kept and not trained again,
provided the retrained teachers give the same test rows and the students' settings are the same; otherwise the run
stops and says so, since new seeds could not be paired with the recorded ones (the teachers' recipe is deterministic
on one machine; another CPU may round differently).
"""

import argparse
import copy
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_table import (  # noqa: E402
    NEGATIVES,
    REPO_ROOT,
    SHAPES,
    distill_run,
    invocation,
    mean_std,
    paired_difference,
    paired_differences,
    row_settings,
    run_folder,
    same_settings,
    shapes_split,
    train_mcad,
    write_section,
)

from modeling_mcad.configuration_mcad import PRESETS  # noqa: E402
from modeling_mcad.objectives import corrected_captions, objective_settings, teacher_agrees  # noqa: E402
from modeling_mcad.teacher_cache import MINED_COLUMN, teacher_fingerprint  # noqa: E402
from modeling_mcad.utils import atomic_write_text  # noqa: E402

# The teachers every setting distils from, pretrained once on 10 000 images of data seed 0 (other images than the
# students'): the ablation's recipe with the fusion teacher trained twice as long as the demo's 350 steps, long enough
# to learn relation flips (95% at step 700, docs/experiments/2026-11-29-fusion-teacher.md), which 500 labelled images
# teach a student only to about 80%: a real cross-encoder has seen far more than a student's transfer set. The dual
# teacher is the ablation's, trained by the same deterministic recipe.
PRETRAINING = {"shapes": {**SHAPES, "train": 10000},
               "fusion_teacher_training": {"steps": 700, "canonical_steps": 200}}

TRANSFER_DATA = {"seed": 7, "validation": 500, "test": 1000, "image_size": 64}  # other images than the teachers'
# A student of more capacity than the `shapes` preset (width 96, 3 + 2 layers): on `tiny` that student cannot hold
# both the dual teacher's shapes and the fusion teacher's relations (docs/experiments/2026-12-03-transfer-settings.md).
WIDE_STUDENT = {
    "vision_config": {**PRESETS["shapes"]["vision_config"], "hidden_size": 128, "num_hidden_layers": 4,
                      "num_attention_heads": 4, "intermediate_size": 512},
    "text_config": {**PRESETS["shapes"]["text_config"], "hidden_size": 128, "num_hidden_layers": 3,
                    "num_attention_heads": 4, "intermediate_size": 512},
    "projection_dim": 128,
}
SETTINGS = {  # name: (description, transfer set, epochs, student config; None: the `shapes` preset)
    "tiny": ("500 clean images", {"train": 500}, 128, None),
    "tiny_wide": ("500 clean images, a wider student", {"train": 500}, 128, WIDE_STUDENT),
    "small": ("2000 clean images", {"train": 2000}, 32, None),
    "noisy": ("8000 images, 40% of the captions wrong", {"train": 8000, "caption_noise": 0.4}, 8, None),
    "noisy_long": ("8000 images, 40% of the captions wrong, 16 epochs", {"train": 8000, "caption_noise": 0.4}, 16,
                   None),
}
# A caption the fusion teacher scores 0.1 logits below one of its distractors is corrected to it: on `tiny`'s clean
# training pairs 1% of the captions lose that way to their flip and 3% to their swap, while of wrong captions whose
# distractor is true (the same two texts, the other way round) 69% of the flipped and 94% of the swapped win back.
CORRECTION_MARGIN = 0.1
# The sharpened ranking over the pairs whose caption the fusion teacher scores above all its distractors, which its
# variants below move one knob of.
SHARP_AGREE = {"fusion_temperature": 0.1, "rank_where_teacher_agrees": True}
# The same at τ_F = 0.05 (the chosen row of `tiny`, `tiny_wide` and `small`), and the variants below that move one
# knob of it.
SHARPER_AGREE = {**SHARP_AGREE, "fusion_temperature": 0.05}
# The sharpened ranking after the CapFilt filter and the correction (`noisy`'s chosen row), and the variants below that
# move one knob of it.
SHARP_FILTER_CORRECT = {"fusion_temperature": 0.1, "correction_margin": CORRECTION_MARGIN}
ROWS = [  # (row, objective, overrides, negative captions)
    ("contrastive", "contrastive", {}, []),
    ("negclip", "contrastive", {}, NEGATIVES),
    ("negclip_filter", "contrastive", {"match_threshold": 8.0}, NEGATIVES),
    ("negclip_filter_correct", "contrastive", {"match_threshold": 8.0, "correction_margin": CORRECTION_MARGIN},
     NEGATIVES),
    ("clip_kd", "clip_kd", {}, []),
    ("clip_kd_feature", "clip_kd_feature", {}, []),
    ("clip_kd_feature_negatives", "clip_kd_feature", {}, NEGATIVES),
    ("fusion_only", "fusion_only", {}, []),
    ("mcad", "mcad", {}, []),
    ("mcad_feature", "mcad_feature", {}, []),
    ("mcad_negatives", "mcad", {}, NEGATIVES),
    ("mcad_feature_negatives", "mcad_feature", {}, NEGATIVES),
    ("mcad_feature_rank", "mcad_feature_rank", {}, NEGATIVES),
    ("mcad_feature_rank_sharp", "mcad_feature_rank", {"fusion_temperature": 0.1}, NEGATIVES),
    ("mcad_feature_rank_sharp_agree", "mcad_feature_rank", SHARP_AGREE, NEGATIVES),
    ("mcad_feature_rank_sharp_agree_light", "mcad_feature_rank", {**SHARP_AGREE, "lambda_rank": 0.5}, NEGATIVES),
    ("mcad_feature_rank_sharp_agree_heavy", "mcad_feature_rank", {**SHARP_AGREE, "lambda_rank": 2.0}, NEGATIVES),
    ("mcad_feature_rank_sharp_agree_alpha3", "mcad_feature_rank", {**SHARP_AGREE, "alpha": 3.0}, NEGATIVES),
    ("mcad_feature_rank_sharp_agree_feat2", "mcad_feature_rank", {**SHARP_AGREE, "lambda_feat": 2.0}, NEGATIVES),
    *((f"mcad_feature_rank_sharp_agree_tau{temperature}", "mcad_feature_rank",
       {**SHARP_AGREE, "fusion_temperature": temperature}, NEGATIVES) for temperature in (0.05, 0.025, 0.2)),
    *((f"mcad_feature_rank_sharp_agree_tau0.05_rankfirst{steps}", "mcad_feature_rank",
       {**SHARPER_AGREE, "ranking_only_steps": steps}, NEGATIVES) for steps in (100, 200)),
    ("mcad_feature_rank_sharp_agree_tau0.05_feat0.5", "mcad_feature_rank", {**SHARPER_AGREE, "lambda_feat": 0.5},
     NEGATIVES),
    ("mcad_feature_rank_sharp_mined", "mcad_feature_rank", {"fusion_temperature": 0.1},
     [*NEGATIVES, MINED_COLUMN]),
    ("mcad_feature_rank_filter", "mcad_feature_rank_filter", {}, NEGATIVES),
    ("mcad_feature_rank_sharp_filter", "mcad_feature_rank_filter", {"fusion_temperature": 0.1}, NEGATIVES),
    ("mcad_feature_rank_sharp_filter_correct", "mcad_feature_rank_filter", SHARP_FILTER_CORRECT, NEGATIVES),
    ("mcad_feature_rank_sharp_filter_correct_heavy", "mcad_feature_rank_filter",
     {**SHARP_FILTER_CORRECT, "lambda_rank": 2.0}, NEGATIVES),
    ("mcad_feature_rank_sharp_filter_correct_tau0.05", "mcad_feature_rank_filter",
     {**SHARP_FILTER_CORRECT, "fusion_temperature": 0.05}, NEGATIVES),
    ("mcad_feature_rank_sharp_agree_filter_correct", "mcad_feature_rank_filter",
     {**SHARP_AGREE, "correction_margin": CORRECTION_MARGIN}, NEGATIVES),
]
METRICS = ("i2t_r1", "t2i_r1", "rsum", "swap_accuracy", "flip_accuracy", "binding_accuracy")
SECTION = "## Transfer: when the teachers know more than the labels"
RESULTS = REPO_ROOT / "benchmarks" / "results" / "transfer.json"


def student_base(root: Path, setting: str, teacher: Path) -> dict:
    """The train_mcad.py configuration every student of `setting` shares (its row and seed added per run)."""
    _, transfer, epochs, student = SETTINGS[setting]
    base = {"output_dir": str(root), "shapes": {**TRANSFER_DATA, **transfer}, "epochs": epochs, "batch_size": 64,
            "learning_rate": 5e-4, "batch_groups": None, "canonical_epochs": 0, "teacher": str(teacher.resolve()),
            "checkpoint_every_steps": 100}
    return base if student is None else {**base, "student_config": copy.deepcopy(student)}


def in_settings_order(entries: dict) -> dict:
    """Entries keyed by setting, those of `SETTINGS` in its order, then any other (e.g. a renamed setting's) as they
    were: a results file is never shortened."""
    return {**{name: entries[name] for name in SETTINGS if name in entries}, **entries}


def prepare_pretrained_teachers(root: Path) -> Path:
    """The teachers of `PRETRAINING`, trained in `root` (once: about 21 minutes on 2 cores) by the teachers stage."""
    if not (root / "teacher" / "config.json").exists():
        train_mcad(["teachers"], {"output_dir": str(root), **PRETRAINING}, root / "config.yaml",
                   ["--overwrite_output_dir"] if (root / "teacher").exists() else [])
    return root / "teacher"


def teacher_rows(base: dict, root: Path, teacher: Path, rows: list) -> dict:
    """
    The teachers' own test rows on this setting's test split (once), and the caches of the transfer set: the plain
    one, and for each row that reads the fusion teacher's scores (ranking, match threshold, correction) the one that
    holds them. A setting's folder serves one teacher: its runs would otherwise be reused with another (SystemExit).
    """
    rows_file = root / "teacher_rows.json"
    fingerprint = teacher_fingerprint(teacher)
    if rows_file.exists() and json.loads(rows_file.read_text()).get("teacher") != fingerprint:
        raise SystemExit(f"{root} holds the students of another teacher than {teacher}: pass a new --output_dir, or "
                         "the teacher they were trained with.")
    train_mcad(["cache"], base, root / "config.yaml")  # found, if built before
    ranked = {tuple(negatives): (objective, overrides) for _, objective, overrides, negatives in rows
              if objective_settings(objective, **overrides).uses_match_scores}
    for negatives, (objective, overrides) in ranked.items():
        train_mcad(["cache"], {**base, "objective": objective, "objective_overrides": overrides,
                               "negative_captions": list(negatives)}, root / "config_ranking.yaml")
    if rows_file.exists():
        return json.loads(rows_file.read_text())["rows"]
    from modeling_mcad.shapes import teacher_gates
    from modeling_mcad.teachers import MCADTeacher

    rows = teacher_gates(MCADTeacher.from_pretrained(teacher), shapes_split(base))["rows"]
    atomic_write_text(rows_file, json.dumps({"teacher": fingerprint, "rows": rows}, indent=2))
    return rows


def linear_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, folds: int = 5) -> float:
    """Held-out accuracy (%) of an L2-regularised logistic regression, folds split by `groups` (a group's rows stay
    together)."""
    correct = 0
    for fold in range(folds):
        held_out = groups % folds == fold
        weights = torch.zeros(features.shape[1] + 1, requires_grad=True)
        inputs = torch.cat([features, torch.ones(len(features), 1)], dim=1)
        optimizer = torch.optim.LBFGS([weights], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            logits = inputs[~held_out] @ weights
            penalty = weights[:-1].square().sum() / (2 * len(logits))  # scikit-learn's default strength (C = 1)
            loss = F.binary_cross_entropy_with_logits(logits, labels[~held_out]) + penalty
            loss.backward()
            return loss

        optimizer.step(closure)
        correct += ((inputs[held_out] @ weights > 0) == labels[held_out].bool()).sum().item()
    return 100 * correct / len(features)


def target_probe(base: dict, root: Path) -> dict:
    """
    Do the teacher's targets carry the binding the fusion teacher knows? On the transfer set's cached targets, the
    held-out accuracy of a linear probe for which colour comes first in scene order (left / top: colour-position
    binding, which a bag of words cannot tell) from the image and text targets: the dual teacher's (v, t), the
    modified ones (v̂, t̂ with the `mcad` α) and the adapted fused features alone (`fusion_only`'s). Labels are the
    image's, so in a noisy transfer set the text probe is capped by the share of true captions.
    """
    probe_file = root / "target_probe.json"
    if probe_file.exists():
        return json.loads(probe_file.read_text())
    import datasets

    from modeling_mcad.data import flatten_pairs
    from modeling_mcad.objectives import modified_features, objective_settings
    from modeling_mcad.teacher_cache import CACHE_COLUMNS, cache_folder, cache_key

    train = shapes_split(base, "train")
    image_index = torch.tensor(flatten_pairs(train)["image_index"])
    scenes = [json.loads(scene)["objects"] for scene in train["scene"]]
    related = torch.tensor([len(objects) >= 2 for objects in scenes])[image_index]
    labels = torch.tensor([len(objects) >= 2 and objects[0]["colour"] < objects[1]["colour"]
                           for objects in scenes], dtype=torch.float32)[image_index][related]
    cache = cache_folder(root, cache_key(base["teacher"], train))
    columns = datasets.load_from_disk(str(cache)).with_format("torch")[:]
    families = torch.tensor(train["family"])[image_index][related]  # near-duplicates stay in one fold
    v, t, adapted_v, adapted_t = (columns[name].float()[related] for name in CACHE_COLUMNS)
    result = {}
    for name, alpha in (("dual teacher (v, t)", 0.0), ("modified (v̂, t̂)", objective_settings("mcad").alpha),
                        ("adapted fused features", float("inf"))):
        image, text = modified_features(v, t, adapted_v, adapted_t, alpha)
        result[name] = {side: linear_probe_accuracy(features, labels, families)
                        for side, features in (("image", image), ("text", text))}
    atomic_write_text(probe_file, json.dumps(result, indent=2))
    return result


CAPTION_KINDS = ("true", "colours swapped", "relation flipped", "another image's")


def label_audit(kinds: list[str], caption: torch.Tensor, negatives: torch.Tensor, true_caption: torch.Tensor,
                candidate_match_logits: torch.Tensor) -> dict:
    """
    What the fusion teacher's scores do to each kind of training caption, as the filtering MCAD rows use them: how
    many pairs of the kind the correction changes (`CORRECTION_MARGIN`, by the library's `corrected_captions`), how
    many hold the true caption after it, how many the CapFilt filter keeps (`mcad_feature_rank_filter`'s match
    threshold) and how many of those the agreeing ranking ranks (the corrected caption scored above all its
    distractors).

    Args:
        kinds (`list[str]`): each pair's kind of caption, one of `CAPTION_KINDS`.
        caption (`torch.Tensor` of shape `(B,)`), negatives (`(B, K)`), true_caption (`(B,)`): text ids of each
            pair's caption, its K distractors (in the cache's order) and the image's true caption in its place.
        candidate_match_logits (`torch.Tensor` of shape `(B, 1 + K)`): the fusion teacher's cached match logits.
    """
    ids = caption.double()[:, None], negatives.double().reshape(-1, 1)  # text ids stand in for the embeddings
    new_caption, _, scores, corrected = corrected_captions(*ids, candidate_match_logits.float(), CORRECTION_MARGIN)
    kept = scores[:, 0] >= objective_settings("mcad_feature_rank_filter").match_threshold
    counts = {"corrected": corrected, "true_after_correction": new_caption[:, 0] == true_caption.double(),
              "kept": kept, "ranked": kept & teacher_agrees(scores)}
    audit = {}
    for kind in CAPTION_KINDS:
        of_kind = torch.tensor([k == kind for k in kinds], dtype=torch.bool)
        audit[kind] = {"pairs": int(of_kind.sum()),
                       **{name: int((mask & of_kind).sum()) for name, mask in counts.items()}}
    return audit


def noisy_label_audit(base: dict, root: Path) -> dict | None:
    """
    `label_audit` of a noisy transfer set's training pairs (None for a clean one), each caption's kind read off the
    clean captions of the same images (mcad-shapes draws the noise from a stream of its own), the scores from the
    ranking cache. Written once to `<setting>/label_audit.json`.
    """
    if not base["shapes"].get("caption_noise"):
        return None
    audit_file = root / "label_audit.json"
    if audit_file.exists():
        return json.loads(audit_file.read_text())
    import datasets

    from modeling_mcad.data import flatten_pairs
    from modeling_mcad.teacher_cache import cache_folder, cache_key

    train = shapes_split(base, "train")
    clean = shapes_split({**base, "shapes": {**base["shapes"], "caption_noise": 0.0}}, "train")
    if train["family"] != clean["family"]:
        raise RuntimeError("The noisy and clean transfer sets hold other images: mcad-shapes no longer keeps the "
                           "images of a noisy split; the audit cannot tell a caption's kind.")
    noisy_pairs, clean_pairs = flatten_pairs(train), flatten_pairs(clean)
    true, swapped, flipped = (clean_pairs[column] for column in ("caption", "swapped_caption", "flipped_caption"))
    kinds = [CAPTION_KINDS[0] if text == right else CAPTION_KINDS[1] if text == swap else
             CAPTION_KINDS[2] if text == flip else CAPTION_KINDS[3]
             for text, right, swap, flip in zip(noisy_pairs["caption"], true, swapped, flipped)]
    texts: dict[str, int] = {}

    def text_ids(column: list[str]) -> torch.Tensor:
        return torch.tensor([texts.setdefault(text, len(texts)) for text in column])

    negatives = torch.stack([text_ids(noisy_pairs[column]) for column in NEGATIVES], dim=1)
    cache = datasets.load_from_disk(str(cache_folder(root, cache_key(base["teacher"], train, NEGATIVES))))
    audit = label_audit(kinds, text_ids(noisy_pairs["caption"]), negatives, text_ids(true),
                        cache.select_columns(["candidate_match_logits"]).with_format("torch")[:]["candidate_match_logits"])
    atomic_write_text(audit_file, json.dumps(audit, indent=2))
    return audit


def student_settings(base: dict) -> dict:
    """What a setting's students share, less where they live: recorded seeds are reused only under equal settings."""
    return {key: value for key, value in base.items() if key not in ("output_dir", "teacher", "cpu_threads")}


def teachers_read(objective: str, overrides: dict, teachers: dict) -> dict:
    """The test rows of the teachers a row's students read: none, the dual teacher's, or both teachers'."""
    settings = objective_settings(objective, **overrides)
    read = ("dual", "fusion") if settings.uses_fusion_teacher else ("dual",) if settings.uses_teacher else ()
    return {name: row for name, row in teachers.items() if name.startswith(tuple(f"{t} teacher" for t in read))}


def recorded_results(entry: dict, students: dict, teachers: dict) -> dict[tuple[str, int], dict]:
    """
    The students a setting's entry of transfer.json records, as `distill_run` results by (row, seed): an earlier
    machine's, to be paired with this one's. Refused (SystemExit) when they were measured with other student
    settings, a row's objective settings have changed since, or a teacher the row reads gave other test rows (a row
    that reads only the dual teacher is kept when only the fusion teacher changed).
    """
    if not entry:
        return {}
    problems = []
    if entry.get("students") != students:
        problems.append(f"the students' settings were {entry.get('students')}, now {students}")
    objectives = {row: (objective, overrides) for row, objective, overrides, _ in ROWS}
    for name, row in entry["rows"].items():
        settings = row_settings(*objectives[name]) if name in objectives else None
        if settings is None or not same_settings(row.get("settings"), settings):
            problems.append(f"row {name!r} was trained with {row.get('settings')}, now {settings}")
            continue
        before, now = (teachers_read(*objectives[name], rows) for rows in (entry["teachers"], teachers))
        if before != now:
            problems.append(f"row {name!r} was trained with other teachers (test rows {before}, now {now})")
    if problems:
        raise SystemExit(f"{RESULTS} records students that new ones could not be paired with: {'; '.join(problems)}. "
                         "Keep those results elsewhere (e.g. commit them) and remove the setting's entry to start it "
                         "over, or run the setting with the same teachers and settings.")
    return {(name, int(seed)): {"row": name, "seed": int(seed), "settings": row["settings"], **run,
                                "validation": {"rsum": run["validation_rsum"]}}
            for name, row in entry["rows"].items() for seed, run in row["seeds"].items()}


def summary(description: str, teacher: str, students: dict, teachers: dict, probe: dict, results: list[dict]) -> dict:
    """The setting's entry of transfer.json: rows by seed, the MCAD variant chosen on validation, paired tests."""
    by_row: dict[str, list[dict]] = {}
    for result in results:
        by_row.setdefault(result["row"], []).append(result)
    rows = {name: {"settings": runs[0]["settings"],
                   "seeds": {str(run["seed"]): {**{key: run[key] for key in METRICS},
                                                "validation_rsum": run["validation"]["rsum"]} for run in runs}}
            for name, runs in by_row.items()}
    # Chosen on the seeds every variant ran (all of a variant's where they share none): a variant given extra seeds
    # is not chosen, or passed over, for them.
    variants = [name for name in by_row if name.startswith("mcad")]
    shared = set.intersection(*({run["seed"] for run in by_row[name]} for name in variants)) if variants else set()

    def validation_rsum(name: str) -> float:
        runs = [run for run in by_row[name] if run["seed"] in shared] or by_row[name]
        return statistics.mean(run["validation"]["rsum"] for run in runs)

    chosen = max(variants, key=validation_rsum, default=None)
    paired = {}
    for name, runs in by_row.items():
        if chosen is None or name == chosen:
            continue
        cells = {key: paired_difference(by_row[chosen], runs, key) for key in ("rsum", "binding_accuracy")}
        if None not in cells.values():
            paired[name] = {key: {"mean": mean, "standard_error": error, "seeds": count}
                            for key, (mean, error, count) in cells.items()}
    return {"description": description, "teacher": teacher, "students": students, "chosen": chosen,
            "teachers": teachers, "target_binding_probe": probe, "rows": rows, "paired_chosen_minus_row": paired}


def markdown(report: dict) -> str:
    """BENCHMARKS.md's section: the settings and rows, then per setting the last command that wrote it, its tables."""
    lines = [SECTION, "", __doc__.split("\n\n", 2)[2].split("\n\nAbout ")[0], ""]
    for setting, entry in report["settings"].items():
        chosen = entry["chosen"]
        lines += [f"### `{setting}`: {entry['description']}", ""]
        if "command" in entry:
            lines += [f"```\n{entry['command']}\n```", ""]
        lines += [f"Teachers: `{entry.get('teacher')}`.", "",
                  "| model | seeds | " + " | ".join(METRICS) + " | validation RSUM |",
                  "|---|---|" + "---|" * (len(METRICS) + 1)]
        for name, row in entry["teachers"].items():
            lines.append(f"| {name} | – | " + " | ".join(f"{row[key]:.1f}" if key in row else "" for key in METRICS)
                         + " | |")
        for name, row in entry["rows"].items():
            runs = list(row["seeds"].values())
            cells = [mean_std([run[key] for run in runs]) for key in (*METRICS, "validation_rsum")]
            lines.append(f"| {name}{' (chosen)' if name == chosen else ''} | {len(runs)} | " + " | ".join(cells)
                         + " |")
        lines += ["", "Linear probe for which colour comes first in scene order (held-out accuracy, %, chance 50) on\n"
                  "the transfer set's cached targets:", "", "| targets | image | text |", "|---|---|---|"]
        lines += [f"| {name} | {cells['image']:.1f} | {cells['text']:.1f} |"
                  for name, cells in entry["target_binding_probe"].items()]
        if "label_audit" in entry:
            lines += ["", "The training captions by kind, and what the fusion teacher's scores do to them (% of the "
                      f"kind's pairs;\ncorrection at {CORRECTION_MARGIN} logits, the filter at the match threshold, "
                      "ranked: kept and the caption scored\nfirst by the agreeing ranking):", "",
                      "| caption | pairs | corrected | true after correction | kept | ranked |",
                      "|---|---|---|---|---|---|"]
            for kind, count in entry["label_audit"].items():
                lines.append(f"| {kind} | {count['pairs']} | " + " | ".join(
                    f"{100 * count[key] / max(count['pairs'], 1):.1f}"
                    for key in ("corrected", "true_after_correction", "kept", "ranked")) + " |")
        by_row = {name: [{"seed": int(seed), **run} for seed, run in row["seeds"].items()]
                  for name, row in entry["rows"].items()}
        if chosen:
            lines += paired_differences(by_row, chosen)
        lines.append("")
    lines += ["![RSUM and binding accuracy per setting and row](benchmarks/transfer_table.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(report["settings"])
    heights = [1.4 + 0.24 * len(report["settings"][setting]["rows"]) for setting in settings]  # a bar's room each
    figure, axes = plt.subplots(len(settings), 2, figsize=(12, sum(heights)), squeeze=False, layout="constrained",
                                gridspec_kw={"height_ratios": heights})
    for line, setting in zip(axes, settings):
        entry = report["settings"][setting]
        names = list(entry["rows"])
        for axis, key, label in ((line[0], "rsum", "RSUM"), (line[1], "binding_accuracy", "binding accuracy (%)")):
            values = [[run[key] for run in entry["rows"][name]["seeds"].values()] for name in names]
            means = [statistics.mean(v) for v in values]
            errors = [statistics.stdev(v) if len(v) > 1 else 0 for v in values]
            axis.barh(names, means, xerr=errors, color=["tab:red" if n.startswith("mcad") else "tab:blue"
                                                        for n in names])
            axis.set_xlabel(f"{label}, {setting}\n(mean ± standard deviation over seeds)")
            axis.invert_yaxis()
            if key == "rsum":
                axis.set_xlim(left=50 * (min(means) // 50 - 1))
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=110, bbox_inches="tight")  # the right column's x label can pass the edge
    temporary.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/transfer"))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rows", nargs="*", default=None, help="row names to run, in this order (default: all; "
                        "`--rows` alone: none, only the teachers' rows and the summary)")
    parser.add_argument("--jobs", type=int, default=2, help="students trained at once, one CPU thread each")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="a saved MCADTeacher to distil from (default: OUTPUT_DIR/pretraining/teacher, trained by "
                        "the PRETRAINING recipe when missing)")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md's section and the plot")
    args = parser.parse_args()
    unknown = sorted(set(args.rows or ()) - {row for row, *_ in ROWS})
    if unknown:
        parser.error(f"unknown row(s) {unknown}; the rows are {[row for row, *_ in ROWS]}")
    started = time.perf_counter()
    if args.teacher is None:
        args.teacher = prepare_pretrained_teachers(args.output_dir / "pretraining")
    elif not (args.teacher / "config.json").exists():
        raise SystemExit(f"No teacher in {args.teacher}: pass a saved MCADTeacher folder, or leave --teacher out to "
                         f"train this benchmark's ({args.output_dir / 'pretraining'}, about 21 minutes).")
    if args.jobs > 1:
        torch.set_num_threads(1)  # the evaluations in this process run beside the other job's training
    report = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"settings": {}}
    for setting in args.settings:
        root = args.output_dir / setting
        base = student_base(root, setting, args.teacher)
        run_rows = ROWS if args.rows is None else [next(row for row in ROWS if row[0] == name) for name in args.rows]
        teachers = teacher_rows(base, root, args.teacher, run_rows)
        if args.jobs > 1:
            base = {**base, "cpu_threads": 1}
        students = student_settings(base)
        recorded = recorded_results(report["settings"].get(setting, {}), students, teachers)
        jobs = [(row, objective, overrides, negatives, seed) for row, objective, overrides, negatives in run_rows
                for seed in args.seeds if (row, seed) not in recorded]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(distill_run, base, root, *job, shared=("data", "cache"), validation=True)
                       for job in jobs]
            for (row, *_, seed), future in zip(jobs, futures):
                result = future.result()
                print(f"{setting} {row} seed {seed}: rsum {result['rsum']:.1f} (validation "
                      f"{result['validation']['rsum']:.1f}), binding {result['binding_accuracy']:.1f}", flush=True)
        # Every student finished so far, in the table's order, whichever invocation (or machine) trained it.
        results = []
        for row, *_ in ROWS:
            seeds = sorted({*args.seeds, *(seed for name, seed in recorded if name == row)})
            for seed in seeds:
                path = run_folder(root, row, seed) / "result.json"
                result = json.loads(path.read_text()) if path.exists() else recorded.get((row, seed))
                if result is not None:
                    results.append(result)
        audit = noisy_label_audit(base, root)
        report["settings"][setting] = {**summary(SETTINGS[setting][0], args.teacher.as_posix(), students, teachers,
                                                 target_probe(base, root), results),
                                       **({"label_audit": audit} if audit else {}), "command": invocation()}
    report["settings"] = in_settings_order(report["settings"])
    report["wall_seconds_last_invocation"] = time.perf_counter() - started
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(report, indent=2))
    text = markdown(report)
    print(text)
    if args.write:
        plot(report, REPO_ROOT / "benchmarks" / "transfer_table.png")
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
