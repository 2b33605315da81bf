"""FP8 W8A8 weights exactly as torchao 0.18 makes them: `Float8Tensor`, per-row e4m3 with float32 row scales.

The config is `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`: each weight row gets
scale = absmax / 448 (computed in the weight's dtype, stored float32 [N, 1]) and q = e4m3(w / scale); activations
are quantized per row (token) to e4m3 at run time by torchao, not here.

torchao's `quantize_` refuses to run this config without an FP8-capable device (compute capability 8.9+), although
the weight math is plain torch. `quantize` therefore calls `Float8Tensor.from_hp` itself with exactly the
arguments the config's own `_float8_dynamic_activation_float8_weight_quantize_tensor` passes (tests/test_fp8.py
checks the result against `quantize_` with the device check lifted). Rows are independent, so a block of rows gives
the same bits as the whole tensor.

The FP8 release's own weights (e4m3 codes with a float32 scale per row) are already this representation: they are
carried over unchanged, never re-quantized (`formats/fp8.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

# e4m3fn's NaN codes (S.1111.111); it has no infinities.
_NAN_BITS = 0x7F


@lru_cache(maxsize=1)
def config():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def fp8_mm_compatible(shape: tuple[int, ...]) -> bool:
    """torchao quantizes a weight only when both dimensions are multiples of 16 (`_scaled_mm`'s requirement);
    others it leaves in high precision (`torchao.quantization.utils._fp8_mm_compat`)."""
    from torchao.quantization.utils import _fp8_mm_compat

    return _fp8_mm_compat(torch.empty(shape, device="meta"))


def quantize(weight: torch.Tensor):
    """One bf16 weight (or a block of its rows) -> torchao Float8Tensor, with the config's own arguments."""
    from torchao.quantization import Float8Tensor
    from torchao.quantization.quantize_.common import KernelPreference
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import QuantizeTensorToFloat8Kwargs

    c = config()
    act, wgt = c.granularity
    act_kwargs = QuantizeTensorToFloat8Kwargs(c.activation_dtype, act, hp_value_lb=c.activation_value_lb,
                                              hp_value_ub=c.activation_value_ub, kernel_preference=c.kernel_preference)
    # The config says AUTO, which picks torch's quantize kernel on a CPU tensor unless the machine has a Hopper GPU
    # and mslk; TORCH names that kernel so every machine makes the same bits. The tensor records the config's choice.
    t = Float8Tensor.from_hp(weight, float8_dtype=c.weight_dtype, granularity=wgt, mm_config=c.mm_config,
                             kernel_preference=KernelPreference.TORCH, act_quant_kwargs=act_kwargs)
    t.kernel_preference = c.kernel_preference  # what the config records (AUTO), as quantize_ leaves it
    return t


@dataclass(frozen=True)
class TensorLayout:
    """What torchao's safetensors format stores for one quantized weight, known before any data exists."""

    keys: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # flattened key -> (dtype, shape)
    metadata: str  # the per-tensor JSON that `flatten_tensor_state_dict` writes


def layout(name: str, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> TensorLayout:
    """Keys, dtypes, shapes and metadata for `name`, from a meta-device Float8Tensor and torchao's flattener."""
    return flattened_layout(name, _meta(tuple(shape), dtype))


def flattened_layout(name: str, tensor: torch.Tensor) -> TensorLayout:
    """What torchao's safetensors flattener stores for one quantized tensor (a meta-device one: no data needed)."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict({name: tensor})
    return TensorLayout({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, metadata[name])


@lru_cache(maxsize=64)
def _meta(shape: tuple[int, int], dtype: torch.dtype):
    return quantize(torch.empty(shape, dtype=dtype, device="meta"))


def quantization_config(protected: list[str]) -> dict:
    """The `quantization_config` block of config.json, as diffusers' `TorchAoConfig(config()).to_dict()` writes it
    (tests/test_fp8.py checks it against diffusers)."""
    from torchao.core.config import config_to_dict

    return {"quant_method": "torchao", "quant_type": {"default": config_to_dict(config())},
            "modules_to_not_convert": list(protected)}


def has_nan(codes: torch.Tensor) -> bool:
    """Whether any e4m3fn code is NaN (a damaged source)."""
    bits = codes.contiguous().view(torch.uint8)
    return bool(((bits & _NAN_BITS) == _NAN_BITS).any())


def dequantize(qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 weight = e4m3 codes * row scale (what torchao's `dequantize` computes, in float32)."""
    from .fp8 import dequantize_fp8r

    return dequantize_fp8r(qdata, scale.reshape(-1))
