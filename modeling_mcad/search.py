"""Search a photo gallery by text, the way a phone would: a tokenizer, the int8 ONNX text encoder and a quantized
index of image embeddings — no torch and no transformers at query time (the paper's ~100 MB / ~8 ms app).

Building an index runs the student's image encoder once over the gallery (torch, imported only inside the functions
that build one). Answering a query imports only numpy, onnxruntime and `tokenizers`:

```python
>>> build_index("photos/", "outputs/demo/export", "photos.mcadidx")   # torch, once
>>> engine = GallerySearch("photos.mcadidx")                            # numpy + onnxruntime + tokenizers
>>> engine.search("a red circle left of a blue square", k=5).hits
[SearchHit(id='beach/0042.png', score=0.61), ...]
```

or from a shell: `mcad-search index photos/ --model outputs/demo/export --out photos.mcadidx`, then
`mcad-search query photos.mcadidx "a red circle left of a blue square" -k 5 [--json]`.

The index file, little-endian, written atomically:

    8 bytes    INDEX_MAGIC
    4 bytes    header length H (uint32)
    4 bytes    CRC-32 of everything after these 16 bytes: header, padding and arrays (uint32)
    H bytes    header, UTF-8 JSON: format_version, dimension, quantization, count, ids_bytes, and model (name,
               path, weights_sha256, probe_texts, probe_embeddings: what identifies the model)
    (zero padding to a multiple of 64 bytes from the file's start before each array)
    codes      count x dimension, int8 (or float16)
    scales     count, float32: embedding i is codes[i] * scales[i]
    offsets    count + 1, int64: id i is bytes offsets[i]:offsets[i + 1] of the id blob
    id blob    ids_bytes bytes, the ids in UTF-8 one after the other

Ids stay in their blob until a hit needs one: a million Python strings would cost about 70 MB. The header names
no folder outside the index's own: the model's `path` is relative to the index's folder, and recorded only when the
model lies inside it (otherwise queries name the model with `--model`), so that an index can be shared. Format 1
(checksum over the arrays only, absolute model path) is refused with a request to rebuild.

int8 codes use one scale per embedding (its largest magnitude / 127): the embeddings are L2-normalised, so a
shared scale would leave most of the 255 levels unused. Scores are computed per block of rows, converted to float32
(numpy has no int8 matrix product); fp16 codes take the same path with unit scales. `benchmarks/query_latency.py`
measures both against exact float search.

A query is checked against the index before it is answered: the text encoder must produce embeddings of the
index's dimension, and embed a few fixed probe texts as the model that built the index did (cosine at least
`MIN_PROBE_COSINE`) — an index is useless with another model's text encoder, however well its shapes match.
"""

import argparse
import hashlib
import json
import logging
import os
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import UserError
from .utils import atomic_file

logger = logging.getLogger(__name__)

INDEX_MAGIC = b"MCADIDX\x00"
INDEX_FORMAT_VERSION = 2
QUANTIZATIONS = {"int8": np.dtype(np.int8), "fp16": np.dtype(np.float16)}
DEFAULT_QUANTIZATION = "int8"
# The int8 ONNX text encoder written by `export.export_onnx` / `export.export_variants`.
DEFAULT_TEXT_MODEL = "onnx/text_model_quantized.onnx"
# Texts the index stores the embeddings of, so that a query can tell whether its text encoder is the model's.
PROBE_TEXTS = (
    "a photo",
    "a small red circle to the left of a large blue square",
    "two green triangles above a yellow star",
)
# int8 and fp32 text encoders of one model agree to ~0.999 on the probes; another model's is far off.
MIN_PROBE_COSINE = 0.98
# Rows converted to float32 at a time while scoring: 4096 x dim floats stay in the CPU cache.
SEARCH_BLOCK_ROWS = 4096
_PREFIX = struct.Struct("<8sII")  # magic, header length, CRC-32 of the rest
_ALIGNMENT = 64


