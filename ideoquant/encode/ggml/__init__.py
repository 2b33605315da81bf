"""Bit-exact ggml encoders, compiled with numba: every ggml type ideoquant writes, with and without an imatrix.

The types are the entries of ``registry.TYPES`` (one each: sizes, encoder, importance-matrix use, fallback, file
type, readers). ``encode`` writes, byte for byte, what ggml's ``ggml_quantize_chunk`` writes (strict float32, no
FMA): ``quantize_row_<t>_ref`` without an imatrix, the weighted ``_impl`` path with one (types marked ``ignored``
ignore it, as ggml does). Decoding is gguf-py's ``gguf.quants.dequantize``. tests/test_ggml_types.py checks every
file of tests/data/ggml.

Layout: ``registry`` (the type table, plain data), ``api`` (encode / decode / quantize and the name helpers),
``common`` (float32 helpers, nearest_int, fp16, the make_*_quants searches), ``legacy`` (Q4_0 .. Q8_0), ``kquants``
(Q2_K .. Q6_K), ``floats`` (F16, BF16), ``iq4`` (IQ4_NL, IQ4_XS), ``fp4`` (MXFP4, NVFP4), ``grids`` (the IQ
lattices: gguf-py's grids and the neighbour maps ggml derives from them), ``iquants`` (IQ3_S, IQ3_XXS, IQ2_S,
IQ2_XS, IQ2_XXS), ``iq1`` (IQ1_S, IQ1_M).

``encode`` is a pure function of its arguments: no threads, no I/O, no global state, and the kernels release the
GIL, so a caller may run it from several threads on disjoint row slices (rows are independent).

Importing this package loads only the registry; the functions (and numpy, numba) load on first use, so that the
command line can list the types without them.
"""

from __future__ import annotations

from typing import Any

from . import registry

__all__ = ["QTYPES", "can_quantize", "decode", "dequantize", "encode", "has_imatrix_path", "needs_imatrix",
           "normalize_qtype", "quantize", "registry", "type_size"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
