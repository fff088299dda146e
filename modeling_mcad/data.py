"""Image-text data for training and evaluation: loading, checking, pairing, sampling and collation.

- `load_image_text_dataset(name_or_path, split=...)`: a Hub dataset, a local `imagefolder` or a `save_to_disk`
  folder → a `datasets.Dataset` with one row per image: `image` (`datasets.Image`) and `captions` (`list[str]`).
  Every example is checked at load (files that are missing, empty, truncated, not images or too large; captions
  that are empty or not strings), so that no bad example can stop an epoch half-way; image modes are converted to
  RGB when batches are made (`to_rgb`).
- `flatten_pairs(dataset)`: one row per (image, caption) pair for training; evaluation keeps the grouping.
- `stream_image_text_pairs(name_or_path, split=...)`: a training split too large to hold (a web-scale alt-text set)
  as a `datasets.IterableDataset` of (image, caption) pairs, checked as they stream by.
- `OneCaptionPerImageSampler`: each epoch, every image once, with one of its captions drawn afresh (DESIGN §3: a
  contrastive batch must not hold an image twice).
- `ImageTextCollator`: from the same raw image and caption, the inputs of every model, each made by its own
  processor (student, dual teacher, fusion teacher).

Typical training use, with Accelerate:

    pairs = flatten_pairs(load_image_text_dataset("imagefolder_dir", split="train"))
    sampler = OneCaptionPerImageSampler(pairs, seed=0)
    loader = DataLoader(pairs, batch_size=64, sampler=sampler, drop_last=True,
                        collate_fn=ImageTextCollator({"student": student_processor, "dual": clip_processor}))
    loader = accelerator.prepare(loader)   # shards each batch (or the batches) across processes
    for epoch in range(epochs):
        loader.set_epoch(epoch)            # reaches the sampler: a fresh caption per image and a fresh order
        for batch in loader: ...           # batch["student"], batch["dual"], batch["pair_index"], ...
"""

import hashlib
import io
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Sampler

from .errors import UserError
from .utils import progress

logger = logging.getLogger(__name__)

