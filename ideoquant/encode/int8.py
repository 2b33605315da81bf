"""INT8 W8A8 weights exactly as torchao 0.18 makes them, streamed in row chunks.

The math is torchao's own (`Int8DynamicActivationInt8WeightConfig()` applied to one weight): per output
row, scale = absmax / 127.5 computed in the weight's dtype, q = round_half_even(w / scale) clamped to
[-128, 127], zero point 0. Rows are independent, so quantizing a block of rows at a time gives the same
bits as the whole tensor and bounds memory by the chunk. Activations are quantized per token at run
time by torchao, not here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

@lru_cache(maxsize=1)
def config():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _quantize(weight: torch.Tensor):
    """One weight (or a block of its rows) -> torchao Int8Tensor, through the config's own code path."""
    from torchao.quantization.quant_api import _int8_dynamic_activation_int8_weight_quantize_tensor

    return _int8_dynamic_activation_int8_weight_quantize_tensor(weight, config())


@dataclass(frozen=True)
class Int8Layout:
    """What torchao's safetensors format stores for one quantized weight, known before any data exists."""

    keys: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # flattened key -> (dtype, shape)
    metadata: str  # the per-tensor JSON that `flatten_tensor_state_dict` writes

    def key(self, part: str) -> str:
        return next(k for k in self.keys if k.endswith(f"._weight_{part}"))


def layout(name: str, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> Int8Layout:
    """Keys, dtypes, shapes and metadata for `name`, from a meta-device Int8Tensor and torchao's flattener."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    meta = _quantize(torch.empty(shape, dtype=dtype, device="meta"))
    tensors, metadata = flatten_tensor_state_dict({name: meta})
    return Int8Layout({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, metadata[name])


def plain_metadata() -> str:
    """torchao's metadata entry for a tensor stored as is."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    return flatten_tensor_state_dict({"t": torch.empty(1, device="meta")})[1]["t"]


EPS = torch.finfo(torch.float32).eps  # torchao clamps int8 scales at float32 eps for every input dtype


def quantize(block: torch.Tensor, device: str = "cpu"):
    """Rows of a weight -> (qdata int8 [r, K], scale float32 [r, 1], zero_point int8 [r, 1], signal, noise).

    The same torch ops, in the same dtypes, as torchao 0.18's `choose_qparams_affine` + `quantize_affine` for
    `Int8DynamicActivationInt8WeightConfig()` (absmax in the weight's dtype, / 127.5 rounded to that dtype, clamp
    at float32 eps, q = round_half_even(w * (1/scale)) clamped to [-128, 127]); the tests check the bits against
    torchao's own function. Written out so that the float32 intermediate `y = w / scale` is made once and also
    gives the quantization error: signal = sum(w^2) = sum(s^2 y^2), noise = sum(s^2 (y - q)^2), no dequantize pass.
    A NaN or Inf anywhere in a row makes that row's scale non-finite, which the caller checks.
    """
    w = block.to(device)
    # torchao: max(-min(amin, 0), max(amax, 0)), which is the row's max |w|; abs().amax() is several times faster
    # than aminmax on CPU and equal bit for bit (a NaN still propagates into the scale).
    absmax = w.abs().amax(dim=1, keepdim=True)
    scale = (absmax / 127.5).clamp_(min=EPS).to(torch.float32)
    y = w * (1.0 / scale)
    q = torch.round(y).clamp_(-128, 127)
    qdata = q.to(torch.int8)
    s2 = scale.squeeze(1).double().square()
    signal = float((torch.linalg.vector_norm(y, dim=1).double().square() * s2).sum())
    noise = float((torch.linalg.vector_norm(y.sub_(q), dim=1).double().square() * s2).sum())
    return qdata.cpu(), scale.cpu(), torch.zeros_like(qdata[:, :1]).cpu(), signal, noise


def reference_quantize(block: torch.Tensor):
    """torchao's own path, for tests: (qdata, scale, zero_point)."""
    q = _quantize(block)
    return q.qdata, q.scale, q.zero_point


def dequantize(qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return qdata.to(torch.float32) * scale


def quantization_config(protected: list[str]) -> dict:
    """The `quantization_config` block of config.json, as diffusers' TorchAoConfig writes it."""
    from diffusers import TorchAoConfig

    d = TorchAoConfig(config(), modules_to_not_convert=list(protected)).to_dict()
    return json.loads(json.dumps(d, default=str))  # QuantizationMethod is a str enum
