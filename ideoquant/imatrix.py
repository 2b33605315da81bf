"""Importance-matrix (imatrix) files: llama.cpp's GGUF and legacy `.dat` layouts, stable-diffusion.cpp's `.dat`.

An importance matrix holds, per weight, the per-input-column sum of squared activations. ggml's weighted
quantizers take one float32 vector per weight (`ggml_quantize_chunk`'s last argument); llama-quantize and
stable-diffusion.cpp derive that vector differently from the same file (they differ by the factor ncall / counts),
so `weights(..., convention)` reproduces either tool. The facts used here are in `shared/notes/imatrix.md`.

Formats:

* GGUF (llama.cpp, the default since PR #9400): `general.type = "imatrix"`, no `general.architecture`, the KV pairs
  `imatrix.datasets` (string array), `imatrix.chunk_count` and `imatrix.chunk_size` (u32), and per weight `<name>`
  the F32 tensors `<name>.in_sum2` (ne = [n_cols, n_mat], the raw sum of x^2) and `<name>.counts` (ne = [1, n_mat],
  activation rows summed), added in sorted name order.
* Legacy `.dat` (llama.cpp `--output-format dat`, and the only layout stable-diffusion.cpp reads or writes), all
  integers int32 little-endian: n_entries; per entry len, name bytes, ncall, nval, float32 values[nval] holding
  mean(x^2) * ncall; then optionally last_call (chunks; sd.cpp always writes 0) and a dataset name (len + bytes,
  llama.cpp only).

Every reader check happens before anything is allocated from a size the file claims, and every problem with a file
is an `IdeoquantError` naming the file. Nothing here unpickles anything.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import IdeoquantError

CONVENTIONS = ("llama", "sdcpp")
GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3  # what ggml's gguf writer emits
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
# stable-diffusion.cpp keys a weight by its full internal name: `--diffusion-model` files get this prefix, the
# `--uncond-diffusion-model` file the second one (shared/notes/imatrix.md 3.2, consumers.md 3).
SDCPP_PREFIX = "model.diffusion_model."
SDCPP_UNCOND_PREFIX = "model.diffusion_model.uncond."
# ideoquant's own files hold both backbones; the unconditional one's keys carry this prefix (sd.cpp's would not fit
# ggml's 64-byte tensor names with the `.in_sum2` suffix: `...uncond.final_layer.adaln_modulation.weight.in_sum2`).
UNCOND_PREFIX = "uncond."
_UNCOND = (SDCPP_UNCOND_PREFIX, UNCOND_PREFIX)
# Prefixes that name the same tensor: sd.cpp's `convert_tensor_name` maps these to `model.diffusion_model.`.
_ALIASES = (SDCPP_UNCOND_PREFIX, SDCPP_PREFIX, UNCOND_PREFIX, "diffusion_model.", "transformer.", "unet.")

_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1
# GGUF value types: fixed sizes, 8 = string, 9 = array
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_U32 = 8, 9, 4


@dataclass
class Entry:
    """One weight's statistics.

    `in_sum2`: float32 [n_mat, n_cols], per-column sums of x^2 (n_mat is 1 for a dense weight, the expert count for
    MoE). `counts`: float32 [n_mat], activation rows summed per matrix.

    `ncall` is set for entries read from a legacy `.dat` and for collected ones. From a `.dat` (`legacy=True`),
    `in_sum2` holds the stored values (mean(x^2) * ncall) and `counts` the file's ncall, the same ratio llama-imatrix
    keeps when it converts a `.dat` (it scales both by chunk_size). From the `Accumulator`, ncall is the number of
    batches added, as stable-diffusion.cpp's collector counts its callbacks. From a GGUF file it is None: the format
    has no ncall.
    """

    in_sum2: np.ndarray
    counts: np.ndarray
    ncall: int | None = None
    legacy: bool = False  # read from a `.dat`: in_sum2 holds the stored values, counts the file's ncall

    @property
    def n_mat(self) -> int:
        return int(self.in_sum2.shape[0])

    @property
    def n_cols(self) -> int:
        return int(self.in_sum2.shape[1])


@dataclass
class ImportanceMatrix:
    entries: dict[str, Entry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0  # 0: unknown (a `.dat` does not record it)
    source_format: str = "memory"  # "gguf", "dat" or "memory"


# ---------------------------------------------------------------------------------------------------- collecting


class Accumulator:
    """Collects per-column sums of x^2 from activation batches, as llama-imatrix does for a dense MUL_MAT.

    `add(name, x)` takes the input of the linear layer `name`, shape [..., n_cols]; leading dimensions are flattened
    into rows. Accumulation is float32, row after row (`values[j] += x_j^2` in llama.cpp's order, so the rounding is
    the same up to the C compiler's FMA contraction). `counts` grows by the number of rows and `ncall` by one per call.
    Non-finite activations are refused (llama-imatrix stops on them too).
    """

    def __init__(self, chunk_size: int = 512, datasets: list[str] | tuple[str, ...] = ()):
        if not isinstance(chunk_size, int) or not 0 < chunk_size <= _UINT32_MAX:
            raise IdeoquantError(f"imatrix chunk size must be a positive 32-bit integer, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.datasets = [str(d) for d in datasets]
        self._sums: dict[str, np.ndarray] = {}
        self._rows: dict[str, int] = {}
        self._calls: dict[str, int] = {}

    def add(self, name: str, x) -> None:
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[-1] == 0:
            raise IdeoquantError(f"imatrix activations for {name} must have at least one column, got shape {x.shape}")
        x = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise IdeoquantError(f"imatrix activations for {name} contain NaN or infinity")
        total = self._sums.get(name)
        if total is None:
            total = np.zeros(x.shape[1], np.float32)
        elif total.shape[0] != x.shape[1]:
            raise IdeoquantError(
                f"imatrix activations for {name} have {x.shape[1]} columns, earlier ones {total.shape[0]}"
            )
        for start in range(0, x.shape[0], 256):  # bounded scratch memory; cumsum keeps the sequential order
            sq = np.square(x[start : start + 256])
            sq[0] += total
            np.cumsum(sq, axis=0, out=sq)
            total = sq[-1].copy()
        self._sums[name] = total
        self._rows[name] = self._rows.get(name, 0) + x.shape[0]
        self._calls[name] = self._calls.get(name, 0) + 1

    def result(self) -> ImportanceMatrix:
        entries = {
            name: Entry(total[None, :].copy(), np.array([self._rows[name]], np.float32), self._calls[name])
            for name, total in self._sums.items()
        }
        # llama-imatrix's m_last_chunk: the largest count divided by chunk_size, rounded down
        chunk_count = max((rows // self.chunk_size for rows in self._rows.values()), default=0)
        return ImportanceMatrix(entries, list(self.datasets), chunk_count, self.chunk_size, "memory")


# ---------------------------------------------------------------------------------------------------- reading


def read(path: str | Path) -> ImportanceMatrix:
    """Read a GGUF imatrix (llama.cpp) or a legacy `.dat` (llama.cpp or stable-diffusion.cpp); the format is detected
    from the first bytes."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IdeoquantError(f"cannot read imatrix file {path}: {e.strerror or e}") from None
    if data[:4] == GGUF_MAGIC:
        return _read_gguf(path, memoryview(data))
    return _read_dat(path, memoryview(data))


class _Cursor:
    def __init__(self, path: Path, data: memoryview, what: str):
        self.path, self.data, self.pos, self.what = path, data, 0, what

    def fail(self, msg: str):
        raise IdeoquantError(f"{self.what} {self.path}: {msg}")

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.left:
            self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, {max(self.left, 0)} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct, what: str):
        return st.unpack(self.take(st.size, what))[0]

    def text(self, raw: memoryview, what: str) -> str:
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")