# Columns of per-caption lists that `flatten_pairs` carries over, singular per pair: mcad-shapes' (its canonical
# captions and rule-made distractors) and the captions mined by the dual teacher (`teacher_cache.mine_captions`).
PER_CAPTION_COLUMNS = {"canonical": "canonical", "swapped_captions": "swapped_caption",
                       "flipped_captions": "flipped_caption", "mined_captions": "mined_caption"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_MAX_LISTED_PROBLEMS = 10
_CHUNK_ROWS = 1000  # rows read and checked at a time
# Rows a stream turns into pairs at a time: each pair carries its image, so datasets' default of 1000 rows of five
# captions and embedded photos would hold 5000 copies of image bytes at once.
_STREAM_BATCH_ROWS = 64
_JOINED_PATH_COLUMN = "mcad_image_file"  # the image path joined from several columns or under image_root


# --- images ------------------------------------------------------------------------------------------------------


class ImageTooLargeError(UserError):
    """An image file declares more pixels than allowed: decoding it could exhaust memory (a decompression bomb)."""


def open_image(image, max_image_pixels: int | None = None) -> Image.Image:
    """
    A PIL image from a PIL image, a `datasets.Image(decode=False)` value (`{"bytes", "path"}`) or a file path.

    A file is opened lazily (only its header is read) and refused with `ImageTooLargeError` when it declares more than
    `max_image_pixels` pixels (default: PIL's `Image.MAX_IMAGE_PIXELS`, about 89M): a few bytes of PNG can declare a
    20000x20000 image, which would take gigabytes once decoded.
    """
    if isinstance(image, Image.Image):
        return image
    try:
        if isinstance(image, Mapping):
            if image.get("bytes"):
                opened = Image.open(io.BytesIO(image["bytes"]))
            elif image.get("path"):
                opened = Image.open(image["path"])
            else:
                raise ValueError("The image value has neither bytes nor a path.")
        elif isinstance(image, (str, os.PathLike)):
            opened = Image.open(image)
        else:
            raise TypeError(f"Expected a PIL image, a {{'bytes', 'path'}} dict or a path, got {type(image).__name__}.")
    except Image.DecompressionBombError as error:  # PIL's own refusal, at twice its limit
        raise ImageTooLargeError(f"the image is too large to decode safely ({error}); downscale it") from None
    limit = max_image_pixels or Image.MAX_IMAGE_PIXELS
    if limit is not None and opened.width * opened.height > limit:
        raise ImageTooLargeError(
            f"the image is {opened.width}x{opened.height} = {opened.width * opened.height} pixels, more than "
            f"max_image_pixels={limit} (decompression-bomb guard); downscale it or raise max_image_pixels")
    return opened


def to_rgb(image, max_image_pixels: int | None = None) -> Image.Image:
    """
    An 8-bit RGB version of an image (see `open_image` for what it accepts). Grayscale, palette, CMYK and the like
    are converted by PIL; transparent images are composited on white (as transformers' `convert_rgb` does), so that
    transparent pixels do not turn into whatever colour they happen to store; 16-bit grayscale is scaled to 8 bits
    (PIL's own conversion would clip it). 32-bit float images have no safe conversion: they raise ValueError.
    The image is decoded (a file that cannot be raises OSError); files over `max_image_pixels` (default: PIL's
    limit) raise `ImageTooLargeError` before that.
    """
    image = open_image(image, max_image_pixels)
    if image.mode == "RGB":
        image.load()  # decode now: a truncated file fails here, not later inside a processor
        return image
    if image.mode == "F":
        raise ValueError("The image is 32-bit floating point (mode F), which has no safe conversion to 8-bit RGB; "
                         "convert it to an 8-bit image first.")
    if image.mode in _SIXTEEN_BIT_MODES:
        levels = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.clip(np.round(levels / 257), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_image(image, max_image_pixels: int | None = None) -> str | None:
    """
    What is wrong with an image value (see `open_image`), or None when it decodes fully and converts to RGB.
    Images over `max_image_pixels` (default: PIL's decompression-bomb limit) are refused before being decoded.
    """
    if image is None:
        return "no image (null)"
    if isinstance(image, Mapping) and not image.get("bytes"):
        path = image.get("path")
        if not path:
            return "no image (neither bytes nor a path)"
        if not os.path.exists(path):
            return "the file does not exist (listed in the metadata but absent on disk)"
        if os.path.getsize(path) == 0:
            return "the file is empty (0 bytes)"
    elif isinstance(image, Mapping) and image.get("bytes") == b"":
        return "the image is empty (0 bytes)"
    try:
        opened = open_image(image, max_image_pixels)
        if opened.format == "JPEG":  # DCT scaling: every byte is still decoded, 1/64 of the pixels made
            opened.draft(opened.mode, (max(1, opened.width // 8), max(1, opened.height // 8)))
        opened.load()
        to_rgb(opened)
    except ImageTooLargeError as error:
        return str(error)
    except UnidentifiedImageError:
        return "not an image file PIL can read"
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt data; a mode with no RGB conversion
        return f"the image cannot be decoded ({error})"
    return None


def _image_label(value) -> str:
    """How messages name an image: its file, or the hash of its embedded bytes."""
    if isinstance(value, Mapping) and value.get("path"):
        return str(value["path"])
    if isinstance(value, Mapping) and value.get("bytes"):
        return f"embedded image sha1:{hashlib.sha1(value['bytes']).hexdigest()[:12]}"
    return "no image"


def _image_key(value) -> str:
    """What identifies an image when captions come one per row: its bytes, or for an image kept on disk its path."""
    if value.get("bytes"):
        return "sha1:" + hashlib.sha1(value["bytes"]).hexdigest()
    return "path:" + os.path.abspath(value["path"]) if value.get("path") else "none"


# --- loading -----------------------------------------------------------------------------------------------------


def load_image_text_dataset(
    name_or_path: str | os.PathLike,
    split: str = "train",
    image_column: str | Sequence[str] = "image",
    caption_column: str | Sequence[str] = "captions",
    skip_bad_examples: bool = False,
    max_image_pixels: int | None = None,
    check_images: bool = True,
    where: Mapping[str, Any] | None = None,
    image_root: str | os.PathLike | None = None,
    stream_source: bool = False,
    **load_kwargs,
) -> datasets.Dataset:
    """
    Load an image-text dataset, one row per image: an `image` column (`datasets.Image`) and a `captions` column
    (`list[str]`).

    The source is a Hub dataset name or a local folder that `datasets.load_dataset` reads (e.g. an `imagefolder`
    with `<split>/metadata.jsonl`, or parquet shards with a README `configs:` block), or a folder written by
    `save_to_disk`. Captions may be a list per row (a column of any name), several string columns (`caption_0` ...
    `caption_4`), or one string per row: rows are then grouped by image (by the image's bytes, or for images kept on
    disk by their path), in order of first appearance. A split held in a column of a single split, as Karpathy's
    splits often are, is selected with `where` (e.g. `split="test", where={"split": "val"}`).

    Every row is checked up front, so that training never meets a bad example half-way through an epoch: a missing,
    empty, truncated or non-image file, an image over `max_image_pixels`, an empty or non-string caption. By default
    any problem raises a ValueError listing the rows and files at fault; with `skip_bad_examples=True` bad images
    are left out (with their captions), bad captions are dropped (and an image left with none), and the counts are
    logged. Image modes (grayscale, RGBA, palette, CMYK, 16-bit) are not an error: `to_rgb` converts them when
    batches are made.

    Args:
        name_or_path (`str` or `os.PathLike`): a Hub dataset name, a local folder `datasets.load_dataset` reads, or a
            `save_to_disk` folder (a `DatasetDict`, or a single `Dataset` which is then the split).
        split (`str`): the split to load.
        image_column (`str` or `list[str]`): the column holding images (`datasets.Image`, or file paths), or columns
            whose values joined by "/" make a file path (e.g. `["filepath", "filename"]` of COCO's Karpathy split).
        caption_column (`str` or `list[str]`): the column holding captions (`list[str]` or `str` per row), or several
            columns of one caption each, gathered in order (a null is left out).
        skip_bad_examples (`bool`): leave bad examples out (logged) instead of raising.
        max_image_pixels (`int`, *optional*): the largest image accepted, in pixels (default: PIL's
            `Image.MAX_IMAGE_PIXELS`, about 89M).
        check_images (`bool`): decode every image at load. False is faster on a large trusted dataset, but a bad
            file then only shows when its batch is made.
        where (`dict`, *optional*): keep only the rows whose columns equal these values (a list: any of them), e.g.
            `{"split": "train"}` or `{"split": ["train", "restval"]}`; values of the column's type. Rows named in
            messages are counted after the filter.
        image_root (`str` or `os.PathLike`, *optional*): the folder relative image paths are read from (e.g. where
            COCO's `train2014/` and `val2014/` are).
        stream_source (`bool`): read the split as a stream and hold only its rows (those `where` keeps):
            `datasets.load_dataset` otherwise prepares every split of the source first, which beside a web-scale
            training split (`stream_image_text_pairs`) means downloading and converting all of it.
        load_kwargs: passed to `datasets.load_dataset` (e.g. `revision`, `data_files`, `name`).
    """
    source = _load_source(name_or_path, split, streaming=stream_source, **load_kwargs)
    label = _split_label(name_or_path, split, where)
    path_columns, caption_columns = _checked_columns(source.features, label, image_column, caption_column, where,
                                                     image_root)
    if stream_source:
        source = _held(source, _where_values(source.features, where, label) if where else {}, label)
    elif where:
        source = _rows_where(source, where, label)
    source = source.select_columns(list(dict.fromkeys([*path_columns, *caption_columns])))
    if len(path_columns) > 1 or image_root is not None:
        image_column = _JOINED_PATH_COLUMN  # renamed `image` at the end
        source = source.add_column(image_column, _image_paths(source, path_columns, image_root))
    else:
        image_column = path_columns[0]
    source = source.select_columns([image_column, *caption_columns])
    if not isinstance(source.features[image_column], datasets.Image):  # file paths
        source = source.cast_column(image_column, datasets.Image())
    one_per_row = len(caption_columns) == 1 and _is_string(source.features[caption_columns[0]])
    raw_images = source.cast_column(image_column, datasets.Image(decode=False))

    rows, captions, problems = [], [], []  # the rows kept (one per image), their captions, what was wrong
    group_of: dict[str, int] = {}  # image key -> its position in `rows`
    image_problem: dict[str, str | None] = {}  # image key -> what is wrong with it, each image checked once
    bad_image_rows = bad_captions = captionless_images = 0
    # PIL decodes without the GIL: the checks of a chunk's images run on this process's threads (torch's count,
    # which train_mcad.py sets to the process's share of the cores).
    with ThreadPoolExecutor(torch.get_num_threads()) as checker:
        for start in range(0, len(source), _CHUNK_ROWS):
            chunk = raw_images[start : start + _CHUNK_ROWS]
            # Rows with captions of their own are their own images; one caption per row groups rows by image.
            keys = [_image_key(image) if one_per_row else f"row {start + offset}"
                    for offset, image in enumerate(chunk[image_column])]
            if check_images:  # otherwise no image is known to be bad, and nothing is kept per image
                unchecked = {key: image for key, image in zip(keys, chunk[image_column]) if key not in image_problem}
                image_problem.update(zip(unchecked, checker.map(partial(check_image, max_image_pixels=max_image_pixels),
                                                                unchecked.values())))
            for offset, (key, image, row_captions) in enumerate(zip(keys, chunk[image_column],
                                                                    _row_captions(chunk, caption_columns))):
                place = f"row {start + offset} ({_image_label(image)})"
                if image_problem.get(key) is not None:
                    problems.append(f"{place}: {image_problem[key]}")
                    bad_image_rows += 1
                    continue
                good, caption_problems = _check_captions(row_captions, one_per_row)
                problems += [f"{place}: {problem}" for problem in caption_problems]
                bad_captions += len(caption_problems)
                if one_per_row and key in group_of:
                    captions[group_of[key]] += good
                elif good:
                    if one_per_row:
                        group_of[key] = len(rows)
                    rows.append(start + offset)
                    captions.append(good)
                elif not one_per_row:
                    captionless_images += 1
    if problems and not skip_bad_examples:
        listed = "\n  ".join(problems[:_MAX_LISTED_PROBLEMS])
        unlisted = len(problems) - _MAX_LISTED_PROBLEMS
        more = f"\n  ... and {unlisted} more" if unlisted > 0 else ""
        raise UserError(f"{label}: {len(problems)} bad example(s):\n  {listed}{more}\nFix or remove them, or pass "
                        "skip_bad_examples=True (train_mcad.py --skip_bad_examples) to leave them out.")
    if problems:
        logger.warning("%s: left out %d row(s) with a bad image, %d bad caption(s) and %d image(s) left without a "
                       "caption; the first problem: %s", label, bad_image_rows, bad_captions, captionless_images,
                       problems[0])
    if not rows:
        raise UserError(f"{label} has no usable image with a caption.")
    dataset = source.select(rows).select_columns([image_column])
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    return dataset.add_column("captions", captions, feature=datasets.List(datasets.Value("string")))


def stream_image_text_pairs(
    name_or_path: str | os.PathLike,
    split: str = "train",
    image_column: str | Sequence[str] = "image",
    caption_column: str | Sequence[str] = "captions",
    skip_bad_examples: bool = False,
    max_image_pixels: int | None = None,
    check_images: bool = True,
    where: Mapping[str, Any] | None = None,
    image_root: str | os.PathLike | None = None,
    **load_kwargs,
) -> datasets.IterableDataset:
    """
    Stream an image-text dataset too large to hold in memory (a web-scale alt-text set): a `datasets.IterableDataset`
    of (image, caption) pairs, `image` (`datasets.Image`, not decoded: `ImageTextCollator` decodes a batch's images)
    and `caption` (`str`). Only the rows on their way to a batch are held.

    It reads the sources and layouts `load_image_text_dataset` reads, with the same options; streaming changes what
    can be known up front:
    - rows are checked as they stream by: a bad example (the image, with `check_images`, and the caption, as
      `load_image_text_dataset` checks them) raises a `UserError` naming its image (file, or hash of the embedded
      bytes) and captions where it is reached, perhaps half-way through training, or with `skip_bad_examples=True`
      is left out and logged (a streamed row has no stable number: shards and buffers reorder it);
    - images given by URL (a Hub imagefolder streamed: `hf://...`) are fetched as their rows stream by;
    - rows are not grouped by image: each caption is a pair of its own, so an image listed in several rows can meet
      itself as a negative in a batch (rare in a web-scale set);
    - a `where` that no row matches gives an empty stream, and the number of pairs is unknown until the end.
    Shuffle it with `.shuffle(seed=..., buffer_size=...)` and call `.set_epoch(epoch)` for a fresh order each epoch.

    Args:
        name_or_path, split, image_column, caption_column, skip_bad_examples, max_image_pixels, check_images, where,
        image_root: as for `load_image_text_dataset`.
        load_kwargs: passed to `datasets.load_dataset(..., streaming=True)`.
    """
    source = _load_source(name_or_path, split, streaming=True, **load_kwargs)
    label = _split_label(name_or_path, split, where)
    features = source.features
    if features is None:
        raise UserError(f"datasets cannot tell the columns of {label} without reading it (a JSON source): stream a "
                        "Parquet or imagefolder copy, or load it without streaming.")
    path_columns, caption_columns = _checked_columns(features, label, image_column, caption_column, where,
                                                     image_root)
    if isinstance(features[path_columns[0]], datasets.Image):
        source = source.cast_column(path_columns[0], datasets.Image(decode=False))  # the collator decodes
    if where:
        source = source.filter(_RowsWhere(_where_values(features, where, label)), input_columns=list(where),
                               batched=True)
    pairs = _StreamedPairs(label, path_columns, caption_columns, image_root,
                           one_per_row=len(caption_columns) == 1 and _is_string(features[caption_columns[0]]),
                           check_images=check_images, max_image_pixels=max_image_pixels,
                           skip_bad_examples=skip_bad_examples)
    return source.map(pairs, batched=True, batch_size=_STREAM_BATCH_ROWS, remove_columns=list(features),
                      features=datasets.Features({"image": datasets.Image(decode=False),
                                                  "caption": datasets.Value("string")}))


def _fetched(image: dict) -> dict:
    """An image value with its bytes read when its path is a URL (`hf://`, `https://`: a Hub folder streamed), which
    PIL cannot open; as it is otherwise."""
    path = image.get("path")
    if image.get("bytes") or not path or "://" not in path:
        return image
    try:
        with fsspec.open(path, "rb") as remote:  # hf:// by huggingface_hub's file system, with the user's token
            return {"path": path, "bytes": remote.read()}
    except (OSError, ValueError) as error:  # left to the check, which names the row
        logger.debug("cannot fetch %s: %s", path, error)
        return image


def _held(stream: datasets.IterableDataset, allowed: Mapping[str, set], label: str) -> datasets.Dataset:
    """The rows of a stream whose columns hold `allowed` values (see `_where_values`), in memory (a split small
    enough to hold), their images as they are stored (never decoded and encoded again)."""
    images = [name for name, feature in stream.features.items() if isinstance(feature, datasets.Image)]
    for name in images:
        stream = stream.cast_column(name, datasets.Image(decode=False))
    if allowed:
        stream = stream.filter(_RowsWhere(allowed), input_columns=list(allowed), batched=True)
    rows = list(stream)
    if not rows:
        raise UserError(f"{label}: no row{' matches where' if allowed else ''}; check the split and where.")
    held = datasets.Dataset.from_list(rows, features=stream.features)
    for name in images:
        held = held.cast_column(name, datasets.Image())
    return held


class _RowsWhere:
    """The filter of a streamed split's rows by `where` (`allowed`: per column, the values a row may hold)."""

    def __init__(self, allowed: Mapping[str, set]):
        self.allowed = dict(allowed)

    def __call__(self, *columns: list) -> list[bool]:  # the `where` columns, in `allowed`'s order
        return [all(value in values for value, values in zip(row, self.allowed.values())) for row in zip(*columns)]


class _StreamedPairs:
    """The map of a streamed split's rows to checked (image, caption) pairs (see `stream_image_text_pairs`)."""

    def __init__(self, label: str, path_columns: list[str], caption_columns: list[str],
                 image_root: str | os.PathLike | None, one_per_row: bool, check_images: bool,
                 max_image_pixels: int | None, skip_bad_examples: bool):
        self.label, self.path_columns, self.caption_columns = label, path_columns, caption_columns
        self.image_root, self.one_per_row = image_root, one_per_row
        self.check_images, self.max_image_pixels = check_images, max_image_pixels
        self.skip_bad_examples = skip_bad_examples
        self.problems = 0  # left out so far by this process (or DataLoader worker)

    def __call__(self, batch: dict) -> dict:
        if self.image_root is not None or len(self.path_columns) > 1:
            images = [{"path": path, "bytes": None}
                      for path in _joined_paths([batch[column] for column in self.path_columns], self.image_root)]
        else:
            images = [{"path": value, "bytes": None} if isinstance(value, str) or value is None else value
                      for value in batch[self.path_columns[0]]]
        pairs = {"image": [], "caption": []}
        for image, row_captions in zip(map(_fetched, images), _row_captions(batch, self.caption_columns)):
            place = f"the row of {_image_label(image)} (captions {str(row_captions)[:100]})"
            problem = check_image(image, self.max_image_pixels) if self.check_images else None
            if problem is not None:
                self._bad(f"{place}: {problem}")
                continue
            good, caption_problems = _check_captions(row_captions, self.one_per_row)
            for caption_problem in caption_problems:
                self._bad(f"{place}: {caption_problem}")
            pairs["image"] += [image] * len(good)
            pairs["caption"] += good
        return pairs

    def _bad(self, problem: str) -> None:
        if not self.skip_bad_examples:
            raise UserError(f"{self.label}: a bad example: {problem}. Fix or remove it, or pass skip_bad_examples=True "
                            "(train_mcad.py --skip_bad_examples) to leave such examples out.")
        self.problems += 1
        if self.problems <= _MAX_LISTED_PROBLEMS or self.problems % 1000 == 0:
            logger.warning("%s: left out %s (%d left out so far by this reader)", self.label, problem, self.problems)


def _split_label(name_or_path, split: str, where: Mapping[str, Any] | None) -> str:
    """How messages name the split read."""
    return f"{name_or_path} (split {split!r}{f', where {dict(where)}' if where else ''})"


def _checked_columns(features: datasets.Features, label: str, image_column, caption_column,
                     where: Mapping[str, Any] | None, image_root) -> tuple[list[str], list[str]]:
    """The image (path) and caption columns as lists, once every named column is known to exist and to hold what
    it must: images or file paths (several columns, or one under `image_root`: paths to join), captions."""
    caption_columns = [caption_column] if isinstance(caption_column, str) else list(caption_column)
    path_columns = [image_column] if isinstance(image_column, str) else list(image_column)
    for option, columns in (("image_column", path_columns), ("caption_column", caption_columns)):
        if not columns or len(set(columns)) != len(columns):
            raise UserError(f"{label}: {option}={columns} must name one column or a list of distinct columns.")
    missing = [column for column in (*path_columns, *caption_columns, *(where or {})) if column not in features]
    if missing:
        raise UserError(f"{label} has no column {missing}; its columns are {list(features)}. "
                        "Pass image_column= and caption_column= (a column, or a list of them) naming the image and "
                        "caption columns, and where= keys naming columns.")
    for column in caption_columns:
        feature = features[column]
        if not _is_string(feature) and not (isinstance(feature, (datasets.Sequence, datasets.LargeList))
                                            and _is_string(feature.feature)):
            raise UserError(f"{label}: column {column!r} holds {feature}, not captions; it must hold a string or a "
                            "list of strings per row.")
    if len(path_columns) > 1 or image_root is not None:
        if not all(_is_string(features[column]) for column in path_columns):
            raise UserError(f"{label}: image columns {path_columns} must hold file paths (strings) to be joined into "
                            f"a path under image_root; they hold {[str(features[c]) for c in path_columns]}. Pass "
                            "image_column= naming the path columns, or leave image_root out for a column of images.")
    elif not (isinstance(features[path_columns[0]], datasets.Image) or _is_string(features[path_columns[0]])):
        raise UserError(f"{label}: column {path_columns[0]!r} holds {features[path_columns[0]]}, not images or image "
                        "file paths; pass image_column= naming the column of images.")
    return path_columns, caption_columns


def _row_captions(chunk: dict, columns: list[str]) -> Iterator:
    """Each row's captions: the one column's value, or the values of several columns gathered in a list (a column
    holding lists contributes its items; nulls are left out)."""
    if len(columns) == 1:
        return iter(chunk[columns[0]])
    rows = zip(*(chunk[column] for column in columns))
    return ([caption for value in values if value is not None
             for caption in (value if isinstance(value, list) else [value])] for values in rows)


def _image_paths(source: datasets.Dataset, columns: list[str], root: str | os.PathLike | None) -> list[str]:
    """Each row's image file: its path columns' values joined by "/", under `root` when given."""
    table = source.select_columns(columns).with_format("arrow")[:]
    return _joined_paths([table.column(column).to_pylist() for column in columns], root)


def _joined_paths(values: list[list], root: str | os.PathLike | None) -> list[str]:
    """Per row, the values of the path columns (`values[column][row]`) joined by "/" under `root`."""
    return [os.path.join(root or "", *(part or "" for part in row)) for row in zip(*values)]


def _rows_where(source: datasets.Dataset, where: Mapping[str, Any], label: str) -> datasets.Dataset:
    """The rows of `source` whose columns equal `where`'s values (a list value: any of its items)."""
    allowed = _where_values(source.features, where, label)
    columns = source.select_columns(list(where)).with_format("arrow")[:]  # only these columns are read
    keep = np.ones(len(source), bool)
    for column, values in allowed.items():
        keep &= np.array([item in values for item in columns.column(column).to_pylist()], bool)
    if not keep.any():
        present = {column: sorted({str(item) for item in columns.column(column).to_pylist()})[:20]
                   for column in allowed}
        raise UserError(f"{label}: no row matches where={dict(where)}; the columns hold {present}.")
    return source.select(np.flatnonzero(keep))


def _where_values(features: datasets.Features, where: Mapping[str, Any], label: str) -> dict[str, set]:
    """Per `where` column, the set of values a row may hold there, once they are known to be of the column's type."""
    allowed = {}
    for column, value in where.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        kind = features.arrow_schema.field(column).type
        wanted = (str if pa.types.is_string(kind) or pa.types.is_large_string(kind) else
                  bool if pa.types.is_boolean(kind) else int if pa.types.is_integer(kind) else
                  (int, float) if pa.types.is_floating(kind) else None)
        if wanted is None:
            raise UserError(f"{label}: where[{column!r}]: the column holds {kind}, not plain values a row can be "
                            "selected by; name a column of strings, numbers or booleans.")
        if not values or not all(isinstance(item, wanted) and (wanted is bool or not isinstance(item, bool))
                                 for item in values):
            advice = " (in YAML, quote a number or yes / no meant as text)" if wanted is str else ""
            raise UserError(f"{label}: where[{column!r}] must be a value or a non-empty list of values of the column's "
                            f"type ({kind}), got {value!r}{advice}.")
        allowed[column] = set(values)
    return allowed


def _load_source(name_or_path, split: str, streaming: bool = False,
                 **load_kwargs) -> datasets.Dataset | datasets.IterableDataset:
    path = Path(name_or_path)
    if path.is_dir() and ((path / datasets.config.DATASETDICT_JSON_FILENAME).exists()
                          or (path / datasets.config.DATASET_STATE_JSON_FILENAME).exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"{path} has splits {list(loaded)}, not {split!r}; pass split= one of them.")
            loaded = loaded[split]
        # Memory-mapped already; as a stream, one shard per Arrow file (shuffled in order among themselves).
        return loaded.to_iterable_dataset(num_shards=max(1, len(loaded.cache_files))) if streaming else loaded
    try:
        return datasets.load_dataset(str(name_or_path), split=split, streaming=streaming, **load_kwargs)
    except (pa.ArrowInvalid, datasets.exceptions.DatasetGenerationError) as error:
        undecodable = _undecodable_metadata(path) if path.is_dir() else None
        if undecodable:
            raise UserError(f"datasets could not read {name_or_path} (split {split!r}): {undecodable}; save the file "
                            "as UTF-8.") from error
        raise UserError(
            f"datasets could not read {name_or_path} (split {split!r}): {error}. In a metadata.jsonl every value of "
            "a column must have one type: each caption a string (or each row a list of strings)."
        ) from error
    except FileNotFoundError as error:  # datasets' DatasetNotFoundError among them
        raise UserError(f"No dataset {name_or_path} ({error}); pass a Hub dataset name, a folder datasets.load_dataset "
                        "reads (an imagefolder) or a save_to_disk folder.") from error
    except ValueError as error:
        if "Unknown split" in str(error):  # datasets' refusal of a split names the splits there are
            raise UserError(f"{name_or_path} has no split {split!r} ({error}); pass one of its splits.") from error
        options = f" with {load_kwargs}" if load_kwargs else ""
        raise UserError(f"datasets could not load {name_or_path}{options} ({error}); check the dataset's name and "
                        "the options passed to datasets.load_dataset (dataset_options).") from error


def _undecodable_metadata(folder: Path) -> str | None:
    """Where the first metadata file of an imagefolder that is not valid UTF-8 goes wrong, or None."""
    for metadata in sorted(folder.rglob("metadata.*")):
        data = metadata.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            return f"{metadata} is not valid UTF-8 (line {line}: {error.reason}, byte 0x{data[error.start]:02x})"
    return None


def _is_string(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _check_captions(row_captions, one_per_row: bool) -> tuple[list[str], list[str]]:
    """A row's usable captions (stripped of surrounding spaces) and what is wrong with the others."""
    if row_captions is None and not one_per_row:
        return [], ["the caption list is missing (null)"]
    good, problems = [], []
    for position, caption in enumerate([row_captions] if one_per_row else row_captions):
        name = "caption" if one_per_row else f"caption {position}"
        if not isinstance(caption, str):
            problems.append(f"{name} is not a string ({type(caption).__name__})")
        elif not caption.strip():
            problems.append(f"{name} is empty")
        else:
            good.append(caption.strip())
    return good, problems


# --- training pairs ------------------------------------------------------------------------------------------------


def flatten_pairs(dataset: datasets.Dataset) -> datasets.Dataset:
    """
    One row per (image, caption) pair of a dataset grouped by image (`image`, `captions`): columns `pair_index`
    (the row number), `image_index` (the image's row in `dataset`), `caption`, and, where `dataset` has them, the
    per-caption columns in the singular (`PER_CAPTION_COLUMNS`: `canonical`, `swapped_caption`, `flipped_caption`,
    `mined_caption`).

    Rows read whole (`pairs[i]`, `pairs[i:j]`, a DataLoader) also carry the decoded `image`, fetched from `dataset`
    when read: the image bytes are not copied once per caption. Single columns (`pairs["caption"]`) do not.
    """
    missing = [column for column in ("image", "captions") if column not in dataset.column_names]
    if missing:
        raise ValueError(f"flatten_pairs needs a dataset grouped by image with columns 'image' and 'captions' (see "
                         f"load_image_text_dataset); it has no {missing}.")
    per_caption = [column for column in PER_CAPTION_COLUMNS if column in dataset.column_names]
    pairs = dataset.select_columns(["captions", *per_caption]).map(
        _explode_captions, batched=True, with_indices=True, remove_columns=["captions", *per_caption],
        fn_kwargs={"per_caption": per_caption}, desc="flatten_pairs",
    )
    pairs = pairs.add_column("pair_index", np.arange(len(pairs), dtype=np.int64))
    pairs = pairs.select_columns(["pair_index", "image_index", "caption",
                                  *(PER_CAPTION_COLUMNS[column] for column in per_caption)])
    return pairs.with_transform(_AttachImages(dataset.select_columns(["image"]), pairs.column_names))


def _explode_captions(batch: dict, indices: list[int], per_caption: list[str]) -> dict:
    exploded = {"image_index": [], "caption": [], **{PER_CAPTION_COLUMNS[column]: [] for column in per_caption}}
    for row, (image_index, captions) in enumerate(zip(indices, batch["captions"])):
        exploded["image_index"] += [image_index] * len(captions)
        exploded["caption"] += captions
        for column in per_caption:
            exploded[PER_CAPTION_COLUMNS[column]] += batch[column][row]
    return exploded


class _AttachImages:
    """The format transform of `flatten_pairs`: adds each pair's decoded image to whole rows read from the pairs."""

    def __init__(self, images: datasets.Dataset, columns: Sequence[str]):
        self.images = images
        self.columns = set(columns)

    def __call__(self, batch: dict) -> dict:
        if self.columns <= batch.keys():  # a column query (pairs["caption"]) must return that column alone
            batch["image"] = self.images[list(batch["image_index"])]["image"]
        return batch


class OneCaptionPerImageSampler(Sampler[int]):
    """
    Pair indices for one epoch: every image once, in a random order, each with one of its captions drawn at random —
    so a batch never holds an image twice (DESIGN §3) and every caption is seen over the epochs. The draw depends only
    on `seed` and the epoch: call `set_epoch(epoch)` before each epoch (as with `DistributedSampler`), or every epoch
    repeats the first one's captions.

    With Accelerate, pass it as the `sampler` of the DataLoader given to `accelerator.prepare`: every process builds
    the same sampler, and Accelerate shards the batches across processes; the prepared loader's `set_epoch` reaches
    this sampler.

    Args:
        pairs (`datasets.Dataset` with an `image_index` column, or a sequence of `int`): the image of each pair, as
            made by `flatten_pairs`; the sampler yields row positions in it.
        seed (`int`): the random seed.
        shuffle (`bool`): draw a random image order each epoch (else images in index order, captions still drawn);
            with `image_groups` the groups' order is random either way.
        image_groups (sequence of `int`, *optional*): a group per image (indexed by image index), e.g. mcad-shapes'
            `family` of near-duplicates. The images of a group then come one after the other, groups in a random
            order each epoch (images in index order within a group): a batch holds each image's hard negatives,
            which a random batch of a large split almost never holds.
        canonical (sequence of `bool`, *optional*): per pair, whether its caption is canonical (mcad-shapes: names
            the left / top object first); read for `canonical_epochs`.
        canonical_epochs (`int`): for epochs below this number each image draws among its canonical captions only
            (an image without one draws among all): the wording curriculum of the fusion teacher. Relations under
            inverse wordings are an XOR of the relation word and the object order; on canonical captions alone the
            order is learnt first.
    """

    def __init__(self, pairs, seed: int = 0, shuffle: bool = True, image_groups: Sequence[int] | None = None,
                 canonical: Sequence[bool] | None = None, canonical_epochs: int = 0):
        image_index = np.asarray(pairs["image_index"] if hasattr(pairs, "column_names") else pairs, dtype=np.int64)
        if canonical_epochs and canonical is None:
            raise ValueError("canonical_epochs needs each pair's `canonical` flag (mcad-shapes' `canonical` column).")
        canonical = np.ones(len(image_index), dtype=bool) if canonical is None else np.asarray(canonical, dtype=bool)
        if canonical.shape != image_index.shape:
            raise ValueError(f"canonical has {len(canonical)} flags for {len(image_index)} pairs: give one per pair.")
        # Pairs sorted by image, canonical captions first: image k's pairs are order[starts[k] : starts[k] + counts[k]],
        # its canonical ones the first canonical_counts[k] of them.
        self._order = np.lexsort((~canonical, image_index))
        images, self._starts, self._counts = np.unique(image_index[self._order], return_index=True,
                                                       return_counts=True)
        canonical_counts = np.add.reduceat(canonical[self._order], self._starts)
        self._canonical_counts = np.where(canonical_counts > 0, canonical_counts, self._counts)
        self._groups = None
        if image_groups is not None:
            image_groups = np.asarray(image_groups, dtype=np.int64)
            if len(image_groups) <= images.max() or image_groups.min() < 0:
                raise ValueError(f"image_groups must give a group id >= 0 to each of the {images.max() + 1} images.")
            self._groups = torch.from_numpy(image_groups[images])
        self.seed, self.shuffle, self.canonical_epochs, self.epoch = seed, shuffle, canonical_epochs, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._starts)

    def __iter__(self) -> Iterator[int]:
        return iter(self.draw(self.epoch, canonical_only=self.epoch < self.canonical_epochs).tolist())

    def draw(self, epoch: int, canonical_only: bool = False) -> np.ndarray:
        """
        The pair indices of `epoch`: every image once, with one of its captions (its canonical ones only, where it
        has any, with `canonical_only`), in the epoch's order. A function of the seed, the epoch and the flag alone.
        """
        rng = np.random.default_rng([self.seed, epoch])
        counts = self._canonical_counts if canonical_only else self._counts
        chosen = self._order[self._starts + (rng.random(len(self._starts)) * counts).astype(np.int64)]
        if self._groups is not None:
            # torch's generator: the teachers' recipes and gates were measured on family batches drawn with it.
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            group_rank = torch.randperm(int(self._groups.max()) + 1, generator=generator)[self._groups]
            chosen = chosen[torch.argsort(group_rank, stable=True).numpy()]
        elif self.shuffle:
            chosen = chosen[rng.permutation(len(chosen))]
        return chosen


# --- training splits as tensors: every image and text preprocessed once -----------------------------------------------


@dataclass
class TextTable:
    """Texts tokenized once by one processor, padded to a common length; `rows(index)` gives a batch."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The texts at `index`, cut to the longest of them."""
        mask = self.attention_mask[index]
        length = max(int(mask.sum(dim=1).max()), 1)
        return self.input_ids[index, :length], mask[:, :length]


def encode_images(images: Sequence, processor, batch_size: int = 256) -> torch.Tensor:
    """`pixel_values` of every image (PIL images or `datasets.Image` values), made by `processor`."""
    chunks = [processor(images=[to_rgb(image) for image in images[start : start + batch_size]],
                        return_tensors="pt")["pixel_values"]
              for start in progress(range(0, len(images), batch_size), desc="preprocessing images")]
    return torch.cat(chunks)


def encode_texts(texts: Sequence[str], processor) -> TextTable:
    """Every text tokenized by `processor` (cut to the tokenizer's limit)."""
    encoding = processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
    return TextTable(encoding["input_ids"], encoding["attention_mask"])


@dataclass
class TrainingPairs:
    """
    A training split as tensors: per pair its image, its caption's text row and its distractors' rows (-1: none);
    every image and text encoded once per processor.

    Args:
        image_index (`torch.LongTensor` of shape `(pairs,)`): each pair's image.
        canonical (`torch.BoolTensor` of shape `(pairs,)`): whether the caption names the left/top object first.
        caption_row, swapped_row, flipped_row (`torch.LongTensor` of shape `(pairs,)`): rows of `texts`.
        texts (`list[str]`): every distinct caption and distractor.
        family (`torch.LongTensor` of shape `(images,)`, *optional*): each image's family of near-duplicates.
        pixel_values (`dict[str, torch.Tensor]`): per processor name, `(images, channels, height, width)`.
        tables (`dict[str, TextTable]`): per processor name, the tokenized `texts`.
    """

    image_index: torch.Tensor
    canonical: torch.Tensor
    caption_row: torch.Tensor
    swapped_row: torch.Tensor
    flipped_row: torch.Tensor
    texts: list[str]
    family: torch.Tensor | None = None
    pixel_values: dict[str, torch.Tensor] = field(default_factory=dict)
    tables: dict[str, TextTable] = field(default_factory=dict)

    @classmethod
    def from_split(cls, split: datasets.Dataset, processors: Mapping[str, object]) -> "TrainingPairs":
        """
        Args:
            split (`datasets.Dataset`): one row per image: `image`, `captions` and, for distractors and the wording
                curriculum, the mcad-shapes columns `canonical`, `swapped_captions`, `flipped_captions`.
            processors (`Mapping[str, processor]`): name -> processor; each encodes every image and text once.
        """
        # Whole columns, read without the per-row transform that attaches images (1.5 s a column for 15k pairs).
        columns = flatten_pairs(split).with_format(None)[:]
        captions = columns["caption"]
        swapped = columns.get("swapped_caption", [None] * len(captions))
        flipped = columns.get("flipped_caption", [None] * len(captions))
        canonical = columns.get("canonical", [True] * len(captions))
        row = {text: index for index, text in enumerate(dict.fromkeys(
            text for text in (*captions, *swapped, *flipped) if text is not None))}

        def rows(texts) -> torch.Tensor:
            return torch.tensor([-1 if text is None else row[text] for text in texts], dtype=torch.long)

        images = split.cast_column("image", datasets.Image(decode=False))[:]["image"]
        # Teachers that share one processor (the shapes teachers) share its encodings: each is made once.
        encoded = {}
        for processor in processors.values():
            if id(processor) not in encoded:
                encoded[id(processor)] = encode_images(images, processor), encode_texts(list(row), processor)
        return cls(
            image_index=torch.tensor(columns["image_index"], dtype=torch.long),
            canonical=torch.tensor(canonical, dtype=torch.bool),
            caption_row=rows(captions), swapped_row=rows(swapped), flipped_row=rows(flipped),
            texts=list(row),
            family=torch.tensor(split["family"], dtype=torch.long) if "family" in split.column_names else None,
            pixel_values={name: encoded[id(processor)][0] for name, processor in processors.items()},
            tables={name: encoded[id(processor)][1] for name, processor in processors.items()},
        )

    def __len__(self) -> int:
        return len(self.image_index)

    def epoch_batches(self, epoch: int, batch_size: int, seed: int, canonical_only: bool = False,
                      group_families: bool = False) -> list[torch.Tensor]:
        """
        The pair indices of one epoch in batches of `batch_size` (the last, smaller one dropped): every image once
        with one of its captions drawn afresh (`OneCaptionPerImageSampler.draw`), from its canonical captions only
        with `canonical_only`.

        With `group_families` (and a `family` per image), the images of a family of near-duplicates come one after
        the other, families in a random order: a batch then holds each image's colour-swapped, place-swapped and
        re-coloured siblings, the hard negatives a random batch of a large split almost never holds.
        """
        if group_families and self.family is None:
            raise ValueError("group_families needs a `family` column in the split (mcad-shapes has one).")
        sampler = OneCaptionPerImageSampler(self.image_index.tolist(), seed=seed, canonical=self.canonical.tolist(),
                                            image_groups=self.family if group_families else None)
        order = torch.from_numpy(sampler.draw(epoch, canonical_only))
        return list(order[: len(order) // batch_size * batch_size].split(batch_size))


# --- collation ---------------------------------------------------------------------------------------------------


class ImageTextCollator:
    """
    Collate (image, caption) examples into the inputs of several models at once: each processor turns the same
    images and captions into its own model's inputs (its own image size and normalisation, its own tokenizer).
    Each image is decoded and converted to RGB once, whatever the number of processors.

    Args:
        processors (`Mapping[str, ProcessorMixin]`): name -> processor, e.g. `{"student": MCADProcessor,
            "dual": CLIPProcessor, "fusion": BlipProcessor}`. Each is called as
            `processor(images=..., text=..., return_tensors="pt", padding=True, truncation=True)`: captions are
            padded per processor and cut to its tokenizer's limit.
        processor_kwargs (`Mapping[str, dict]`, *optional*): extra call arguments per processor name, e.g.
            `{"fusion": {"max_length": 35}}`.
        image_column, caption_column (`str`): the example keys (`flatten_pairs` gives `image` and `caption`).
        negative_columns (`Sequence[str]`): example keys of hard-negative captions (e.g. `flatten_pairs`'s
            `swapped_caption`, `flipped_caption` for NegCLIP), tokenized by `negative_processor`'s tokenizer into
            `batch["negatives"]`, example by example, column by column.
        negative_processor (`str`): the processor whose tokenizer reads the negatives.
        max_image_pixels (`int`, *optional*): the largest image decoded, in pixels (default: PIL's limit, about
            89M); a batch decodes all its images at once, so lower it for datasets of very large photos.

    Returns (from a call on a list of examples):
        `dict` with, when the examples have them, `pair_index` and `image_index` (`torch.LongTensor`), per
        processor name its `BatchFeature` (`pixel_values`, `input_ids`, `attention_mask`, ...), and with
        `negative_columns` the tokenized `negatives`.
    """

    def __init__(self, processors: Mapping[str, Any], processor_kwargs: Mapping[str, dict] | None = None,
                 image_column: str = "image", caption_column: str = "caption",
                 negative_columns: Sequence[str] = (), negative_processor: str = "student",
                 max_image_pixels: int | None = None):
        if not processors:
            raise ValueError("ImageTextCollator needs at least one processor.")
        unknown = set(processor_kwargs or {}) - set(processors)
        if unknown:
            raise ValueError(f"processor_kwargs names {sorted(unknown)}, which are not processors "
                             f"({sorted(processors)}).")
        self.processors = dict(processors)
        self.processor_kwargs = dict(processor_kwargs or {})
        self.image_column, self.caption_column = image_column, caption_column
        if negative_columns and negative_processor not in self.processors:
            raise ValueError(f"negative_processor {negative_processor!r} is not one of the processors "
                             f"({sorted(self.processors)}).")
        self.negative_columns, self.negative_processor = tuple(negative_columns), negative_processor
        self.max_image_pixels = max_image_pixels

    def __call__(self, examples: Sequence[Mapping]) -> dict:
        images, captions = [], []
        for position, example in enumerate(examples):
            where = f"pair {example['pair_index']}" if "pair_index" in example else f"example {position}"
            missing = [key for key in (self.image_column, self.caption_column) if key not in example]
            if missing:
                raise KeyError(f"{where} has no {missing} (it has {sorted(example)}); set image_column= / "
                               "caption_column= of the collator.")
            try:
                images.append(to_rgb(example[self.image_column], self.max_image_pixels))
            except (OSError, ValueError, TypeError) as error:
                raise UserError(f"{where}: the image cannot be used ({error}). Load the data with "
                                "load_image_text_dataset, which checks every image up front.") from error
            captions.append(example[self.caption_column])
        batch = {}
        for key in ("pair_index", "image_index"):
            if all(key in example for example in examples):
                batch[key] = torch.tensor([example[key] for example in examples], dtype=torch.long)
        for name, processor in self.processors.items():
            kwargs = {"return_tensors": "pt", "padding": True, "truncation": True,
                      **self.processor_kwargs.get(name, {})}
            batch[name] = processor(images=images, text=captions, **kwargs)
        if self.negative_columns:
            negatives = []
            for position, example in enumerate(examples):
                for column in self.negative_columns:
                    if not isinstance(example.get(column), str):
                        # Every process must gather as many negatives as the others: none may be missing.
                        raise UserError(f"pair {example.get('pair_index', position)} has no {column!r} negative; "
                                        "hard negatives need one for every pair (mcad-shapes scenes of two "
                                        "objects with relations have them).")
                    negatives.append(example[column])
            tokenizer = self.processors[self.negative_processor].tokenizer
            batch["negatives"] = tokenizer(negatives, return_tensors="pt", padding=True, truncation=True)
        return batch


__all__ = ["ImageTextCollator", "ImageTooLargeError", "OneCaptionPerImageSampler", "TextTable", "TrainingPairs",
           "check_image", "encode_images", "encode_texts", "flatten_pairs", "load_image_text_dataset", "open_image",
           "stream_image_text_pairs", "to_rgb"]
