"""The gallery index's search kernel: onnxruntime's integer matrix product over int8 codes, at memory bandwidth.

A query against a gallery is one pass over its codes. onnxruntime's `MatMulInteger` packs a constant int8 right-hand
side once, when its session is made, into the layout its integer kernels (AVX-512 VNNI, AVX2, NEON dot product)
stream; after that a query reads each code once. `benchmarks/query_latency.py` measures it against numpy, simsimd,
FAISS and usearch.

One graph scans every block and merges their best:

    per block: dots   = MatMulInteger(query_codes, codes, 64)   # (2Q, D) uint8 x (D, rows) int8 -> (2Q, rows) int32
               scores = MatMul(query_scales, Reshape(Cast(dots), (Q, 2, rows))) * row_scales    # (Q, 1, rows) float32
               groups of 64 scores (the last filled up with -inf); the k groups with the best maxima, in gallery
               order; TopK(their scores, min(k, rows)) and the hits' positions in the gallery
    then:      TopK over the blocks' best; ties: the lower index first

- The best k of a block lie in its k groups with the best maxima (a group left out has k groups at or above its best,
  ties going to the lower group), so TopK reads 64 times fewer scores than there are entries: one TopK over a
  million scores cost 2.3 ms, a third of the scan on two threads. Taking the chosen groups in gallery order keeps
  ties going to the lower index, as one TopK over all entries would.
- The codes are one block's `(dimension, rows)` int8 tensor (the right-hand side is K x N); sessions read them from
  the index file itself (external data), so nothing but the packed copy stays in memory; packing a block at a time
  keeps the extra memory of loading to one block.
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
GROUP_SIZE = 64  # entries per group: the top k lie in the k groups with the best maxima

# onnx.proto enums
_FLOAT, _UINT8, _INT8, _INT32, _INT64 = 1, 2, 3, 6, 7
_ATTRIBUTE_INT, _ATTRIBUTE_INTS, _EXTERNAL = 2, 7, 1


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


def _node(op_type: str, inputs: list[str], outputs: list[str], **attributes: "int | list[int]") -> bytes:
    """A NodeProto; attributes are ints or lists of ints."""
    fields = []
    for name, value in attributes.items():
        if isinstance(value, int):
            fields.append((5, _message((1, name), (3, value), (20, _ATTRIBUTE_INT))))
        else:
            fields.append((5, _message((1, name), *[(8, item) for item in value], (20, _ATTRIBUTE_INTS))))
    return _message(*[(1, name) for name in inputs], *[(2, name) for name in outputs], (4, op_type), *fields)


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
        x = f"_{number}"  # the suffix of the block's tensor names
        rows = block["rows"]
        groups = -(-rows // GROUP_SIZE)
        initializers += [_tensor("codes" + x, _INT8, [dimension, rows], block["codes"]),
                         _tensor("row_scales" + x, _FLOAT, [rows], block["row_scales"]),
                         _tensor("rows" + x, _INT64, [1], _int64s(rows)),
                         _tensor("levels_shape" + x, _INT64, [3], _int64s(-1, QUERY_LEVELS, rows)),
                         _tensor("groups_shape" + x, _INT64, [3], _int64s(-1, groups, GROUP_SIZE)),
                         _tensor("group_count" + x, _INT64, [1], _int64s(groups)),
                         _tensor("group_starts" + x, _INT64, [groups],
                                 _int64s(*range(start, start + groups * GROUP_SIZE, GROUP_SIZE)))]
        nodes += [
            _node("MatMulInteger", ["query_codes", "codes" + x, "query_zero_point"], ["dots" + x]),
            _node("Cast", ["dots" + x], ["float_dots" + x], to=_FLOAT),
            _node("Reshape", ["float_dots" + x, "levels_shape" + x], ["levels" + x]),  # (Q, 2, rows)
            _node("MatMul", ["query_scales", "levels" + x], ["level_sums" + x]),  # (Q, 1, rows)
            _node("Mul", ["level_sums" + x, "row_scales" + x], ["scores" + x]),
        ]
        scores = "scores" + x
        if rows % GROUP_SIZE:  # the last group filled up with scores below any entry's
            initializers.append(_tensor("pads" + x, _INT64, [6], _int64s(0, 0, 0, 0, 0, groups * GROUP_SIZE - rows)))
            nodes.append(_node("Pad", [scores, "pads" + x, "minus_infinity"], ["padded" + x]))
            scores = "padded" + x
        nodes += [
            _node("Reshape", [scores, "groups_shape" + x], ["grouped" + x]),  # (Q, groups, G)
            _node("ReduceMax", ["grouped" + x], ["group_best" + x], axes=[2], keepdims=0),
            _node("Min", ["k", "group_count" + x], ["group_k" + x]),
            _node("TopK", ["group_best" + x, "group_k" + x], ["best_group_maxima" + x, "best_groups" + x], axis=1),
            _node("TopK", ["best_groups" + x, "group_k" + x], ["chosen_groups" + x, "chosen_order" + x], axis=1,
                  largest=0),  # in gallery order
            _node("Unsqueeze", ["chosen_groups" + x, "last_axis"], ["chosen_column" + x]),
            _node("Expand", ["chosen_column" + x, "group_shape"], ["chosen_spread" + x]),  # (Q, group_k, G)
            _node("GatherElements", ["grouped" + x, "chosen_spread" + x], ["chosen_scores" + x], axis=1),
            _node("Reshape", ["chosen_scores" + x, "candidates_shape"], ["candidates" + x]),  # (Q, group_k * G)
            _node("Min", ["k", "rows" + x], ["k" + x]),
            _node("TopK", ["candidates" + x, "k" + x], ["values" + x, "slots" + x], axis=1),  # ties: lower index
            _node("Div", ["slots" + x, "group_size"], ["slot_groups" + x]),
            _node("Mod", ["slots" + x, "group_size"], ["slot_offsets" + x]),
            _node("GatherElements", ["chosen_groups" + x, "slot_groups" + x], ["hit_groups" + x], axis=1),
            _node("Gather", ["group_starts" + x, "hit_groups" + x], ["hit_starts" + x]),
            _node("Add", ["hit_starts" + x, "slot_offsets" + x], ["indices" + x]),
        ]
        block_values.append("values" + x)
        block_indices.append("indices" + x)
        start += rows
    nodes += [_node("Concat", block_values, ["block_values"], axis=1),
              _node("Concat", block_indices, ["block_indices"], axis=1),
              _node("TopK", ["block_values", "k"], ["values", "best"], axis=1),  # ties: the earlier, lower index
              _node("GatherElements", ["block_indices", "best"], ["indices"], axis=1)]
    initializers += [_tensor("query_zero_point", _UINT8, [], bytes([QUERY_ZERO_POINT])),
                     _tensor("group_size", _INT64, [], _int64s(GROUP_SIZE)),
                     _tensor("group_shape", _INT64, [3], _int64s(1, 1, GROUP_SIZE)),
                     _tensor("last_axis", _INT64, [1], _int64s(2)),
                     _tensor("candidates_shape", _INT64, [2], _int64s(0, -1))]
    if any(block["rows"] % GROUP_SIZE for block in blocks):
        initializers.append(_tensor("minus_infinity", _FLOAT, [], np.array(-np.inf, "<f4").tobytes()))
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
