"""The type registry, in the style of gguf-py's ``quants.py``: one small class per type, registered by name."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import floats, iquants, kquants, legacy

_NO_IMATRIX = np.zeros(0, np.float32)

TYPES: dict[str, type[GGMLType]] = {}


class GGMLType:
    """One ggml type: ``encode_rows(x, imatrix, out)`` fills ``out`` with the bytes ggml writes for ``x``."""

    qtype: ClassVar[GGMLQuantizationType]
    name: ClassVar[str]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    uses_imatrix: ClassVar[bool] = False  # does ggml have a weighted (`_impl`) path for this type
    requires_imatrix: ClassVar[bool] = False  # does ggml assert one (ggml_quantize_requires_imatrix)
    kernel: ClassVar[Callable[..., None]]

    def __init_subclass__(cls, qtype: GGMLQuantizationType, **kw: Any):
        super().__init_subclass__(**kw)
        cls.qtype = qtype
        cls.name = qtype.name
        cls.block_size, cls.type_size = (int(v) for v in GGML_QUANT_SIZES[qtype])
        TYPES[cls.name] = cls

    @classmethod
    def encode_rows(cls, x: np.ndarray, imatrix: np.ndarray | None, out: np.ndarray) -> None:
        if cls.uses_imatrix:
            w = _NO_IMATRIX if imatrix is None else imatrix
            cls.kernel(x, w, imatrix is not None, out)
        else:
            cls.kernel(x, out)

    @classmethod
    def decode_rows(cls, q: np.ndarray) -> np.ndarray:
        return np.asarray(gguf.quants.dequantize(q, cls.qtype), dtype=np.float32)


class _Weighted(GGMLType, qtype=GGMLQuantizationType.Q4_0):  # base only; re-registered below
    uses_imatrix = True


class Q4_0(_Weighted, qtype=GGMLQuantizationType.Q4_0):
    kernel = legacy.encode_q4_0


class Q4_1(_Weighted, qtype=GGMLQuantizationType.Q4_1):
    kernel = legacy.encode_q4_1


class Q5_0(_Weighted, qtype=GGMLQuantizationType.Q5_0):
    kernel = legacy.encode_q5_0


class Q5_1(_Weighted, qtype=GGMLQuantizationType.Q5_1):
    kernel = legacy.encode_q5_1


class Q8_0(GGMLType, qtype=GGMLQuantizationType.Q8_0):
    kernel = legacy.encode_q8_0


class Q2_K(_Weighted, qtype=GGMLQuantizationType.Q2_K):
    kernel = kquants.encode_q2_k


class Q3_K(_Weighted, qtype=GGMLQuantizationType.Q3_K):
    kernel = kquants.encode_q3_k


class Q4_K(_Weighted, qtype=GGMLQuantizationType.Q4_K):
    kernel = kquants.encode_q4_k


class Q5_K(_Weighted, qtype=GGMLQuantizationType.Q5_K):
    kernel = kquants.encode_q5_k


class Q6_K(_Weighted, qtype=GGMLQuantizationType.Q6_K):
    kernel = kquants.encode_q6_k


class F16(GGMLType, qtype=GGMLQuantizationType.F16):
    kernel = floats.encode_f16


class BF16(GGMLType, qtype=GGMLQuantizationType.BF16):
    kernel = floats.encode_bf16


class IQ2_XXS(_Weighted, qtype=GGMLQuantizationType.IQ2_XXS):
    requires_imatrix = True
    kernel = iquants.encode_iq2_xxs


class IQ2_XS(_Weighted, qtype=GGMLQuantizationType.IQ2_XS):
    requires_imatrix = True
    kernel = iquants.encode_iq2_xs


class IQ2_S(_Weighted, qtype=GGMLQuantizationType.IQ2_S):
    kernel = iquants.encode_iq2_s


class IQ3_XXS(_Weighted, qtype=GGMLQuantizationType.IQ3_XXS):
    kernel = iquants.encode_iq3_xxs


class IQ3_S(_Weighted, qtype=GGMLQuantizationType.IQ3_S):
    kernel = iquants.encode_iq3_s