def _check_values(cur: _Cursor, name: str, what: str, arr: np.ndarray) -> None:
    if not np.isfinite(arr).all():
        cur.fail(f"entry {name!r} has non-finite {what}")
    if (arr < 0).any():
        cur.fail(f"entry {name!r} has negative {what}")


def _read_dat(path: Path, data: memoryview) -> ImportanceMatrix:
    cur = _Cursor(path, data, "legacy imatrix file")
    n_entries = cur.unpack(_I32, "the entry count")
    if n_entries < 1:
        cur.fail(f"entry count is {n_entries}; need at least 1")
    if n_entries * 12 > cur.left:  # each entry has at least len, ncall and nval
        cur.fail(f"claims {n_entries} entries but only {cur.left} bytes follow")
    entries: dict[str, Entry] = {}
    for i in range(n_entries):
        length = cur.unpack(_I32, f"the name length of entry {i}")
        if length < 1:
            cur.fail(f"entry {i} has name length {length}")
        name = cur.text(cur.take(length, f"the name of entry {i}"), f"the name of entry {i}")
        ncall = cur.unpack(_I32, f"ncall of entry {name!r}")
        nval = cur.unpack(_I32, f"nval of entry {name!r}")
        if ncall < 0:
            cur.fail(f"entry {name!r} has negative ncall {ncall}")
        if nval < 1:
            cur.fail(f"entry {name!r} has {nval} values")
        values = np.frombuffer(cur.take(4 * nval, f"the {nval} values of entry {name!r}"), "<f4").astype(np.float32)
        _check_values(cur, name, "values", values)
        if name in entries:
            cur.fail(f"entry {name!r} appears twice")
        entries[name] = Entry(values[None, :], np.array([ncall], np.float32), ncall, legacy=True)
    chunk_count, datasets = 0, []
    if cur.left:  # llama.cpp: last_call, then the dataset name; older llama.cpp files and sd.cpp's end earlier
        chunk_count = cur.unpack(_I32, "the chunk count")
        if chunk_count < 0:
            cur.fail(f"negative chunk count {chunk_count}")
    if cur.left:
        length = cur.unpack(_I32, "the dataset name length")
        if length < 0:
            cur.fail(f"negative dataset name length {length}")
        dataset = cur.text(cur.take(length, "the dataset name"), "the dataset name")
        datasets = [dataset] if dataset else []
    if cur.left:
        cur.fail(f"{cur.left} unexpected bytes after the dataset name")
    return ImportanceMatrix(entries, datasets, chunk_count, 0, "dat")


