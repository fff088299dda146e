"""The gallery index's search kernel: onnxruntime's integer matrix product over int8 codes, at memory bandwidth.

A query against a gallery is one pass over its codes. onnxruntime's `MatMulInteger` packs a constant int8 right-hand
side once, when its session is made, into the layout its integer kernels (AVX-512 VNNI, AVX2, NEON dot product)
stream; after that a query reads each code once. `benchmarks/query_latency.py` measures it against numpy, simsimd,
FAISS and usearch.

One graph scans every block of gallery entries and merges their best:

    per block: dots   = MatMulInteger(query_codes, codes, 64)   # (2Q, D) uint8 x (D, rows) int8 -> (2Q, rows) int32
               scores = MatMul(query_scales, Reshape(Cast(dots), (Q, 2, rows))) * row_scales    # (Q, rows) float32
               TopK(scores, min(k, rows)), positions + the block's start
    then:      TopK over the blocks' best; ties: the lower index first

- The codes are one block's `(dimension, rows)` int8 tensor (the right-hand side is K x N); sessions read them from
  the index file itself (external data), so nothing but the packed copy stays in memory; packing a block at a time
  keeps the extra memory of loading to one block, and a block's scores stay in the CPU's cache.
- Each query is two rows of 7-bit codes around a zero point of 64 — its codes and those of what the first leaves
  over — so that the int8 kernels of CPUs without VNNI, which add pairs of u8 x s8 products in saturating int16,
  stay exact (2 x 127 x 127 < 32767), and the scores differ from a float32 query's by under 1e-4 (scale of the
  second row / 2, times the code's L1 norm).
- The graph is written here as protobuf bytes (a dozen fields of `onnx.proto`): importing `onnx` would cost a
  query process 17 MB and most of a second.
"""

import os
from pathlib import Path

import numpy as np

QUERY_LEVELS = 2  # code rows per query: its 7-bit codes and those of the remainder
QUERY_CODE_MAX = 63  # 7 bits around the zero point: u8 x s8 pairs cannot saturate int16
QUERY_ZERO_POINT = 64
# int32 dot products are exact in float32 up to 2**24: dimension x 63 x 127 must stay below it.
MAX_DIMENSION = (1 << 24) // (QUERY_CODE_MAX * 127)

# onnx.proto enums
_FLOAT, _UINT8, _INT8, _INT32, _INT64 = 1, 2, 3, 6, 7
_ATTRIBUTE_INT, _EXTERNAL = 2, 1


def _varint(value: int) -> bytes:
    if value < 0:  # int64 fields: ten bytes of two's complement
        value += 1 << 64
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _message(*fields: tuple[int, "int | str | bytes | None"]) -> bytes:
    """A protobuf message of `(field number, value)` pairs: ints as varints, str and bytes length-delimited."""
    out = bytearray()
    for number, value in fields:
        if value is None:
            continue
        if isinstance(value, int):
            out += _varint(number << 3) + _varint(value)
        else:
            value = value.encode("utf-8") if isinstance(value, str) else value
            out += _varint(number << 3 | 2) + _varint(len(value)) + value
    return bytes(out)


def _int64s(*values: int) -> bytes:
    """Raw data of an int64 tensor (little-endian, as ONNX stores it)."""
    return np.array(values, "<i8").tobytes()


def _value_info(name: str, elem_type: int, dims: list) -> bytes:
    dimensions = [(1, _message((1, dim) if isinstance(dim, int) else (2, dim))) for dim in dims]
    shape = _message(*dimensions)
    return _message((1, name), (2, _message((1, _message((1, elem_type), (2, shape))))))


def _tensor(name: str, elem_type: int, dims: list[int], data: "bytes | tuple[str, int, int]") -> bytes:
    """An initializer: raw bytes, or `(file name, offset, length)` of external data."""
    fields = [(1, dim) for dim in dims] + [(2, elem_type), (8, name)]
    if isinstance(data, bytes):
        fields.append((9, data))
    else:
        location, offset, length = data
        fields += [(13, _message((1, key), (2, str(value))))
                   for key, value in (("location", location), ("offset", offset), ("length", length))]
        fields.append((14, _EXTERNAL))
    return _message(*fields)


def _node(op_type: str, inputs: list[str], outputs: list[str], **int_attributes: int) -> bytes:
    attributes = [(5, _message((1, name), (3, value), (20, _ATTRIBUTE_INT))) for name, value in int_attributes.items()]
    return _message(*[(1, name) for name in inputs], *[(2, name) for name in outputs], (4, op_type), *attributes)