class SearchError(UserError):
    """A problem with an index, a model folder or a query; the message names the input and the fix."""


class CorruptIndexError(SearchError):
    """The file is not an mcad-search index, or it is truncated or damaged."""


class IndexModelMismatchError(SearchError):
    """The index was built by another model (or one of another dimension) than the text encoder given."""


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGNMENT) * _ALIGNMENT


def _layout(header_length: int, count: int, dimension: int, code_size: int, ids_bytes: int) -> dict[str, slice]:
    """Where each array of an index file lies, in file order."""
    codes = _aligned(_PREFIX.size + header_length)
    scales = _aligned(codes + count * dimension * code_size)
    offsets = _aligned(scales + 4 * count)
    blob = offsets + 8 * (count + 1)
    return {"codes": slice(codes, codes + count * dimension * code_size), "scales": slice(scales, scales + 4 * count),
            "offsets": slice(offsets, blob), "blob": slice(blob, blob + ids_bytes)}


def _rebuild_hint(path) -> str:
    return f"rebuild it with `mcad-search index IMAGES_DIR --model MODEL_DIR --out {path}`"


@dataclass(frozen=True, eq=False)  # eq would compare numpy arrays with ==
class IndexModel:
    """
    What an index records about the model that built it.

    Args:
        name (`str`): the model folder's name, for messages.
        path (`str`, *optional*): the model folder; queries load the text encoder from it unless given another. An
            index file records it relative to its own folder, and only when the model lies inside that folder.
        probe_embeddings (`np.ndarray` of shape `(len(probe_texts), dimension)`): the model's L2-normalised text
            embeddings of `probe_texts`.
        probe_texts (`tuple[str, ...]`): defaults to `PROBE_TEXTS`.
        weights_sha256 (`str`, *optional*): SHA-256 of the model's `model.safetensors`.
    """

    name: str
    path: str | None
    probe_embeddings: np.ndarray
    probe_texts: tuple[str, ...] = PROBE_TEXTS
    weights_sha256: str | None = None

    def to_json(self, index_folder: Path) -> dict:
        """The index header's record, for an index written into `index_folder`."""
        return {"name": self.name, "path": _path_inside(self.path, index_folder), "weights_sha256": self.weights_sha256,
                "probe_texts": list(self.probe_texts), "probe_embeddings": self.probe_embeddings.tolist()}

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, model=None, processor=None) -> "IndexModel":
        """
        Describe a saved student (torch): its folder, weights hash and fp32 embeddings of the probe texts.

        Args:
            model_dir (`str` or `os.PathLike`): the student folder.
            model ([`MCADModel`], *optional*), processor ([`MCADProcessor`], *optional*): already loaded from it.
        """
        import torch

        from . import MCADModel, MCADProcessor  # through the package, which registers the auto classes
        from .export import TextEncoder

        model_dir = Path(model_dir).resolve()
        model = model if model is not None else MCADModel.from_pretrained(model_dir, dtype=torch.float32)
        processor = processor if processor is not None else MCADProcessor.from_pretrained(model_dir)
        tokens = processor(text=list(PROBE_TEXTS), padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            probes = TextEncoder(model).eval()(tokens["input_ids"], tokens["attention_mask"]).numpy()
        if not np.isfinite(probes).all():
            raise SearchError(f"The text encoder of {model_dir} makes NaN or infinite embeddings (of the probe texts "
                              f"{list(PROBE_TEXTS)}): its weights are broken. Train or export the model again.")
        return cls(name=model_dir.name, path=str(model_dir), probe_embeddings=probes,
                   weights_sha256=_sha256(model_dir / "model.safetensors"))

    @classmethod
    def from_json(cls, data: dict, index_folder: Path) -> "IndexModel":
        """The record of `to_json`, read from an index in `index_folder`."""
        path = data["path"]
        if path is not None and (PurePosixPath(path).is_absolute() or ".." in PurePosixPath(path).parts):
            raise ValueError(f"the model path {path!r} is not a folder inside the index's folder")
        return cls(name=str(data["name"]), path=None if path is None else str(index_folder / path),
                   weights_sha256=data["weights_sha256"], probe_texts=tuple(data["probe_texts"]),
                   probe_embeddings=np.asarray(data["probe_embeddings"], dtype=np.float32))


def _path_inside(path: str | os.PathLike | None, folder: Path) -> str | None:
    """`path` relative to `folder` (POSIX) when it lies inside it, else None."""
    if path is None:
        return None
    try:
        relative = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder)))
    except ValueError:  # another drive (Windows)
        return None
    return None if relative.parts[:1] == ("..",) or relative.is_absolute() else relative.as_posix()