def _gguf_string(cur: _Cursor, what: str) -> str:
    n = cur.unpack(_U64, f"the length of {what}")
    return cur.text(cur.take(n, what), what)


def _gguf_value(cur: _Cursor, vtype: int, key: str):
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


def _read_gguf(path: Path, data: memoryview) -> ImportanceMatrix:
    cur = _Cursor(path, data, "GGUF imatrix file")
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
        _check_values(cur, name, what, arr)
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


# ---------------------------------------------------------------------------------------------------- writing


def _validate(imatrix: ImportanceMatrix, path: Path) -> list[str]:
    """The entry names in llama.cpp's order (std::sort on the bytes), after checking everything a writer relies on."""

    def fail(msg):
        raise IdeoquantError(f"cannot write imatrix {path}: {msg}")

    if not imatrix.entries:
        fail("it has no entries")
    for key, v in (("chunk_count", imatrix.chunk_count), ("chunk_size", imatrix.chunk_size)):
        if not isinstance(v, (int, np.integer)) or not 0 <= v <= _UINT32_MAX:
            fail(f"{key} {v!r} is not a 32-bit unsigned integer")
    if not all(isinstance(d, str) for d in imatrix.datasets):
        fail("datasets must be strings")
    for name, e in imatrix.entries.items():
        if not isinstance(name, str) or not name:
            fail(f"bad entry name {name!r}")
        s, c = np.asarray(e.in_sum2), np.asarray(e.counts)
        if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1 or c.shape != (s.shape[0],):
            fail(f"entry {name!r}: in_sum2 must be [n_mat, n_cols] and counts [n_mat], got {s.shape} and {c.shape}")
        for what, arr in (("in_sum2", s), ("counts", c)):
            if not np.isfinite(arr).all() or (arr < 0).any():
                fail(f"entry {name!r}: {what} must be finite and non-negative")
        if e.ncall is not None and not 0 <= e.ncall <= _INT32_MAX:
            fail(f"entry {name!r}: ncall {e.ncall} does not fit an int32")
        if e.legacy and (e.ncall is None or s.shape[0] != 1):
            fail(f"entry {name!r}: a legacy entry needs an ncall and one matrix")
    return sorted(imatrix.entries, key=lambda n: n.encode("utf-8"))


