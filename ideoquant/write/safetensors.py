"""A streaming writer for (sharded) safetensors files.

safetensors itself only writes a whole in-memory dict; a backbone does not fit the memory budget. But
the header can be planned from shapes alone, so each shard is laid out up front (same order as
safetensors: larger dtypes first, then by name, which keeps every tensor aligned) and tensors are
written into their slots as they are produced. safe_open reads the result like any other file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import IdeoquantError
from .hashing import sha256_mapped

# torch dtype -> the name safetensors headers use for it
DTYPE_NAMES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8", torch.uint8: "U8",
}


@dataclass(frozen=True)
class Slot:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


class ShardWriter:
    """One safetensors file whose header is fixed at creation; `write` fills slots in any order.

    Slots are laid out in the order given (the order the job produces them), so the file fills front to back
    and its sha256 is computed while it is written: a background thread hashes the completed prefix in place in
    the page cache (a memory map), instead of a pass over the whole file after close. If that order would misalign a
    tensor, the layout falls back to safetensors' own order (larger dtypes first, then by name), which is always
    aligned, and the hash then catches up at close.
    """

    def __init__(self, path: Path, slots: dict[str, Slot], metadata: dict[str, str]):
        self.path = Path(path)
        order = list(slots)
        if not _aligned(order, slots):
            order = sorted(slots, key=lambda k: (-slots[k].dtype.itemsize, k))
        header: dict = {"__metadata__": metadata}
        offset = 0
        self.offsets: dict[str, tuple[int, int]] = {}
        for k in order:
            s = slots[k]
            header[k] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
            self.offsets[k] = (offset, s.nbytes)
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes so the data region is aligned
        self.data_start = 8 + len(raw)
        self.size = self.data_start + offset
        self._written = 0
        self._lock = threading.Condition()  # encoder threads write their blocks concurrently (pwrite is positional)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(self._fd, len(raw).to_bytes(8, "little") + raw, 0, self.path)
            os.ftruncate(self._fd, self.size)
            _allocate(self._fd, self.size, self.path)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        self._ends: dict[int, int] = {}  # completed byte ranges past the frontier: start -> end
        self._frontier = self.data_start  # every byte before it is written
        self._closing = False
        self.sha256: str | None = None  # set once the whole file is written and hashed
        self._hash_error: Exception | None = None
        self._hasher = threading.Thread(target=self._hash, name="ideoquant-shard-hash", daemon=True)
        self._hasher.start()

    def write(self, key: str, tensor: torch.Tensor, row_offset_bytes: int = 0) -> None:
        """Write a tensor (or a block of its leading rows, at `row_offset_bytes` into the slot)."""
        start, length = self.offsets[key]
        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        if row_offset_bytes + data.nbytes > length:
            raise ValueError(f"{key}: write past the end of its slot")
        begin = self.data_start + start + row_offset_bytes
        _pwrite_all(self._fd, data, begin, self.path)
        with self._lock:
            self._written += data.nbytes
            if data.nbytes:
                self._ends[begin] = begin + data.nbytes
                advanced = False
                while self._frontier in self._ends:
                    self._frontier = self._ends.pop(self._frontier)
                    advanced = True
                if advanced:
                    self._lock.notify()

    def _hash(self) -> None:
        """Hash the file front to back as the written prefix grows (see `sha256_mapped`)."""
        try:
            self.sha256 = sha256_mapped(self._fd, self.size, self._wait_written)
        except _Aborted:
            pass
        except Exception as e:  # noqa: BLE001  (reported by close)
            self._hash_error = e

    def _wait_written(self, pos: int) -> int:
        with self._lock:
            while self._frontier <= pos and not self._closing:
                self._lock.wait()
            if self._frontier <= pos:
                raise _Aborted
            return self._frontier

    def _stop_hasher(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._hasher.join()

    def abort(self) -> None:
        """Close without the completeness check (the staging folder is about to be removed)."""
        if self._fd is not None:
            self._stop_hasher()
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        if self._fd is not None:
            self._stop_hasher()
            os.close(self._fd)
            self._fd = None
            if self._written != self.size - self.data_start:
                raise RuntimeError(f"{self.path.name}: wrote {self._written} of {self.size - self.data_start} bytes")
            if self.sha256 is None:
                raise RuntimeError(f"{self.path.name}: could not hash the file: {self._hash_error}")


def _pwrite_all(fd: int, data, offset: int, path: Path) -> None:
    """Every byte of `data` at `offset` (pwrite: positional, so encoder threads write concurrently). A full disk
    is an OSError naming the file, never a signal (nothing is written through a memory map)."""
    view, done = memoryview(data).cast("B"), 0
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def _allocate(fd: int, size: int, path: Path) -> None:
    """Reserve the file's blocks up front, so a full disk fails here, before any encoding, and never halfway.
    Filesystems without fallocate (some network and FUSE filesystems) are written as is: pwrite reports a full
    disk as an error too."""
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
            return
        raise OSError(e.errno, e.strerror, str(path)) from None


class _Aborted(Exception):
    """The writer closed before the file was complete: stop hashing."""


def _aligned(order: list[str], slots: dict[str, Slot]) -> bool:
    offset = 0
    for k in order:
        if offset % slots[k].dtype.itemsize:
            return False
        offset += slots[k].nbytes
    return True


def shard_groups(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow the current one."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if groups[-1] and used + n > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += n
    return groups


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(KIB|MIB|GIB|TIB|KB|MB|GB|TB|K|M|G|T|B)?")
_UNITS = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "B": 1, None: 1}
MIN_SHARD_BYTES = 1 << 10  # smaller shards are a typo, not a choice
MAX_SHARD_BYTES = 1 << 50


def parse_size(size: str | int, option: str = "--max-shard-size") -> int:
    """'5GB', '500MB', '2MiB' or a number of bytes (decimal units as diffusers' max_shard_size uses them), between
    1 KiB and 1 PiB. Anything else is an IdeoquantError naming the option."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise IdeoquantError(f"{option}: expected a size such as 5GB or 500MB, not {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = _SIZE.fullmatch(size.strip().upper())
        if not m:
            raise IdeoquantError(f"{option} '{size}': expected a size such as 5GB, 500MB or 2GiB")
        n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if not MIN_SHARD_BYTES <= n <= MAX_SHARD_BYTES:
        raise IdeoquantError(f"{option} {size}: must be between 1KiB and 1PiB")
    return n
