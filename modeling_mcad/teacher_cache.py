"""The teacher cache: one pass of the frozen teachers over the training pairs, read back by pair index.

For every pair i (in `flatten_pairs` order) it stores, as float16 in an Arrow dataset on disk (memory-mapped):

    teacher_image_embeds  v_i        teacher_text_embeds  t_i
    adapted_image_embeds  P_v f_i    adapted_text_embeds  P_t f_i

and, for an objective that reads the fusion teacher's scores (λ_rank > 0 or a match threshold), also

    candidate_match_logits  the fusion teacher's match logits of image i with its caption and its K hard negatives
                            (K = 0 without λ_rank: the caption's own score)

(float16 like the rest: about 3 significant digits, 0.008 at a logit of 12, well below what moves softmax(m / τ_F)
at τ_F = 1; the fusion teacher reads the captions padded together with the negatives, so the other columns of such
a cache differ from a plain cache's by float rounding, within 2e-3).

v̂, t̂ = modified_features(v, t, P_v f, P_t f, α) are formed from these at loss time: a change of α (or of any loss
knob) reuses the cache, and with β = 0 distillation runs no teacher at all. The cache folder is named by a
fingerprint of the teacher's files (weights, adapter, processors), the training split (its pairs are
`flatten_pairs(split)`, in that order), the negative caption columns (if any) and this format; a rerun with the same
reuses it, a change of any of them builds a new one. The split's own fingerprint names it: the pairs' fingerprint
also hashes the image transform's source dataset, file path included, so the same split opened through another path
(a symlinked run folder) would miss its cache.

The folder also holds `cache_record.json`: those fingerprints, a hash of the split's captions and its pair count (which
a dataset fingerprint kept across an edit of the data would miss) and the precision the teachers ran in. The cache
stage reuses a cache only when the whole record matches its own, the distill stage reads one only when its teacher
and data match, and the values are checked to be finite when the cache is built and when it is read: a folder
copied from another run, a change of `teacher_mixed_precision` or a damaged file is refused with a message, never
silently distilled from.

With `mined_caption` among the negative captions, the cache stage also mines each caption's hard negative from the
other images' captions out of the plain cache's v, t (`mine_captions`: the dual teacher's confusions) and saves them
beside it (`<plain cache>.mined_captions.json`), before the scored cache scores them with the others: the distill
stage and every process read those texts, which name the scored cache, rather than mining again.

Building shards the images across processes (each runs the teachers on its share, each image encoded once for
all of its captions); the main process merges the shards in order and publishes the folder atomically.
"""

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import torch

from .data import PER_CAPTION_COLUMNS, to_rgb
from .errors import UserError
from .teachers import MCADTeacher
from .utils import atomic_directory, atomic_write_text, progress, recover_directory

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: with its record
RECORD_FILE = "cache_record.json"
CACHE_COLUMNS = ("teacher_image_embeds", "teacher_text_embeds", "adapted_image_embeds", "adapted_text_embeds")
CANDIDATE_COLUMN = "candidate_match_logits"  # with negative caption columns: (1 + K) match logits per pair
MINED_COLUMN = "mined_caption"  # the negative caption column of the dual teacher's confusions (`mine_captions`)


def teacher_fingerprint(teacher_dir: str | Path) -> str:
    """A hash of every file a saved teacher is made of (weights, config, processors)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(teacher_dir).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(teacher_dir)).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _grouped_column(negative_column: str) -> str:
    """The grouped split's column (`swapped_captions`) of a pair-level negative caption column (`swapped_caption`)."""
    grouped = {pair: image for image, pair in PER_CAPTION_COLUMNS.items() if pair != "canonical"}
    if negative_column not in grouped:
        raise UserError(f"negative caption column {negative_column!r} is not one the pairs carry; the hard-negative "
                        f"columns are {sorted(grouped)} (from the split's {sorted(PER_CAPTION_COLUMNS)}).")
    return grouped[negative_column]


