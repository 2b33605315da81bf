"""Baselines built in memory from the source weights, for `ideoquant eval` to compare against.

- `fp8`: FP8 e4m3 per-row weight-only, as the official FP8 release stores it (`w = fp8 * scale[:, None]`), made
  with diffusers' own functions for that scheme (`quantize_fp8r` / `dequantize_fp8r`)
  on every linear weight; the model runs on the dequantized weights (bf16 compute), as FP8 weight-only does.
- `nf4`: 4-bit NormalFloat, blockwise (64 elements of the flattened weight per block, float32 absmax per block, the 16
  NF4 code values, nearest code), on every linear weight: what bitsandbytes' `quantize_4bit(quant_type="nf4")` does
  (no double quantization, diffusers' default), dequantized for a bf16 forward.
- `w8a8`: INT8 W8A8 with nothing protected: torchao `quantize_` with `Int8DynamicActivationInt8WeightConfig()` on a
  fresh copy of the source backbone.

Each builder returns (model, bytes of the weights as the format stores them).
"""

from __future__ import annotations

import torch

from ..encode import int8
from .runner import source_model, stored_bytes

NF4_BLOCK = 64
# bitsandbytes' NF4 code book (bitsandbytes.functional / backends.utils CODE["nf4"]).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def _linears(m: torch.nn.Module):
    return [(n, mod) for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]


def _plain_bytes(m: torch.nn.Module, replaced: set[str]) -> int:
    return sum(p.numel() * p.element_size() for n, p in m.named_parameters() if n not in replaced)


@torch.no_grad()
def _weight_only(component, device: str, fake_quantize):
    """The source model with every linear weight replaced by fake_quantize(w) -> (dequantized w, bytes stored)."""
    m = source_model(component, device)
    nbytes, replaced = 0, set()
    for name, mod in _linears(m):
        mod.weight.data, stored = fake_quantize(mod.weight)
        nbytes += stored
        replaced.add(name + ".weight")
    return m, nbytes + _plain_bytes(m, replaced)


def fp8_model(component, device: str = "cpu"):
    """FP8 e4m3 per-row weight-only (the official release's scheme) on every linear weight."""
    from diffusers.quantizers.bfl.utils import dequantize_fp8r, quantize_fp8r

    def fake_quantize(w):
        q, scale = quantize_fp8r(w.float())
        return dequantize_fp8r(q, scale).to(w.dtype), q.numel() * q.element_size() + scale.numel() * scale.element_size()

    return _weight_only(component, device, fake_quantize)


def nf4_quantize(weight: torch.Tensor, blocksize: int = NF4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight -> (4-bit codes as uint8 [numel], float32 absmax per block).

    Mirrors bitsandbytes' quantize_nf4 (`quantize_4bit(..., quant_type="nf4")`, default backend): the flattened
    tensor in blocks of `blocksize` (a short last block), absmax per block in float32, x * (1 / absmax) clamped to
    [-1, 1], the index of the nearest of the 16 NF4 code values (argmin, ties to the lower code)."""
    flat = weight.reshape(-1)
    n = flat.numel()
    blocks = (n + blocksize - 1) // blocksize
    padded = torch.nn.functional.pad(flat.float(), (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # bitsandbytes would give NaN for 0
    scaled = (padded * inv[:, None]).clamp(-1, 1).reshape(-1)[:n]
    code = torch.tensor(NF4_CODE, dtype=scaled.dtype, device=scaled.device)
    idx = torch.empty(n, dtype=torch.uint8, device=scaled.device)
    step = 1 << 22  # bounded temporaries on large weights
    for s in range(0, n, step):
        idx[s : s + step] = torch.argmin((scaled[s : s + step, None] - code).abs(), dim=-1).to(torch.uint8)
    return idx, absmax


def nf4_dequantize(idx: torch.Tensor, absmax: torch.Tensor, shape, dtype=torch.bfloat16,
                   blocksize: int = NF4_BLOCK) -> torch.Tensor:
    """As bitsandbytes' dequantize_4bit: the code value in the output dtype times the block absmax, in that dtype."""
    n = idx.numel()
    blocks = absmax.numel()
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=idx.device).to(dtype)
    vals = torch.nn.functional.pad(code[idx.long()], (0, blocks * blocksize - n)).view(blocks, blocksize)
    return (vals * absmax[:, None]).to(dtype).reshape(-1)[:n].reshape(shape)


def nf4_model(component, device: str = "cpu"):
    """NF4 blockwise 4-bit (bitsandbytes' scheme, block 64) on every linear weight."""

    def fake_quantize(w):
        idx, absmax = nf4_quantize(w)
        # two codes per byte, float32 absmax per block
        return nf4_dequantize(idx, absmax, w.shape, w.dtype), (idx.numel() + 1) // 2 + absmax.numel() * 4

    return _weight_only(component, device, fake_quantize)


@torch.no_grad()
def w8a8_model(component, device: str = "cpu"):
    """INT8 W8A8 (torchao Int8DynamicActivationInt8WeightConfig) on every linear, nothing protected."""
    from torchao.quantization import quantize_


    m = source_model(component, device)
    quantize_(m, int8.config())
    return m, stored_bytes(m)


BUILDERS = {
    "fp8": ("fp8-e4m3 (baseline)", fp8_model),
    "nf4": ("nf4 (baseline)", nf4_model),
    "w8a8": ("w8a8-unprotected (baseline)", w8a8_model),
}
