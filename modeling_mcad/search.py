"""Search a photo gallery by text, the way a phone would: a tokenizer, the int8 ONNX text encoder and an int8 index
of image embeddings — no torch and no transformers at query time (the paper's ~100 MB / ~8 ms app).

Building an index runs the student's image encoder once over the gallery (torch, imported only inside the functions
that build one). Answering a query imports only numpy, onnxruntime and `tokenizers`:

```python
>>> build_index("photos/", "outputs/demo/export", "photos.index.safetensors")   # torch, once
>>> engine = GallerySearch("photos.index.safetensors")                            # numpy + onnxruntime + tokenizers
>>> engine.search("a red circle left of a blue square", k=5).hits
[SearchHit(id='beach/0042.png', score=0.61), ...]
>>> add_to_index("photos.index.safetensors", "photos/")      # embeds only the photos the index does not hold yet
>>> remove_from_index("photos.index.safetensors", ["beach/0042.png"])
```

or from a shell: `mcad-search index | query | add | remove | export` (`mcad-search -h`). The index (its file format,
search kernel, updates and Parquet export) is `gallery_index.GalleryIndex`.

A query is checked against the index before it is answered: the text encoder must produce embeddings of the
index's dimension, and embed a few fixed probe texts as the model that built the index did (cosine at least
`MIN_PROBE_COSINE`) — an index is useless with another model's text encoder, however well its shapes match.
"""

import argparse
import json
import logging
import os
import sys
from collections.abc import Container, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .gallery_index import (
    PROBE_TEXTS,
    CorruptIndexError,
    GalleryIndex,
    IdTable,
    IndexModel,
    IndexModelMismatchError,
    SearchError,
    check_index_destination,
    rebuild_hint,
)

__all__ = ["PROBE_TEXTS", "CorruptIndexError", "GalleryIndex", "GallerySearch", "IdTable", "IndexModel",
           "IndexModelMismatchError", "SearchError", "SearchHit", "SearchResult", "TextQueryEncoder", "add_to_index",
           "build_index", "embed_gallery", "main", "remove_from_index"]

logger = logging.getLogger(__name__)

# The int8 ONNX text encoder written by `export.export_onnx` / `export.export_variants`.
DEFAULT_TEXT_MODEL = "onnx/text_model_quantized.onnx"
# int8 and fp32 text encoders of one model agree to ~0.999 on the probes; another model's is far off.
MIN_PROBE_COSINE = 0.98


# --- the text side: tokenizer.json + the ONNX text encoder --------------------------------------------------------


