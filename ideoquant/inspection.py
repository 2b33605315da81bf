"""`inspect`: what a source holds and what a recipe would do to it, from headers alone (nothing is read)."""

from __future__ import annotations

from collections import Counter

from . import formats
from .errors import IdeoquantError
from .job import prepare
from .plan import numel

GIB = 1 << 30
# Beyond the weights, a 1024x1024 generation on the real model needs activations, the attention working set and
# the CUDA context; measured figures for the bf16 pipeline put this at roughly 2-3 GiB with the text encoder and
# VAE offloaded. Said as an estimate, not a promise.
ACTIVATION_OVERHEAD_GIB = 3.0
GPU_BUDGET_GIB = 24 * 1e9 / GIB


def inspect(source=None, recipe: str | None = None, *, qtype: str | None = None, revision=None, components=None,
            token=None, vram_gb: float | None = None) -> dict:
    """The plan for `recipe` (default int8-w8a8; with `qtype`, a GGUF type or mixture, the GGUF plan of that type,
    as `convert_gguf` would write it).

    vram_gb: also list, for every format's rows (`Format.fit_rows`: INT8, every GGUF type, ...), the size of both
    backbones and whether they fit on a card of that size, all resident or one at a time (CPU offload)."""
    fmt = formats.of(recipe, "gguf" if qtype else None)
    r = fmt.conversion(recipe, (), (), {"qtype": qtype} if qtype else {}).recipes[0]
    # From a Hub repo only the configs and safetensors headers are fetched, never the weights.
    src, plans = prepare(source, r, components=components, revision=revision, token=token, headers_only=True)
    comps = {}
    decisions: Counter = Counter()
    sizes: Counter = Counter()
    for name, plan in plans.items():
        c = plan.component
        params = sum(numel(t.shape) for t in c.tensors.values())
        comps[name] = {
            "layout": c.layout,
            "params": params,
            "dtypes": sorted({"FP8 e4m3 + row scale" if t.scale is not None else t.dtype for t in c.tensors.values()}),
            "quantized": sum(t.quantize for t in plan.tensors),
            "kept": sum(not t.quantize for t in plan.tensors),
            "bytes_in": plan.bytes_in,
            "bytes_out": plan.bytes_out,
            "protected_modules": plan.protected,
        }
        for t in plan.tensors:
            key = (t.dtype, t.reason)
            decisions[key] += 1
            sizes[key] += t.bytes_out
    fit = _fit_table(src, float(vram_gb)) if vram_gb is not None else None
    weights = sum(c["bytes_out"] for c in comps.values()) / GIB
    largest = max(c["bytes_out"] for c in comps.values()) / GIB
    peak = weights + ACTIVATION_OVERHEAD_GIB
    offload_peak = largest + ACTIVATION_OVERHEAD_GIB
    return {
        "source": src.describe(),
        "recipe": r.to_dict(),
        "components": comps,
        "decisions": [{"dtype": d, "reason": why, "tensors": n, "bytes": sizes[(d, why)]}
                      for (d, why), n in sorted(decisions.items(), key=lambda kv: -sizes[kv[0]])],
        "gpu": {
            "weights_gib": round(weights, 3),
            "estimated_peak_gib": round(peak, 3),
            "budget_gib": round(GPU_BUDGET_GIB, 2),
            "fits": peak <= GPU_BUDGET_GIB,
            # With pipe.enable_model_cpu_offload() only one backbone is on the GPU at a time.
            "offload_peak_gib": round(offload_peak, 3),
            "fits_with_offload": offload_peak <= GPU_BUDGET_GIB,
            "note": f"weights of {len(comps)} backbone(s) resident + ~{ACTIVATION_OVERHEAD_GIB:.0f} GiB activations; "
                    "text encoder and VAE offloaded",
        },
        "fit": fit,
    }


def _fit_table(src, vram_gb: float) -> dict:
    """Every output type's size for these backbones, and whether it fits `vram_gb` (decimal GB, as cards are sold)."""
    if not 0 < vram_gb < 10_000:
        raise IdeoquantError(f"--vram must be a card size in GB (e.g. 24), not {vram_gb:g}")
    budget = vram_gb * 1e9 / GIB
    rows = []
    for fmt in formats.every():
        for row in fmt.fit_rows():
            sizes = [fmt.plan(c, row.recipe).bytes_out for c in src.components.values()]
            weights, largest = sum(sizes) / GIB, max(sizes) / GIB
            rows.append({"type": row.label, "format": fmt.name, "weights_gib": round(weights, 3),
                         "fits": weights + ACTIVATION_OVERHEAD_GIB <= budget,
                         "fits_with_offload": largest + ACTIVATION_OVERHEAD_GIB <= budget})
    return {"vram_gb": vram_gb, "budget_gib": round(budget, 2), "types": rows}
