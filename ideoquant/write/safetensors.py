"""A streaming writer for (sharded) safetensors files.

safetensors itself only writes a whole in-memory dict; a backbone does not fit the memory budget. But
the header can be planned from shapes alone, so each shard is laid out up front (same order as
safetensors: larger dtypes first, then by name, which keeps every tensor aligned) and tensors are
written into their slots as they are produced. safe_open reads the result like any other file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import IdeoquantError
from .positional import PositionalFile

# torch dtype -> the name safetensors headers use for it
DTYPE_NAMES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8", torch.uint8: "U8",
    torch.float8_e4m3fn: "F8_E4M3",
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
    """One safetensors file whose header is fixed at creation; `write` fills slots in any order, from any thread.

    Slots are laid out in the order given (the order the job produces them), so the file fills front to back and its
    sha256 is computed while it is written (`PositionalFile`). If that order would misalign a tensor, the layout
    falls back to safetensors' own order (larger dtypes first, then by name), which is always aligned, and the hash
    then catches up at close.
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
        self._file = PositionalFile(self.path, self.size, self.data_start, len(raw).to_bytes(8, "little") + raw)
        self.sha256: str | None = None  # set by close

    def write(self, key: str, tensor: torch.Tensor, row_offset_bytes: int = 0) -> None:
        """Write a tensor (or a block of its leading rows, at `row_offset_bytes` into the slot)."""
        start, length = self.offsets[key]
        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        if row_offset_bytes + data.nbytes > length:
            raise ValueError(f"{key}: write past the end of its slot")
        self._file.write_at(self.data_start + start + row_offset_bytes, data)

    def abort(self) -> None:
        """Close without the completeness check (the staging folder is about to be removed)."""
        self._file.abort()

    def close(self) -> None:
        self.sha256 = self._file.close(self.size - self.data_start)


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
