"""What `ideoquant bench` generates with: the reference (SOURCE as released), ideoquant outputs (loaded as `eval`
loads them) and baselines built from SOURCE in memory (as `eval` builds them).

The reference runs the source's own numbers: a bf16 source as bf16; the FP8 release with its FP8 weights and
per-row scales kept, each linear dequantized on the fly by diffusers' own `BFLFP8RLinear` (on FP8-capable GPUs its
scaled-mm path, as diffusers runs the release), so it needs no bf16 copy of the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import IdeoquantError
from ..evaluation.runner import stored_bytes
from ..evaluation.variants import baseline_variants, resolve_variants

REFERENCE = "reference"
# Baselines by their bench names -> `eval`'s builder names.
BASELINES = {"nf4": "nf4", "w8a8-unprotected": "w8a8", "fp8": "fp8"}


@dataclass
class BenchVariant:
    name: str  # the folder name under REPORT/images/
    kind: str  # "reference", "int8", "gguf", or the baseline's builder name
    what: str  # where it comes from: a path, or "built from SOURCE"
    # (component name, source Component, device) -> (model, bytes of the weights as stored)
    load: Callable[[str, object, str], tuple[torch.nn.Module, int]]

    @property
    def is_baseline(self) -> bool:
        return self.kind in BASELINES.values()


def reference_variant() -> BenchVariant:
    return BenchVariant(REFERENCE, REFERENCE, "SOURCE as released",
                        lambda component, comp, device: _released(comp, device))


def bench_variants(args: list[str]) -> list[BenchVariant]:
    """VARIANT arguments -> variants, reference first. An argument that names a baseline (and no existing path)
    is that baseline; anything else is an ideoquant output (INT8 folder, folder of GGUF files, one type folder or
    the parent of a multi-type pass)."""
    out = [reference_variant()]
    for arg in args:
        if arg.lower() in BASELINES and not Path(arg).exists():
            [v] = baseline_variants([BASELINES[arg.lower()]])
            out.append(BenchVariant(arg.lower(), v.kind, "built from SOURCE", v.load))
            continue
        for v in resolve_variants([arg]):
            out.append(BenchVariant(_folder_name(v.name), v.kind, ", ".join(sorted(set(v.paths.values()))), v.load))
    names: set[str] = set()
    for v in out:
        base, i = v.name, 2
        while v.name in names:
            v.name, i = f"{base}-{i}", i + 1
        names.add(v.name)
    return out


def _folder_name(name: str) -> str:
    """A variant's name as one safe path component (a GGUF group `folder:Q4_K` becomes `folder-Q4_K`)."""
    safe = re.sub(r"[^A-Za-z0-9_.+-]+", "-", name).strip("-.") or "variant"
    return "reference-output" if safe == REFERENCE else safe


@torch.no_grad()
def _released(component, device: str, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.nn.Module, int]:
    """The source backbone as released: FP8 linears stay FP8 (`BFLFP8RLinear`), everything else in bf16, built
    like `from_pretrained(torch_dtype=bfloat16)` builds it (the rotary buffer stays float32, see pitfalls)."""
    from accelerate import init_empty_weights
    from diffusers import Ideogram4Transformer2DModel
    from diffusers.quantizers.bfl.utils import BFLFP8RLinear

    with init_empty_weights():
        m = Ideogram4Transformer2DModel.from_config(component.config)
    state = {}
    for name, t in component.tensors.items():
        if t.scale is not None and name.endswith(".weight"):
            module = name[: -len(".weight")]
            parent, _, child = module.rpartition(".")
            old = m.get_submodule(module)
            setattr(m.get_submodule(parent) if parent else m, child,
                    BFLFP8RLinear(old.in_features, old.out_features, old.bias is not None, compute_dtype=dtype,
                                  device="meta"))
            codes, scale = t.read_fp8()
            state[name], state[f"{module}.weight_scale"] = codes.to(device), scale.to(device)
        else:
            state[name] = t.read().to(device=device, dtype=dtype)
    missing = m.load_state_dict(state, assign=True, strict=False)
    if missing.missing_keys or missing.unexpected_keys:
        raise IdeoquantError(f"the source's {component.name} does not fit its config (missing "
                             f"{missing.missing_keys[:1]}, unexpected {missing.unexpected_keys[:1]})")
    m = m.to(device).eval()
    return m, stored_bytes(m)
