"""NVFP4 W4A4 in torchao's safetensors format, for Blackwell GPUs (RTX 50 series, B200): stock diffusers loads it
with `from_pretrained`.

Plan: every linear weight the recipe quantizes becomes a torchao `NVFP4Tensor`
(`NVFP4DynamicActivationNVFP4WeightConfig()`): e2m1 values two per byte, an e4m3 scale per 16 values (swizzled for
the FP4 GEMM) and a float32 scale per tensor; torchao quantizes the activations the same way at run time. Everything
else stays bf16. Sink: torchao's own rule (`encode.nvfp4`) on each whole weight (its per-tensor scale needs the
whole weight's absmax); from the FP8 release, on the release's weight (fp8 * scale) in bf16.
torchao runs NVFP4 matmuls on Blackwell only (its CPU path needs a Triton kernel), so this checkpoint is checked on
the CPU through its dequantized weights.
"""

from __future__ import annotations

import torch

from .. import model
from ..encode import nvfp4
from ..encode.finite import check_finite
from ..metrics import ErrorStats
from ..plan import TensorPlan
from . import CardText, torchao_common, usage

DTYPE = "NVFP4"


class NVFP4Format(torchao_common.TorchaoFormat):
    name = "float4"
    label = "NVFP4"
    dtype = DTYPE
    default_recipe = "nvfp4-w4a4"
    codec = nvfp4
    whole_tensors = True  # the per-tensor scale needs the whole weight's absmax
    runs_on_cpu = False  # torchao's NVFP4 linear needs its Triton kernels (mslk) and a Blackwell GPU
    runs_on = "torchao runs NVFP4 matmuls on Blackwell GPUs only"

    def scheme(self, r) -> str:
        return ("nvfp4 weights (torchao NVFP4DynamicActivationNVFP4WeightConfig), dequantized: the CPU cannot run "
                "torchao's NVFP4 matmul, so activations stay bf16 while measuring")

    def compatible(self, shape: tuple[int, ...]) -> str | None:
        return None if nvfp4.compatible(shape) else f"{tuple(shape)} is not a multiple of 16 (NVFP4 blocks)"

    def quantized_bytes(self, shape: tuple[int, int]) -> int:
        return nvfp4.stored_bytes(shape)

    def reason(self, src) -> str:
        return "linear weight: NVFP4 (torchao NVFP4Tensor)"

    def encoder(self, tensors, writer):
        return _encoder(tensors, writer)

    def fake_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The NVFP4 weight dequantized (weights only: see `scheme`)."""
        return nvfp4.quantize(w.to(torch.bfloat16)).dequantize(w.dtype)

    def card(self, m: dict, repo_id: str, base: str, device: str = usage.CARD_DEVICE,
             call: dict | None = None, folder: str = "") -> CardText:
        notes = ["", "**GPU:** Blackwell (RTX 50 series, B200: compute capability 10.0+), whose tensor cores run FP4 "
                     "matmuls; torchao needs its Triton kernels (`pip install mslk`). On Ada or Hopper use FP8 W8A8 "
                     "(`ideoquant convert --recipe fp8-w8a8`), on Ampere INT8 W8A8."]
        return torchao_common.card(m, repo_id, base, device, call, "NVFP4 W4A4 (torchao)", ["nvfp4", "torchao", "fp4"],
                                   "the weights are torchao's NVFP4Tensor safetensors format: e2m1 values, an e4m3 "
                                   "scale per 16 and a float32 scale per tensor; activations are quantized the same "
                                   "way at run time", notes, folder)


def _encoder(tensors: list[TensorPlan], writer):
    def encode(i: int, src, rows, maps, ws, start: int, row: int) -> tuple[int, ErrorStats]:
        """One whole weight (`whole_tensors`); runs on the pool's threads."""
        t = tensors[i]
        module = model.module_of(t.name)
        data = torchao_common.read_block(src, rows, maps, ws)
        check_finite(t.name, data)
        q = nvfp4.quantize(data.to(torch.bfloat16))  # torchao's rule takes the bf16 weight, as diffusers loads it
        stats = ErrorStats()
        stats.add(data, q.dequantize(torch.float32))
        writer.write(f"{module}._weight_qdata", q.qdata)
        writer.write(f"{module}._weight_scale", q.scale)
        writer.write(f"{module}._weight_per_tensor_scale", q.per_tensor_scale)
        return data.numel(), stats

    return encode


FORMAT = NVFP4Format()
