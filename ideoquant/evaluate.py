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

import gc
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import model as model_mod
from .errors import IdeoquantError
from .metrics import ErrorStats

GUIDANCE = 7.0
KEY_CAPTURE = "ideoquant.capture"
BASELINES = ("fp8", "nf4", "w8a8")


class Reporter:
    """Progress hooks (the CLI renders them); the default does nothing."""

    def start(self, task: str, total: int) -> None: ...

    def advance(self, task: str, n: int) -> None: ...

    def finish(self, task: str) -> None: ...


# ---------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """A list of calls; each call maps a component to the keyword arguments of its forward (one denoising step)."""

    calls: list[dict[str, dict[str, torch.Tensor]]]
    info: dict = field(default_factory=dict)

    def for_component(self, component: str) -> list[dict[str, torch.Tensor]]:
        return [c[component] for c in self.calls if component in c]


def sample_calls(config: dict, *, steps: int = 4, tokens: int = 64, grid: int | tuple[int, int] = 16, batch: int = 2,
                 seed: int = 0) -> Inputs:
    """`steps` deterministic denoising steps at timesteps (i + 0.5) / steps, each a conditional call on the packed
    [left-pad][text][image] sequence (`demo.sample_inputs`) and the matching unconditional call (image tokens only,
    zero text features), as the pipeline makes them."""
    from .demo import sample_inputs

    if steps < 1 or tokens < 1:
        raise IdeoquantError("--steps and --tokens must be at least 1")
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    calls = []
    for i in range(steps):
        cond = sample_inputs(config, batch=batch, text_tokens=tokens, grid=(gh, gw),
                             timesteps=((i + 0.5) / steps,), seed=seed + i)
        calls.append({"transformer": cond, "unconditional_transformer": unconditional(cond, tokens)})
    info = {"kind": "sample", "steps": steps, "tokens": tokens, "grid": [gh, gw], "batch": batch, "seed": seed}
    return Inputs(calls, info)


def unconditional(cond: dict[str, torch.Tensor], text_tokens: int) -> dict[str, torch.Tensor]:
    """The pipeline's unconditional call for a conditional one: the image region, zeroed text features."""
    img = slice(text_tokens, None)
    return {
        "hidden_states": cond["hidden_states"][:, img].clone(),
        "timestep": cond["timestep"].clone(),
        "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"][:, img]),
        "position_ids": cond["position_ids"][:, img].clone(),
        "segment_ids": cond["segment_ids"][:, img].clone(),
        "indicator": cond["indicator"][:, img].clone(),
    }


def make_inputs(config: dict, inputs: str | Path | Inputs | None = None, **sample) -> Inputs:
    if isinstance(inputs, Inputs):
        return inputs
    if inputs is not None:
        return load_captured(inputs)
    return sample_calls(config, **sample)


# ---------------------------------------------------------------- capture


