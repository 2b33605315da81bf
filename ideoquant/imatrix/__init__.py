"""Importance-matrix (imatrix) files: llama.cpp's GGUF and legacy `.dat` layouts, stable-diffusion.cpp's `.dat`.

An importance matrix holds, per weight, the per-input-column sum of squared activations. ggml's weighted
quantizers take one float32 vector per weight (`ggml_quantize_chunk`'s last argument); llama-quantize and
stable-diffusion.cpp derive that vector differently from the same file, so `weights(..., convention)` reproduces
either tool. The facts used here are in `shared/notes/imatrix.md`.

- `matrix`: the matrix in memory (`ImportanceMatrix`, `Entry`) and the `Accumulator` that collects one.
- `gguf_file`: llama.cpp's GGUF layout (written with gguf-py; read by hand, see there why).
- `dat`: the legacy `.dat` layout (read and written by hand: no library does it).
- `use`: the vector each tool passes to ggml for a tensor, under any key form either tool writes.

Every problem with a file is an `IdeoquantError` naming the file. Nothing here unpickles anything.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import IdeoquantError
from .dat import read_dat, write_dat
from .gguf_file import GGUF_MAGIC, read_gguf, write_gguf
from .matrix import Accumulator, Entry, ImportanceMatrix
from .use import (CONVENTIONS, SDCPP_PREFIX, SDCPP_UNCOND_PREFIX, UNCOND_PREFIX, candidate_keys, canonical, lookup,
                  ones, weights)

__all__ = ["CONVENTIONS", "SDCPP_PREFIX", "SDCPP_UNCOND_PREFIX", "UNCOND_PREFIX", "Accumulator", "Entry",
           "ImportanceMatrix", "candidate_keys", "canonical", "lookup", "ones", "read", "weights", "write_dat",
           "write_gguf"]


def read(path: str | Path) -> ImportanceMatrix:
    """Read a GGUF imatrix (llama.cpp) or a legacy `.dat` (llama.cpp or stable-diffusion.cpp); the format is detected
    from the first bytes."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IdeoquantError(f"cannot read imatrix file {path}: {e.strerror or e}") from None
    if data[:4] == GGUF_MAGIC:
        return read_gguf(path, memoryview(data))
    return read_dat(path, memoryview(data))
