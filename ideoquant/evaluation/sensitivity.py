"""Sensitivity: which linear layers does a recipe's scheme hurt most, measured end to end.

One linear layer (or, with `group=True`, one group such as every `feed_forward.w2`) at a time is quantized under the
recipe's scheme, every other weight stays as in the source, and the velocity on the image tokens is compared with the
source's on the same inputs. Each format quantizes in memory the way it computes
(`Format.fake_quantize`): INT8 recipes through torchao W8A8 (`quantize_` with `Int8DynamicActivationInt8WeightConfig`,
per-token dynamic int8 activations included); GGUF recipes quantize and dequantize the weight with
`ideoquant.gguf.quantize` / `dequantize` at the type the recipe gives that tensor (rules and row-length fallbacks
included), which is what GGUFLinear computes with. The recipe's own protect list is ignored while measuring (every
linear is measured) and reported beside the ranking.

`write_recipe` turns a ranking into a recipe TOML: the measured recipe's own protections, plus the most fragile units
it does not protect yet (top K, or as many as fit a budget of extra bf16 bytes).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import replace
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from .. import formats
from .. import model as model_mod
from ..device import check_device
from ..errors import IdeoquantError
from ..formatting import db
from ..progress import Reporter
from ..write.target import output_file
from .inputs import open_with_inputs
from .runner import compare, free, source_model, velocities

_LAYER = re.compile(r"^layers\.\d+\.")


def group_of(module: str) -> str:
    """`layers.3.feed_forward.w2` -> `layers.*.feed_forward.w2`; modules outside the blocks are their own group."""
    return _LAYER.sub("layers.*.", module)


def _planned(component, recipe) -> dict[str, tuple[str, int, int]]:
    """Linear module -> (type it gets with nothing protected, bytes quantized, bytes in bf16)."""
    bare = replace(recipe, protect=(), no_protect=())
    plan = formats.get(recipe.format).plan(component, bare, "diffusers")
    spec = component.spec
    out = {}
    for t in plan.tensors:
        if spec.is_linear_weight(t.name):
            numel = math.prod(t.shape)
            out[model_mod.module_of(t.name)] = (t.dtype, t.bytes_out, numel * 2)
    return out


def sensitivity(
    source: str | None,
    recipe="int8-w8a8",
    *,
    qtype: str | None = None,
    group: bool = False,
    components: list[str] | None = None, inputs=None,
    device: str = "cpu",
    threads: int | None = None,
    revision: str | None = None,
    token: str | None = None,
    reporter: Reporter | None = None,
    **sample,
) -> dict:
    """Rank linear layers (or groups) by the end-to-end velocity SQNR with only that unit quantized (lowest first).
    `qtype` overrides a GGUF recipe's base type (q8_0, q4_k, q5_k, q6_k)."""
    reporter = reporter or Reporter()
    sample.setdefault("steps", 2)
    device = check_device(device)
    r = formats.resolve(recipe, qtype=qtype)
    fmt = formats.get(r.format)
    src, ins = open_with_inputs(source, inputs, components=components or list(model_mod.COMPONENTS),
                                revision=revision, token=token, **sample)

    units: dict[str, dict] = {}
    for c, comp in src.components.items():
        calls = ins.for_component(c)
        if not calls:
            raise IdeoquantError(f"the inputs hold no calls of {c}")
        planned = _planned(comp, r)
        base = fmt.plan(comp, r, "diffusers")
        protected = set(base.protected)
        order = _linear_names(comp)
        groups: dict[str, list[str]] = {}
        for n in order:
            groups.setdefault(group_of(n) if group else n, []).append(n)
        task = f"sensitivity/{c}"
        reporter.start(task, len(groups))
        m = source_model(comp, device)
        ref = torch.cat(velocities(m, calls, device))
        for unit, names in groups.items():
            u = units.setdefault(unit, {"unit": unit, "modules": names, "types": sorted({planned[n][0] for n in names}),
                                        "sqnr_db": {}, "extra_bytes": 0, "non_finite": [],
                                        "protected_by_recipe": all(n in protected for n in names)})
            saved = fmt.fake_quantize(m, {n: planned[n][0] for n in names}, threads)
            try:  # a unit whose planned type keeps the weight as is (BF16) changes nothing: no measurement
                sq = compare(ref, torch.cat(velocities(m, calls, device)))["sqnr_db"] if saved else None
            finally:
                formats.restore(m, saved)
            if sq is not None and (math.isnan(sq) or sq == -math.inf):  # NaN/Inf out: the most fragile of all
                u["non_finite"].append(c)
                sq = None
            u["sqnr_db"][c] = sq
            u["extra_bytes"] += sum(planned[n][2] - planned[n][1] for n in names)
            reporter.advance(task, 1)
        reporter.finish(task)
        free(m)
        m = None

    ranked = list(units.values())
    for u in ranked:
        finite = [s for s in u["sqnr_db"].values() if s is not None]
        u["sqnr_db_min"] = min(finite) if finite else None
        u["noise"] = sum(10 ** (-s / 10) for s in finite)
    total = sum(u["noise"] for u in ranked) or 1.0
    ranked.sort(key=lambda u: (not u["non_finite"], u["sqnr_db_min"] is None,
                               u["sqnr_db_min"] if u["sqnr_db_min"] is not None else 0))
    for i, u in enumerate(ranked, 1):
        u["rank"] = i
        u["noise_share"] = round(u.pop("noise") / total, 5)
    return {
        "source": src.describe(),
        "recipe": r.to_dict(),
        "scheme": fmt.scheme(r),
        "group": group,
        "components": list(src.components),
        "inputs": ins.info,
        "device": device,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "units": ranked,
    }


