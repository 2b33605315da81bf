"""Evaluation inputs: deterministic sample calls shaped like the pipeline's, or calls recorded from a real run.

`sample_calls` builds a conditional call on [text][image] and an unconditional call on the image tokens with zeroed
text features, as `Ideogram4Pipeline.__call__` builds them; `capture` records what a real pipeline run passes to each
backbone, and `load_captured` reads it back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import model as model_mod
from .. import sidecar
from ..device import check_device
from ..errors import IdeoquantError
from ..load import BF16_BASE_PIPELINE, DEFAULT_BASE_PIPELINE
from ..source.hub import check_base
from ..write.target import output_file, source_paths

KEY_CAPTURE = "ideoquant.capture"
GUIDANCE = 7.0  # g in g * v_cond + (1 - g) * v_uncond, the pipeline's default


def sample_inputs(
    config: dict,
    *,
    batch: int = 2,
    text_tokens: int = 12,
    grid: tuple[int, int] = (4, 4),
    timesteps: tuple[float, ...] = (0.3, 0.8),
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """Packed [left-pad][text][image] inputs shaped like the pipeline's, deterministic for a seed.

    Prompts of different lengths exercise the padding and the block-diagonal mask.
    """
    from diffusers.models.transformers.transformer_ideogram4 import (
        IMAGE_POSITION_OFFSET, LLM_TOKEN_INDICATOR, OUTPUT_IMAGE_INDICATOR, SEQUENCE_PADDING_INDICATOR)

    g = torch.Generator().manual_seed(seed)
    gh, gw = grid
    n_img = gh * gw
    total = text_tokens + n_img
    h = torch.arange(gh).repeat_interleave(gw)
    w = torch.arange(gw).repeat(gh)
    image_pos = torch.stack([torch.zeros_like(h), h, w], dim=1) + IMAGE_POSITION_OFFSET
    position_ids = torch.zeros(batch, total, 3, dtype=torch.long)
    segment_ids = torch.full((batch, total), SEQUENCE_PADDING_INDICATOR, dtype=torch.long)
    indicator = torch.zeros(batch, total, dtype=torch.long)
    for b in range(batch):
        n_text = max(1, text_tokens - 3 * b)
        off = text_tokens - n_text
        t = torch.arange(n_text)
        position_ids[b, off:text_tokens] = torch.stack([t, t, t], dim=1)
        position_ids[b, text_tokens:] = image_pos
        indicator[b, off:text_tokens] = LLM_TOKEN_INDICATOR
        indicator[b, text_tokens:] = OUTPUT_IMAGE_INDICATOR
        segment_ids[b, off:] = 1
    ts = torch.tensor([timesteps[b % len(timesteps)] for b in range(batch)])
    return {
        "hidden_states": torch.randn(batch, total, config["in_channels"], generator=g).to(dtype),
        "timestep": ts.to(dtype),
        "encoder_hidden_states": torch.randn(batch, total, config["llm_features_dim"], generator=g).to(dtype),
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "indicator": indicator,
    }


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
    gh, gw = check_sample_size(config, steps=steps, tokens=tokens, grid=grid, batch=batch)
    calls = []
    for i in range(steps):
        cond = sample_inputs(config, batch=batch, text_tokens=tokens, grid=(gh, gw),
                             timesteps=((i + 0.5) / steps,), seed=seed + i)
        calls.append({"transformer": cond, "unconditional_transformer": unconditional(cond, tokens)})
    info = {"kind": "sample", "steps": steps, "tokens": tokens, "grid": [gh, gw], "batch": batch, "seed": seed}
    return Inputs(calls, info)


# Ranges of the sampled inputs' sizes (the CLI's options carry the same): one text tokens, grid side, batch, steps.
SAMPLE_RANGES = {"steps": (1, 1000), "tokens": (1, 4096), "grid": (1, 256), "batch": (1, 64)}
MAX_INPUT_BYTES = 1 << 30  # the sampled inputs of every step together, whatever the machine


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_sample_size(config: dict, *, steps, tokens, grid, batch) -> tuple[int, int]:
    """Refuse, before allocating anything, sample sizes out of range or whose inputs (bf16, conditional and
    unconditional calls of every step) would not fit in memory. Returns the grid as (height, width)."""
    gh, gw = (grid, grid) if not isinstance(grid, (tuple, list)) else (tuple(grid) + (None, None))[:2]
    for name, value in (("steps", steps), ("tokens", tokens), ("grid", gh), ("grid", gw), ("batch", batch)):
        lo, hi = SAMPLE_RANGES[name]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise IdeoquantError(f"--{name} {value!r}: must be a whole number from {lo} to {hi}")
    features = int(config.get("in_channels", 0)) + int(config.get("llm_features_dim", 0))
    per_call = batch * (tokens + gh * gw) * features * 2  # bf16 hidden_states and encoder_hidden_states
    needed = steps * per_call * 2  # the unconditional call copies the image part
    avail = _available_memory()
    limit = MAX_INPUT_BYTES if avail is None else min(MAX_INPUT_BYTES, avail // 4)
    if needed > limit:
        raise IdeoquantError(f"--steps {steps} --tokens {tokens} --grid {gh}x{gw} --batch {batch}: the sample inputs "
                             f"would need {needed / 2**30:.1f} GiB of memory (limit {limit / 2**30:.1f} GiB); "
                             "use smaller sizes")
    return gh, gw


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


def capture(pipe, out: str | Path, *args, components=model_mod.COMPONENTS, overwrite: bool = False, **kwargs) -> dict:
    """Run `pipe(*args, **kwargs)` (an `Ideogram4Pipeline`, or anything with the same two backbones) and save the
    forward kwargs of every call of `transformer` and `unconditional_transformer` to a safetensors file.

    Tensors equal to the same argument of the previous call (the text features, the positions: constant over the
    denoising loop) are stored once. Returns the capture's description (also in the file's metadata). `out`
    follows the output policy (`write.target.output_file`)."""
    with output_file(out, overwrite=overwrite) as tmp:
        info = _capture(pipe, tmp, *args, components=components, **kwargs)
    return info | {"path": str(out), "bytes": Path(out).stat().st_size}


def _capture(pipe, out: Path, *args, components, **kwargs) -> dict:
    import inspect as inspect_mod

    from safetensors.torch import save_file

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
    save_file(tensors, out, metadata={"format": "pt", KEY_CAPTURE: json.dumps(info)})
    return {k: v for k, v in info.items() if k != "index"}


def capture_pipeline(base: str | Path = DEFAULT_BASE_PIPELINE, out: str | Path = "captured.safetensors", *,
                     prompts=("a red fox in fresh snow, photograph",), height: int = 512, width: int = 512,
                     steps: int = 4, max_sequence_length: int = 256, guidance_scale: float = GUIDANCE, seed: int = 0,
                     device: str = "cpu", offload: bool = False, revision: str | None = None,
                     overwrite: bool = False) -> dict:
    """Load a whole `Ideogram4Pipeline` from `base` and `capture` one generation.

    `base` is a diffusers-layout Ideogram 4 pipeline (Hub repo id or folder) that stock diffusers loads, text encoder
    and VAE included: `ideogram-ai/ideogram-4-nf4-diffusers` (the default; bitsandbytes NF4 text encoder and
    backbones, so a CUDA GPU with bitsandbytes) or a bf16 diffusers repack (`load.BF16_BASE_PIPELINE`; no
    bitsandbytes). `ideogram-ai/ideogram-4-fp8` is not one (fused FP8 backbones, FP8 weight-only text encoder).
    Small sizes keep the file small: the text features are stored once, the latents once per step. `out` follows
    the output policy (`write.target.output_file`), checked before the pipeline loads."""
    check_base(base)
    device = check_device(device)
    with output_file(out, source_paths(base), overwrite=overwrite) as tmp:
        info = _capture_pipeline(base, tmp, prompts=prompts, height=height, width=width, steps=steps,
                                 max_sequence_length=max_sequence_length, guidance_scale=guidance_scale, seed=seed,
                                 device=device, offload=offload, revision=revision)
    return info | {"path": str(out), "bytes": Path(out).stat().st_size, "base": str(base)}


def _capture_pipeline(base, out: Path, *, prompts, height, width, steps, max_sequence_length, guidance_scale, seed,
                      device, offload, revision) -> dict:
    from diffusers import Ideogram4Pipeline

    try:
        pipe = Ideogram4Pipeline.from_pretrained(base, torch_dtype=torch.bfloat16, revision=revision)
    except (OSError, ValueError, TypeError, ImportError, AttributeError) as e:
        msg = " ".join(str(e).split())
        raise IdeoquantError(f"cannot load the pipeline {base}: {msg} (capture needs a whole diffusers-layout "
                             f"Ideogram 4 pipeline, e.g. {DEFAULT_BASE_PIPELINE} on CUDA with bitsandbytes, or "
                             f"{BF16_BASE_PIPELINE})") from None
    if offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    generator = torch.Generator("cpu").manual_seed(seed)
    # A constant guidance scale replaces the pipeline's default per-step schedule (diffusers refuses both).
    return _capture(pipe, out, components=model_mod.COMPONENTS, prompt=list(prompts), height=height, width=width,
                    num_inference_steps=steps, guidance_scale=guidance_scale, guidance_schedule=None,
                    max_sequence_length=max_sequence_length, generator=generator, output_type="latent")


def load_captured(path: str | Path) -> Inputs:
    """Inputs recorded by `capture`: the i-th call of each backbone forms step i."""
    info, stored = sidecar.read(path, KEY_CAPTURE, "inputs", "ideoquant capture")
    steps = max(len(v) for v in info["index"].values())
    calls: list[dict] = [{} for _ in range(steps)]
    for component, entries in info["index"].items():
        for i, call in enumerate(entries):
            calls[i][component] = {k: stored[key] for k, key in call.items()}
    desc = {"kind": "captured", "path": str(path), "pipeline": info.get("pipeline"),
            "calls": info["calls"], "call_kwargs": info.get("call_kwargs", {})}
    return Inputs(calls, desc)


def open_with_inputs(source, inputs=None, *, components=None, revision=None, token=None, **sample):
    """The source (headers) and the evaluation inputs for it: `inputs` (recorded, or an Inputs), else sample calls
    shaped by the first backbone's config (`sample`: steps, tokens, grid, batch, seed; see `sample_calls`)."""
    from ..source import open_source

    src = open_source(source, components=components, revision=revision, token=token)
    first = next(iter(src.components.values()))
    return src, make_inputs(first.config, inputs, **sample)