def cache_key(teacher_dir: str | Path, split: datasets.Dataset, negative_columns: Sequence[str] | None = None) -> dict:
    """
    What the cache of these teachers over the pairs of this split (grouped by image) is made from: this format, the
    teacher's files, the split's fingerprint, its captions and its number of pairs, and when the cache holds the
    fusion teacher's scores (`negative_columns` not None: pair-level names, e.g. `swapped_caption`, maybe none) those
    columns and their text.
    """
    captions = list(split["captions"])
    key = {
        "format": CACHE_FORMAT,
        "teacher": teacher_fingerprint(teacher_dir),
        "data": split._fingerprint,
        "captions": hashlib.sha256(json.dumps(captions).encode()).hexdigest(),
        "pairs": sum(len(image_captions) for image_captions in captions),
    }
    if negative_columns is not None:
        missing = [column for column in negative_columns if _grouped_column(column) not in split.column_names]
        if missing:
            raise UserError(f"negative caption column(s) {missing} need the training split's "
                            f"{[_grouped_column(column) for column in missing]}, which it has not (it has "
                            f"{split.column_names}): leave them out of --negative_captions.")
        negatives = {column: list(split[_grouped_column(column)]) for column in negative_columns}
        key["negatives"] = {"columns": list(negative_columns),
                            "text": hashlib.sha256(json.dumps(negatives).encode()).hexdigest()}
    return key


def cache_folder(output_dir: str | Path, key: dict) -> Path:
    """Where the cache of `key` (`cache_key`) lives under the run's output folder."""
    name = f"{key['format']}|{key['teacher']}|{key['data']}"
    if "negatives" in key:
        name += f"|{key['negatives']['columns']}|{key['negatives']['text']}"
    return Path(output_dir) / "cache" / hashlib.sha256(name.encode()).hexdigest()[:16]


def check_cache_record(folder: Path, expected: dict) -> None:
    """Refuse (a UserError) a cache folder whose record does not match `expected` (some of its entries)."""
    rebuild = ("Rebuild it with `train_mcad.py cache --overwrite_output_dir` (or pass a new --output_dir to keep "
               "it).")
    try:
        record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(
            f"The teacher cache {folder} has no readable {RECORD_FILE} ({type(error).__name__}), so nothing shows "
            f"which teacher and training data it was built from: an older version wrote it, or it was copied or "
            f"damaged. {rebuild}"
        ) from None
    differences = [f"{name} {record.get(name)!r} there, {value!r} here" for name, value in expected.items()
                   if record.get(name) != value]
    if differences:
        raise UserError(
            f"The teacher cache {folder} was built from another teacher, training data or teacher precision than "
            f"this run's ({'; '.join(differences)}). {rebuild}"
        )


def nonfinite_values(rows: datasets.Dataset) -> dict[str, int]:
    """The number of NaN or infinite values in each cache column of `rows` that has any."""
    counts = {}
    for name in (*CACHE_COLUMNS, CANDIDATE_COLUMN):
        if name not in rows.column_names:
            continue
        count = sum(int(np.count_nonzero(~np.isfinite(chunk.flatten().to_numpy(zero_copy_only=False))))
                    for chunk in rows.data.column(name).chunks)
        if count:
            counts[name] = count
    return counts


@torch.no_grad()
def _encode_images(teacher: MCADTeacher, split: datasets.Dataset, image_indices: range, batch_size: int,
                   captions_per_image: list[int], negative_columns: Sequence[str] | None = None
                   ) -> dict[str, np.ndarray]:
    """The cache rows of the pairs of these images, in pair order."""
    dual, fusion = teacher.processors["dual"], teacher.processors["fusion"]
    scored = negative_columns is not None
    columns = {name: [] for name in (*CACHE_COLUMNS, *([CANDIDATE_COLUMN] if scored else []))}
    for start in progress(range(image_indices.start, image_indices.stop, batch_size), desc="teacher cache"):
        rows = split[start:min(start + batch_size, image_indices.stop)]
        images = [to_rgb(image) for image in rows["image"]]
        captions = [caption for image_captions in rows["captions"] for caption in image_captions]
        image_of_caption = torch.tensor(
            [i for i, count in enumerate(captions_per_image[start:start + len(images)]) for _ in range(count)]
        )
        dual_text = dual.tokenizer(captions, return_tensors="pt", padding=True, truncation=True)
        # The fusion teacher reads the captions, then each negative column's captions, all paired with their image.
        negatives = [_negatives(rows[_grouped_column(column)], column, start) for column in negative_columns or ()]
        fusion_text = fusion.tokenizer(captions + [text for column in negatives for text in column],
                                       return_tensors="pt", padding=True, truncation=True)
        image_embeds = teacher.encode_images(dual.image_processor(images, return_tensors="pt")["pixel_values"])
        text_embeds = teacher.encode_texts(dual_text["input_ids"], dual_text["attention_mask"])
        fused = teacher.fuse(
            fusion.image_processor(images, return_tensors="pt")["pixel_values"],
            fusion_text["input_ids"],
            fusion_text["attention_mask"],
            pairs=torch.stack([image_of_caption.repeat(1 + len(negatives)),
                               torch.arange(len(captions) * (1 + len(negatives)))], dim=1),
        )
        positives = slice(0, len(captions))
        adapted_image, adapted_text = teacher.adapter(fused.image_part()[positives], fused.text_part()[positives])
        values = [image_embeds[image_of_caption.to(image_embeds.device)], text_embeds, adapted_image, adapted_text]
        if scored:  # (pairs, 1 + K): the caption's logit, then each negative column's
            values.append(fused.match_logits.view(1 + len(negatives), len(captions)).t())
        for name, value in zip(columns, values):
            columns[name].append(value.float().cpu().numpy().astype(np.float16))
    return {name: np.concatenate(parts) for name, parts in columns.items()}


