"""INT8 W8A8 weights exactly as torchao 0.18 makes them, streamed in row chunks.

The math is torchao's own (`Int8DynamicActivationInt8WeightConfig()` applied to one weight): per output
row, scale = absmax / 127.5 computed in the weight's dtype, q = round_half_even(w / scale) clamped to
[-128, 127], zero point 0. Rows are independent, so quantizing a block of rows at a time gives the same
bits as the whole tensor and bounds memory by the chunk. Activations are quantized per token at run
time by torchao, not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
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

    tensors, metadata = flatten_tensor_state_dict({name: _meta_int8(tuple(shape), dtype)})
    return Int8Layout({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, metadata[name])


@lru_cache(maxsize=64)
def _meta_int8(shape: tuple[int, int], dtype: torch.dtype):
    """The meta-device Int8Tensor torchao makes for a weight of this shape (4 ms each: a backbone has ~270 weights
    in ~6 shapes). Shared, so never modified."""
    return _quantize(torch.empty(shape, dtype=dtype, device="meta"))


def plain_metadata() -> str:
    """torchao's metadata entry for a tensor stored as is."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    return flatten_tensor_state_dict({"t": torch.empty(1, device="meta")})[1]["t"]


EPS = torch.finfo(torch.float32).eps  # torchao clamps int8 scales at float32 eps for every input dtype


class Workspace:
    """Reusable buffers for one encoding thread.

    A fresh multi-MB tensor per block costs page faults on first touch (measured: the encode ran 2x slower with
    fresh temporaries than with reused ones), so each thread keeps its buffers and ops write into them (`out=`).
    What `quantize` returns lives in these buffers: consume it before the thread's next call.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() * buf.element_size() < n * dtype.itemsize:
            buf = self._buffers[name] = torch.empty(n * dtype.itemsize, dtype=torch.uint8)
        return buf[: n * dtype.itemsize].view(dtype).view(shape)



def quantize(block: torch.Tensor, device: str = "cpu", ws: Workspace | None = None):
    """Rows of a weight -> (qdata int8 [r, K], scale float32 [r, 1], zero_point int8 [r, 1], signal, noise).

    Bit for bit what torchao 0.18's `choose_qparams_affine` + `quantize_affine` give for
    `Int8DynamicActivationInt8WeightConfig()` (the tests check against torchao's own function): per row,
    scale = max|w| / 127.5 computed in the weight's dtype and clamped at float32 eps, then
    q = round_half_even(w * (1/scale)) clamped to [-128, 127] in float32. signal and noise are sum(w^2) and
    sum((w - dequantized)^2) over the block. A NaN or Inf in a row makes that row's scale, and the signal,
    non-finite, which the caller checks. On CPU the compiled loops of `kernels` do it, one pass per row, and the
    returned qdata lives in `ws` (default: this thread's): consume it before the thread's next call.
    """
    if torch.device(device).type != "cpu":
        return _quantize_torch(block.to(device))
    from . import kernels

    ws = ws or Workspace()
    rows, k = block.shape
    qdata, scale, energy = _outputs(ws, rows, k)
    if block.dtype == torch.bfloat16:
        kernels.quantize_bf16(numpy_bits(block, torch.int16).view(np.uint16), qdata.numpy(), scale.numpy(), energy)
    else:
        x = block
        if block.dtype != torch.float32:
            x = ws.take("wide", (rows, k), torch.float32).copy_(block)
        rounding = {torch.float32: kernels.ROUND_NONE, torch.float16: kernels.ROUND_F16}[block.dtype]
        kernels.quantize_f32(numpy_bits(x, torch.float32), rounding, qdata.numpy(), scale.numpy(), energy)
    return _finish(qdata, scale, energy)


def quantize_fp8(codes: torch.Tensor, row_scale: torch.Tensor, ws: Workspace | None = None):
    """FP8 e4m3fn rows (codes [r, K] as stored, float32 per-row scale [r]) -> as `quantize`, of the weight that
    diffusers' fp8r dequantization gives (`weight.float() * weight_scale[:, None]`), without materializing it."""
    from . import kernels

    ws = ws or Workspace()
    rows, k = codes.shape
    qdata, scale, energy = _outputs(ws, rows, k)
    kernels.quantize_fp8(numpy_bits(codes, torch.uint8), numpy_bits(row_scale.to(torch.float32), torch.float32),
                         qdata.numpy(), scale.numpy(), energy)
    return _finish(qdata, scale, energy)


def numpy_bits(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A C-contiguous numpy view of `t`'s bits as `dtype` (a copy only if `t` is not contiguous)."""
    return t.contiguous().view(dtype).numpy()


def _outputs(ws: Workspace, rows: int, k: int):
    return ws.take("qdata", (rows, k), torch.int8), torch.empty(rows, dtype=torch.float32), np.empty((2, rows))


def _finish(qdata, scale, energy):
    signal, noise = energy.sum(axis=1).tolist()
    return qdata, scale.view(-1, 1), torch.zeros((qdata.shape[0], 1), dtype=torch.int8), signal, noise


def _quantize_torch(w: torch.Tensor):
    """The same math as torch ops, for `--device cuda` (and as a second implementation the tests compare)."""
    rows, k = w.shape
    y = torch.empty((rows, k), dtype=torch.float32, device=w.device).copy_(w)
    absmax = torch.maximum(y.amax(dim=1, keepdim=True), y.amin(dim=1, keepdim=True).neg_()).to(w.dtype)
    scale = (absmax / 127.5).clamp_(min=EPS).to(torch.float32)
    y.mul_(1.0 / scale)
    q = torch.round(y).clamp_(-128, 127)
    qdata = q.to(torch.int8)
    norms = torch.stack((torch.linalg.vector_norm(y, dim=1), torch.linalg.vector_norm(y.sub_(q), dim=1)))
    signal, noise = norms.double().square_().mul_(scale.double().square_().view(1, -1)).sum(dim=1).tolist()
    return qdata.cpu(), scale.cpu(), torch.zeros((rows, 1), dtype=torch.int8), signal, noise


def reference_quantize(block: torch.Tensor):
    """torchao's own path, for tests: (qdata, scale, zero_point)."""
    q = _quantize(block)
    return q.qdata, q.scale, q.zero_point


def dequantize(qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return qdata.to(torch.float32) * scale


def quantization_config(protected: list[str]) -> dict:
    """The `quantization_config` block of config.json, as diffusers' `TorchAoConfig(...).to_dict()` writes it.

    Built from torchao's own `config_to_dict` rather than through diffusers, whose import costs seconds on the
    convert path; tests/test_int8.py checks it equals diffusers' output.
    """
    from torchao.core.config import config_to_dict

    return {"quant_method": "torchao", "quant_type": {"default": config_to_dict(config())},
            "modules_to_not_convert": list(protected)}