class TextQueryEncoder:
    """
    Turns texts into L2-normalised embeddings with the model folder's `tokenizer.json` (`tokenizers`) and its ONNX
    text encoder (onnxruntime): the same ids, mask and truncation as the model's transformers tokenizer with
    `padding=True, truncation=True`.

    Args:
        model_dir (`str` or `os.PathLike`): a student export folder (`tokenizer.json`, `tokenizer_config.json`,
            `config.json`, `onnx/`).
        text_model (`str` or `os.PathLike`, defaults to `DEFAULT_TEXT_MODEL`): the ONNX text encoder, relative to
            `model_dir` or absolute (`onnx/text_model.onnx` for fp32).
        num_threads (`int`, defaults to 1): onnxruntime threads; one answers a single query fastest.
    """

    def __init__(self, model_dir: str | os.PathLike, text_model: str | os.PathLike = DEFAULT_TEXT_MODEL,
                 num_threads: int = 1):
        import onnxruntime
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir)
        self.text_model = self.model_dir / text_model
        tokenizer_file = self.model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise SearchError(f"{self.model_dir} holds no tokenizer.json: pass the student's export folder (it holds "
                              "the processor's files, saved by MCADProcessor.save_pretrained).")
        if not self.text_model.is_file():
            raise SearchError(f"There is no ONNX text encoder {self.text_model}: export the model with "
                              "modeling_mcad.export.export_variants(MODEL_DIR) (or `python train_mcad.py export`) and "
                              "pass its export folder.")
        tokenizer_config = _read_json(self.model_dir / "tokenizer_config.json")
        self.max_length = _max_length(tokenizer_config, _read_json(self.model_dir / "config.json"))
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # tokenizers raises a bare Exception for a file it cannot parse
            raise SearchError(f"{tokenizer_file} is not a tokenizer file `tokenizers` can read ({error}); save the "
                              "model folder again with its processor (MCADProcessor.save_pretrained).") from error
        self.tokenizer.enable_truncation(self.max_length)
        pad_token = tokenizer_config.get("pad_token")
        pad_token = pad_token.get("content") if isinstance(pad_token, dict) else pad_token
        if pad_token is not None:
            self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id(pad_token), pad_token=pad_token,
                                          direction=tokenizer_config.get("padding_side", "right"))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        # A worker thread spinning after its run would hold a core the gallery scan's threads need next (the scan's
        # threads may spin: the text encoder of the next query runs on the calling thread first).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(str(self.text_model), options,
                                                        providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
            raise SearchError(f"onnxruntime cannot load {self.text_model} ({error}); re-export the model.") from error
        inputs = sorted(node.name for node in self.session.get_inputs())
        if inputs != ["attention_mask", "input_ids"]:
            raise SearchError(f"{self.text_model} takes inputs {inputs}, not input_ids and attention_mask: pass the "
                              "text encoder written by modeling_mcad.export.")

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """`(input_ids, attention_mask, truncated)`: int64 arrays `(batch, length)` and, per text, whether it was
        cut to `max_length` tokens."""
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise SearchError("texts must be a list of strings.")
        encodings = self.tokenizer.encode_batch(list(texts))
        for position, (text, encoding) in enumerate(zip(texts, encodings)):
            # Control or zero-width characters survive str.strip() but tokenize to nothing (special tokens only).
            if not text.strip() or all(encoding.special_tokens_mask):
                query = "The query" if len(texts) == 1 else f"Query {position}"
                raise SearchError(f"{query} is empty or only whitespace ({text!r}); describe what to find, e.g. "
                                  "\"a red circle left of a blue square\".")
        input_ids = np.array([encoding.ids for encoding in encodings], dtype=np.int64)
        attention_mask = np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64)
        return input_ids, attention_mask, [bool(encoding.overflowing) for encoding in encodings]

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """`(embeddings, truncated)`: float32 `(batch, dimension)`, L2-normalised, and the truncation flags."""
        input_ids, attention_mask, truncated = self.tokenize(texts)
        for text, cut in zip(texts, truncated):
            if cut:
                logger.warning("The query is longer than the model's %d tokens and was truncated: %.60r...",
                               self.max_length, text)
        embeddings = self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]
        return embeddings, truncated


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise SearchError(f"{path} is not readable JSON ({error}); save the model folder again.") from error


def _max_length(tokenizer_config: dict, config: dict) -> int:
    """The tokenizer's `model_max_length`, bounded by the text tower's positions (some tokenizers say 10**30)."""
    limits = [tokenizer_config.get("model_max_length"), config.get("text_config", {}).get("max_position_embeddings")]
    limits = [int(limit) for limit in limits if isinstance(limit, (int, float)) and 0 < limit < 10**6]
    if not limits:
        raise SearchError("Neither tokenizer_config.json (model_max_length) nor config.json (max_position_embeddings) "
                          "says how many tokens the text encoder takes; save the model folder with its processor.")
    return min(limits)


# --- the query engine -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchHit:
    """One gallery entry: its id and its score (cosine similarity to the query, up to quantization)."""

    id: str
    score: float