def _negatives(per_image: list[list[str | None]], column: str, first_image: int) -> list[str]:
    """One negative caption column of a batch of images, flattened in caption order; every caption must have one."""
    for image, texts in enumerate(per_image, start=first_image):
        if not all(isinstance(text, str) for text in texts):
            raise UserError(
                f"Image {image} of the training split has a caption without a {column!r} hard negative; ranking "
                "distillation (lambda_rank > 0) needs one for every caption, as NegCLIP does. Leave that column out "
                "of --negative_captions, set lambda_rank to 0, or use data whose every caption has one (mcad-shapes: "
                "scenes of two related objects)."
            )
    return [text for texts in per_image for text in texts]


def build_teacher_cache(
    teacher: MCADTeacher,
    teacher_dir: str | Path,
    split: datasets.Dataset,
    output_dir: str | Path,
    accelerator,
    batch_size: int = 64,
    overwrite: bool = False,
    negative_columns: Sequence[str] | None = None,
) -> Path:
    """
    Write (or reuse) the cache of `teacher` over the pairs of `split` (rows in `flatten_pairs(split)` order); every
    process must call it. A cache already there is reused when its record matches this teacher, data and precision;
    otherwise it is refused, unless `overwrite`.

    Args:
        teacher ([`MCADTeacher`]): the frozen teachers with their fitted adapter.
        teacher_dir (`str` or `Path`): the folder the teacher was loaded from (its files name the cache).
        split (`datasets.Dataset`): the training split grouped by image (`image`, `captions`).
        output_dir (`str` or `Path`): the run's output folder; the cache goes under `cache/`.
        accelerator (`accelerate.Accelerator`): shards the images across its processes.
        batch_size (`int`): images per teacher call.
        overwrite (`bool`): build the cache again even where one is, and replace it.
        negative_columns (`Sequence[str]`, *optional*): the cache then also holds the fusion teacher's match logits
            of each image with its caption and with these pair-level hard-negative caption columns (e.g.
            `swapped_caption`; `[]`: the caption's alone) as `candidate_match_logits`, for λ_rank > 0 or a match
            threshold. `None` (the default): no scores.

    Returns:
        The cache folder.

    Raises:
        `UserError`: a cache is there that was built from another teacher, data or precision (and not `overwrite`),
            the teacher gave non-finite values, or a negative column is unknown, missing from the split or lacks a
            caption's negative.
    """
    key = cache_key(teacher_dir, split, negative_columns)
    record = {**key, "teacher_precision": str(teacher.autocast_dtype or torch.float32)}
    folder = cache_folder(output_dir, key)
    shard_dir = folder.parent / f".shards-{folder.name}"
    if accelerator.is_main_process:
        recover_directory(folder)
        for leftover in (shard_dir, *folder.parent.glob(f".{folder.name}.tmp-*")):  # of a build that was cut short
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    if folder.exists() and not overwrite:
        check_cache_record(folder, record)
        logger.info("teacher cache found: %s", folder)
        return folder
    captions_per_image = [len(captions) for captions in split["captions"]]
    world, rank = accelerator.num_processes, accelerator.process_index
    bounds = np.linspace(0, len(split), world + 1).astype(int)
    rows = _encode_images(teacher, split, range(bounds[rank], bounds[rank + 1]), batch_size, captions_per_image,
                          negative_columns)
    first_pair = sum(captions_per_image[:bounds[rank]])
    rows["pair_index"] = np.arange(first_pair, first_pair + len(rows["teacher_text_embeds"]), dtype=np.int64)
    datasets.Dataset.from_dict(rows).save_to_disk(str(shard_dir / f"rank_{rank}"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            merged = datasets.concatenate_datasets(
                [datasets.load_from_disk(str(shard_dir / f"rank_{r}")) for r in range(world)]
            )
            pair_count = sum(captions_per_image)
            if merged["pair_index"] != list(range(pair_count)):
                raise RuntimeError(f"The teacher cache covers {len(merged)} pairs but there are {pair_count}: the "
                                   "training split changed while the cache was built. Run the cache stage again.")
            nonfinite = nonfinite_values(merged)
            if nonfinite:
                raise UserError(
                    f"The teacher in {teacher_dir} gave non-finite values ({nonfinite}) for the teacher cache "
                    f"{folder}: its training diverged, or its outputs overflow float16. Train it again "
                    "(`train_mcad.py teachers --overwrite_output_dir`), with --teacher_mixed_precision no if it ran "
                    "in bf16."
                )
            with atomic_directory(folder) as temporary:
                merged.save_to_disk(str(temporary))
                (temporary / RECORD_FILE).write_text(json.dumps(record, indent=2))
        finally:
            shutil.rmtree(shard_dir, ignore_errors=True)
        logger.info("teacher cache written: %s (%d pairs)", folder, len(merged))
    accelerator.wait_for_everyone()
    return folder


class TeacherCache:
    """
    Teacher targets read from a built cache by pair index.

    Args:
        folder (`str` or `Path`): a folder written by `build_teacher_cache`.

    Raises:
        `UserError`: the cache holds non-finite values (a damaged file).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        rows = datasets.load_from_disk(str(self.folder))
        rows = rows.select_columns([name for name in (*CACHE_COLUMNS, CANDIDATE_COLUMN) if name in rows.column_names])
        nonfinite = nonfinite_values(rows)
        if nonfinite:
            raise UserError(
                f"The teacher cache {self.folder} holds non-finite values ({nonfinite}), which the teacher did not "
                "write: the files are damaged. Rebuild it with `train_mcad.py cache --overwrite_output_dir`."
            )
        self.rows = rows.with_format("torch")

    @classmethod
    def for_run(cls, output_dir: str | Path, teacher_dir: str | Path, split: datasets.Dataset,
                negative_columns: Sequence[str] | None = None) -> "TeacherCache":
        """
        The cache of this run's teacher, training split and scored negative caption columns (see
        `build_teacher_cache`), which the
        `cache` stage must have built (a UserError otherwise, or when the cache found was built from another teacher
        or data).
        """
        key = cache_key(teacher_dir, split, negative_columns)
        folder = cache_folder(output_dir, key)
        if not folder.exists():
            raise UserError(
                f"No teacher cache for this teacher and training data at {folder}: run the cache stage first "
                "(`train_mcad.py cache ...`), or use an objective with beta > 0, which runs the teacher online."
            )
        check_cache_record(folder, key)
        return cls(folder)

    def targets(self, pair_index: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The cached targets of these pairs, as float32 tensors keyed like `MCADLoss.forward`'s arguments."""
        rows = self.rows[pair_index.tolist()]
        return {name: value.to(device=device, dtype=torch.float32) for name, value in rows.items()}


@torch.no_grad()
def mine_captions(split: datasets.Dataset, cache: TeacherCache, images_per_chunk: int = 256) -> list[list[str]]:
    """
    Each caption's hard negative from the rest of the split, the dual teacher's confusions: for the r-th caption of
    image a, the caption text the dual teacher ranks r-th for image a (by <v_a, t>, from the plain cache) among the
    split's distinct texts that are none of image a's own — the cache-wide counterpart of the in-batch rule the
    fusion teacher's training mines by (`teacher_training.mine_hard_negatives`).

    Named in --negative_captions as `mined_caption`, it joins L_con as a NegCLIP negative and L_rank as a candidate
    the fusion teacher scores: where the rule-made distractors order a caption only against its own rewrites, these
    are the other images' captions a retrieval ranks it against, and the fusion teacher can tell which of them also
    fit the image (a hard target pushes those away).

    Args:
        split (`datasets.Dataset`): the training split grouped by image (`captions`), in the cache's pair order.
        cache ([`TeacherCache`]): the dual teacher's v, t of every pair of `split` (the plain cache).
        images_per_chunk (`int`): images scored at a time (memory: images_per_chunk × distinct texts floats).

    Returns:
        The `mined_captions` column: per image, one text per caption.

    Raises:
        `UserError`: the cache has another number of pairs than the split, or an image has more captions than the
            split has other distinct texts.
    """
    captions = list(split["captions"])
    counts = torch.tensor([len(texts) for texts in captions])
    pair_texts = [text for image_captions in captions for text in image_captions]
    if len(cache.rows) != len(pair_texts):
        raise UserError(f"The teacher cache {cache.folder} holds {len(cache.rows)} pairs and the training split "
                        f"{len(pair_texts)}: they are not of the same data. Rebuild the cache (`train_mcad.py cache "
                        "--overwrite_output_dir`).")
    first_of_text = {}  # each distinct text's first pair, whose embedding stands for it
    for pair, text in enumerate(pair_texts):
        first_of_text.setdefault(text, pair)
    texts = list(first_of_text)
    text_ids = {text: i for i, text in enumerate(texts)}
    text_of_pair = torch.tensor([text_ids[text] for text in pair_texts])
    first_pair = torch.cumsum(counts, 0) - counts
    image_embeds = cache.rows["teacher_image_embeds"][first_pair.tolist()].float()
    text_embeds = cache.rows["teacher_text_embeds"][list(first_of_text.values())].float()
    depth = min(int(counts.max()), len(texts))
    mined = []
    for start in range(0, len(captions), images_per_chunk):
        stop = min(start + images_per_chunk, len(captions))
        similarity = image_embeds[start:stop] @ text_embeds.t()
        # The chunk's images are contiguous, so are their pairs: each image's own texts out of its row.
        pairs = slice(int(first_pair[start]), int(first_pair[stop - 1] + counts[stop - 1]))
        own_image = torch.repeat_interleave(torch.arange(stop - start), counts[start:stop])
        similarity[own_image, text_of_pair[pairs]] = float("-inf")
        scores, ranked = similarity.topk(depth, dim=1)
        for image, image_scores, image_ranked in zip(range(start, stop), scores.tolist(), ranked.tolist()):
            needed = len(captions[image])
            if needed > len(image_scores) or (needed and image_scores[needed - 1] == float("-inf")):
                raise UserError(
                    f"{MINED_COLUMN} gives each caption its own hard negative from the other images' captions, and "
                    f"image {image} of the training split has {needed} captions but the split only "
                    f"{sum(score > float('-inf') for score in image_scores)} other distinct text(s): leave "
                    f"{MINED_COLUMN} out of --negative_captions, or train on more images."
                )
            mined.append([texts[text] for text in image_ranked[:needed]])
    return mined


def mined_captions_file(plain_cache: Path) -> Path:
    """Where the cache stage saves the captions mined from a plain cache folder: beside it."""
    return plain_cache.with_name(f"{plain_cache.name}.{MINED_COLUMN}s.json")


def save_mined_captions(output_dir: str | Path, teacher_dir: str | Path, split: datasets.Dataset,
                        overwrite: bool = False) -> Path:
    """
    Mine the captions of `split` (`mine_captions`) from its plain cache, which must be built, and save them beside
    it with that cache's record (atomically; on the main process only). Mined once, so that every process and the
    distill stage read the same texts, which name the scored cache; mined again when the plain cache's record has
    changed (it was rebuilt, e.g. in another precision), or with `overwrite`.
    """
    folder = cache_folder(output_dir, cache_key(teacher_dir, split))
    path, record = mined_captions_file(folder), _read_json(folder / RECORD_FILE)
    if overwrite or _read_json(path).get("cache_record") != record:
        atomic_write_text(path, json.dumps({"cache_record": record,
                                            "mined_captions": mine_captions(split, TeacherCache(folder))}))
    return path


def with_mined_captions(split: datasets.Dataset, output_dir: str | Path, teacher_dir: str | Path) -> datasets.Dataset:
    """
    `split` with the `mined_captions` column the cache stage saved (`save_mined_captions`). Reads the plain cache's
    record only, not the cache.

    Raises:
        `UserError`: the cache stage has not mined this teacher's and split's captions, or mined them from another
            version of the plain cache.
    """
    folder = cache_folder(output_dir, cache_key(teacher_dir, split))
    path = mined_captions_file(folder)
    if not path.exists():
        raise UserError(f"--negative_captions names {MINED_COLUMN}, and no captions were mined for this teacher and "
                        f"training data ({path}): run the cache stage first (`train_mcad.py cache ...`), or leave "
                        f"{MINED_COLUMN} out of --negative_captions.")
    saved = _read_json(path)
    if saved.get("cache_record") != _read_json(folder / RECORD_FILE):
        raise UserError(f"The mined captions {path} were mined from another version of the teacher cache {folder} "
                        "(rebuilt since, or gone), or the file is damaged: run the cache stage again (`train_mcad.py "
                        "cache ...`), which mines them anew.")
    return split.add_column(_grouped_column(MINED_COLUMN), saved["mined_captions"])


def _read_json(path: Path) -> dict:
    """A JSON object saved at `path`; {} where there is none (missing, unreadable, not an object)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