def _linear_names(component) -> list[str]:
    """Linear modules in registration order (the order the model runs them, near enough)."""
    spec = component.spec
    return [model_mod.module_of(n) for n in spec.names if spec.is_linear_weight(n)]


def select(report: dict, protect_top: int | None = None, budget_gb: float | None = None) -> list[dict]:
    """The most fragile units the recipe does not already protect: the top K, or the longest prefix of that ranking
    whose extra bf16 bytes fit the budget."""
    if (protect_top is None) == (budget_gb is None):
        raise IdeoquantError("give exactly one of --protect-top K and --budget-gb X")
    ranked = [u for u in report["units"] if (u["sqnr_db_min"] is not None or u.get("non_finite"))
              and not u["protected_by_recipe"]]
    if protect_top is not None:
        if protect_top < 0:
            raise IdeoquantError("--protect-top must be 0 or more")
        return ranked[:protect_top]
    budget = budget_gb * 1e9
    chosen, used = [], 0
    for u in ranked:
        if used + u["extra_bytes"] > budget:
            break
        chosen.append(u)
        used += u["extra_bytes"]
    return chosen


def write_recipe(report: dict, path: str | Path, *, protect_top: int | None = None, budget_gb: float | None = None,
                 name: str | None = None, overwrite: bool = False):
    """Write a recipe TOML that keeps every protection of the measured recipe and adds the most fragile units of
    `report` it does not protect yet (`recipe_toml`); returns it loaded (`load_recipe`). `path` follows the output
    policy (`write.target.output_file`); `name` defaults to the file's stem."""
    path = Path(path)
    text = recipe_toml(report, protect_top=protect_top, budget_gb=budget_gb, name=name or path.stem)
    with output_file(path, overwrite=overwrite, option="--write-recipe") as tmp:
        tmp.write_text(text)
    return formats.load_recipe(path)


def recipe_toml(report: dict, *, name: str, protect_top: int | None = None, budget_gb: float | None = None) -> str:
    """The text of `write_recipe`'s recipe.

    Recipe files have no `no_protect`: a base recipe that carries one (overrides given through the API) is written
    with its protected modules spelled out, which protects exactly the same modules."""
    chosen = select(report, protect_top, budget_gb)
    base = report["recipe"]
    added = [u["unit"] for u in chosen]
    kept = list(base.get("protect", []))
    if base.get("no_protect"):
        modules = sorted({m for u in report["units"] for m in u["modules"]})
        kept = [m for m in modules if any(fnmatchcase(m, p) for p in kept)
                and not any(fnmatchcase(m, p) for p in base["no_protect"])]
    protect = kept + [a for a in added if a not in kept]
    src = report["source"].get("repo_id") or report["source"].get("path") or report["source"].get("spec")
    how = f"top {protect_top}" if protect_top is not None else f"as many as fit {budget_gb:g} GB of extra bf16 weights"
    extra = sum(u["extra_bytes"] for u in chosen)
    inputs = report["inputs"]
    inputs_txt = (f"captured inputs {inputs.get('path')}" if inputs.get("kind") == "captured" else
                  f"{inputs.get('steps')} sample steps, {inputs.get('tokens')} text tokens, "
                  f"{inputs['grid'][0]}x{inputs['grid'][1]} image grid, batch {inputs.get('batch')}")
    description = (f"{base['name']} (its protections kept) with the {len(chosen)} most fragile linear "
                   f"{'groups' if report['group'] else 'layers'} it quantized also kept in bf16 ({how}; "
                   f"+{extra / 1e6:.1f} MB over quantizing them), ranked by `ideoquant sensitivity`.")
    source = (f"ideoquant sensitivity on {src} ({', '.join(report['components'])}), {report['created']}: "
              f"{report['scheme']}, one {'group' if report['group'] else 'layer'} quantized at a time, ranked by "
              f"end-to-end velocity SQNR on {inputs_txt}. Most fragile: "
              + ", ".join(f"{u['unit']} ({'NaN/Inf output' if u.get('non_finite') else db(u['sqnr_db_min'])})"
                          for u in chosen[:5])
              + (" ..." if len(chosen) > 5 else "") + ".")
    lines = [
        f"name = {_toml_str(name)}",
        f"format = {_toml_str(base['format'])}",
        f"description = {_toml_str(description)}",
        f"source = {_toml_str(source)}",
        "protect = [" + "".join(f"\n    {_toml_str(p)}," for p in protect) + ("\n]" if protect else "]"),
    ]
    if base.get("type") is not None:  # a recipe with per-tensor types (GGUF)
        lines.append(f"type = {_toml_str(base['type'])}")
        if base.get("rules"):
            lines += ["", "[rules]"] + [f"{_toml_str(k)} = {_toml_str(v)}" for k, v in base["rules"].items()]
    return "\n".join(lines) + "\n"


def _toml_str(s: str) -> str:
    """A TOML basic string (JSON's escapes are valid TOML)."""
    return json.dumps(s, ensure_ascii=False)