@dataclass(frozen=True)
class SearchResult:
    """The best gallery entries for a query, best first; `truncated` says the query was cut to the model's length."""

    query: str
    hits: list[SearchHit]
    truncated: bool

    def to_json(self) -> dict:
        return {"query": self.query, "truncated": self.truncated,
                "results": [{"id": hit.id, "score": hit.score} for hit in self.hits]}


def _model_of(index: GalleryIndex, model_dir: str | os.PathLike | None) -> Path:
    """The model folder for `index`: the one given, else the one the index records (when it lies in the index's
    folder and is still there)."""
    if model_dir is not None:
        return Path(model_dir)
    if index.model.path is None:
        raise SearchError(f"The index {index.path} does not record where its model is (it was built with the model "
                          f"folder {index.model.name!r}, outside the index's folder): pass that folder (--model DIR).")
    if not Path(index.model.path).is_dir():
        raise SearchError(f"The index {index.path} was built with the model in {index.model.path}, which is not there "
                          "any more: pass the model folder (--model DIR).")
    return Path(index.model.path)


class GallerySearch:
    """
    Answers text queries over an index with the model's ONNX text encoder. Imports no torch and no transformers.

    Args:
        index (`str`, `os.PathLike` or [`GalleryIndex`]): the index (file).
        model_dir (`str` or `os.PathLike`, *optional*): the folder holding `tokenizer.json` and the ONNX text
            encoder; defaults to the folder the index was built with, when the index records it (see
            [`IndexModel`]).
        text_model (`str` or `os.PathLike`, defaults to `DEFAULT_TEXT_MODEL`): the ONNX text encoder in it.
        num_threads (`int`, defaults to 1): threads of the text encoder and of the gallery scan.

    Raises:
        [`IndexModelMismatchError`]: the text encoder is not the one of the model that built the index.
    """

    def __init__(self, index: "str | os.PathLike | GalleryIndex", model_dir: str | os.PathLike | None = None,
                 text_model: str | os.PathLike = DEFAULT_TEXT_MODEL, num_threads: int = 1):
        self.index = index if isinstance(index, GalleryIndex) else GalleryIndex.load(index)
        self.encoder = TextQueryEncoder(_model_of(self.index, model_dir), text_model, num_threads)
        self.num_threads = num_threads
        self._check_model()

    def _check_model(self) -> None:
        index, encoder = self.index, self.encoder
        built_with = index.model.name if index.model.path is None else f"{index.model.name}, {index.model.path}"
        rebuild = f"query with the model the index was built with ({built_with}), or {rebuild_hint(index.path)}"
        probes, _ = encoder.encode(list(index.model.probe_texts))
        if probes.shape[1] != index.dimension:
            raise IndexModelMismatchError(
                f"The index {index.path} holds {index.dimension}-dimensional embeddings but {encoder.text_model} "
                f"makes {probes.shape[1]}-dimensional ones: the index was built by another model; {rebuild}.")
        if not np.isfinite(probes).all():
            raise SearchError(f"{encoder.text_model} makes NaN or infinite embeddings (of the probe texts): the text "
                              "encoder is broken. Export the model again (train_mcad.py export).")
        cosine = index.model.agreement(probes)
        if cosine < MIN_PROBE_COSINE:
            raise IndexModelMismatchError(
                f"The index {index.path} was built by another model than {encoder.text_model}: their text embeddings "
                f"of fixed probe texts differ (cosine {cosine:.3f} < {MIN_PROBE_COSINE}); {rebuild}.")

    def search(self, query: str, k: int = 5) -> SearchResult:
        """The `k` gallery entries that best match `query` (a non-empty string)."""
        if not isinstance(query, str):
            raise SearchError(f"The query must be a string, got {type(query).__name__}.")
        embeddings, truncated = self.encoder.encode([query])
        indices, scores = self.index.search(embeddings[0], k, self.num_threads)
        hits = [SearchHit(self.index.ids[i], float(score)) for i, score in zip(indices, scores)]
        return SearchResult(query, hits, truncated[0])