class IdTable(Sequence[str]):
    """
    Ids kept as one UTF-8 blob and int64 offsets, decoded when read.

    Args:
        offsets (`np.ndarray` of shape `(count + 1,)`): id i is `blob[offsets[i]:offsets[i + 1]]`.
        blob (`np.ndarray` of uint8): the encoded ids, one after the other.
    """

    def __init__(self, offsets: np.ndarray, blob: np.ndarray):
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(blob) or (
                np.diff(offsets) < 0).any():
            raise ValueError(f"id offsets must rise from 0 to the blob's length {len(blob)}.")
        self.offsets, self.blob = offsets, blob

    @classmethod
    def from_strings(cls, ids: Sequence[str]) -> "IdTable":
        encoded = [str(value).encode("utf-8") for value in ids]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(value) for value in encoded], out=offsets[1:])
        return cls(offsets, np.frombuffer(b"".join(encoded), np.uint8))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        position = range(len(self))[position]  # negative positions; IndexError out of range (ends iteration)
        return self.blob[self.offsets[position] : self.offsets[position + 1]].tobytes().decode("utf-8")


class GalleryIndex:
    """
    Quantized, L2-normalised image embeddings with their ids, searched by exact (brute-force) dot product.

    Build one with [`GalleryIndex.from_embeddings`] (or [`build_index`] from images), save it with [`save`], load
    it with [`load`].

    Args:
        codes (`np.ndarray` of shape `(count, dimension)`): int8 or float16 codes.
        scales (`np.ndarray` of shape `(count,)`): float32; embedding i is `codes[i] * scales[i]`.
        ids (`Sequence[str]` or [`IdTable`]): one id per embedding (a file's path relative to the gallery, a row
            number, ...).
        model ([`IndexModel`]): the model that made the embeddings.
        path (`Path`, *optional*): the file it was loaded from, for messages.
    """

    def __init__(self, codes: np.ndarray, scales: np.ndarray, ids: "Sequence[str] | IdTable", model: IndexModel,
                 path: Path | None = None):
        ids = ids if isinstance(ids, IdTable) else IdTable.from_strings(ids)
        self.quantization = next((name for name, dtype in QUANTIZATIONS.items() if codes.dtype == dtype), None)
        if self.quantization is None or codes.ndim != 2:
            raise SearchError(f"codes must be a 2-D array of {sorted(QUANTIZATIONS)} codes, got {codes.dtype} "
                              f"{codes.shape}.")
        if len(codes) == 0:
            raise SearchError("An index needs at least one embedding: index a gallery holding at least one image.")
        if scales.shape != (len(codes),) or len(ids) != len(codes):
            raise SearchError(f"{len(codes)} codes need as many scales and ids, got {scales.shape[0]} scales and "
                              f"{len(ids)} ids.")
        if model.probe_embeddings.shape != (len(model.probe_texts), codes.shape[1]):
            raise SearchError(f"The model's probe embeddings have shape {model.probe_embeddings.shape}; expected "
                              f"({len(model.probe_texts)}, {codes.shape[1]}).")
        if not np.isfinite(model.probe_embeddings).all():
            raise SearchError(f"The probe embeddings of the model {model.name} hold NaN or infinite values: its text "
                              "encoder is broken. Train or export the model again, then rebuild the index.")
        self.codes, self.scales, self.ids = codes, np.asarray(scales, np.float32), ids
        self.model, self.path = model, path

    @property
    def count(self) -> int:
        return len(self.codes)

    @property
    def dimension(self) -> int:
        return self.codes.shape[1]

    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, ids: Sequence[str], model: IndexModel,
                        quantization: str = DEFAULT_QUANTIZATION) -> "GalleryIndex":
        """
        Quantize L2-normalised embeddings.

        Args:
            embeddings (`np.ndarray` of shape `(count, dimension)`): float embeddings, L2-normalised.
            ids (`Sequence[str]`): one unique id per embedding.
            model ([`IndexModel`]): the model that made them.
            quantization (`str`, defaults to `"int8"`): `"int8"` (per-embedding scale) or `"fp16"`.
        """
        if quantization not in QUANTIZATIONS:
            raise SearchError(f"quantization={quantization!r}; choose one of {sorted(QUANTIZATIONS)}.")
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) == 0:
            raise SearchError(f"embeddings must have shape (count >= 1, dimension), got {embeddings.shape}.")
        if not np.isfinite(embeddings).all():
            raise SearchError("embeddings hold NaN or infinite values; the model that made them is broken.")
        ids = IdTable.from_strings(ids)
        if len(set(ids)) != len(ids):
            raise SearchError("ids must be unique: a search result would not say which image it is.")
        if quantization == "fp16":
            return cls(embeddings.astype(np.float16), np.ones(len(embeddings), np.float32), ids, model)
        largest = np.abs(embeddings).max(axis=1)
        scales = np.where(largest > 0, largest / 127, 1).astype(np.float32)
        codes = np.clip(np.rint(embeddings / scales[:, None]), -127, 127).astype(np.int8)
        return cls(codes, scales, ids, model)

    def search(self, queries: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """
        The `k` best gallery entries for each query, best first (ties: lower index first).

        Args:
            queries (`np.ndarray` of shape `(dimension,)` or `(batch, dimension)`): L2-normalised query
                embeddings. Scoring holds a `(count, batch)` float32 matrix.
            k (`int`): results per query (at most `count`).

        Returns:
            `(indices, scores)`: arrays of shape `(k,)` (one query) or `(batch, k)`.
        """
        queries = np.asarray(queries, dtype=np.float32)
        single = queries.ndim == 1
        queries = np.atleast_2d(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise SearchError(f"queries must have shape (dimension,) or (batch, dimension) with dimension "
                              f"{self.dimension}, got {queries.shape}.")
        if not np.isfinite(queries).all():
            raise SearchError("The query embeddings hold NaN or infinite values: the text encoder that made them is "
                              "broken. Export the model again (train_mcad.py export).")
        if k < 1:
            raise SearchError(f"k={k}: ask for at least one result.")
        k = min(k, self.count)
        scores = np.empty((self.count, len(queries)), np.float32)
        block = np.empty((min(SEARCH_BLOCK_ROWS, self.count), self.dimension), np.float32)
        for start in range(0, self.count, SEARCH_BLOCK_ROWS):
            rows = block[: min(SEARCH_BLOCK_ROWS, self.count - start)]
            rows[...] = self.codes[start : start + len(rows)]
            np.matmul(rows, queries.T, out=scores[start : start + len(rows)])
        scores *= self.scales[:, None]
        # Which of the entries tied with the k-th best score argpartition keeps is unspecified: take every entry
        # scoring at least as much (in index order), then a stable sort keeps the lower indices of each tie.
        kth_best = np.partition(scores, self.count - k, axis=0)[self.count - k]
        indices = np.empty((len(queries), k), np.int64)
        for column, threshold in enumerate(kth_best):
            candidates = np.flatnonzero(scores[:, column] >= threshold)
            indices[column] = candidates[np.argsort(-scores[candidates, column], kind="stable")[:k]]
        scores = np.take_along_axis(scores.T, indices, axis=1)
        return (indices[0], scores[0]) if single else (indices, scores)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to `path` atomically (see the module docstring for the layout)."""
        path = Path(path)
        _check_index_destination(path)
        header = json.dumps({
            "format_version": INDEX_FORMAT_VERSION,
            "dimension": self.dimension,
            "quantization": self.quantization,
            "count": self.count,
            "ids_bytes": len(self.ids.blob),
            "model": self.model.to_json(path.parent),
        }).encode("utf-8")
        arrays = {"codes": self.codes, "scales": self.scales.astype("<f4"), "offsets": self.ids.offsets.astype("<i8"),
                  "blob": self.ids.blob}
        payload, position = [], _PREFIX.size + len(header)
        for name, where in _layout(len(header), self.count, self.dimension, self.codes.itemsize,
                                   len(self.ids.blob)).items():
            payload += [bytes(where.start - position), np.ascontiguousarray(arrays[name]).reshape(-1).view(np.uint8)]
            position = where.stop
        checksum = zlib.crc32(header)
        for section in payload:
            checksum = zlib.crc32(section, checksum)
        try:
            with atomic_file(path) as handle:
                handle.write(_PREFIX.pack(INDEX_MAGIC, len(header), checksum))
                handle.write(header)
                for section in payload:
                    handle.write(section)
        except OSError as error:
            raise SearchError(f"Cannot write the index {path} ({error.strerror or error}); choose a folder you can "
                              "write to, with free space (--out).") from error
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GalleryIndex":
        """
        Read an index written by [`save`], checking its magic, header, size and checksum.

        Raises:
            [`SearchError`]: no such file, or it cannot be read. [`CorruptIndexError`]: not an index (of this
            format), truncated or damaged.
        """
        path = Path(path)
        if not path.is_file():
            raise SearchError(f"No index file {path}: {_rebuild_hint(path)}.")
        try:
            buffer = np.fromfile(path, dtype=np.uint8)
        except OSError as error:
            raise SearchError(f"Cannot read the index {path} ({error.strerror or error}); check its permissions, or "
                              f"{_rebuild_hint(path)}.") from error
        if len(buffer) < _PREFIX.size or bytes(buffer[: len(INDEX_MAGIC)]) != INDEX_MAGIC:
            raise CorruptIndexError(f"{path} is not an mcad-search index (it does not start with {INDEX_MAGIC!r}); "
                                    f"pass a file written by `mcad-search index`, or {_rebuild_hint(path)}.")
        _, header_length, checksum = _PREFIX.unpack(buffer[: _PREFIX.size].tobytes())
        payload_start = _PREFIX.size + header_length
        if payload_start > len(buffer) or zlib.crc32(buffer[_PREFIX.size :]) != checksum:
            if payload_start <= len(buffer) and zlib.crc32(buffer[payload_start:]) == checksum:
                # Format 1 checked the arrays only (and recorded the model's absolute path).
                raise CorruptIndexError(f"{path} has index format 1, which this mcad no longer reads; "
                                        f"{_rebuild_hint(path)}.")
            raise CorruptIndexError(f"{path} is truncated or damaged (its checksum does not match); "
                                    f"{_rebuild_hint(path)}.")
        count, dimension, dtype, ids_bytes, model = _read_header(buffer[_PREFIX.size : payload_start], path)
        where = _layout(header_length, count, dimension, dtype.itemsize, ids_bytes)
        if where["blob"].stop != len(buffer):
            raise CorruptIndexError(f"{path} is {len(buffer)} bytes, not the {where['blob'].stop} its header "
                                    f"describes; {_rebuild_hint(path)}.")
        try:
            ids = IdTable(buffer[where["offsets"]].view("<i8"), buffer[where["blob"]])
            codes = buffer[where["codes"]].view(dtype).reshape(count, dimension)
            return cls(codes, buffer[where["scales"]].view("<f4"), ids, model, path)
        except ValueError as error:  # SearchError included
            raise CorruptIndexError(f"{path} is inconsistent ({error}); {_rebuild_hint(path)}.") from error


def _read_header(raw: np.ndarray, path: Path) -> tuple[int, int, np.dtype, int, IndexModel]:
    """`(count, dimension, code dtype, ids_bytes, model)` of an index file's header, of this format version; any key
    missing or of the wrong type is a damaged header."""
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
        version = header["format_version"]
        if isinstance(version, int) and version != INDEX_FORMAT_VERSION:
            newer = version > INDEX_FORMAT_VERSION
            raise CorruptIndexError(f"{path} has index format {version}, {'newer' if newer else 'older'} than the "
                                    f"one this mcad reads ({INDEX_FORMAT_VERSION}): "
                                    f"{'upgrade mcad, or ' if newer else ''}{_rebuild_hint(path)}.")
        sizes = {key: header[key] for key in ("format_version", "count", "dimension", "ids_bytes")}
        bad = [f"{key}={value!r}" for key, value in sizes.items() if type(value) is not int or value < 0]  # no bool
        if bad:
            raise ValueError(f"expected non-negative integers, got {', '.join(bad)}")
        dtype = QUANTIZATIONS[header["quantization"]]
        model = IndexModel.from_json(header["model"], path.parent)
    except CorruptIndexError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSON and UTF-8 errors are ValueErrors
        raise CorruptIndexError(f"{path} has a damaged header ({error!r}); {_rebuild_hint(path)}.") from error
    return sizes["count"], sizes["dimension"], dtype, sizes["ids_bytes"], model


def _check_index_destination(path: Path) -> None:
    """Refuse to replace anything but an earlier index: `--out` pointing at a photo must not destroy it."""
    if path.is_dir():
        raise SearchError(f"The index destination {path} is a folder; pass a file path such as {path}/gallery.mcadidx.")
    if path.exists():
        try:
            with path.open("rb") as handle:
                magic = handle.read(len(INDEX_MAGIC))
        except OSError as error:
            raise SearchError(f"Cannot read {path} ({error.strerror or error}) to check that it is an index before "
                              "replacing it; choose another output path.") from error
        if magic != INDEX_MAGIC:
            raise SearchError(f"{path} exists and is not an mcad-search index, so it is not replaced; choose "
                              "another output path, or remove the file first.")


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


class GallerySearch:
    """
    Answers text queries over an index with the model's ONNX text encoder. Imports no torch and no transformers.

    Args:
        index (`str`, `os.PathLike` or [`GalleryIndex`]): the index (file).
        model_dir (`str` or `os.PathLike`, *optional*): the folder holding `tokenizer.json` and the ONNX text
            encoder; defaults to the folder the index was built with, when the index records it (see
            [`IndexModel`]).
        text_model (`str` or `os.PathLike`, defaults to `DEFAULT_TEXT_MODEL`): the ONNX text encoder in it.
        num_threads (`int`, defaults to 1): onnxruntime threads.

    Raises:
        [`IndexModelMismatchError`]: the text encoder is not the one of the model that built the index.
    """

    def __init__(self, index: "str | os.PathLike | GalleryIndex", model_dir: str | os.PathLike | None = None,
                 text_model: str | os.PathLike = DEFAULT_TEXT_MODEL, num_threads: int = 1):
        self.index = index if isinstance(index, GalleryIndex) else GalleryIndex.load(index)
        if model_dir is None:
            model_dir = self.index.model.path
            if model_dir is None:
                raise SearchError(f"The index {self.index.path} does not record where its model is (it was built with "
                                  f"the model folder {self.index.model.name!r}, outside the index's folder): pass "
                                  "that folder (mcad-search query ... --model DIR).")
            if not Path(model_dir).is_dir():
                raise SearchError(f"The index {self.index.path} was built with the model in {model_dir}, which is not "
                                  "there any more: pass the model folder (mcad-search query ... --model DIR).")
        self.encoder = TextQueryEncoder(model_dir, text_model, num_threads)
        self._check_model()

    def _check_model(self) -> None:
        index, encoder = self.index, self.encoder
        built_with = index.model.name if index.model.path is None else f"{index.model.name}, {index.model.path}"
        rebuild = f"query with the model the index was built with ({built_with}), or {_rebuild_hint(index.path)}"
        probes, _ = encoder.encode(list(index.model.probe_texts))
        if probes.shape[1] != index.dimension:
            raise IndexModelMismatchError(
                f"The index {index.path} holds {index.dimension}-dimensional embeddings but {encoder.text_model} "
                f"makes {probes.shape[1]}-dimensional ones: the index was built by another model; {rebuild}.")
        if not np.isfinite(probes).all():
            raise SearchError(f"{encoder.text_model} makes NaN or infinite embeddings (of the probe texts): the text "
                              "encoder is broken. Export the model again (train_mcad.py export).")
        cosine = float((probes * index.model.probe_embeddings).sum(axis=1).min())
        if cosine < MIN_PROBE_COSINE:
            raise IndexModelMismatchError(
                f"The index {index.path} was built by another model than {encoder.text_model}: their text embeddings "
                f"of fixed probe texts differ (cosine {cosine:.3f} < {MIN_PROBE_COSINE}); {rebuild}.")

    def search(self, query: str, k: int = 5) -> SearchResult:
        """The `k` gallery entries that best match `query` (a non-empty string)."""
        if not isinstance(query, str):
            raise SearchError(f"The query must be a string, got {type(query).__name__}.")
        embeddings, truncated = self.encoder.encode([query])
        indices, scores = self.index.search(embeddings[0], k)
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


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def embed_gallery(
    images,
    model_dir: str | os.PathLike,
    *,
    batch_size: int = 64,
    image_column: str = "image",
    id_column: str | None = None,
    skip_bad_images: bool = False,
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

    Returns:
        `(ids, embeddings, model)`: the ids of the images embedded, their L2-normalised float32 embeddings
        `(count, dimension)` and the [`IndexModel`] describing the student.
    """
    import torch

    from . import MCADModel, MCADProcessor  # through the package, which registers the auto classes
    from .data import open_image, to_rgb
    from .export import VisionEncoder

    model_dir = Path(model_dir)
    if type(batch_size) is not int or batch_size < 1:  # bool is no size
        raise SearchError(f"batch_size={batch_size!r}: pass a positive number of images per forward pass "
                          "(--batch-size, default 64).")
    if not (model_dir / "config.json").is_file():
        raise SearchError(f"{model_dir} holds no config.json: pass a student folder (MCADModel.save_pretrained with "
                          "its processor), e.g. the export folder outputs/demo/export.")
    # transformers would load another architecture's folder with a mere warning, and embed with garbage.
    model_type = _read_json(model_dir / "config.json").get("model_type")
    if model_type != MCADModel.config_class.model_type:
        raise SearchError(f"{model_dir} holds a {model_type!r} model (config.json model_type), not an MCAD student "
                          f"({MCADModel.config_class.model_type!r}): pass a student folder, e.g. the export folder "
                          "outputs/demo/export.")
    ids, values, label = _gallery_items(images, image_column, id_column)
    try:
        model = MCADModel.from_pretrained(model_dir, dtype=torch.float32).eval()
        processor = MCADProcessor.from_pretrained(model_dir)
    except OSError as error:  # transformers' error for a folder without the weights or the processor's files
        raise SearchError(f"{model_dir} cannot be loaded as an MCAD student ({error}); pass a complete student folder "
                          "(MCADModel.save_pretrained with its processor), e.g. the export folder "
                          "outputs/demo/export.") from error
    index_model = IndexModel.from_model_dir(model_dir, model, processor)  # a broken text encoder fails before the work
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
        raise SearchError(f"No image of {label} could be read.")
    embeddings = np.concatenate(embeddings)
    if not np.isfinite(embeddings).all():
        raise SearchError(f"The image encoder of {model_dir} makes NaN or infinite embeddings: its weights are broken. "
                          "Train or export the model again.")
    return kept_ids, embeddings, index_model


def build_index(
    images,
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    quantization: str = DEFAULT_QUANTIZATION,
    **embed_kwargs,
) -> GalleryIndex:
    """
    Embed a gallery ([`embed_gallery`]: a folder of images or a dataset split) and write its index to `output`
    atomically. Nothing is written if any step fails.

    Args:
        images, model_dir: see [`embed_gallery`].
        output (`str` or `os.PathLike`): the index file; an existing file is replaced only if it is an index.
        quantization (`str`, defaults to `"int8"`): `"int8"` or `"fp16"`.
        embed_kwargs: `batch_size`, `image_column`, `id_column`, `skip_bad_images` (see [`embed_gallery`]).

    Returns:
        [`GalleryIndex`]: the index written.
    """
    model_dir, output = Path(model_dir), Path(output)
    if quantization not in QUANTIZATIONS:
        raise SearchError(f"quantization={quantization!r}; choose one of {sorted(QUANTIZATIONS)}.")
    _check_index_destination(output)  # before the embedding work, which may take long
    ids, embeddings, model = embed_gallery(images, model_dir, **embed_kwargs)
    index = GalleryIndex.from_embeddings(embeddings, ids, model, quantization)
    index.save(output)
    logger.info("Indexed %d images into %s (%s, dimension %d)", index.count, output, quantization, index.dimension)
    if not (model_dir / DEFAULT_TEXT_MODEL).is_file():
        logger.warning("%s holds no %s: queries will need this model's export folder "
                       "(modeling_mcad.export.export_variants), passed with --model.", model_dir, DEFAULT_TEXT_MODEL)
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
                                     "ONNX text encoder and the index only (no torch).")
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="embed a folder of images into an index file")
    index.add_argument("images", metavar="IMAGES_DIR", help="folder of images (searched recursively)")
    index.add_argument("--model", required=True, metavar="DIR", help="the student's export folder")
    index.add_argument("--out", required=True, metavar="INDEX", help="the index file to write")
    index.add_argument("--quantization", choices=sorted(QUANTIZATIONS), default=DEFAULT_QUANTIZATION)
    index.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass (default 64)")
    index.add_argument("--skip-bad-images", action="store_true", help="leave out unreadable images")
    query = commands.add_parser("query", help="find the images that best match a text")
    query.add_argument("index", metavar="INDEX", help="an index file written by `mcad-search index`")
    query.add_argument("text", help="what to look for")
    query.add_argument("-k", type=int, default=5, help="results to show (default 5)")
    query.add_argument("--json", action="store_true", help="print the results as one JSON object")
    query.add_argument("--model", metavar="DIR", help="the export folder (default: the one the index was built with, "
                       "if it lies in the index's folder)")
    query.add_argument("--text-model", default=DEFAULT_TEXT_MODEL,
                       help=f"the ONNX text encoder in the model folder (default {DEFAULT_TEXT_MODEL})")
    query.add_argument("--threads", type=_positive_int, default=1, help="onnxruntime threads (default 1)")
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
    logging.basicConfig(format="mcad-search: %(message)s", level=logging.INFO if arguments.command == "index"
                        else logging.WARNING, stream=sys.stderr)
    try:
        if arguments.command == "index":
            build_index(arguments.images, arguments.model, arguments.out, quantization=arguments.quantization,
                        batch_size=arguments.batch_size, skip_bad_images=arguments.skip_bad_images)
        else:
            engine = GallerySearch(arguments.index, arguments.model, arguments.text_model, arguments.threads)
            _print_result(engine.search(arguments.text, arguments.k), arguments.json)
    except UserError as error:
        print(f"mcad-search: error: {error}".replace("\n", " "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
