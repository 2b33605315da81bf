"""llama.cpp's legacy `.dat` imatrix layout (`--output-format dat`), the only one stable-diffusion.cpp reads or
writes: read by hand (no library reads it), written as llama-imatrix's `save_imatrix_legacy` writes it.

All integers int32 little-endian: n_entries; per entry len, name bytes, ncall, nval, float32 values[nval] holding
mean(x^2) * ncall; then optionally last_call (chunks; sd.cpp always writes 0) and a dataset name (len + bytes,
llama.cpp only). Every check happens before anything is allocated from a size the file claims.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ..errors import IdeoquantError
from .matrix import INT32_MAX, Entry, ImportanceMatrix, legacy_values, replace_file, validate

_I32 = struct.Struct("<i")


class Cursor:
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


def check_values(cur: Cursor, name: str, what: str, arr: np.ndarray) -> None:
    if not np.isfinite(arr).all():
        cur.fail(f"entry {name!r} has non-finite {what}")
    if (arr < 0).any():
        cur.fail(f"entry {name!r} has negative {what}")


def read_dat(path: Path, data: memoryview) -> ImportanceMatrix:
    cur = Cursor(path, data, "legacy imatrix file")
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
        check_values(cur, name, "values", values)
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



def write_dat(path: str | Path, imatrix: ImportanceMatrix) -> None:
    """Write llama.cpp's legacy `.dat`, which stable-diffusion.cpp also reads: entries sorted by name (entries whose
    counts are all 0 are skipped, as llama-imatrix does), then last_call = chunk_count and the last dataset name.
    Per-expert counts and all datasets but the last are lost, as in llama.cpp."""
    path = Path(path)
    names = validate(imatrix, path)
    out = bytearray()
    n = 0
    for name in names:
        e = imatrix.entries[name]
        if not e.legacy and not np.asarray(e.counts).any():
            continue
        ncall, stored = legacy_values(e, int(imatrix.chunk_size), name, f"cannot write imatrix {path}")
        if stored.size > INT32_MAX:
            raise IdeoquantError(f"cannot write imatrix {path}: entry {name!r} has too many values")
        raw = name.encode("utf-8")
        out += _I32.pack(len(raw)) + raw + _I32.pack(ncall) + _I32.pack(stored.size) + stored.astype("<f4").tobytes()
        n += 1
    if n == 0:
        raise IdeoquantError(f"cannot write imatrix {path}: every entry has zero counts")
    if imatrix.chunk_count > INT32_MAX:
        raise IdeoquantError(f"cannot write imatrix {path}: chunk_count {imatrix.chunk_count} does not fit an int32")
    dataset = imatrix.datasets[-1].encode("utf-8") if imatrix.datasets else b""
    tail = _I32.pack(int(imatrix.chunk_count)) + _I32.pack(len(dataset)) + dataset
    payload = _I32.pack(n) + bytes(out) + tail
    replace_file(path, lambda tmp: tmp.write_bytes(payload))