# --- building an index (torch) ----------------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    from PIL import Image

    extensions = {extension.lower() for extension in Image.registered_extensions()}
    return sorted(path for path in folder.rglob("*")
                  if path.suffix.lower() in extensions and path.is_file() and not path.name.startswith("."))


def _gallery_items(images, image_column: str, id_column: str | None) -> tuple[list[str], list, str]:
    """(ids, image values that `data.open_image` reads, a label for messages) of a folder or a dataset split."""
    if isinstance(images, (str, os.PathLike)):
        folder = Path(images)
        if not folder.is_dir():
            raise SearchError(f"{folder} is not a folder of images; pass the folder holding the gallery's photos.")
        files = _image_files(folder)
        if not files:
            raise SearchError(f"{folder} holds no image files (searched recursively); pass the gallery's folder.")
        return [file.relative_to(folder).as_posix() for file in files], files, str(folder)
    import datasets

    if not isinstance(images, datasets.Dataset):
        raise SearchError(f"images must be a folder or a datasets.Dataset split, got {type(images).__name__}.")
    for column in (image_column, id_column):
        if column is not None and column not in images.column_names:
            raise SearchError(f"The dataset has no column {column!r} (it has {images.column_names}); pass "
                              "image_column= / id_column= naming its image and id columns.")
    if len(images) == 0:
        raise SearchError("The dataset split is empty; an index needs at least one image.")
    ids = [str(value) for value in images[id_column]] if id_column else [str(row) for row in range(len(images))]
    raw = images.cast_column(image_column, datasets.Image(decode=False))[image_column]
    return ids, raw, f"the dataset split ({len(images)} rows)"


