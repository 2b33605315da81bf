"""`ideoquant calibrate`: SmoothQuant statistics from the source backbones' activations.

The source backbones run on sample or captured inputs with a forward pre-hook on every linear the recipe quantizes,
keeping a running per-input-channel max |x| (what torchao's `RunningAbsMaxSmoothQuantObserver` keeps). The
statistics go to a safetensors file: one float32 vector per `<component>.<module>` (the bf16 absmax, exactly),
provenance in the header. `convert --smoothquant` applies them (`formats/smoothquant.py`).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import torch

from .. import formats
from .. import model as model_mod
from ..device import check_device
from ..encode.smoothing import EPS, KEY_STATS
from ..errors import IdeoquantError
from ..manifest import tool_versions
from ..progress import Reporter
from ..write.target import output_file, source_paths
from .inputs import open_with_inputs
from .runner import free, source_model, to_device


def observed_runs(src, ins, device: str, reporter: Reporter, what: str, attach):
    """Run each source backbone on its calibration calls with an observer (`attach(model, component)`, which hooks
    the model; `.remove()` unhooks it); yields (component, calls, observer) once the calls have run. One backbone
    is in memory at a time."""
    for c, comp in src.components.items():
        calls = ins.for_component(c)
        if not calls:
            raise IdeoquantError(f"the inputs hold no calls of {c}")
        task = f"{what}/{c}"
        reporter.start(task, len(calls))
        m = source_model(comp, device)
        obs = attach(m, c)
        try:
            with torch.no_grad():
                for kw in calls:
                    m(**to_device(kw, device), return_dict=False)
                    reporter.advance(task, 1)
        finally:
            obs.remove()
        reporter.finish(task)
        free(m)
        m = None
        yield c, calls, obs


class AbsMaxObserver:
    """Forward pre-hooks on linears: running per-input-channel max |x| (torchao's RunningAbsMax observer, pass 1)."""

    def __init__(self, m: torch.nn.Module, modules: list[str]):
        self.absmax: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        named = dict(m.named_modules())
        missing = [n for n in modules if not isinstance(named.get(n), torch.nn.Linear)]
        if missing:
            raise IdeoquantError(f"not a linear module of the model: {missing[0]}")
        self._handles = [named[n].register_forward_pre_hook(self._hook(n)) for n in modules]

    def _hook(self, name: str):
        def hook(mod, args):
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1])
            batch_max = flat.abs().amax(dim=0).to("cpu")
            prev = self.absmax.get(name)
            self.absmax[name] = batch_max if prev is None else torch.maximum(prev, batch_max)
            self.rows[name] = self.rows.get(name, 0) + flat.shape[0]
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def quantized_modules(component, recipe) -> list[str]:
    """The linear modules an INT8 recipe quantizes in this component (the ones SmoothQuant can apply to)."""
    plan = formats.get(recipe.format).plan(component, recipe)
    return [model_mod.module_of(t.name) for t in plan.tensors if t.quantize]


def calibrate(
    source: str | None,
    out: str | Path,
    *,
    recipe="int8-w8a8",
    protect=(),
    no_protect=(),
    components: list[str] | None = None, inputs=None,
    device: str = "cpu", revision: str | None = None, token: str | None = None, reporter: Reporter | None = None,
    overwrite: bool = False, **sample,
) -> dict:
    """Record per-input-channel activation absmax for every linear the recipe quantizes; write `out` (safetensors).
    `out` follows the output policy (`write.target.output_file`): an existing file is replaced only with
    `overwrite`, and only once the new one is complete."""
    with output_file(out, _inputs_of(source, inputs, recipe), overwrite=overwrite) as tmp:
        res = _calibrate(source, tmp, recipe=recipe, protect=protect, no_protect=no_protect, components=components,
                         inputs=inputs, device=device, revision=revision, token=token, reporter=reporter, **sample)
    return {"out": str(out), "bytes": Path(out).stat().st_size} | res


def _inputs_of(source, inputs, recipe=None) -> list[Path]:
    """What a calibration reads: the source, recorded inputs, a recipe file."""
    return source_paths(source or model_mod.DEFAULT_SOURCE, inputs if isinstance(inputs, (str, Path)) else None,
                        recipe if isinstance(recipe, (str, Path)) and Path(recipe).is_file() else None)


