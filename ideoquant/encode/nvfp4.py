"""NVFP4 W4A4 weights exactly as torchao 0.18 makes them: `NVFP4Tensor` (e2m1 values two per byte, an e4m3 scale
per 16 values in the swizzled layout Blackwell's FP4 GEMM reads, and a float32 scale per tensor).

The config is `NVFP4DynamicActivationNVFP4WeightConfig()`: torchao's `quantize_` asserts a Blackwell GPU (sm100)
before it quantizes, although the weight math is plain torch (its non-Triton `nvfp4_quantize`). `quantize` therefore
makes the tensor with exactly the arguments of the config's own dynamic path (tests/test_nvfp4.py checks the result
against `quantize_` with that assertion lifted). The per-tensor scale needs the whole weight's absmax, so a weight is
quantized whole, not in row blocks.
"""

from __future__ import annotations

from functools import lru_cache

import torch

BLOCK = 16  # values per e4m3 block scale


@lru_cache(maxsize=1)
def config():
    from torchao.prototype.mx_formats.inference_workflow import NVFP4DynamicActivationNVFP4WeightConfig

    return NVFP4DynamicActivationNVFP4WeightConfig()


def compatible(shape: tuple[int, ...]) -> bool:
    """torchao refuses a weight whose dimensions are not multiples of 16."""
    return len(shape) == 2 and shape[0] % BLOCK == 0 and shape[1] % BLOCK == 0


def quantize(weight: torch.Tensor):
    """A whole bf16 weight -> torchao NVFP4Tensor, with the arguments of the config's dynamic path."""
    from torchao.prototype.mx_formats.nvfp4_tensor import (NVFP4Tensor, QuantizeTensorToNVFP4Kwargs,
                                                           per_tensor_amax_to_scale)

    c = config()
    per_tensor_scale = per_tensor_amax_to_scale(torch.max(torch.abs(weight))) if c.use_dynamic_per_tensor_scale \
        else None
    act = QuantizeTensorToNVFP4Kwargs(use_dynamic_per_tensor_scale=c.use_dynamic_per_tensor_scale,
                                      use_triton_kernel=c.use_triton_kernel, is_swizzled_scales=True)
    t = NVFP4Tensor.to_nvfp4(weight, per_tensor_scale=per_tensor_scale, is_swizzled_scales=True,
                             use_triton_kernel=False, act_quant_kwargs=act)
    t.use_triton_kernel = c.use_triton_kernel  # as the config's own transform sets it after quantizing
    return t


def layout(name: str, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16):
    """Keys, dtypes, shapes and metadata for `name`, from a meta-device NVFP4Tensor and torchao's flattener."""
    from .float8 import flattened_layout

    return flattened_layout(name, _meta(tuple(shape), dtype))


@lru_cache(maxsize=64)
def _meta(shape: tuple[int, int], dtype: torch.dtype):
    return quantize(torch.empty(shape, dtype=dtype, device="meta"))


def quantization_config(protected: list[str]) -> dict:
    from torchao.core.config import config_to_dict

    return {"quant_method": "torchao", "quant_type": {"default": config_to_dict(config())},
            "modules_to_not_convert": list(protected)}


def stored_bytes(shape: tuple[int, int]) -> int:
    """Bytes of one weight: half a byte per value, the swizzled e4m3 scales (rows padded to 128, scale columns to
    4), the float32 per-tensor scale."""
    rows, cols = shape
    return rows * cols // 2 + -(-rows // 128) * 128 * (-(-(cols // BLOCK) // 4) * 4) + 4
