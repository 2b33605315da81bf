"""The importance matrix in memory: per weight the per-column sums of squared activations and the row counts, as
llama-imatrix keeps them; the `Accumulator` that collects them; what every writer checks first."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import IdeoquantError

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1


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



class Accumulator:
    """Collects per-column sums of x^2 from activation batches, as llama-imatrix does for a dense MUL_MAT.

    `add(name, x)` takes the input of the linear layer `name`, shape [..., n_cols]; leading dimensions are flattened
    into rows. Accumulation is float32, row after row (`values[j] += x_j^2` in llama.cpp's order, so the rounding is
    the same up to the C compiler's FMA contraction). `counts` grows by the number of rows and `ncall` by one per call.
    Non-finite activations are refused (llama-imatrix stops on them too).
    """

    def __init__(self, chunk_size: int = 512, datasets: list[str] | tuple[str, ...] = ()):
        if not isinstance(chunk_size, int) or not 0 < chunk_size <= UINT32_MAX:
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



def validate(imatrix: ImportanceMatrix, path: Path) -> list[str]:
    """The entry names in llama.cpp's order (std::sort on the bytes), after checking everything a writer relies on."""

    def fail(msg):
        raise IdeoquantError(f"cannot write imatrix {path}: {msg}")

    if not imatrix.entries:
        fail("it has no entries")
    for key, v in (("chunk_count", imatrix.chunk_count), ("chunk_size", imatrix.chunk_size)):
        if not isinstance(v, (int, np.integer)) or not 0 <= v <= UINT32_MAX:
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
        if e.ncall is not None and not 0 <= e.ncall <= INT32_MAX:
            fail(f"entry {name!r}: ncall {e.ncall} does not fit an int32")
        if e.legacy and (e.ncall is None or s.shape[0] != 1):
            fail(f"entry {name!r}: a legacy entry needs an ncall and one matrix")
    return sorted(imatrix.entries, key=lambda n: n.encode("utf-8"))


def replace_file(path: Path, fill: Callable[[Path], None]) -> None:
    """`fill(tmp)` writes the whole file at a temporary path next to `path`; then it is synced and renamed over
    `path`. On any failure `path` is untouched and the temporary file removed."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise IdeoquantError(f"cannot write imatrix {path}: {e.strerror or e}") from None
    try:
        os.close(fd)
        fill(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise IdeoquantError(f"cannot write imatrix {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)



def legacy_values(entry: Entry, chunk_size: int, name: str, where: str) -> tuple[int, np.ndarray]:
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
    if ncall > INT32_MAX:
        raise IdeoquantError(f"{where}: entry {name!r} has ncall {ncall}, too large for the legacy format")
    zero = counts == 0
    count = np.where(zero, np.float32(1), counts)[:, None]
    value = np.where(zero[:, None], np.float32(1), sums)
    with np.errstate(over="ignore"):
        stored = ((value / count) * np.float32(ncall)).astype(np.float32)
    if not np.isfinite(stored).all():
        raise IdeoquantError(f"{where}: entry {name!r} overflows float32 in the legacy layout")
    return int(ncall), stored.reshape(-1)
