"""GGUF encoders as a public API (like gguf-py's `quants`), bit-exact with ggml's quantizers.

    q = ideoquant.gguf.quantize(x, "Q4_K")                  # uint8 [..., bytes_per_row]
    q = ideoquant.gguf.quantize(x, "Q4_K", imatrix=w)       # ggml's importance-weighted path
    x2 = ideoquant.gguf.dequantize(q, "Q4_K")               # float32 [..., cols]

Types: `QTYPES` (Q4_0 .. Q8_0, Q2_K .. Q6_K, IQ4_NL, IQ4_XS, MXFP4, NVFP4, the IQ3/IQ2/IQ1 family, F16, BF16; the
registry `ideoquant.encode.ggml.registry` says what each does with an imatrix). `imatrix` is one non-negative
float32 weight per column (ggml's `quant_weights`); Q8_0, MXFP4, NVFP4, F16 and BF16 ignore it, as ggml does, and
IQ2_XXS, IQ2_XS and IQ1_S cannot run without one. Rows are
independent, so they are split over `threads` workers (default: every CPU this process may use); the bytes do not
depend on the thread count. The encoders themselves are `ideoquant.encode.ggml` (pure functions).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .encode import ggml
from .encode.ggml import QTYPES, can_quantize, dequantize, has_imatrix_path, type_size  # noqa: F401  (public API)
from .write.gguf import read_metadata  # noqa: F401  (public API)
from .workers import Pool, thread_count

_TASK_ELEMENTS = 1 << 20  # rows handed to a worker at a time


def quantize(x: Any, qtype: Any, imatrix: Any = None, threads: int | None = None) -> np.ndarray:
    """Quantize the rows of `x` (float array or torch tensor `[..., cols]`) exactly as ggml's
    `ggml_quantize_chunk(type, x, ..., imatrix)` does."""
    if hasattr(x, "detach"):  # a torch tensor, any float dtype
        import torch

        x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim < 1:
        raise ValueError("quantize expects an array with at least one dimension")
    name = ggml.normalize_qtype(qtype)
    w = None if imatrix is None else np.ascontiguousarray(np.asarray(imatrix, dtype=np.float32))
    rows = arr.reshape(-1, arr.shape[-1])
    block, size = type_size(name)
    if rows.shape[1] % block:
        raise ValueError(f"{name}: row length {rows.shape[1]} is not a multiple of the block size {block}")
    out = np.empty((rows.shape[0], rows.shape[1] // block * size), np.uint8)
    step = max(1, _TASK_ELEMENTS // max(1, rows.shape[1]))
    chunks = [(a, min(a + step, rows.shape[0])) for a in range(0, rows.shape[0], step)]
    with Pool(max(1, min(len(chunks), thread_count(threads)))) as pool:
        pool.map(lambda r: ggml.encode(rows[r[0]:r[1]], name, w, out=out[r[0]:r[1]]), chunks)
    return out.reshape(*arr.shape[:-1], out.shape[-1])