def scan_graph(dimension: int, blocks: list[dict]) -> bytes:
    """
    The ONNX model (serialized `ModelProto`) that scores a gallery held in blocks and keeps the best `k` entries.

    Args:
        dimension (`int`): the embeddings' dimension.
        blocks (`list[dict]`): per block, in gallery order, `rows`; `codes`, its `(dimension, rows)` int8 codes, and
            `row_scales`, its `rows` float32 scales (entry i is `codes[:, i] * row_scales[i]`), each as raw bytes or
            `(file name, offset, length)` of data in a file.
    """
    nodes, initializers, block_values, block_indices, start = [], [], [], [], 0
    for number, block in enumerate(blocks):
        suffix = f"_{number}"  # the block's tensor names
        rows = block["rows"]
        initializers += [_tensor("codes" + suffix, _INT8, [dimension, rows], block["codes"]),
                         _tensor("row_scales" + suffix, _FLOAT, [rows], block["row_scales"]),
                         _tensor("rows" + suffix, _INT64, [1], _int64s(rows)),
                         _tensor("levels_shape" + suffix, _INT64, [3], _int64s(-1, QUERY_LEVELS, rows)),
                         _tensor("scores_shape" + suffix, _INT64, [2], _int64s(-1, rows)),
                         _tensor("start" + suffix, _INT64, [], _int64s(start))]
        nodes += [
            _node("MatMulInteger", ["query_codes", "codes" + suffix, "query_zero_point"], ["dots" + suffix]),
            _node("Cast", ["dots" + suffix], ["float_dots" + suffix], to=_FLOAT),
            _node("Reshape", ["float_dots" + suffix, "levels_shape" + suffix], ["levels" + suffix]),  # (Q, 2, rows)
            _node("MatMul", ["query_scales", "levels" + suffix], ["level_sums" + suffix]),  # (Q, 1, rows)
            _node("Reshape", ["level_sums" + suffix, "scores_shape" + suffix], ["query_scores" + suffix]),
            _node("Mul", ["query_scores" + suffix, "row_scales" + suffix], ["scores" + suffix]),
            _node("Min", ["k", "rows" + suffix], ["k" + suffix]),
            _node("TopK", ["scores" + suffix, "k" + suffix], ["values" + suffix, "positions" + suffix], axis=1),
            _node("Add", ["positions" + suffix, "start" + suffix], ["indices" + suffix]),
        ]
        block_values.append("values" + suffix)
        block_indices.append("indices" + suffix)
        start += rows
    nodes += [_node("Concat", block_values, ["block_values"], axis=1),
              _node("Concat", block_indices, ["block_indices"], axis=1),
              _node("TopK", ["block_values", "k"], ["values", "best"], axis=1),  # ties: the earlier, lower index
              _node("GatherElements", ["block_indices", "best"], ["indices"], axis=1)]
    initializers.append(_tensor("query_zero_point", _UINT8, [], bytes([QUERY_ZERO_POINT])))
    inputs = [_value_info("query_codes", _UINT8, ["query_rows", dimension]),
              _value_info("query_scales", _FLOAT, ["queries", 1, QUERY_LEVELS]),
              _value_info("k", _INT64, [1])]
    outputs = [_value_info("values", _FLOAT, ["queries", "k"]), _value_info("indices", _INT64, ["queries", "k"])]
    graph = _message(*[(1, node) for node in nodes], (2, "mcad_gallery_scan"),
                     *[(5, tensor) for tensor in initializers], *[(11, value) for value in inputs],
                     *[(12, value) for value in outputs])
    return _message((1, 8), (2, "mcad"), (7, graph), (8, _message((2, 17))))  # IR version 8, opset 17


def quantize_queries(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """
    `(query_codes, query_scales)` for `scan_graph`: each float32 query q as `s1 * c1 + s2 * c2` with 7-bit codes.

    Returns:
        `query_codes`: uint8 `(2Q, D)`, the codes plus the zero point, query b's in rows 2b and 2b + 1.
        `query_scales`: float32 `(Q, 1, 2)`, `s1` and `s2` of each query.
    """
    count = len(queries)
    codes = np.empty((count, QUERY_LEVELS, queries.shape[1]), np.float32)
    scales = np.empty((count, 1, QUERY_LEVELS), np.float32)
    remainder = queries.astype(np.float32)
    for level in range(QUERY_LEVELS):
        largest = np.abs(remainder).max(axis=1)
        scales[:, 0, level] = np.where(largest > 0, largest / QUERY_CODE_MAX, 1)
        codes[:, level] = np.rint(remainder / scales[:, :, level])
        remainder = remainder - codes[:, level] * scales[:, :, level]
    return (codes + QUERY_ZERO_POINT).astype(np.uint8).reshape(count * QUERY_LEVELS, -1), scales


class GalleryScan:
    """
    Scores queries against a gallery held in blocks: one onnxruntime session of [`scan_graph`] (one thread pool).

    Args:
        blocks (`list[dict]`): the `blocks` argument of [`scan_graph`].
        dimension (`int`): the embeddings' dimension.
        folder (`str` or `os.PathLike`, *optional*): where the file named by external data lies.
        num_threads (`int`, defaults to 1): the session's threads.
    """

    def __init__(self, blocks: list[dict], dimension: int, folder: "str | os.PathLike | None" = None,
                 num_threads: int = 1):
        import onnxruntime

        if dimension > MAX_DIMENSION:
            raise ValueError(f"embeddings of dimension {dimension} are above the {MAX_DIMENSION} the int8 scan adds "
                             "up exactly in float32.")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = num_threads, 1
        if folder is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(Path(folder).resolve()))
        self.session = onnxruntime.InferenceSession(scan_graph(dimension, blocks), options,
                                                    providers=["CPUExecutionProvider"])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`(indices, scores)` of shape `(Q, k)`, best first, ties lower index first; `k` at most the row count."""
        query_codes, query_scales = quantize_queries(queries)
        values, indices = self.session.run(None, {"query_codes": query_codes, "query_scales": query_scales,
                                                  "k": np.array([k], np.int64)})
        return indices, values
