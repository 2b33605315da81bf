"""The encoders' functions (see the package docstring): names checked against the registry, rows handed to the
compiled kernel the registry names."""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from .registry import REQUIRED, TYPES, GGMLType, encoded

QTYPES: tuple[str, ...] = encoded()
_NO_IMATRIX = np.zeros(0, np.float32)


@functools.cache
def _kernel(t: GGMLType) -> Callable[..., None]:
    module, function = t.encoder.rsplit(".", 1)
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)


def normalize_qtype(qtype: Any) -> str:
    """The canonical name ("Q4_K", "F16", ...) of a supported type: a case-insensitive name, a
    ``GGMLQuantizationType`` or its integer id. ``ValueError`` for anything else."""
    name: str | None = None
    if isinstance(qtype, GGMLQuantizationType):
        name = qtype.name
    elif isinstance(qtype, (int, np.integer)) and not isinstance(qtype, bool):
        try:
            name = GGMLQuantizationType(int(qtype)).name
        except ValueError:
            name = None
    elif isinstance(qtype, str):
        name = qtype.strip().upper()
    if name is None or name not in QTYPES:
        raise ValueError(f"unsupported ggml type {qtype!r}; supported: {', '.join(QTYPES)}")
    return name


def type_size(qtype: Any) -> tuple[int, int]:
    """``(block_size, bytes_per_block)``."""
    t = TYPES[normalize_qtype(qtype)]
    return t.block_size, t.type_size


def can_quantize(qtype: Any, row_length: int) -> bool:
    """True if rows of ``row_length`` values can be stored as ``qtype`` (a positive multiple of the block)."""
    bs, _ = type_size(qtype)
    row_length = int(row_length)
    return row_length > 0 and row_length % bs == 0


def has_imatrix_path(qtype: Any) -> bool:
    """True if ggml quantizes ``qtype`` differently when given an importance matrix."""
    return TYPES[normalize_qtype(qtype)].weighted


def needs_imatrix(qtype: Any) -> bool:
    """True if ``qtype`` is written only with an importance matrix (see ``registry.GGMLType.needs_imatrix``)."""
    return TYPES[normalize_qtype(qtype)].needs_imatrix


def encode(x: np.ndarray, qtype: Any, imatrix: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """ggml's bytes for the rows of ``x`` (float32, 2-D, C-contiguous): uint8 ``[rows, bytes_per_row]``.

    ``imatrix``: float32 ``[cols]``, one weight per column, shared by all rows (ggml's ``quant_weights``).
    ``out``: optional uint8 ``[rows, bytes_per_row]`` to fill (and return)."""
    t = TYPES[normalize_qtype(qtype)]
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
        raise ValueError("encode expects a C-contiguous float32 array [rows, cols]")
    rows, cols = x.shape
    if not can_quantize(t.name, cols):
        raise ValueError(f"{t.name}: row length {cols} is not a positive multiple of the block size {t.block_size}")
    nbytes = cols // t.block_size * t.type_size
    if out is None:
        out = np.empty((rows, nbytes), np.uint8)
    elif (not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != (rows, nbytes)
          or not out.flags.c_contiguous or not out.flags.writeable):
        raise ValueError(f"out must be a writable C-contiguous uint8 array of shape {(rows, nbytes)}")
    if imatrix is not None and t.weighted:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (cols,):
            raise ValueError(f"imatrix must have shape ({cols},), got {imatrix.shape}")
    else:
        imatrix = None
    if imatrix is None and t.imatrix == REQUIRED:
        raise ValueError(f"{t.name} needs an importance matrix (ggml asserts one)")
    if rows:
        if t.weighted:
            _kernel(t)(x, _NO_IMATRIX if imatrix is None else imatrix, imatrix is not None, out)
        else:
            _kernel(t)(x, out)
    return out


def decode(q: np.ndarray, qtype: Any) -> np.ndarray:
    """float32 ``[rows, cols]`` from ggml bytes ``[rows, bytes_per_row]`` (gguf-py's dequantize)."""
    t = TYPES[normalize_qtype(qtype)]
    q = np.ascontiguousarray(q, dtype=np.uint8)
    if q.ndim < 1 or q.shape[-1] % t.type_size != 0:
        raise ValueError(f"{t.name}: last dimension {q.shape[-1:]} is not a multiple of {t.type_size} bytes")
    return np.asarray(gguf.quants.dequantize(q, GGMLQuantizationType[t.name]), dtype=np.float32)


def _to_float32(x: Any) -> np.ndarray:
    if type(x).__module__.startswith("torch") and hasattr(x, "detach"):
        import torch

        x = x.detach().to(device="cpu", dtype=torch.float32).clone().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def quantize(x: Any, qtype: Any, imatrix: Any = None) -> np.ndarray:
    """Like ``encode`` for any array (numpy, torch, list) whose last dimension is the row: uint8 ``[..., bytes]``.
    Single-threaded."""
    name = normalize_qtype(qtype)
    arr = _to_float32(x)
    if arr.ndim < 1:
        raise ValueError("quantize expects an array with at least one dimension")
    cols = arr.shape[-1]
    if not can_quantize(name, cols):
        raise ValueError(f"{name}: row length {cols} is not a positive multiple of the block size {type_size(name)[0]}")
    q = encode(arr.reshape(-1, cols), name, None if imatrix is None else _to_float32(imatrix))
    return q.reshape(*arr.shape[:-1], q.shape[-1])


def dequantize(q: Any, qtype: Any) -> np.ndarray:
    """float32 ``[..., cols]`` from ggml bytes ``[..., bytes_per_row]``."""
    return decode(np.asarray(q, dtype=np.uint8), qtype)
