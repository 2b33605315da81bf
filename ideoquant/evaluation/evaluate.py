"""Evaluate quantized backbones against their source: end to end, with guidance, and layer by layer.

Every variant (INT8 output folders, GGUF files, and baselines built in the same run from the source weights:
FP8 per-row, NF4, unprotected W8A8) runs on the same deterministic inputs as the source. Reported per variant and
component: SQNR / cosine / relative error of the velocity on the image tokens, the same for the guidance-combined
velocity `g * v_cond + (1 - g) * v_uncond`, the bytes of the weights as stored, and the SQNR of every linear layer's
output through forward hooks, twice: in situ (the variant's layer output inside the variant against the source's
inside the source: upstream error included) and isolated (the variant's layer on the source's layer input: the
layer's own quantization error).

Memory: one backbone of one variant is in memory at a time; the source's layer inputs and outputs are kept (on the
CPU) as a strided subset of at most `layer_rows` rows per layer and call. On the real model use `device="cuda"`.

Inputs: `sample_calls` (shaped like the pipeline's packed inputs: a conditional call on [text][image] and an
unconditional call on the image tokens with zeroed text features, as `Ideogram4Pipeline.__call__` builds them), or
what `capture` recorded from a real pipeline run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import model as model_mod
from ..device import check_device
from ..errors import IdeoquantError
from ..progress import Reporter
from .inputs import GUIDANCE, Inputs, open_with_inputs
from .runner import LayerTaps, compare, free, guided, source_model, stored_bytes, velocities
from .variants import BASELINES, baseline_variants, resolve_variants


# ---------------------------------------------------------------- evaluate


def evaluate(
    source: str | None,
    quantized=(),
    *,
    baselines=BASELINES,
    components: list[str] | None = None,
    inputs: str | Path | Inputs | None = None,
    guidance: float = GUIDANCE,
    layer_rows: int = 64,
    device: str = "cpu", revision: str | None = None, token: str | None = None, reporter: Reporter | None = None,
    **sample,
) -> dict:
    """Evaluate quantized outputs (and baselines) against the source on the same inputs. See the module docstring."""

    reporter = reporter or Reporter()
    device = check_device(device)
    variants = resolve_variants(quantized) + baseline_variants(baselines or ())
    if not variants:
        raise IdeoquantError("nothing to evaluate: give quantized outputs, or keep the baselines")
    wanted = components or [c for c in model_mod.COMPONENTS if any(c in v.paths for v in variants)]
    src, ins = open_with_inputs(source, inputs, components=wanted, revision=revision, token=token,
                                **sample)
    for c in wanted:
        if not ins.for_component(c):
            raise IdeoquantError(f"the inputs hold no calls of {c}")

    report_variants = {v.name: {"name": v.name, "kind": v.kind, "paths": v.paths, "components": {}} for v in variants}
    ref_v: dict[str, list[torch.Tensor]] = {}
    var_v: dict[str, dict[str, list[torch.Tensor]]] = {v.name: {} for v in variants}
    source_bytes = {}
    for c in wanted:
        calls = ins.for_component(c)
        comp = src.components[c]
        task = f"source/{c}"
        reporter.start(task, len(calls))
        m = source_model(comp, device)
        source_bytes[c] = stored_bytes(m)
        ref_taps = LayerTaps(m, layer_rows)
        ref_v[c] = velocities(m, calls, device, ref_taps, lambda task=task: reporter.advance(task, 1))
        reporter.finish(task)
        ref_taps.remove()
        free(m)
        m = None
        for v in variants:
            if c not in v.paths:
                continue
            task = f"{v.name}/{c}"
            reporter.start(task, len(calls))
            m, nbytes = v.load(c, comp, device)
            if model_mod.model_spec(dict(m.config)).shapes != comp.spec.shapes:
                raise IdeoquantError(f"{v.name} ({v.paths[c]}): its {c} is not the same model as the source's "
                                     "(the shapes differ)")
            taps = LayerTaps(m, layer_rows, reference=ref_taps)
            var_v[v.name][c] = velocities(m, calls, device, taps, lambda task=task: reporter.advance(task, 1))
            taps.remove()
            isolated = taps.sqnr(isolated=True)
            finite = {k: s for k, s in isolated.items() if s is not None}
            worst = min(finite, key=finite.get) if finite else None
            report_variants[v.name]["components"][c] = {
                **compare(torch.cat(ref_v[c]), torch.cat(var_v[v.name][c])),
                "weight_bytes": nbytes,
                "weight_ratio": round(nbytes / source_bytes[c], 4),
                "worst_layer": worst,  # lowest isolated SQNR: the layer whose own quantization loses most
                "worst_layer_sqnr_db": finite.get(worst) if worst else None,
                "layers": taps.sqnr(),  # in situ: upstream error included
                "layers_isolated": isolated,  # on the source's layer inputs: the layer's own error
            }
            reporter.finish(task)
            free(m)
            m = None
        del ref_taps

    both = all(c in ref_v for c in model_mod.COMPONENTS)
    for v in variants:
        r = report_variants[v.name]
        r["weight_bytes"] = sum(x["weight_bytes"] for x in r["components"].values())
        r["guided"] = None
        if both and all(c in var_v[v.name] for c in model_mod.COMPONENTS):
            n = min(len(ref_v[c]) for c in model_mod.COMPONENTS)
            ref = guided(ref_v["transformer"][:n], ref_v["unconditional_transformer"][:n], guidance)
            app = guided(var_v[v.name]["transformer"][:n], var_v[v.name]["unconditional_transformer"][:n], guidance)
            r["guided"] = compare(ref, app)
    return {
        "source": src.describe(),
        "inputs": ins.info,
        "device": device,
        "guidance": guidance,
        "layer_rows": layer_rows,
        "components": wanted,
        "source_weight_bytes": source_bytes,
        "variants": list(report_variants.values()),
    }
