"""Source tensors: one tensor as a file holds it, and its rows read on demand.

Reading touches only the bytes of the rows asked for (positional reads, or views of shared memory maps);
`ReadAhead` asks the kernel for the next tensors while this one is encoded, and `ReadBehind` lets it drop what the
job is done with.
"""

from __future__ import annotations

import heapq
import math
import mmap
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..encode.fp8 import dequantize_fp8r
from ..errors import IdeoquantError

FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
FP8_DTYPES = {"F8_E4M3"}
# Every dtype a safetensors header may name that ideoquant can parse (and refuse by name when it is not a source
# format: U8 markers, I8 weights, ...). Any other dtype string is refused when the header is read.
STORED_DTYPES = {
    **FLOAT_DTYPES, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F64": torch.float64,
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_BYTES = {k: v.itemsize for k, v in STORED_DTYPES.items()}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as the file holds it."""

    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # where the data starts in the file

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SourceTensor:
    """A tensor under its diffusers name: possibly a row block of a fused tensor, possibly FP8 with a row scale."""

    name: str
    shape: tuple[int, ...]
    stored: StoredTensor
    rows: tuple[int, int] | None = None  # row block of a fused original-layout tensor
    scale: StoredTensor | None = None  # FP8 per-row `weight_scale`

    @property
    def dtype(self) -> str:
        return self.stored.dtype

    @property
    def nbytes(self) -> int:
        """Bytes read from the source for this tensor (its share of a fused tensor, plus its FP8 scale)."""
        share = (self.rows[1] - self.rows[0]) / self.stored.shape[0] if self.rows else 1.0
        scale = self.scale.nbytes if self.scale is not None else 0
        return int((self.stored.nbytes + scale) * share)

    def read(self, rows: tuple[int, int] | None = None, maps: "FileMaps | None" = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor (or rows [a, b) of it) in its stored float dtype; FP8 is dequantized exactly in float32 (and a
        NaN or Inf in it is an error naming the tensor, found in the same pass).

        maps: read through these memory maps (a view of the page cache, no copy) instead of a fresh buffer.
        out: a float32 buffer of the block's shape to dequantize FP8 into (see `dequantize_fp8r`).
        """
        if self.scale is not None:
            return dequantize_fp8r(*self.read_fp8(rows, maps), out, self.name)
        return _read_rows(self.stored, self._file_rows(rows), maps)

    def read_fp8(self, rows: tuple[int, int] | None = None, maps: "FileMaps | None" = None):
        """An FP8 tensor's rows as stored, not dequantized: (e4m3fn codes [r, K], float32 scale per row [r])."""
        t = _read_rows(self.stored, self._file_rows(rows), maps)
        per_row = bool(self.scale.shape) and self.scale.shape[0] == self.stored.shape[0]
        s = _read_rows(self.scale, self._file_rows(rows) if per_row else None, maps).to(torch.float32).reshape(-1)
        return t, (s.expand(t.shape[0]) if s.numel() == 1 else s)

    def _file_rows(self, rows: tuple[int, int] | None) -> tuple[int, int] | None:
        """Rows of this tensor -> rows of the stored tensor (a fused tensor holds several)."""
        if rows is None:
            rows = (0, self.shape[0]) if self.shape else None
        if rows is not None and self.rows is not None:
            rows = (self.rows[0] + rows[0], self.rows[0] + rows[1])
        return rows

    def row_ranges(self, max_elements: int = 1 << 20) -> list[tuple[int, int] | None]:
        """Row ranges [a, b) of about max_elements each, covering the tensor (None: a 1-D tensor, read whole)."""
        if len(self.shape) < 2:
            return [None]
        step = max(1, max_elements // math.prod(self.shape[1:]))
        return [(a, min(a + step, self.shape[0])) for a in range(0, self.shape[0], step)]

    def row_blocks(self, max_elements: int = 1 << 20):
        """Yield (first_row, block) covering the tensor, each block holding about max_elements: bounded memory."""
        for rows in self.row_ranges(max_elements):
            yield (rows[0] if rows else 0), self.read(rows)


def _byte_range(stored: StoredTensor, rows: tuple[int, int] | None) -> tuple[int, int, tuple[int, ...]]:
    """(file offset, length, shape) of rows [a, b) of a stored tensor (None: all of it)."""
    shape = stored.shape
    if rows is None or not shape:
        return stored.offset, stored.nbytes, shape
    row_bytes = stored.nbytes // shape[0]
    return stored.offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes, (rows[1] - rows[0], *shape[1:])


def _read_rows(stored: StoredTensor, rows: tuple[int, int] | None, maps: "FileMaps | None" = None) -> torch.Tensor:
    """Rows [a, b) of a stored tensor (None: all of it), at the offset its header gave (checked by safe_open when
    the source was opened): positional reads, or views of `maps`. Not safe_open per read: it maps the whole file
    on every call, and that costs more CPU than the copy."""
    start, n, shape = _byte_range(stored, rows)
    if maps is not None:
        data = maps.view(stored.file, start, n)
        if start % STORED_DTYPES[stored.dtype].itemsize:  # a misaligned tensor (hand-made file): an aligned copy
            data = data.clone()
    else:
        data = torch.empty(n, dtype=torch.uint8)
        try:
            fd = os.open(stored.file, os.O_RDONLY)
            try:
                got, view = 0, memoryview(data.numpy())
                while got < n and (k := os.preadv(fd, [view[got:]], start + got)):
                    got += k
            finally:
                os.close(fd)
        except OSError as e:
            raise IdeoquantError(f"cannot read {stored.key} from {stored.file}: {e}") from None
        if got != n:
            raise IdeoquantError(f"cannot read {stored.key} from {stored.file}: the file is truncated")
    return data.view(STORED_DTYPES[stored.dtype]).view(shape)


_CAN_DROP = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")  # not on Windows


class FileMaps:
    """Read-only memory maps of source files, shared by the encoder threads.

    A block of rows is then a view of the page cache: no copy into a buffer (measured: the kernel's copy cost about
    a third as much CPU as encoding the block). `release` unmaps a block once it is encoded, so the resident size
    stays a few blocks however large the file, and tells `reads` (when given) that the job is done with it.
    """

    def __init__(self, reads: "ReadBehind | None" = None) -> None:
        self._maps: dict[Path, tuple[mmap.mmap, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._reads = reads

    def view(self, path: Path, start: int, n: int) -> torch.Tensor:
        with self._lock:
            if path not in self._maps:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    # copy-on-write (never written): a writable buffer, which torch.frombuffer wants
                    mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
                self._maps[path] = (mm, torch.frombuffer(mm, dtype=torch.uint8))
            mm, whole = self._maps[path]
        if start + n > whole.numel():
            raise IdeoquantError(f"cannot read {path}: the file is truncated")
        return whole[start : start + n]

    def release(self, t: SourceTensor, rows: tuple[int, int] | None) -> None:
        """Unmap the pages of a block that is done with (re-reading it would just map them again)."""
        start, n, _ = _byte_range(t.stored, t._file_rows(rows))
        entry = self._maps.get(t.stored.file)
        if entry is not None and n and _CAN_DROP:
            first = start - start % mmap.PAGESIZE
            entry[0].madvise(mmap.MADV_DONTNEED, first, start + n - first)
        if self._reads is not None and n:
            self._reads.consumed(t.stored.file, start, n)

    def close(self) -> None:
        with self._lock:
            maps, self._maps = self._maps, {}
        while maps:
            mm, whole = maps.popitem()[1]
            del whole
            try:
                mm.close()
            except BufferError:  # a block is still referenced somewhere: unmapped when it goes
                pass


class ReadBehind:
    """Drop source bytes from the page cache once the job is done with them, as `dd iflag=nocache` does.

    A checkpoint is read once, and on a machine whose free memory is not much larger than it, a page cache that
    keeps every byte read costs more CPU than reading: each read lands in a fresh page, and the kernel reclaims
    others to find it (measured on a 2-core VM: 3 GB read cold through a map and hashed, 5.9 CPU-s; 1.9 CPU-s
    with each range dropped once read). Each byte is read twice, by the encoders (in plan order, `FileMaps`) and,
    for a file whose hash is not known, by the source hash (in file order): a range is dropped once both are done
    with it. The hash waits while it is more than `lead` bytes ahead of the encoders in a file, so what it reads
    ahead stays a bounded part of memory. Use as a context manager around the job (`finish` lifts the wait).
    """

    def __init__(self, lead: int = 1 << 30) -> None:
        self.lead = lead
        self._lock = threading.Condition()
        self._files: dict[str, _ReadState] = {}
        self._open = True  # the encoders are still reading (the hash waits for them)
        self._open_files = True  # descriptors may be opened (until the context ends)

    def __enter__(self) -> "ReadBehind":
        with self._lock:
            self._open = self._open_files = True
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._open = self._open_files = False
            self._lock.notify_all()
            files, self._files = self._files, {}
            for f in files.values():
                if f.fd is not None:
                    os.close(f.fd)
                    f.fd = None

    def _state(self, path: Path) -> "_ReadState":
        key = os.path.realpath(path)
        with self._lock:
            if key not in self._files:
                self._files[key] = _ReadState(key)
            return self._files[key]

    def hashing(self, path: Path):
        """`(ready, hashed)` for the hash of `path` (as `write.hashing.sha256_mapped` takes them)."""
        f = self._state(path)
        f.hashed = 0
        return (lambda pos: self._hash_ready(f, pos)), (lambda pos, end: self._hash_done(f, end))

    def _hash_ready(self, f: "_ReadState", pos: int) -> int:
        with self._lock:
            while self._open and pos >= f.consumed + self.lead:
                self._lock.wait()
            return f.consumed + self.lead if self._open else 1 << 62

    def _hash_done(self, f: "_ReadState", end: int) -> None:
        with self._lock:
            f.hashed = end
            while f.waiting and f.waiting[0][0] <= end:
                stop, start = heapq.heappop(f.waiting)
                self._done(f, start, stop)

    def consumed(self, path: Path, start: int, n: int) -> None:
        """The encoders are done with bytes [start, start + n) of `path`."""
        f = self._state(path)
        with self._lock:
            f.consumed += n
            self._lock.notify_all()
            if f.hashed is not None and f.hashed < start + n:  # the hash has yet to read them
                heapq.heappush(f.waiting, (start + n, start))
            else:
                self._done(f, start, start + n)

    def finish(self) -> None:
        """The encoders are done: the hash runs on without waiting for them."""
        with self._lock:
            self._open = False
            self._lock.notify_all()

    def _done(self, f: "_ReadState", start: int, end: int) -> None:
        """[start, end) is read by all: merged with the adjacent ranges done before, and dropped with a margin into
        them. The kernel drops only whole folios (up to a few MB) inside a range, and one may straddle two blocks:
        the margin drops it once its second block is done. Called with the lock held."""
        lo = f.done_ends.pop(start, start)  # a done range ending where this one starts
        hi = f.done_starts.pop(end, end)  # one starting where this one ends
        f.done_starts.pop(lo, None)
        f.done_ends.pop(hi, None)
        f.done_starts[lo], f.done_ends[hi] = hi, lo
        if not hasattr(os, "posix_fadvise"):  # not on macOS / Windows
            return
        if f.fd is None and self._open_files:
            try:
                f.fd = os.open(f.path, os.O_RDONLY)
            except OSError:
                return
        if f.fd is None:
            return
        a, b = max(lo, start - FOLIO_MARGIN), min(hi, end + FOLIO_MARGIN)
        try:
            os.posix_fadvise(f.fd, a, b - a, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


FOLIO_MARGIN = 4 << 20  # larger than the page cache's largest folio (2 MB)


@dataclass
class _ReadState:
    path: str
    fd: int | None = None
    consumed: int = 0  # bytes the encoders are done with
    hashed: int | None = None  # where the hash is (None: the file is not hashed)
    waiting: list = field(default_factory=list)  # heap of (end, start): done by the encoders, not yet hashed
    done_starts: dict = field(default_factory=dict)  # ranges read by all, merged: start -> end
    done_ends: dict = field(default_factory=dict)  # and end -> start


class ReadAhead:
    """Ask the kernel to read the next tensors while this one is encoded (posix_fadvise WILLNEED).

    Reading a cold checkpoint is disk-bound; with the hint, disk reads overlap with the CPU work instead of
    alternating with it. It affects only the page cache, never this process's memory.
    """

    def __init__(self, tensors: list[SourceTensor], window: int = 512 << 20):
        self.ranges = []
        for t in tensors:
            s = t.stored
            share = (t.rows[1] - t.rows[0]) / s.shape[0] if t.rows else 1.0
            start = s.offset + (int(s.nbytes * t.rows[0] / s.shape[0]) if t.rows else 0)
            self.ranges.append((s.file, start, int(s.nbytes * share)))
        self.window, self.done, self.hinted, self.next = window, 0, 0, 0
        self.fds: dict[Path, int] = {}
        self._hint()

    def consumed(self, nbytes: int) -> None:
        self.done += nbytes
        self._hint()

    def _hint(self) -> None:
        while self.next < len(self.ranges) and self.hinted < self.done + self.window:
            path, start, length = self.ranges[self.next]
            will_need(path, start, length, self.fds)
            self.hinted += length
            self.next += 1

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def will_need(path: Path, start: int, length: int, fds: dict | None = None) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = fds.get(path) if fds is not None else None
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if fds is not None:
                fds[path] = fd
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
        if fds is None:
            os.close(fd)
    except OSError:
        pass