def embed_gallery(
    images,
    model_dir: str | os.PathLike,
    *,
    batch_size: int = 64,
    image_column: str = "image",
    id_column: str | None = None,
    skip_bad_images: bool = False,
    skip_ids: Container[str] = (),
    same_model_as: IndexModel | None = None,
) -> tuple[list[str], np.ndarray, IndexModel]:
    """
    Embed a gallery with the student's image encoder (torch, fp32): what [`build_index`] quantizes and saves.

    Args:
        images (`str`, `os.PathLike` or `datasets.Dataset`): a folder (searched recursively for image files; ids are
            the paths relative to it) or a dataset split, e.g. `make_shapes(...)["test"]` or
            `load_image_text_dataset(...)` (ids: `id_column`, or the row numbers).
        model_dir (`str` or `os.PathLike`): a saved student (`save_pretrained` with its processor), ideally the
            export folder, whose ONNX text encoder answers the queries.
        batch_size (`int`, defaults to 64): images per forward pass, at least 1.
        image_column (`str`), id_column (`str`, *optional*): columns of a dataset split.
        skip_bad_images (`bool`, defaults to `False`): leave out images that cannot be decoded (logged) instead of
            raising [`SearchError`] listing them.
        skip_ids (`Container[str]`, *optional*): ids not to embed (those an index already holds).
        same_model_as ([`IndexModel`], *optional*): the model of the index the embeddings are for; another model is
            refused ([`IndexModelMismatchError`]) before any image is embedded.

    Returns:
        `(ids, embeddings, model)`: the ids of the images embedded, their L2-normalised float32 embeddings
        `(count, dimension)` and the [`IndexModel`] describing the student.
    """
    import torch

    from . import MCADModel, MCADProcessor  # through the package, which registers the auto classes
    from .configuration_mcad import PLAIN_MODEL_CLASSES
    from .data import open_image, to_rgb
    from .export import VisionEncoder

    model_dir = Path(model_dir)
    if type(batch_size) is not int or batch_size < 1:  # bool is no size
        raise SearchError(f"batch_size={batch_size!r}: pass a positive number of images per forward pass "
                          "(--batch-size, default 64).")
    if not (model_dir / "config.json").is_file():
        raise SearchError(f"{model_dir} holds no config.json: pass a student folder (MCADModel.save_pretrained with "
                          "its processor), e.g. the export folder outputs/demo/export.")
    # transformers would load another architecture's folder with a mere warning, and embed with garbage. A student
    # is saved under its own model_type or a standard class's that holds the same weights (CLIP's).
    model_type = _read_json(model_dir / "config.json").get("model_type")
    readable = (MCADModel.config_class.model_type, *PLAIN_MODEL_CLASSES)
    if model_type not in readable:
        raise SearchError(f"{model_dir} holds a {model_type!r} model (config.json model_type), not an MCAD student "
                          f"(one of {', '.join(map(repr, readable))}): pass a student folder, e.g. the export folder "
                          "outputs/demo/export.")
    try:
        MCADModel.config_class.from_pretrained(model_dir)
    except ValueError as error:  # a standard class's folder with towers the student cannot use (MCADConfig's check)
        raise SearchError(f"{model_dir} holds a {model_type!r} model that is not an MCAD student: {error}") from None
    ids, values, label = _gallery_items(images, image_column, id_column)
    if skip_ids:
        kept = [position for position, image_id in enumerate(ids) if image_id not in skip_ids]
        ids, values = [ids[position] for position in kept], [values[position] for position in kept]
    try:
        model = MCADModel.from_pretrained(model_dir, dtype=torch.float32).eval()
        processor = MCADProcessor.from_pretrained(model_dir)
    except OSError as error:  # transformers' error for a folder without the weights or the processor's files
        raise SearchError(f"{model_dir} cannot be loaded as an MCAD student ({error}); pass a complete student folder "
                          "(MCADModel.save_pretrained with its processor), e.g. the export folder "
                          "outputs/demo/export.") from error
    # A broken text encoder fails here, before the work; another index's model is compared on that index's probes.
    probe_texts = PROBE_TEXTS if same_model_as is None else same_model_as.probe_texts
    index_model = IndexModel.from_model_dir(model_dir, model, processor, probe_texts)
    if same_model_as is not None:
        dimensions = (index_model.probe_embeddings.shape[1], same_model_as.probe_embeddings.shape[1])
        if dimensions[0] != dimensions[1] or same_model_as.agreement(index_model.probe_embeddings) < MIN_PROBE_COSINE:
            raise IndexModelMismatchError(f"{model_dir} is not the model the index was built with "
                                          f"({same_model_as.name}): their text embeddings of fixed probe texts differ; "
                                          "pass that model folder (--model), or build a new index.")
    vision = VisionEncoder(model).eval()
    kept_ids, embeddings, problems = [], [], []
    with torch.inference_mode():
        for start in range(0, len(values), batch_size):
            batch_images = []
            for image_id, value in zip(ids[start : start + batch_size], values[start : start + batch_size]):
                try:
                    batch_images.append(to_rgb(open_image(value)))
                    kept_ids.append(image_id)
                except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for unreadable or odd files
                    problems.append(f"{image_id}: {error}")
            if batch_images:
                embeddings.append(vision(processor(images=batch_images, return_tensors="pt")["pixel_values"]).numpy())
            if start // batch_size % 20 == 19:
                logger.info("Embedded %d / %d images", len(kept_ids), len(values))
    if problems and not skip_bad_images:
        listed = "\n  ".join(problems[:10])
        raise SearchError(f"{len(problems)} image(s) of {label} cannot be read:\n  {listed}\nFix or remove them, or "
                          "pass skip_bad_images=True (--skip-bad-images).")
    if problems:
        logger.warning("Left out %d unreadable image(s) of %s; the first: %s", len(problems), label, problems[0])
    if not kept_ids:
        if not ids:  # every image skipped: nothing new
            return [], np.zeros((0, index_model.probe_embeddings.shape[1]), np.float32), index_model
        raise SearchError(f"No image of {label} could be read.")
    embeddings = np.concatenate(embeddings)
    if not np.isfinite(embeddings).all():
        raise SearchError(f"The image encoder of {model_dir} makes NaN or infinite embeddings: its weights are broken. "
                          "Train or export the model again.")
    return kept_ids, embeddings, index_model


