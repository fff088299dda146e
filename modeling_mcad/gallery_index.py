"""
The gallery index of `mcad-search`: int8 image embeddings with their ids and the model that made them, in a
safetensors file; searched exactly (every entry scored) by onnxruntime's integer kernel (`gallery_scan`); grown and
shrunk without re-embedding; exported to Parquet for vector databases.

The file is a plain safetensors file (`safetensors.safe_open(path, "numpy")` reads it):

    codes.00000, codes.00001, ...   int8 (dimension, rows): the codes of one block of entries each, a column per
                                    entry — the layout the scan kernel packs (`gallery_scan`)
    scales                          float32 (count,): entry i's embedding is its code column times scales[i]
    id_offsets, id_bytes            int64 (count + 1,), uint8: id i is id_bytes[id_offsets[i]:id_offsets[i + 1]]
                                    in UTF-8
    __metadata__  mcad_search_index JSON: format_version, dimension, count, block_rows, model (name, path,
                                    weights_sha256, probe_texts, probe_embeddings: what identifies the model)
                  checksum          CRC-32 of the header (as sorted JSON, without the checksum) and of every byte
                                    after it

Reading maps the file (`numpy.memmap`); a query touches the scales and the ids of its hits, and the kernel keeps only
its packed copy of the codes, so an index costs about its codes' size in memory, not twice. The model's `path` is
relative to the index's folder, and recorded only when the model lies inside it (otherwise queries name the model
with `--model`), so that an index names no folder of the machine that built it.

int8 codes use one scale per embedding (its largest magnitude / 127): the embeddings are L2-normalised, so a shared
scale would leave most of the 255 levels unused. Files of the earlier, hand-laid format (`MCADIDX`) are refused with
a request to rebuild.
"""

import json
import os
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import UserError
from .utils import atomic_file

INDEX_FORMAT_VERSION = 3
METADATA_KEY = "mcad_search_index"
_LEGACY_MAGIC = b"MCADIDX\x00"  # formats 1 and 2
# Codes are packed and scanned a block at a time: loading holds at most one block beside the packed codes.
SCAN_BLOCK_BYTES = 1 << 22
# Texts the index stores the embeddings of, so that a query can tell whether its text encoder is the model's.
PROBE_TEXTS = (
    "a photo",
    "a small red circle to the left of a large blue square",
    "two green triangles above a yellow star",
)
_SAFETENSORS_DTYPES = {"I8": np.int8, "U8": np.uint8, "F32": np.float32, "I64": np.int64}
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


class SearchError(UserError):
    """A problem with an index, a model folder or a query; the message names the input and the fix."""


class CorruptIndexError(SearchError):
    """The file is not an mcad-search index, or it is truncated or damaged."""


class IndexModelMismatchError(SearchError):
    """The index was built by another model (or one of another dimension) than the text encoder given."""


def rebuild_hint(path) -> str:
    return f"rebuild it with `mcad-search index IMAGES_DIR --model MODEL_DIR --out {path}`"