def capture(pipe, out: str | Path, *args, components=model_mod.COMPONENTS, **kwargs) -> dict:
    """Run `pipe(*args, **kwargs)` (an `Ideogram4Pipeline`, or anything with the same two backbones) and save the
    forward kwargs of every call of `transformer` and `unconditional_transformer` to a safetensors file.

    Tensors equal to the same argument of the previous call (the text features, the positions: constant over the
    denoising loop) are stored once. Returns the capture's description (also in the file's metadata)."""
    import inspect as inspect_mod

    from safetensors.torch import save_file

    out = Path(out)
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, list[dict[str, str]]] = {c: [] for c in components}
    last: dict[tuple[str, str], str] = {}
    handles = []

    def hook_for(component: str, module):
        params = list(inspect_mod.signature(module.forward).parameters)

        def hook(mod, args, kw):
            named = dict(zip(params, args))
            named.update(kw)
            call = {}
            n = len(index[component])
            for k, v in named.items():
                if not isinstance(v, torch.Tensor):
                    continue
                v = v.detach().to("cpu").contiguous()
                prev = last.get((component, k))
                if prev is not None and tensors[prev].dtype == v.dtype and tensors[prev].shape == v.shape \
                        and torch.equal(tensors[prev], v):
                    call[k] = prev
                    continue
                key = f"{component}.{n:04d}.{k}"
                tensors[key] = v.clone()
                last[(component, k)] = key
                call[k] = key
            index[component].append(call)

        return hook

    for c in components:
        module = getattr(pipe, c, None)
        if module is None:
            raise IdeoquantError(f"the pipeline has no '{c}'")
        handles.append(module.register_forward_pre_hook(hook_for(c, module), with_kwargs=True))
    try:
        pipe(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    counts = {c: len(v) for c, v in index.items()}
    if not any(counts.values()):
        raise IdeoquantError("the pipeline ran without calling its backbones: nothing captured")
    info = {
        "pipeline": type(pipe).__name__,
        "call_kwargs": {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "calls": counts,
        "index": index,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out, metadata={"format": "pt", KEY_CAPTURE: json.dumps(info)})
    return {k: v for k, v in info.items() if k != "index"} | {"path": str(out), "bytes": out.stat().st_size}


def capture_pipeline(model: str, out: str | Path, *, prompts=("a red fox in fresh snow, photograph",),
                     height: int = 512, width: int = 512, steps: int = 4, max_sequence_length: int = 256,
                     guidance_scale: float = GUIDANCE, seed: int = 0, device: str = "cpu", offload: bool = False,
                     revision: str | None = None) -> dict:
    """Load an `Ideogram4Pipeline` (text encoder and VAE included: needs the real repo) and `capture` one generation.

    Small sizes keep the file small: the text features are stored once, the latents once per step."""
    from diffusers import Ideogram4Pipeline

    from .job import check_device

    device = check_device(device)
    try:
        pipe = Ideogram4Pipeline.from_pretrained(model, torch_dtype=torch.bfloat16, revision=revision)
    except (OSError, ValueError, TypeError, ImportError) as e:
        msg = " ".join(str(e).split())
        raise IdeoquantError(f"cannot load the pipeline {model}: {msg}") from None
    if offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    generator = torch.Generator("cpu").manual_seed(seed)
    return capture(pipe, out, prompt=list(prompts), height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance_scale, max_sequence_length=max_sequence_length, generator=generator,
                   output_type="latent")


def load_captured(path: str | Path) -> Inputs:
    """Inputs recorded by `capture`: the i-th call of each backbone forms step i."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise IdeoquantError(f"no such inputs file: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if KEY_CAPTURE not in meta:
                raise IdeoquantError(f"{path} was not written by `ideoquant capture` (no {KEY_CAPTURE} metadata)")
            info = json.loads(meta[KEY_CAPTURE])
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise IdeoquantError(f"cannot read {path}: {e}") from None
    steps = max(len(v) for v in info["index"].values())
    calls: list[dict] = [{} for _ in range(steps)]
    for component, entries in info["index"].items():
        for i, call in enumerate(entries):
            calls[i][component] = {k: stored[key] for k, key in call.items()}
    desc = {"kind": "captured", "path": str(path), "pipeline": info.get("pipeline"),
            "calls": info["calls"], "call_kwargs": info.get("call_kwargs", {})}
    return Inputs(calls, desc)


# ---------------------------------------------------------------- models


def source_model(component, device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The source backbone in bf16, from the source reader (any layout, FP8 dequantized), built like
    `from_pretrained(torch_dtype=bfloat16)` builds it: the rotary buffer stays float32 (see pitfalls)."""
    from accelerate import init_empty_weights
    from diffusers import Ideogram4Transformer2DModel

    with init_empty_weights():
        m = Ideogram4Transformer2DModel.from_config(component.config)
    state = {n: t.read().to(device=device, dtype=dtype) for n, t in component.tensors.items()}
    m.load_state_dict(state, assign=True, strict=True)
    return m.to(device).eval()


def stored_bytes(m: torch.nn.Module) -> int:
    """Bytes of the parameters and persistent buffers as the model holds them (Int8Tensor: qdata + scale + ...,
    GGUF: the packed blocks)."""
    total = 0
    for p in m.parameters():
        total += _tensor_bytes(p)
    for mod in m.modules():
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and name not in mod._non_persistent_buffers_set:
                total += _tensor_bytes(b)
    return total


def _tensor_bytes(t: torch.Tensor) -> int:
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    names = getattr(data, "tensor_data_names", None)
    if names is not None:  # a torchao tensor subclass
        parts = list(names) + list(getattr(data, "optional_tensor_data_names", []) or [])
        return sum(getattr(data, n).numel() * getattr(data, n).element_size()
                   for n in parts if getattr(data, n, None) is not None)
    return t.numel() * t.element_size()


def free(m: torch.nn.Module | None) -> None:
    """Let a backbone go before the next one loads (the caller drops its own reference too). A full collection
    only pays off for a real-size model or on the GPU."""
    big = m is not None and (sum(p.numel() for p in m.parameters()) > 50_000_000
                             or any(p.is_cuda for p in m.parameters()))
    del m
    if big:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def to_device(kwargs: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in kwargs.items()}


@torch.no_grad()
def velocities(m: torch.nn.Module, calls: list[dict[str, torch.Tensor]], device: str = "cpu",
               taps: "LayerTaps | None" = None, progress: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """`demo.velocity` for each call (image tokens, float32, on the CPU)."""
    from .demo import velocity

    out = []
    for i, kw in enumerate(calls):
        if taps is not None:
            taps.start_call(i)
        out.append(velocity(m, to_device(kw, device)).cpu())
        if progress is not None:
            progress()
    return out


# ---------------------------------------------------------------- metrics


def compare(reference: torch.Tensor, approx: torch.Tensor) -> dict:
    """SQNR (dB, None when exact), cosine similarity and relative L2 error."""
    ref = reference.double().flatten()
    app = approx.double().flatten()
    s = ErrorStats()
    s.add(ref, app)
    norm = float(ref.norm())
    return {
        "sqnr_db": s.sqnr_db,
        "cosine": round(float(torch.nn.functional.cosine_similarity(ref, app, dim=0)), 7),
        "rel_error": round(float((ref - app).norm()) / norm, 7) if norm else None,
    }


def guided(v_cond: list[torch.Tensor], v_uncond: list[torch.Tensor], g: float) -> torch.Tensor:
    return torch.cat([g * c + (1.0 - g) * u for c, u in zip(v_cond, v_uncond)])


class LayerTaps:
    """Forward hooks on every nn.Linear (GGUFLinear included).

    Reference mode keeps, per call, a strided subset of at most `rows` rows of each layer's input and output.
    Compare mode measures two errors on the same rows: in situ (the variant's layer output inside the variant
    against the source's, so upstream error is included) and isolated (the variant's layer applied to the source's
    layer input: that layer's own quantization error)."""

    def __init__(self, m: torch.nn.Module, rows: int, reference: "LayerTaps | None" = None):
        self.rows = rows
        self.reference = reference
        self.records: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.stats: dict[str, ErrorStats] = {}
        self.isolated: dict[str, ErrorStats] = {}
        self.call = 0
        self._seen: dict[str, int] = {}
        linears = [(name, mod) for name, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
        self.order = [name for name, _ in linears]
        self._handles = [mod.register_forward_hook(self._hook(name)) for name, mod in linears]

    def start_call(self, i: int) -> None:
        self.call = i
        self._seen = {}

    def _subset(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().reshape(-1, t.shape[-1])
        if t.shape[0] > self.rows:
            t = t[torch.linspace(0, t.shape[0] - 1, self.rows, device=t.device).round().long()]
        return t

    def _hook(self, name: str):
        def hook(mod, args, output):
            n = self._seen.get(name, 0)
            self._seen[name] = n + 1
            key = (self.call, name, n)
            y = self._subset(output)
            if self.reference is None:
                self.records[key] = (self._subset(args[0]).to("cpu", copy=True), y.to("cpu", copy=True))
                return
            ref = self.reference.records.get(key)
            if ref is None:
                return
            x_ref, y_ref = ref
            self.stats.setdefault(name, ErrorStats()).add(y_ref, y.to("cpu"))
            own = mod.forward(x_ref.to(args[0].device))  # forward(), not __call__: no hooks, no recursion
            self.isolated.setdefault(name, ErrorStats()).add(y_ref, own.detach().to("cpu"))
        return hook

    def sqnr(self, isolated: bool = False) -> dict[str, float | None]:
        stats = self.isolated if isolated else self.stats
        return {name: stats[name].sqnr_db for name in self.order if name in stats}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# ---------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    kind: str  # "int8", "gguf", "fp8", "nf4", "w8a8"
    paths: dict[str, str] = field(default_factory=dict)  # component -> file or folder
    # (component, Component, device) -> (model, bytes as stored)
    load: Callable | None = None


def resolve_variants(paths) -> list[Variant]:
    """QUANTIZED arguments -> variants, in the order given. An INT8 output folder gives both (or its) backbones; a
    folder of GGUF files, or GGUF files of one folder, form one variant per type label; a lone .gguf names its
    backbone in its metadata (`ideogram4.component`)."""
    from .gguf import KEY_COMPONENT, read_metadata

    entries: list = []  # Variant (INT8) or a GGUF group key, in argument order
    gguf_groups: dict[tuple[Path, str], dict[str, str]] = {}

    def add_gguf(f: Path) -> None:
        meta = read_metadata(f)
        component = meta.get(KEY_COMPONENT) or next((c for c in sorted(model_mod.COMPONENTS, key=len, reverse=True)
                                                       if f"-{c}-" in f.name), "transformer")
        if component not in model_mod.COMPONENTS:
            raise IdeoquantError(f"{f.name}: component '{component}' is not an Ideogram 4 backbone")
        label = f.stem.split(f"-{component}-", 1)[-1] if f"-{component}-" in f.stem else f.stem
        key = (f.parent.resolve(), label)
        if key not in gguf_groups:
            gguf_groups[key] = {}
            entries.append(key)
        group = gguf_groups[key]
        if component in group and group[component] != str(f):
            raise IdeoquantError(f"two {component} files for one variant: {group[component]} and {f}")
        group[component] = str(f)

    def check_quantized(folder: Path) -> None:
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise IdeoquantError(f"cannot read {folder / 'config.json'}: {e}") from None
        if not cfg.get("quantization_config"):
            raise IdeoquantError(f"{folder} is not quantized (no quantization_config in config.json)")

    for p in map(Path, paths):
        if not p.exists():
            raise IdeoquantError(f"no such quantized output: {p}")
        if p.is_file():
            if p.suffix != ".gguf":
                raise IdeoquantError(f"{p.name}: give an INT8 output folder (or a component folder) or a .gguf file")
            add_gguf(p)
            continue
        comps = {c: str(p / c) for c in model_mod.COMPONENTS if (p / c / "config.json").is_file()}
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            for f in ggufs:
                add_gguf(f)
        elif comps:
            for c in comps:
                check_quantized(p / c)
            entries.append(Variant(p.name, "int8", comps))
        elif (p / "config.json").is_file():
            check_quantized(p)
            c = p.name if p.name in model_mod.COMPONENTS else "transformer"
            entries.append(Variant(p.parent.name or p.name, "int8", {c: str(p)}))
        else:
            raise IdeoquantError(f"{p} holds no INT8 backbone (<component>/config.json) and no .gguf file")
    labels_per_folder: dict[Path, int] = {}
    for folder, _ in gguf_groups:
        labels_per_folder[folder] = labels_per_folder.get(folder, 0) + 1
    out: list[Variant] = []
    for e in entries:
        if not isinstance(e, Variant):
            folder, label = e
            e = Variant(folder.name if labels_per_folder[folder] == 1 else f"{folder.name}:{label}", "gguf",
                        dict(sorted(gguf_groups[e].items())))
        base, name, i = e.name, e.name, 2
        while any(v.name == name for v in out):
            name, i = f"{base}-{i}", i + 1
        e.name = name
        e.load = _load_quantized(e)
        out.append(e)
    return out


def _load_quantized(v: Variant):
    def load(component: str, source_component, device: str):
        from .load import load_transformer

        m = load_transformer(v.paths[component], torch.bfloat16, device=device)
        return m, stored_bytes(m)

    return load


def baseline_variants(names=BASELINES) -> list[Variant]:
    from . import baselines

    out = []
    for n in names:
        n = n.strip().lower()
        if n not in baselines.BUILDERS:
            raise IdeoquantError(f"unknown baseline '{n}': choose from {', '.join(baselines.BUILDERS)}")
        label, build = baselines.BUILDERS[n]
        out.append(Variant(label, n, {c: "(built from the source weights)" for c in model_mod.COMPONENTS},
                           (lambda component, src, device, build=build: build(src, device))))
    return out


# ---------------------------------------------------------------- evaluate


def evaluate(
    source: str | None,
    quantized=(),
    *,
    baselines=BASELINES,
    components: list[str] | None = None,
    inputs: str | Path | Inputs | None = None,
    steps: int = 4,
    tokens: int = 64,
    grid: int = 16,
    batch: int = 2,
    seed: int = 0,
    guidance: float = GUIDANCE,
    layer_rows: int = 64,
    device: str = "cpu",
    revision: str | None = None,
    token: str | None = None,
    reporter: Reporter | None = None,
) -> dict:
    """Evaluate quantized outputs (and baselines) against the source on the same inputs. See the module docstring."""
    from .job import check_device
    from .source import open_source

    reporter = reporter or Reporter()
    device = check_device(device)
    variants = resolve_variants(quantized) + baseline_variants(baselines or ())
    if not variants:
        raise IdeoquantError("nothing to evaluate: give quantized outputs, or keep the baselines")
    wanted = components or [c for c in model_mod.COMPONENTS if any(c in v.paths for v in variants)]
    src = open_source(source, components=wanted, revision=revision, token=token)
    first = next(iter(src.components.values()))
    ins = make_inputs(first.config, inputs, steps=steps, tokens=tokens, grid=grid, batch=batch, seed=seed)
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


# ---------------------------------------------------------------- plot


def plot(report: dict, path: str | Path, title: str | None = None) -> Path:
    """Per-layer output SQNR of each variant: per component, the layers' own error (isolated) and in situ
    (matplotlib through the Agg canvas: no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    comps = report["components"]
    panels = [(c, kind) for c in comps for kind in ("layers_isolated", "layers")]
    layer_names = {c: _layer_order(report, c) for c in comps}
    width = max(11.0, min(28.0, 0.28 * max(len(n) for n in layer_names.values()) + 7))
    fig = Figure(figsize=(width, 3.3 * len(panels) + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    markers = "os^Dv<>ph*"
    what = {"layers_isolated": "own error (the layer on the source's layer input)",
            "layers": "in situ (inside the quantized model: upstream error included)"}
    for ax, (c, kind) in zip(axes, panels):
        names = layer_names[c]
        x = list(range(len(names)))
        for i, v in enumerate(report["variants"]):
            comp = v["components"].get(c)
            if not comp:
                continue
            y = [comp.get(kind, {}).get(n) for n in names]
            y = [math.nan if s is None else s for s in y]
            ax.plot(x, y, marker=markers[i % len(markers)], markersize=3.5, linewidth=1.1, color=f"C{i % 10}",
                    label=f"{v['name']} ({_db(comp['sqnr_db'])} end to end)")
        ax.set_title(f"{c}: per-layer output SQNR, {what[kind]}; a gap: exact", fontsize=9, loc="left")
        ax.set_ylabel("SQNR (dB)")
        ax.grid(True, alpha=0.3)
        step = max(1, len(names) // 60)
        ax.set_xticks(x[::step])
        ax.set_xticklabels([_short(n) for n in names[::step]], rotation=90, fontsize=6)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    src = report["source"].get("repo_id") or report["source"].get("spec", "")
    fig.suptitle(title or f"ideoquant eval of {src}", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _layer_order(report: dict, component: str) -> list[str]:
    names: list[str] = []
    for v in report["variants"]:
        for n in (v["components"].get(component) or {}).get("layers", {}):
            if n not in names:
                names.append(n)
    return names


def _short(name: str) -> str:
    return (name.replace("layers.", "L").replace(".attention.", ".attn.").replace(".feed_forward.", ".ff.")
            .replace("adaln_modulation", "adaln"))


def _db(x) -> str:
    return "exact" if x is None else f"{x:.1f} dB"