def build_index(images, model_dir: str | os.PathLike, output: str | os.PathLike, **embed_kwargs) -> GalleryIndex:
    """
    Embed a gallery ([`embed_gallery`]: a folder of images or a dataset split) and write its index to `output`
    atomically. Nothing is written if any step fails.

    Args:
        images, model_dir: see [`embed_gallery`].
        output (`str` or `os.PathLike`): the index file; an existing file is replaced only if it is an index.
        embed_kwargs: `batch_size`, `image_column`, `id_column`, `skip_bad_images` (see [`embed_gallery`]).

    Returns:
        [`GalleryIndex`]: the index written.
    """
    model_dir, output = Path(model_dir), Path(output)
    check_index_destination(output)  # before the embedding work, which may take long
    ids, embeddings, model = embed_gallery(images, model_dir, **embed_kwargs)
    index = GalleryIndex.from_embeddings(embeddings, ids, model)
    index.save(output)
    logger.info("Indexed %d images into %s (dimension %d)", index.count, output, index.dimension)
    if not (model_dir / DEFAULT_TEXT_MODEL).is_file():
        logger.warning("%s holds no %s: queries will need this model's export folder "
                       "(modeling_mcad.export.export_variants), passed with --model.", model_dir, DEFAULT_TEXT_MODEL)
    return index


def add_to_index(index_path: str | os.PathLike, images, model_dir: str | os.PathLike | None = None,
                 **embed_kwargs) -> GalleryIndex:
    """
    Embed the images of `images` that the index does not hold yet (by id: a folder's relative paths, a split's
    `id_column`) and write the grown index over `index_path`, atomically: an interrupted update leaves the previous
    index whole. The entries already there are not re-embedded.

    Args:
        index_path (`str` or `os.PathLike`): an index file.
        images: a folder or a dataset split, as for [`embed_gallery`].
        model_dir (`str` or `os.PathLike`, *optional*): the model the index was built with (checked by its probe
            embeddings); defaults to the folder the index records.
        embed_kwargs: `batch_size`, `image_column`, `id_column`, `skip_bad_images` (see [`embed_gallery`]).

    Returns:
        [`GalleryIndex`]: the index written (or the one read, when there was nothing new).
    """
    if not isinstance(images, (str, os.PathLike)) and embed_kwargs.get("id_column") is None:
        raise SearchError("add_to_index tells new images from indexed ones by id: pass id_column= naming a column of "
                          "unique ids (row numbers would match other images).")
    index = GalleryIndex.load(index_path)
    known = set(index.ids)
    ids, embeddings, _ = embed_gallery(images, _model_of(index, model_dir), skip_ids=known,
                                       same_model_as=index.model, **embed_kwargs)
    if not ids:
        logger.info("Nothing to add: the index %s holds all %d images already.", index.path, index.count)
        return index
    grown = index.add(embeddings, ids)
    grown.save(index_path)
    logger.info("Added %d images to %s (%d in all).", len(ids), index_path, grown.count)
    return grown


def remove_from_index(index_path: str | os.PathLike, ids: Sequence[str]) -> GalleryIndex:
    """Remove the entries of `ids` from the index at `index_path`, atomically; unknown ids change nothing and raise
    [`SearchError`] naming them."""
    index = GalleryIndex.load(index_path).remove(ids)
    index.save(index_path)
    logger.info("Removed %d entries from %s (%d left).", len(set(ids)), index_path, index.count)
    return index