def block_rows(dimension: int) -> int:
    """Entries per block of codes for embeddings of `dimension`."""
    return max(1, SCAN_BLOCK_BYTES // max(dimension, 1))


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
    def from_model_dir(cls, model_dir: str | os.PathLike, model=None, processor=None,
                       probe_texts: Sequence[str] = PROBE_TEXTS) -> "IndexModel":
        """
        Describe a saved student (torch): its folder, weights hash and fp32 embeddings of the probe texts.

        Args:
            model_dir (`str` or `os.PathLike`): the student folder.
            model ([`MCADModel`], *optional*), processor ([`MCADProcessor`], *optional*): already loaded from it.
            probe_texts (`Sequence[str]`, defaults to `PROBE_TEXTS`): the texts to embed (an index's own, to compare
                a model with the one that built it).
        """
        import torch

        from . import MCADModel, MCADProcessor  # through the package, which registers the auto classes
        from .export import TextEncoder

        model_dir = Path(model_dir).resolve()
        model = model if model is not None else MCADModel.from_pretrained(model_dir, dtype=torch.float32)
        processor = processor if processor is not None else MCADProcessor.from_pretrained(model_dir)
        tokens = processor(text=list(probe_texts), padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            probes = TextEncoder(model).eval()(tokens["input_ids"], tokens["attention_mask"]).numpy()
        if not np.isfinite(probes).all():
            raise SearchError(f"The text encoder of {model_dir} makes NaN or infinite embeddings (of the probe texts "
                              f"{list(probe_texts)}): its weights are broken. Train or export the model again.")
        return cls(name=model_dir.name, path=str(model_dir), probe_embeddings=probes, probe_texts=tuple(probe_texts),
                   weights_sha256=sha256_of_file(model_dir / "model.safetensors"))

    @classmethod
    def from_json(cls, data: dict, index_folder: Path) -> "IndexModel":
        """The record of `to_json`, read from an index in `index_folder`."""
        path = data["path"]
        if path is not None and (PurePosixPath(path).is_absolute() or ".." in PurePosixPath(path).parts):
            raise ValueError(f"the model path {path!r} is not a folder inside the index's folder")
        return cls(name=str(data["name"]), path=None if path is None else str(index_folder / path),
                   weights_sha256=data["weights_sha256"], probe_texts=tuple(data["probe_texts"]),
                   probe_embeddings=np.asarray(data["probe_embeddings"], dtype=np.float32))

    def agreement(self, probe_embeddings: np.ndarray) -> float:
        """The lowest cosine between this model's probe embeddings and another encoder's (same texts)."""
        return float((probe_embeddings * self.probe_embeddings).sum(axis=1).min())


def sha256_of_file(path: Path) -> str | None:
    import hashlib

    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    Ids kept as one UTF-8 blob and int64 offsets, decoded when read: a million Python strings would cost about 70 MB.

    Args:
        offsets (`np.ndarray` of shape `(count + 1,)`): id i is `blob[offsets[i]:offsets[i + 1]]`.
        blob (`np.ndarray` of uint8): the encoded ids, one after the other.
    """

    def __init__(self, offsets: np.ndarray, blob: np.ndarray):
        # Each id's offsets are checked when it is read: checking a million here would bring them all into memory.
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(blob):
            raise ValueError(f"id offsets must rise from 0 to the blob's length {len(blob)}.")
        self.offsets, self.blob = offsets, blob

    @classmethod
    def from_strings(cls, ids: Iterable[str]) -> "IdTable":
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
        start, stop = int(self.offsets[position]), int(self.offsets[position + 1])
        if not 0 <= start <= stop <= len(self.blob):
            raise ValueError(f"the offsets of id {position} ({start}, {stop}) fall outside the id bytes")
        return self.blob[start:stop].tobytes().decode("utf-8")


class GalleryIndex:
    """
    Int8 codes of L2-normalised image embeddings with their ids, searched exactly (every entry scored).

    Build one with [`GalleryIndex.from_embeddings`] (or `search.build_index` from images), grow or shrink it with
    [`add`] / [`remove`], write it with [`save`], read it with [`load`].

    Args:
        codes (`np.ndarray` of shape `(count, dimension)`): int8 codes.
        scales (`np.ndarray` of shape `(count,)`): float32; embedding i is `codes[i] * scales[i]`.
        ids (`Sequence[str]` or [`IdTable`]): one unique id per embedding (a file's path relative to the gallery, a
            row number, ...).
        model ([`IndexModel`]): the model that made the embeddings.
        path (`Path`, *optional*): the file it was loaded from, for messages.
    """

    def __init__(self, codes: np.ndarray, scales: np.ndarray, ids: "Sequence[str] | IdTable", model: IndexModel,
                 path: Path | None = None):
        codes = np.asarray(codes)
        if codes.dtype != np.int8 or codes.ndim != 2:
            raise SearchError(f"codes must be a 2-D array of int8 codes, got {codes.dtype} {codes.shape}.")
        rows = block_rows(codes.shape[1])
        blocks = [np.ascontiguousarray(codes[start : start + rows].T) for start in range(0, len(codes), rows)]
        self._init(blocks, scales, ids, model, path)

    def _init(self, blocks: list[np.ndarray], scales: np.ndarray, ids: "Sequence[str] | IdTable", model: IndexModel,
              path: Path | None, file_identity: tuple | None = None) -> None:
        ids = ids if isinstance(ids, IdTable) else IdTable.from_strings(ids)
        count = sum(block.shape[1] for block in blocks)
        dimension = blocks[0].shape[0] if blocks else model.probe_embeddings.shape[-1]
        if count == 0:
            raise SearchError("An index needs at least one embedding: index a gallery holding at least one image.")
        if dimension == 0:
            raise SearchError("Embeddings of dimension 0 cannot be searched; pass the model's embeddings.")
        if scales.shape != (count,) or len(ids) != count:
            raise SearchError(f"{count} codes need as many scales and ids, got {scales.shape[0]} scales and "
                              f"{len(ids)} ids.")
        if model.probe_embeddings.shape != (len(model.probe_texts), dimension):
            raise SearchError(f"The model's probe embeddings have shape {model.probe_embeddings.shape}; expected "
                              f"({len(model.probe_texts)}, {dimension}).")
        if not np.isfinite(model.probe_embeddings).all():
            raise SearchError(f"The probe embeddings of the model {model.name} hold NaN or infinite values: its text "
                              "encoder is broken. Train or export the model again, then rebuild the index.")
        from .gallery_scan import MAX_DIMENSION

        if dimension > MAX_DIMENSION:
            raise SearchError(f"Embeddings of dimension {dimension} are above the {MAX_DIMENSION} the int8 search adds "
                              "up exactly; use a student with a smaller projection_dim.")
        scales = np.ascontiguousarray(scales, np.float32)  # a view of float32 scales, a copy of others
        self.blocks, self.scales, self.ids, self.model, self.path = blocks, scales, ids, model, path
        self._file_identity = file_identity  # (path, stat identity, block locations) when read from a file
        self._scanners = {}

    @property
    def count(self) -> int:
        return len(self.scales)

    @property
    def dimension(self) -> int:
        return self.blocks[0].shape[0]

    @property
    def codes(self) -> np.ndarray:
        """The int8 codes, `(count, dimension)`: a view for an index of one block, else a copy."""
        return self.blocks[0].T if len(self.blocks) == 1 else np.concatenate([block.T for block in self.blocks])

    def embeddings(self) -> np.ndarray:
        """The dequantized float32 embeddings, `(count, dimension)`."""
        return self.codes.astype(np.float32) * self.scales[:, None]

    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, ids: Sequence[str], model: IndexModel) -> "GalleryIndex":
        """
        Quantize L2-normalised embeddings to int8, one scale per embedding.

        Args:
            embeddings (`np.ndarray` of shape `(count, dimension)`): float embeddings, L2-normalised.
            ids (`Sequence[str]`): one unique id per embedding.
            model ([`IndexModel`]): the model that made them.
        """
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) == 0:
            raise SearchError(f"embeddings must have shape (count >= 1, dimension), got {embeddings.shape}.")
        if not np.isfinite(embeddings).all():
            raise SearchError("embeddings hold NaN or infinite values; the model that made them is broken.")
        ids = IdTable.from_strings(ids)
        if len(set(ids)) != len(ids):
            raise SearchError("ids must be unique: a search result would not say which image it is.")
        largest = np.abs(embeddings).max(axis=1)
        scales = np.where(largest > 0, largest / 127, 1).astype(np.float32)
        codes = np.clip(np.rint(embeddings / scales[:, None]), -127, 127).astype(np.int8)
        return cls(codes, scales, ids, model)

    def add(self, embeddings: np.ndarray, ids: Sequence[str]) -> "GalleryIndex":
        """
        This index with more entries after its own (a new object; [`save`] it). The entries already there are not
        re-embedded. Ids must be new: an id already in the index raises [`SearchError`] naming it.
        """
        if np.ndim(embeddings) != 2 or np.shape(embeddings)[1] != self.dimension:
            raise SearchError(f"The index holds {self.dimension}-dimensional embeddings; the ones to add have shape "
                              f"{np.shape(embeddings)}: embed them with the index's model.")
        new = GalleryIndex.from_embeddings(embeddings, ids, self.model)
        clashes = sorted(set(new.ids) & set(self.ids))
        if clashes:
            raise SearchError(f"{len(clashes)} id(s) are already in the index {self.path or ''}: {clashes[:5]}; remove "
                              "them first (mcad-search remove) to index them again, or give new ids.")
        return GalleryIndex(np.concatenate([self.codes, new.codes]), np.concatenate([self.scales, new.scales]),
                            IdTable.from_strings([*self.ids, *new.ids]), self.model, self.path)

    def remove(self, ids: Iterable[str]) -> "GalleryIndex":
        """This index without the entries of `ids` (a new object; [`save`] it). Unknown ids raise [`SearchError`]."""
        if isinstance(ids, str):
            raise SearchError(f"remove takes a list of ids, not the string {ids!r} (which would be read as its "
                              f"characters): pass [{ids!r}].")
        doomed = set(ids)
        keep = np.array([value not in doomed for value in self.ids], bool)
        unknown = sorted(doomed - {value for value, kept in zip(self.ids, keep) if not kept})
        if unknown:
            raise SearchError(f"{len(unknown)} id(s) are not in the index {self.path or ''}: {unknown[:5]}; pass ids "
                              "as `mcad-search query --json` shows them.")
        if not keep.any():
            raise SearchError("Removing every entry would leave an empty index; delete the file instead.")
        return GalleryIndex(self.codes[keep], self.scales[keep], IdTable.from_strings(
            value for value, kept in zip(self.ids, keep) if kept), self.model, self.path)

    def search(self, queries: np.ndarray, k: int = 5, num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """
        The `k` best entries for each query, best first (ties: lower index first), with their scores: the dot
        products of the query with the dequantized codes, within 1e-4 (the codes are within 0.5 / 127 of each
        embedding's largest value, so scores are within about 0.003 of the float embeddings').

        Args:
            queries (`np.ndarray` of shape `(dimension,)` or `(batch, dimension)`): L2-normalised query embeddings.
            k (`int`): results per query (at most `count`).
            num_threads (`int`, defaults to 1): threads of the scan.

        Returns:
            `(indices, scores)`: arrays of shape `(k,)` (one query) or `(batch, k)`.
        """
        queries = np.asarray(queries, dtype=np.float32)
        single = queries.ndim == 1
        queries = np.atleast_2d(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dimension or len(queries) == 0:
            raise SearchError(f"queries must have shape (dimension,) or (batch >= 1, dimension) with dimension "
                              f"{self.dimension}, got {queries.shape}.")
        if not np.isfinite(queries).all():
            raise SearchError("The query embeddings hold NaN or infinite values: the text encoder that made them is "
                              "broken. Export the model again (train_mcad.py export).")
        if k < 1:
            raise SearchError(f"k={k}: ask for at least one result.")
        indices, scores = self._scanner(num_threads).search(queries, min(k, self.count))
        return (indices[0], scores[0]) if single else (indices, scores)

    def _scanner(self, num_threads: int):
        """The scan session: onnxruntime reads the codes from a file (the index's own, or a temporary one for an index
        in memory) as external data, so that only its packed copy stays in memory."""
        from .gallery_scan import GalleryScan

        if num_threads in self._scanners:
            return self._scanners[num_threads]
        if self._file_identity is None:
            with tempfile.TemporaryDirectory(prefix="mcad-scan-", ignore_cleanup_errors=True) as folder:
                blocks = _write_blocks(Path(folder) / "codes.bin", self.blocks, self.scales)
                scanner = GalleryScan(blocks, self.dimension, folder, num_threads)
        else:
            path, identity, blocks = self._file_identity
            try:
                scanner = GalleryScan(blocks, self.dimension, path.parent, num_threads)
            except Exception as error:  # onnxruntime's own exception types: the file moved, vanished, or is unreadable
                raise SearchError(f"onnxruntime cannot read the codes of the index {self.path} ({error}); check that "
                                  f"the file is still there and readable, or {rebuild_hint(self.path)}.") from error
            if _stat_identity(path) != identity:
                raise SearchError(f"The index {self.path} changed while it was being read (another process replaced "
                                  "it); load it again.")
        self._scanners[num_threads] = scanner
        return scanner

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to `path` atomically, replacing only an earlier index (see the module docstring)."""
        path = Path(path)
        check_index_destination(path)
        target = path.resolve() if path.is_symlink() else path  # replace what a link points to, not the link
        header = {"format_version": INDEX_FORMAT_VERSION, "dimension": self.dimension, "count": self.count,
                  "block_rows": self.blocks[0].shape[1], "model": self.model.to_json(path.parent)}
        tensors = {f"codes.{number:05d}": np.ascontiguousarray(block) for number, block in enumerate(self.blocks)}
        tensors |= {"scales": np.ascontiguousarray(self.scales, "<f4"),
                    "id_offsets": np.ascontiguousarray(self.ids.offsets, "<i8"),
                    "id_bytes": np.ascontiguousarray(self.ids.blob, np.uint8)}
        try:
            with atomic_file(target) as handle:
                handle.write(_serialize(tensors, header))
        except OSError as error:
            raise SearchError(f"Cannot write the index {path} ({error.strerror or error}); choose a folder you can "
                              "write to, with free space (--out).") from error
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GalleryIndex":
        """
        Read an index written by [`save`], checking its checksum and header. The codes stay in the file (mapped):
        the scan reads them from it.

        Raises:
            [`SearchError`]: no such file, or it cannot be read. [`CorruptIndexError`]: not an index (of this
            format), truncated or damaged.
        """
        path = Path(path)
        header, data_start = _read_index_header(path)
        file = path.resolve()  # onnxruntime reads the codes from the file itself, wherever links and cwd go
        identity = _stat_identity(file)
        metadata = header.pop("__metadata__")
        _check_format_version(metadata[METADATA_KEY], path)  # a newer format may check itself another way
        stored = metadata.pop("checksum", None)
        try:
            with path.open("rb") as handle:
                handle.seek(data_start)
                actual = _checksum(json.dumps({**header, "__metadata__": metadata}, sort_keys=True).encode(),
                                   iter(lambda: handle.read(1 << 22), b""))
        except OSError as error:
            raise SearchError(f"Cannot read the index {path} ({error.strerror or error}); check its permissions, or "
                              f"{rebuild_hint(path)}.") from error
        if stored != actual:
            raise CorruptIndexError(f"{path} is truncated or damaged (its checksum does not match); "
                                    f"{rebuild_hint(path)}.")
        count, dimension, rows, model = _read_index_record(metadata[METADATA_KEY], path)
        try:
            arrays = {name: _mapped(path, data_start, entry) for name, entry in header.items()}
            starts = range(0, count, rows)
            names = [f"codes.{number:05d}" for number in range(len(starts))]
            expected = {name: (np.int8, (dimension, min(rows, count - start))) for name, start in zip(names, starts)}
            expected |= {"scales": (np.float32, (count,)), "id_offsets": (np.int64, (count + 1,)),
                         "id_bytes": (np.uint8, arrays["id_bytes"].shape if "id_bytes" in arrays else (-1,))}
            for name, (dtype, shape) in expected.items():
                if name not in arrays or arrays[name].dtype != dtype or arrays[name].shape != shape:
                    raise ValueError(f"the tensor {name} is missing or not {np.dtype(dtype).name} {shape}")
            scales_start = data_start + header["scales"]["data_offsets"][0]
            locations = [{"rows": arrays[name].shape[1],
                          "codes": (file.name, data_start + header[name]["data_offsets"][0], arrays[name].nbytes),
                          "row_scales": (file.name, scales_start + 4 * start, 4 * arrays[name].shape[1])}
                         for name, start in zip(names, starts)]
            index = cls.__new__(cls)
            index._init([arrays[name] for name in names], arrays["scales"],
                        IdTable(arrays["id_offsets"], arrays["id_bytes"]), model, path,
                        (file, identity, locations))
            return index
        except (ValueError, KeyError) as error:  # SearchError included
            raise CorruptIndexError(f"{path} is inconsistent ({error}); {rebuild_hint(path)}.") from error

    def to_parquet(self, path: str | os.PathLike, batch_rows: int = 65536) -> Path:
        """
        Write ids and dequantized float32 embeddings as Parquet (columns `id`, `embedding`; the model in the schema's
        metadata), the input vector databases bulk-load. Atomic; replaces only an earlier Parquet file.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(path)
        if path.is_dir() or (path.exists() and _read_prefix(path, 4) != b"PAR1"):
            raise SearchError(f"{path} exists and is not a Parquet file, so it is not replaced; choose another output "
                              "path (--out).")
        record = {"model": self.model.name, "weights_sha256": self.model.weights_sha256, "dimension": self.dimension,
                  "count": self.count, "source": "mcad-search index, int8 codes dequantized"}
        schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), self.dimension))],
                           metadata={METADATA_KEY: json.dumps(record)})
        codes = self.codes
        with atomic_file(path) as handle, pq.ParquetWriter(handle, schema) as writer:
            for start in range(0, self.count, batch_rows):
                stop = min(start + batch_rows, self.count)
                embeddings = codes[start:stop].astype(np.float32) * self.scales[start:stop, None]
                values = pa.array(embeddings.reshape(-1), pa.float32())
                writer.write_batch(pa.record_batch(
                    [pa.array(self.ids[start:stop], pa.string()),
                     pa.FixedSizeListArray.from_arrays(values, self.dimension)], schema=schema))
        return path


def _write_blocks(path: Path, blocks: list[np.ndarray], scales: np.ndarray) -> list[dict]:
    """Write the blocks' codes and scales one after the other; their locations, as `gallery_scan` takes them."""
    locations, offset, start = [], 0, 0
    with path.open("wb") as handle:
        for block in blocks:
            rows = block.shape[1]
            codes, row_scales = np.ascontiguousarray(block).tobytes(), scales[start : start + rows].tobytes()
            handle.write(codes + row_scales)
            locations.append({"rows": rows, "codes": (path.name, offset, len(codes)),
                              "row_scales": (path.name, offset + len(codes), len(row_scales))})
            offset, start = offset + len(codes) + len(row_scales), start + rows
    return locations


def _checksum(header: bytes, data: Iterable[bytes]) -> str:
    checksum = zlib.crc32(header)
    for chunk in data:
        checksum = zlib.crc32(chunk, checksum)
    return f"{checksum:08x}"


def _serialize(tensors: dict[str, np.ndarray], record: dict) -> bytes:
    """An index file's bytes: the tensors and the record in safetensors, with the checksum in its metadata."""
    import safetensors.numpy

    metadata = {METADATA_KEY: json.dumps(record)}
    # The data's offsets do not depend on the metadata: serialize once to checksum, again with the checksum.
    unsigned = safetensors.numpy.save(tensors, metadata)
    length = int.from_bytes(unsigned[:8], "little")
    header = json.dumps(json.loads(unsigned[8 : 8 + length]), sort_keys=True).encode()
    metadata["checksum"] = _checksum(header, [memoryview(unsigned)[8 + length :]])
    del unsigned
    return safetensors.numpy.save(tensors, metadata)


def _read_prefix(path: Path, size: int) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(size)
    except OSError as error:
        raise SearchError(f"Cannot read {path} ({error.strerror or error}); check its permissions.") from error


def _stat_identity(path: Path) -> tuple:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _read_index_header(path: Path) -> tuple[dict, int]:
    """The safetensors header of an index file and where its data starts; refuses other files with the reason."""
    if not path.is_file():
        raise SearchError(f"No index file {path}: {rebuild_hint(path)}.")
    prefix, raw = _header_bytes(path)
    if prefix == _LEGACY_MAGIC:
        raise CorruptIndexError(f"{path} has an index format (MCADIDX) this mcad no longer reads; "
                                f"{rebuild_hint(path)}.")
    not_an_index = (f"{path} is not an mcad-search index (a safetensors file written by `mcad-search index`); pass "
                    f"such a file, or {rebuild_hint(path)}.")
    if raw is None:
        raise CorruptIndexError(not_an_index)
    try:
        header = json.loads(raw.decode("utf-8"))
        metadata = header["__metadata__"]
        is_index = METADATA_KEY in metadata
    except (ValueError, KeyError, TypeError):  # not JSON, or JSON of another kind
        is_index = False
    if not is_index:
        if _names_the_index(raw):  # ours, damaged
            raise CorruptIndexError(f"{path} is truncated or damaged (its header is not readable JSON); "
                                    f"{rebuild_hint(path)}.")
        raise CorruptIndexError(not_an_index)
    return header, 8 + len(raw)


def _header_bytes(path: Path) -> tuple[bytes, bytes | None]:
    """A file's first 8 bytes and, when they give a length a safetensors header can have there, its header."""
    prefix = _read_prefix(path, 8)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
    if not 0 < length <= min(_MAX_HEADER_BYTES, path.stat().st_size - 8):
        return prefix, None
    return prefix, _read_prefix(path, 8 + length)[8:]


def _names_the_index(raw: bytes | None) -> bool:
    """Whether a safetensors header is an index's, as `save` writes it (its metadata first), readable or not."""
    return raw is not None and raw.startswith(b'{"__metadata__":{') and f'"{METADATA_KEY}"'.encode() in raw


def _read_index_record(raw: str, path: Path) -> tuple[int, int, int, IndexModel]:
    """`(count, dimension, block_rows, model)` of the index's metadata record, of this format version; any key
    missing or of the wrong type is a damaged header."""
    try:
        record = json.loads(raw)
        _check_format_version(raw, path)
        sizes = {key: record[key] for key in ("format_version", "count", "dimension", "block_rows")}
        bad = [f"{key}={value!r}" for key, value in sizes.items() if type(value) is not int or value < 0]  # no bool
        if bad:
            raise ValueError(f"expected non-negative integers, got {', '.join(bad)}")
        if sizes["block_rows"] == 0:
            raise ValueError("expected block_rows >= 1, got 0")
        model = IndexModel.from_json(record["model"], path.parent)
    except CorruptIndexError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSON and UTF-8 errors are ValueErrors
        raise CorruptIndexError(f"{path} has a damaged header ({error!r}); {rebuild_hint(path)}.") from error
    return sizes["count"], sizes["dimension"], sizes["block_rows"], model


def _check_format_version(raw: str, path: Path) -> None:
    """Refuse an index of another format version, named as such; a record that cannot be read passes (the checksum
    and the header's checks name it)."""
    try:
        version = json.loads(raw).get("format_version")
    except (ValueError, AttributeError):
        return
    if isinstance(version, int) and not isinstance(version, bool) and version != INDEX_FORMAT_VERSION:
        newer = version > INDEX_FORMAT_VERSION
        raise CorruptIndexError(f"{path} has index format {version}, {'newer' if newer else 'older'} than the one "
                                f"this mcad reads ({INDEX_FORMAT_VERSION}): {'upgrade mcad, or ' if newer else ''}"
                                f"{rebuild_hint(path)}.")


def _mapped(path: Path, data_start: int, entry: dict) -> np.ndarray:
    """One tensor of a safetensors file, memory-mapped read-only."""
    dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<")
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end - begin != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"a tensor's offsets ({begin}, {end}) do not match its shape {shape}")
    if begin == end:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype, "r", data_start + begin, shape)


def check_index_destination(path: Path) -> None:
    """Refuse to replace anything but an earlier index (of either format, even one whose data is damaged): `--out`
    pointing at a photo, a note or an export must not destroy it."""
    if path.is_dir():
        raise SearchError(f"The index destination {path} is a folder; pass a file path such as "
                          f"{path}/gallery.index.safetensors.")
    if path.exists():
        prefix, raw = _header_bytes(path)
        if not (prefix == _LEGACY_MAGIC or _names_the_index(raw)):
            raise SearchError(f"{path} exists and is not an mcad-search index, so it is not replaced; choose "
                              "another output path, or remove the file first.")
