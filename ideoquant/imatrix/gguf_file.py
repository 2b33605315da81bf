"""llama.cpp's GGUF imatrix layout (the default since llama.cpp PR #9400).

`general.type = "imatrix"`, no `general.architecture`, the KV pairs `imatrix.datasets` (string array),
`imatrix.chunk_count` and `imatrix.chunk_size` (u32), and per weight `<name>` the F32 tensors `<name>.in_sum2`
(ne = [n_cols, n_mat], the raw sum of x^2) and `<name>.counts` (ne = [1, n_mat], activation rows summed), added in
sorted name order.

Written by gguf-py's `GGUFWriter`. Read by hand: gguf-py's `GGUFReader` trusts the sizes a file claims (an array
header claiming 2**62 numbers makes it loop for ever over a 41-byte file), and an imatrix is a file from a
stranger. The reader checks every size against the file before anything is allocated from it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ..errors import IdeoquantError
from .dat import Cursor, check_values
from .matrix import Entry, ImportanceMatrix, replace_file, validate

GGUF_MAGIC = b"GGUF"
GGUF_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT; llama-imatrix writes no general.alignment
GGML_MAX_NAME = 64  # ggml's tensor-name buffer, terminator included: gguf_init_from_file refuses longer names
GGML_MAX_DIMS = 4
GGML_TYPE_F32 = 0
KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUM2 = ".in_sum2"
SUFFIX_COUNTS = ".counts"

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# GGUF value types: fixed sizes, 8 = string, 9 = array
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_U32 = 8, 9, 4


def _gguf_string(cur: Cursor, what: str) -> str:
    n = cur.unpack(_U64, f"the length of {what}")
    return cur.text(cur.take(n, what), what)


def _gguf_value(cur: Cursor, vtype: int, key: str):
    if vtype == _GGUF_STRING:
        return _gguf_string(cur, f"the value of {key}")
    if vtype == _GGUF_ARRAY:
        etype = cur.unpack(_U32, f"the element type of {key}")
        n = cur.unpack(_U64, f"the length of {key}")
        if etype == _GGUF_STRING:
            if n * 8 > cur.left:
                cur.fail(f"{key} claims {n} strings but only {cur.left} bytes follow")
            return [_gguf_string(cur, f"an element of {key}") for _ in range(n)]
        if etype not in _GGUF_SIZES:
            cur.fail(f"{key} has unsupported array element type {etype}")
        raw = cur.take(n * _GGUF_SIZES[etype], f"the {n} elements of {key}")
        return np.frombuffer(raw, _GGUF_SCALAR[etype]).tolist()
    if vtype not in _GGUF_SCALAR:
        cur.fail(f"{key} has unknown value type {vtype}")
    return struct.unpack(_GGUF_SCALAR[vtype], cur.take(_GGUF_SIZES[vtype], f"the value of {key}"))[0]


def read_gguf(path: Path, data: memoryview) -> ImportanceMatrix:
    cur = Cursor(path, data, "GGUF imatrix file")
    cur.take(4, "the magic")
    version = cur.unpack(_U32, "the version")
    if version not in (2, 3):
        cur.fail(f"unsupported GGUF version {version}")
    n_tensors = cur.unpack(_U64, "the tensor count")
    n_kv = cur.unpack(_U64, "the key/value count")
    if n_kv * 13 > cur.left:  # key length (8) + at least one byte of key + type (4)
        cur.fail(f"claims {n_kv} key/value pairs but only {cur.left} bytes follow")
    kv: dict[str, tuple[int, object]] = {}
    for _ in range(n_kv):
        key = _gguf_string(cur, "a key")
        vtype = cur.unpack(_U32, f"the type of {key}")
        if key in kv:
            cur.fail(f"key {key!r} appears twice")
        kv[key] = (vtype, _gguf_value(cur, vtype, key))
    if n_tensors * 25 > cur.left:  # name length (8) + 1 byte + n_dims (4) + type (4) + offset (8)
        cur.fail(f"claims {n_tensors} tensors but only {cur.left} bytes follow")
    infos: dict[str, tuple[tuple[int, ...], int, int]] = {}
    for _ in range(n_tensors):
        name = _gguf_string(cur, "a tensor name")
        n_dims = cur.unpack(_U32, f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            cur.fail(f"tensor {name!r} has {n_dims} dimensions")
        ne = tuple(cur.unpack(_U64, f"the shape of tensor {name!r}") for _ in range(n_dims))
        ttype = cur.unpack(_U32, f"the type of tensor {name!r}")
        offset = cur.unpack(_U64, f"the offset of tensor {name!r}")
        if name in infos:
            cur.fail(f"tensor {name!r} appears twice")
        infos[name] = (ne, ttype, offset)

    alignment = GGUF_ALIGNMENT
    if "general.alignment" in kv:
        atype, alignment = kv["general.alignment"]
        if atype != _GGUF_U32 or alignment == 0 or alignment & (alignment - 1):
            cur.fail("general.alignment is not a power-of-two u32")
    data_start = -(-cur.pos // alignment) * alignment

    gtype = kv.get(KEY_TYPE)
    if gtype is None or gtype[1] != "imatrix":
        found = "missing" if gtype is None else repr(gtype[1])
        cur.fail(f"not an importance matrix (general.type is {found}, expected 'imatrix')")
    for key, want in ((KEY_CHUNK_COUNT, _GGUF_U32), (KEY_CHUNK_SIZE, _GGUF_U32), (KEY_DATASETS, _GGUF_ARRAY)):
        if key not in kv:
            cur.fail(f"missing key {key}")
        if kv[key][0] != want:
            cur.fail(f"key {key} has GGUF type {kv[key][0]}, expected {want}")
    datasets = kv[KEY_DATASETS][1]
    if not all(isinstance(d, str) for d in datasets):
        cur.fail(f"{KEY_DATASETS} is not an array of strings")

    def tensor(name: str, want_shape: tuple[int, ...] | None, what: str) -> np.ndarray:
        ne, ttype, offset = infos[name]
        if ttype != GGML_TYPE_F32:
            cur.fail(f"tensor {name!r} has ggml type {ttype}, expected F32 (0)")
        ne = ne + (1,) * (GGML_MAX_DIMS - len(ne))  # ggml writes only ggml_n_dims dimensions
        if any(d < 1 or d > len(data) for d in ne) or ne[2:] != (1, 1):
            cur.fail(f"tensor {name!r} has invalid shape {list(ne[: len(infos[name][0])])}")
        if want_shape is not None and ne[:2] != want_shape:
            cur.fail(f"tensor {name!r} has shape {list(ne[:2])}, expected {list(want_shape)}")
        nbytes = 4 * ne[0] * ne[1]
        if offset % alignment or data_start + offset + nbytes > len(data):
            cur.fail(f"tensor {name!r} data ({nbytes} bytes at offset {offset}) lies outside the file")
        start = data_start + offset
        arr = np.frombuffer(data[start : start + nbytes], "<f4").astype(np.float32).reshape(ne[1], ne[0])
        check_values(cur, name, what, arr)
        return arr

    entries: dict[str, Entry] = {}
    for tname in infos:
        if not tname.endswith(SUFFIX_SUM2):
            continue  # `.counts` are read with their `.in_sum2`; newer llama.cpp also writes `.in_sum`, unused here
        name = tname[: -len(SUFFIX_SUM2)]
        if name + SUFFIX_COUNTS not in infos:
            cur.fail(f"tensor {tname!r} has no {name + SUFFIX_COUNTS!r}")
        in_sum2 = tensor(tname, None, "sums")
        counts = tensor(name + SUFFIX_COUNTS, (1, in_sum2.shape[0]), "counts")
        entries[name] = Entry(in_sum2, counts.reshape(-1), None)
    for tname in infos:
        if tname.endswith(SUFFIX_COUNTS) and tname[: -len(SUFFIX_COUNTS)] not in entries:
            cur.fail(f"tensor {tname!r} has no {tname[: -len(SUFFIX_COUNTS)] + SUFFIX_SUM2!r}")
    if not entries:
        cur.fail("no entries (no <name>.in_sum2 tensors)")
    return ImportanceMatrix(entries, list(datasets), kv[KEY_CHUNK_COUNT][1], kv[KEY_CHUNK_SIZE][1], "gguf")




def write_gguf(path: str | Path, imatrix: ImportanceMatrix) -> None:
    """Write llama.cpp's GGUF imatrix layout with gguf-py: the KV pairs general.type, imatrix.datasets,
    imatrix.chunk_count and imatrix.chunk_size in that order, then `<name>.in_sum2` and `<name>.counts` per entry
    in sorted name order, F32, with ggml's n_dims (trailing 1s dropped), 32-byte alignment and zero padding after
    every tensor. Replaces `path` only once the file is complete."""
    import gguf

    path = Path(path)
    names = validate(imatrix, path)
    for name in names:
        if len((name + SUFFIX_SUM2).encode("utf-8")) >= GGML_MAX_NAME:
            raise IdeoquantError(
                f"cannot write imatrix {path}: entry name {name!r} is too long for a GGUF tensor name "
                f"(ggml allows {GGML_MAX_NAME - 1} bytes including the {SUFFIX_SUM2!r} suffix)"
            )
    if not imatrix.datasets:  # gguf-py writes no empty array (it drops the key), and llama.cpp wants the key
        raise IdeoquantError(f"cannot write imatrix {path}: it names no dataset (GGUF imatrix files list at least one)")

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch="")
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
        writer.add_type("imatrix")
        writer.add_array(KEY_DATASETS, list(imatrix.datasets))
        writer.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
        writer.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
        for name in names:
            e = imatrix.entries[name]
            sums = np.ascontiguousarray(e.in_sum2, dtype="<f4")
            counts = np.ascontiguousarray(e.counts, dtype="<f4").reshape(-1, 1)  # ne [1, n_mat]
            for tname, arr in ((name + SUFFIX_SUM2, sums), (name + SUFFIX_COUNTS, counts)):
                # numpy's shape is ne reversed; ggml_n_dims drops ne's trailing 1s, numpy's leading ones
                while arr.ndim > 1 and arr.shape[0] == 1:
                    arr = arr[0]
                writer.add_tensor(tname, arr)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    replace_file(path, fill)
