"""GGUF encoders as a public API (like gguf-py's `quants`), bit-exact with ggml's quantizers.

    q = ideoquant.gguf.quantize(x, "Q4_K")          # uint8 [..., bytes_per_row]
    x2 = ideoquant.gguf.dequantize(q, "Q4_K")       # float32 [..., cols]

Rows are independent, so they are split over `threads` workers (default: every CPU this process may use); the
bytes do not depend on the thread count. The encoders themselves are `ideoquant.encode.ggml` (pure functions).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .encode import ggml
from .encode.ggml import QTYPES, can_quantize, dequantize, type_size  # noqa: F401  (public API)
from .formats.gguf import read_metadata  # noqa: F401  (public API)
from .workers import Pool, thread_count

_ROWS_PER_TASK_ELEMENTS = 1 << 20  # rows handed to a worker at a time


def quantize(x: Any, qtype: Any, threads: int | None = None) -> np.ndarray:
    """Quantize the rows of `x` (float array or torch tensor `[..., cols]`) exactly as ggml does."""
    if hasattr(x, "detach"):  # a torch tensor, any float dtype
        import torch

        x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim < 1:
        raise ValueError("quantize expects an array with at least one dimension")
    rows = arr.reshape(-1, arr.shape[-1])
    step = max(1, _ROWS_PER_TASK_ELEMENTS // max(1, rows.shape[1]))
    chunks = [(a, min(a + step, rows.shape[0])) for a in range(0, rows.shape[0], step)]
    with Pool(max(1, min(len(chunks), thread_count(threads)))) as pool:
        parts = pool.map(lambda r: ggml.quantize(rows[r[0]:r[1]], qtype, threads=1), chunks)
    if not parts:
        return ggml.quantize(arr, qtype, threads=1)
    return np.concatenate(parts).reshape(*arr.shape[:-1], -1)