def _replace(path: Path, payload: bytes) -> None:
    """Write to a temporary file next to `path`, then rename it over `path`."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise IdeoquantError(f"cannot write imatrix {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise IdeoquantError(f"cannot write imatrix {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _gguf_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return _U64.pack(len(b)) + b


def write_gguf(path: str | Path, imatrix: ImportanceMatrix) -> None:
    """Write llama.cpp's GGUF imatrix layout: the KV pairs general.type, imatrix.datasets, imatrix.chunk_count and
    imatrix.chunk_size in that order, then `<name>.in_sum2` and `<name>.counts` per entry in sorted name order, F32,
    with ggml's n_dims (trailing 1s dropped), 32-byte alignment and zero padding after every tensor."""
    path = Path(path)
    names = _validate(imatrix, path)
    for name in names:
        if len((name + SUFFIX_SUM2).encode("utf-8")) >= GGML_MAX_NAME:
            raise IdeoquantError(
                f"cannot write imatrix {path}: entry name {name!r} is too long for a GGUF tensor name "
                f"(ggml allows {GGML_MAX_NAME - 1} bytes including the {SUFFIX_SUM2!r} suffix)"
            )
    kv = bytearray()
    kv += _gguf_str(KEY_TYPE) + _U32.pack(_GGUF_STRING) + _gguf_str("imatrix")
    kv += _gguf_str(KEY_DATASETS) + _U32.pack(_GGUF_ARRAY) + _U32.pack(_GGUF_STRING) + _U64.pack(len(imatrix.datasets))
    for d in imatrix.datasets:
        kv += _gguf_str(d)
    kv += _gguf_str(KEY_CHUNK_COUNT) + _U32.pack(_GGUF_U32) + _U32.pack(int(imatrix.chunk_count))
    kv += _gguf_str(KEY_CHUNK_SIZE) + _U32.pack(_GGUF_U32) + _U32.pack(int(imatrix.chunk_size))

    infos, blobs, offset = bytearray(), [], 0
    for name in names:
        e = imatrix.entries[name]
        s = np.ascontiguousarray(e.in_sum2, dtype="<f4")
        c = np.ascontiguousarray(e.counts, dtype="<f4")
        pairs = ((name + SUFFIX_SUM2, [s.shape[1], s.shape[0]], s), (name + SUFFIX_COUNTS, [1, c.shape[0]], c))
        for tname, ne, arr in pairs:
            while len(ne) > 1 and ne[-1] == 1:  # ggml_n_dims
                ne.pop()
            infos += _gguf_str(tname) + _U32.pack(len(ne)) + b"".join(_U64.pack(d) for d in ne)
            infos += _U32.pack(GGML_TYPE_F32) + _U64.pack(offset)
            raw = arr.tobytes()
            pad = -len(raw) % GGUF_ALIGNMENT
            blobs.append(raw + b"\0" * pad)
            offset += len(raw) + pad
    head = GGUF_MAGIC + _U32.pack(GGUF_VERSION) + _U64.pack(2 * len(names)) + _U64.pack(4) + bytes(kv) + bytes(infos)
    head += b"\0" * (-len(head) % GGUF_ALIGNMENT)
    _replace(path, head + b"".join(blobs))


