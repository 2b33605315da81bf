"""FP8 W8A8 in torchao's safetensors format, for GPUs with FP8 tensor cores (Ada, Hopper, Blackwell): stock
diffusers loads it with `from_pretrained`.

Plan: every linear weight the recipe quantizes becomes a torchao `Float8Tensor`
(`Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`): e4m3 `qdata` [N, K] and a float32 `scale`
[N, 1]; torchao quantizes the activations per token to e4m3 at run time and runs FP8 GEMMs. Everything else stays
bf16, and so does a weight torchao itself would not quantize (a dimension not a multiple of 16).

Sink: from the FP8 release (e4m3 weights with a float32 `weight_scale` per row) the codes and scales are the
representation already: they are carried over byte for byte (a repack; the weight in effect is exactly the
release's), never dequantized and re-quantized. From a bf16 source, torchao's own rule (`encode.float8`).
Verify: torchao's keys, dtypes and shapes, and the config's `modules_to_not_convert`.
"""

from __future__ import annotations

import torch

from .. import model
from ..encode import float8
from ..encode.finite import check_finite
from ..errors import damaged_tensor
from ..metrics import ErrorStats
from ..plan import TensorPlan
from . import CardText, torchao_common, usage

DTYPE = "F8_E4M3"


class FP8Format(torchao_common.TorchaoFormat):
    name = "float8"
    label = "FP8"
    dtype = DTYPE
    default_recipe = "fp8-w8a8"
    codec = float8

    def scheme(self, r) -> str:
        return ("fp8 W8A8 (torchao Float8DynamicActivationFloat8WeightConfig PerRow: e4m3 row-scaled weights, "
                "per-token dynamic e4m3 activations)")

    def compatible(self, shape: tuple[int, ...]) -> str | None:
        return None if float8.fp8_mm_compatible(shape) else f"{tuple(shape)} is not a multiple of 16 (FP8 GEMM)"

    def quantized_bytes(self, shape: tuple[int, int]) -> int:
        rows, cols = shape
        return rows * cols + rows * 4  # e4m3 codes, float32 scale per row

    def reason(self, src) -> str:
        return ("linear weight: the release's e4m3 codes and row scales, carried over unchanged"
                if src.scale is not None else "linear weight: e4m3 per row (torchao Float8Tensor)")

    def encoder(self, tensors, writer):
        return _encoder(tensors, writer)

    def fake_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The Float8Tensor torchao computes with (what `quantize_` makes; `quantize_` itself refuses to run without
        an FP8-capable GPU, although torchao's FP8 linear runs on the CPU)."""
        return float8.quantize(w.to(torch.bfloat16))

    def card(self, m: dict, repo_id: str, base: str, device: str = usage.CARD_DEVICE,
             call: dict | None = None, folder: str = "") -> CardText:
        carried = any(t["decision"] == "quantized" and t["dtype_in"] == DTYPE for c in m["components"].values()
                      for t in c["tensors"])
        notes = ["",
                 "**GPU:** FP8 tensor cores, compute capability 8.9 or newer: Ada (RTX 40 series, L4, L40S), Hopper "
                 "(H100, H200) or Blackwell. On Ampere (RTX 30, A100), which has no FP8 tensor cores, use an INT8 "
                 "W8A8 checkpoint (`ideoquant convert --recipe int8-w8a8`)."]
        if carried:
            notes += ["", "The FP8 weights are the official release's own e4m3 codes and per-row scales, carried over "
                          "bit for bit (no re-quantization): only the activations are newly quantized."]
        return torchao_common.card(m, repo_id, base, device, call, "FP8 W8A8 (torchao)", ["fp8", "torchao", "w8a8"],
                                   "the weights are torchao's Float8Tensor safetensors format, e4m3 with a float32 "
                                   "scale per row; activations are quantized to e4m3 per token at run time", notes,
                                   folder)


def _encoder(tensors: list[TensorPlan], writer):
    def encode(i: int, src, rows, maps, ws, start: int, row: int) -> tuple[int, ErrorStats]:
        """One block of rows of a quantized weight; runs on the pool's threads."""
        t = tensors[i]
        module = model.module_of(t.name)
        stats = ErrorStats()
        if src.scale is not None:  # the release's codes and scales are the Float8Tensor's: copied, error zero
            qdata, scale = src.read_fp8(rows, maps)
            if float8.has_nan(qdata) or not bool(torch.isfinite(scale).all()):
                raise damaged_tensor(t.name)
            scale = scale.reshape(-1, 1)
        else:
            data = torchao_common.read_block(src, rows, maps, ws)
            check_finite(t.name, data)
            q = float8.quantize(data.to(torch.bfloat16))  # torchao's rule takes the bf16 weight, as diffusers loads it
            qdata, scale = q.qdata, q.scale
            stats.add(data, float8.dequantize(qdata, scale))
        writer.write(f"{module}._weight_qdata", qdata, start * row)
        writer.write(f"{module}._weight_scale", scale, start * 4)
        return qdata.numel(), stats

    return encode


FORMAT = FP8Format()