# --- the mcad-search command ------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcad-search", description="Search a photo gallery by text with an MCAD "
                                     "student: `index` embeds the photos once (torch); `query` answers with the int8 "
                                     "ONNX text encoder and the index only (no torch); `add` / `remove` update an "
                                     "index; `export` writes it as Parquet for a vector database.")
    commands = parser.add_subparsers(dest="command", required=True)

    def embedding_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--batch-size", type=_positive_int, default=64,
                             help="images per forward pass (default 64)")
        command.add_argument("--skip-bad-images", action="store_true", help="leave out unreadable images")

    index = commands.add_parser("index", help="embed a folder of images into an index file")
    index.add_argument("images", metavar="IMAGES_DIR", help="folder of images (searched recursively)")
    index.add_argument("--model", required=True, metavar="DIR", help="the student's export folder")
    index.add_argument("--out", required=True, metavar="INDEX", help="the index file to write")
    embedding_options(index)
    query = commands.add_parser("query", help="find the images that best match a text")
    query.add_argument("index", metavar="INDEX", help="an index file written by `mcad-search index`")
    query.add_argument("text", help="what to look for")
    query.add_argument("-k", type=_positive_int, default=5, help="results to show (default 5)")
    query.add_argument("--json", action="store_true", help="print the results as one JSON object")
    query.add_argument("--model", metavar="DIR", help="the export folder (default: the one the index was built with, "
                       "if it lies in the index's folder)")
    query.add_argument("--text-model", default=DEFAULT_TEXT_MODEL,
                       help=f"the ONNX text encoder in the model folder (default {DEFAULT_TEXT_MODEL})")
    query.add_argument("--threads", type=_positive_int, default=1,
                       help="threads of the text encoder and the scan (default 1)")
    add = commands.add_parser("add", help="embed the images of a folder that an index does not hold yet into it")
    add.add_argument("index", metavar="INDEX", help="the index file to grow")
    add.add_argument("images", metavar="IMAGES_DIR", help="folder of images (ids: paths relative to it)")
    add.add_argument("--model", metavar="DIR", help="the model the index was built with (default: the one it records)")
    embedding_options(add)
    remove = commands.add_parser("remove", help="remove entries from an index by id")
    remove.add_argument("index", metavar="INDEX", help="the index file to shrink")
    remove.add_argument("ids", metavar="ID", nargs="+", help="ids as `query` prints them")
    export = commands.add_parser("export", help="write ids and float32 embeddings as Parquet")
    export.add_argument("index", metavar="INDEX", help="an index file")
    export.add_argument("--out", required=True, metavar="FILE", help="the Parquet file to write")
    return parser


def _print_result(result: SearchResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
        return
    for rank, hit in enumerate(result.hits, 1):
        print(f"{rank:>3}  {hit.score:.4f}  {hit.id}")


def main(argv: Sequence[str] | None = None) -> int:
    """The `mcad-search` command. A user's mistake ([`UserError`]) prints one line on stderr and returns 2; any other
    exception is a bug and keeps its traceback."""
    arguments = _parser().parse_args(argv)
    logging.basicConfig(format="mcad-search: %(message)s", level=logging.WARNING if arguments.command == "query"
                        else logging.INFO, stream=sys.stderr)
    try:
        if arguments.command == "index":
            build_index(arguments.images, arguments.model, arguments.out, batch_size=arguments.batch_size,
                        skip_bad_images=arguments.skip_bad_images)
        elif arguments.command == "query":
            engine = GallerySearch(arguments.index, arguments.model, arguments.text_model, arguments.threads)
            _print_result(engine.search(arguments.text, arguments.k), arguments.json)
        elif arguments.command == "add":
            add_to_index(arguments.index, arguments.images, arguments.model, batch_size=arguments.batch_size,
                         skip_bad_images=arguments.skip_bad_images)
        elif arguments.command == "remove":
            remove_from_index(arguments.index, arguments.ids)
        else:
            path = GalleryIndex.load(arguments.index).to_parquet(arguments.out)
            logger.info("Wrote %s", path)
    except UserError as error:
        print(f"mcad-search: error: {error}".replace("\n", " "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
