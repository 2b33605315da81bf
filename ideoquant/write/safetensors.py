"""A streaming writer for (sharded) safetensors files.

safetensors itself only writes a whole in-memory dict; a backbone does not fit the memory budget. But
the header can be planned from shapes alone, so each shard is laid out up front (same order as
safetensors: larger dtypes first, then by name, which keeps every tensor aligned) and tensors are
written into their slots as they are produced. safe_open reads the result like any other file.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

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
        os.pwrite(self._fd, len(raw).to_bytes(8, "little") + raw, 0)
        os.ftruncate(self._fd, self.size)
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
        view, done = memoryview(data), 0
        while done < data.nbytes:
            done += os.pwrite(self._fd, view[done:], begin + done)
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


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '2MiB' or a number of bytes (decimal units as diffusers' max_shard_size uses them)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)