def _calibrate(source, out: Path, *, recipe, protect, no_protect, components, inputs, device, revision, token,
               reporter, **sample) -> dict:
    from safetensors.torch import save_file

    reporter = reporter or Reporter()
    device = check_device(device)
    r = formats.resolve(recipe, protect, no_protect)
    if not getattr(formats.get(r.format), "smoothquant", False):
        raise IdeoquantError(f"recipe '{r.name}' is a {r.format} recipe; SmoothQuant applies to INT8 W8A8")
    src, ins = open_with_inputs(source, inputs, components=components, revision=revision, token=token,
                                **sample)
    tensors: dict[str, torch.Tensor] = {}
    summary: dict[str, dict] = {}
    modules_of = {c: quantized_modules(comp, r) for c, comp in src.components.items()}
    for c, calls, obs in observed_runs(src, ins, device, reporter, "calibrate",
                                       lambda m, c: AbsMaxObserver(m, modules_of[c])):
        modules = modules_of[c]
        never = [n for n in modules if n not in obs.absmax]
        if never:
            raise IdeoquantError(f"{c}: {never[0]} never ran on these inputs")
        for n in modules:
            tensors[f"{c}.{n}"] = obs.absmax[n].float().contiguous()  # a bf16 absmax is exact in float32
        ratios = {n: float(a.float().max() / a.float().median().clamp(min=EPS)) for n, a in obs.absmax.items()}
        worst = sorted(ratios, key=ratios.get, reverse=True)[:5]
        summary[c] = {"modules": len(modules), "calls": len(calls), "rows": obs.rows[modules[0]] if modules else 0,
                      "outlier_ratio": {n: round(ratios[n], 2) for n in worst}}
    provenance = {
        "source": src.describe(),
        "recipe": r.name,
        "protected": {c: sorted(comp.spec.linear_modules - set(quantized_modules(comp, r)))
                      for c, comp in src.components.items()},
        "inputs": ins.info,
        "count": {c: {"calls": s["calls"], "rows": s["rows"]} for c, s in summary.items()},
        "dtype": "bfloat16",
        "device": device,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool": {k: v for k, v in tool_versions().items() if k in ("ideoquant", "torch", "torchao", "diffusers")},
    }
    save_file(tensors, out, metadata={"format": "pt", KEY_STATS: json.dumps(provenance)})
    return {"provenance": provenance, "components": summary}


# ---------------------------------------------------------------- importance matrix


def imatrix_key(component: str, module: str) -> str:
    """The imatrix key of a linear module: its weight's name in ideoquant's GGUF output (original layout, as
    llama.cpp keys entries); the unconditional backbone's entries carry the prefix `uncond.`, so one file serves
    both backbones."""
    from ..imatrix import UNCOND_PREFIX

    name = model_mod.diffusers_to_original(f"{module}.weight")[0]
    return (UNCOND_PREFIX + name) if component == "unconditional_transformer" else name


class SquareSumObserver:
    """Forward pre-hooks on every linear: per-column sums of squared inputs (llama-imatrix's collector). q, k and v
    read the same input and are one fused `attention.qkv` weight in the GGUF: counted once, from to_q."""

    def __init__(self, m: torch.nn.Module, component: str, accumulator):
        self.acc = accumulator
        self._handles = []
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and not name.endswith(("attention.to_k", "attention.to_v")):
                self._handles.append(mod.register_forward_pre_hook(self._hook(imatrix_key(component, name))))

    def _hook(self, key: str):
        def hook(mod, args):
            self.acc.add(key, args[0].detach().float().cpu().numpy())
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def calibrate_imatrix(
    source: str | None,
    out: str | Path,
    *,
    components: list[str] | None = None, inputs=None,
    device: str = "cpu", revision: str | None = None, token: str | None = None, reporter: Reporter | None = None,
    overwrite: bool = False, **sample,
) -> dict:
    """Record an importance matrix for every linear of both backbones (per-column sum of squared inputs and the
    row counts over the calibration inputs) and write it in llama.cpp's GGUF imatrix format, for
    `ideoquant gguf --imatrix` (and llama.cpp / stable-diffusion.cpp tools that map the names). `out` follows the
    output policy (`write.target.output_file`)."""
    with output_file(out, _inputs_of(source, inputs), overwrite=overwrite, option="--imatrix") as tmp:
        res = _calibrate_imatrix(source, tmp, components=components, inputs=inputs, device=device, revision=revision,
                                 token=token, reporter=reporter, **sample)
    return {"out": str(out), "bytes": Path(out).stat().st_size} | res


def _calibrate_imatrix(source, out: Path, *, components, inputs, device, revision, token, reporter, **sample) -> dict:
    from .. import imatrix

    reporter = reporter or Reporter()
    device = check_device(device)
    src, ins = open_with_inputs(source, inputs, components=components, revision=revision, token=token,
                                **sample)
    described = ins.info.get("path") or ("ideoquant sample inputs: " + ", ".join(
        f"{k} {ins.info[k]}" for k in ("steps", "tokens", "grid", "batch", "seed") if k in ins.info))
    acc = imatrix.Accumulator(datasets=[str(described)])
    counts = {c: len(calls) for c, calls, _ in observed_runs(src, ins, device, reporter, "imatrix",
                                                                lambda m, c: SquareSumObserver(m, c, acc))}
    result = acc.result()
    imatrix.write_gguf(out, result)
    return {"entries": len(result.entries), "calls": counts, "inputs": ins.info, "datasets": result.datasets}