def _legacy(entry: Entry, chunk_size: int, name: str, where: str) -> tuple[int, np.ndarray]:
    """(ncall, stored float32 values) as llama-imatrix's save_imatrix_legacy computes them: (sum / count) * ncall
    with ncall = ceil(max count / chunk_size), and 1.0 * ncall for a matrix whose count is 0. An entry read from a
    `.dat` keeps its own ncall and values unchanged."""
    counts = np.asarray(entry.counts, np.float32)
    sums = np.asarray(entry.in_sum2, np.float32)
    if entry.legacy:
        return int(entry.ncall), sums.reshape(-1).copy()
    if entry.ncall is not None:
        ncall = entry.ncall
    else:
        if chunk_size <= 0:
            raise IdeoquantError(
                f"{where}: entry {name!r} has no ncall and the chunk size is unknown, so the legacy "
                "values (mean * ncall) cannot be derived"
            )
        ncall = -(-math.ceil(float(counts.max())) // chunk_size)
    if ncall > _INT32_MAX:
        raise IdeoquantError(f"{where}: entry {name!r} has ncall {ncall}, too large for the legacy format")
    zero = counts == 0
    count = np.where(zero, np.float32(1), counts)[:, None]
    value = np.where(zero[:, None], np.float32(1), sums)
    with np.errstate(over="ignore"):
        stored = ((value / count) * np.float32(ncall)).astype(np.float32)
    if not np.isfinite(stored).all():
        raise IdeoquantError(f"{where}: entry {name!r} overflows float32 in the legacy layout")
    return int(ncall), stored.reshape(-1)


def write_dat(path: str | Path, imatrix: ImportanceMatrix) -> None:
    """Write llama.cpp's legacy `.dat`, which stable-diffusion.cpp also reads: entries sorted by name (entries whose
    counts are all 0 are skipped, as llama-imatrix does), then last_call = chunk_count and the last dataset name.
    Per-expert counts and all datasets but the last are lost, as in llama.cpp."""
    path = Path(path)
    names = _validate(imatrix, path)
    out = bytearray()
    n = 0
    for name in names:
        e = imatrix.entries[name]
        if not e.legacy and not np.asarray(e.counts).any():
            continue
        ncall, stored = _legacy(e, int(imatrix.chunk_size), name, f"cannot write imatrix {path}")
        if stored.size > _INT32_MAX:
            raise IdeoquantError(f"cannot write imatrix {path}: entry {name!r} has too many values")
        raw = name.encode("utf-8")
        out += _I32.pack(len(raw)) + raw + _I32.pack(ncall) + _I32.pack(stored.size) + stored.astype("<f4").tobytes()
        n += 1
    if n == 0:
        raise IdeoquantError(f"cannot write imatrix {path}: every entry has zero counts")
    if imatrix.chunk_count > _INT32_MAX:
        raise IdeoquantError(f"cannot write imatrix {path}: chunk_count {imatrix.chunk_count} does not fit an int32")
    dataset = imatrix.datasets[-1].encode("utf-8") if imatrix.datasets else b""
    tail = _I32.pack(int(imatrix.chunk_count)) + _I32.pack(len(dataset)) + dataset
    _replace(path, _I32.pack(n) + bytes(out) + tail)


# ---------------------------------------------------------------------------------------------------- using


def ones(n_cols: int) -> np.ndarray:
    """stable-diffusion.cpp's vector without an imatrix (or for a key it does not find): all 1.0."""
    return np.ones(n_cols, np.float32)


def canonical(key: str) -> str:
    """The tensor name in ideoquant's GGUF output (original layout, unprefixed) for an imatrix key of either tool."""
    for prefix in _ALIASES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def candidate_keys(tensor_name: str, convention: str = "llama", uncond: bool = False) -> list[str]:
    """The keys each tool writes for `tensor_name`, the preferred one first.

    llama.cpp keys an entry by the weight's GGUF name, which for ideoquant's files is the unprefixed original name
    (`layers.0.attention.qkv.weight`). stable-diffusion.cpp keys it by its full internal name,
    `model.diffusion_model.<name>` (`model.diffusion_model.uncond.<name>` for the unconditional backbone, whose
    loader prefix that is). The `sdcpp` convention tries sd.cpp's form first.
    """
    _convention(convention)
    name = canonical(tensor_name)
    sd = (SDCPP_UNCOND_PREFIX if uncond else SDCPP_PREFIX) + name
    keys = [sd, name] if convention == "sdcpp" else [name, sd]
    return [UNCOND_PREFIX + name, *keys] if uncond else keys


def lookup(
    imatrix: ImportanceMatrix, tensor_name: str, *, convention: str = "llama", uncond: bool = False
) -> Entry | None:
    """The entry for a tensor of ideoquant's GGUF output, under any key form either tool writes; None if absent.

    With `uncond=False` an `uncond.`-prefixed entry is never used, and with `uncond=True` a conditional one is
    never used, so one backbone's statistics do not silently quantize the other.
    """
    keys = candidate_keys(tensor_name, convention, uncond)
    if uncond and any(k.startswith(_UNCOND) for k in imatrix.entries):
        # A file holding both backbones: the unconditional one's entries are the prefixed ones, never the others.
        keys = [k for k in keys if k.startswith(_UNCOND)]
    elif not uncond:
        keys = [k for k in keys if not k.startswith(_UNCOND)]
    for key in keys:
        if key in imatrix.entries:
            return imatrix.entries[key]
    return None


def _convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise IdeoquantError(f"unknown imatrix convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")


def weights(
    imatrix: ImportanceMatrix, name: str, n_cols: int, convention: str, *, uncond: bool = False
) -> np.ndarray | None:
    """The float32 vector ggml_quantize_chunk receives for tensor `name` (n_cols = n_per_row), as each tool derives it.

    * `llama` (llama-quantize): GGUF entries give in_sum2 / counts per matrix (a float32 division; 1.0 for a matrix
      whose count is 0); `.dat` entries give stored / ncall (stored as is when ncall is 0). A missing entry gives
      None (ggml's `_ref` path).
    * `sdcpp` (sd-cli -M convert): the stored `.dat` values as they are, mean(x^2) * ncall, not divided; an entry
      from GGUF or the Accumulator gives what `llama-imatrix --output-format dat` (ncall = ceil(max count /
      chunk_size)) or sd.cpp's own collector (ncall = batches added) would store. A missing entry gives `ones`.

    The result has n_mat * n_cols values (n_mat > 1 only for MoE entries; matrix i is the slice i * n_cols). A size
    that does not match n_cols is an error here (sd.cpp would silently pad with 1.0 or truncate), and so is any
    non-finite value (as in llama-quantize).
    """
    _convention(convention)
    entry = lookup(imatrix, name, convention=convention, uncond=uncond)
    if entry is None:
        return ones(n_cols) if convention == "sdcpp" else None
    if entry.n_cols != n_cols:
        raise IdeoquantError(f"imatrix entry for {name} has {entry.n_cols} columns, the tensor has {n_cols}")
    sums = np.asarray(entry.in_sum2, np.float32)
    counts = np.asarray(entry.counts, np.float32)
    if convention == "sdcpp":
        if not entry.legacy and not counts.any():  # never stored in a `.dat`, so sd.cpp would not find it
            return ones(n_cols * entry.n_mat)
        _, vec = _legacy(entry, int(imatrix.chunk_size), name, "imatrix")
    elif entry.legacy:  # llama-quantize's `.dat` path: stored / ncall
        vec = (sums / np.float32(entry.ncall) if entry.ncall > 0 else sums).reshape(-1)
    else:
        zero = counts == 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            vec = np.where(zero[:, None], np.float32(1), sums / np.where(zero, np.float32(1), counts)[:, None])
        vec = vec.astype(np.float32).reshape(-1)
    if not np.isfinite(vec).all():
        raise IdeoquantError(f"imatrix entry for {name} gives non-finite weights")
    return np.ascontiguousarray(vec, np.float32)
