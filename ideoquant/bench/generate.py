"""Generation: every variant's image for every (prompt, seed), written the moment it exists, skipped when it is there.

One variant's backbones are resident at a time; the base pipeline (text encoder, tokenizer, VAE, scheduler) is
loaded once and the backbones swapped into it. Under `accelerate launch`, each process generates its share of the
(prompt, seed) list (`PartialState.split_between_processes`) for every variant; the caller gathers.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from .. import model as model_mod
from ..errors import IdeoquantError
from ..evaluation.runner import free
from ..progress import Reporter
from .results import TIMINGS, image_path, write_json
from .variants import BenchVariant


@dataclass(frozen=True)
class Job:
    prompt_id: str
    prompt: str
    seed: int


@dataclass
class Generation:
    steps: int
    size: tuple[int, int]  # width, height
    guidance: float | None  # None: the pipeline's default schedule
    max_sequence_length: int | None = None


def jobs_for(prompts, seeds: int) -> list[Job]:
    """(prompt, seed) pairs: a prompt's own seed, else seeds 0..N-1."""
    return [Job(p.id, p.prompt, s) for p in prompts for s in ([p.seed] if p.seed is not None else range(seeds))]


def readable(path: Path) -> bool:
    """An image that exists and decodes whole (a file cut short by a kill does not)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except (OSError, ValueError, SyntaxError):
        return False


def save_png(image, path: Path, text: dict) -> None:
    """The image with its metadata as PNG text chunks; written beside and renamed, so it appears whole."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, str(v))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def png_text(path: Path) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        return dict(getattr(im, "text", {}) or {})


def load_base(base: str, backbones: dict, device: str, offload: bool):
    from diffusers import Ideogram4Pipeline

    from ..load import BF16_BASE_PIPELINE, DEFAULT_BASE_PIPELINE

    try:
        pipe = Ideogram4Pipeline.from_pretrained(base, torch_dtype=torch.bfloat16, **backbones)
    except (OSError, ValueError, TypeError, ImportError, AttributeError) as e:
        raise IdeoquantError(f"cannot load the base pipeline {base}: {' '.join(str(e).split())} (a base is a "
                             f"diffusers-layout Ideogram 4 pipeline, e.g. {DEFAULT_BASE_PIPELINE}, which needs "
                             f"bitsandbytes on CUDA, or {BF16_BASE_PIPELINE})") from None
    pipe.set_progress_bar_config(disable=True)
    _place(pipe, device, offload)
    return pipe


def _place(pipe, device: str, offload: bool) -> None:
    if offload:
        pipe.remove_all_hooks()
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def generate(report: Path, variants: list[BenchVariant], jobs: list[Job], source, base: str, gen: Generation, *,
             device: str = "cpu", offload: bool = False, rank: int = 0, reporter: Reporter | None = None) -> dict:
    """Make every missing image of `jobs` for every variant; returns {"generated": n, "skipped": n}."""
    reporter = reporter or Reporter()
    todo = {v.name: [j for j in jobs if not readable(image_path(report, v.name, j.prompt_id, j.seed))]
            for v in variants}
    total = sum(len(t) for t in todo.values())
    skipped = len(jobs) * len(variants) - total
    reporter.start("images", total)
    pipe = None
    try:
        for v in variants:
            if not todo[v.name]:
                continue
            is_cuda = device.startswith("cuda")
            if is_cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            load_device = "cpu" if offload else device
            backbones, nbytes = {}, 0
            for c in model_mod.COMPONENTS:
                backbones[c], n = v.load(c, source.components[c], load_device)
                nbytes += n
            if pipe is None:
                pipe = load_base(base, backbones, device, offload)
            else:
                for c, m in backbones.items():
                    setattr(pipe, c, m)
                _place(pipe, device, offload)
            backbones = None
            _sync(device)
            load_seconds = time.perf_counter() - t0
            for job in todo[v.name]:
                _sync(device)
                t0 = time.perf_counter()
                try:
                    image = pipe(**_call(job, gen)).images[0]
                except ValueError as e:  # the pipeline's own input checks (size multiple, prompt too long)
                    raise IdeoquantError(f"the pipeline refused prompt {job.prompt_id}: {' '.join(str(e).split())}") \
                        from None
                _sync(device)
                seconds = time.perf_counter() - t0
                save_png(image, image_path(report, v.name, job.prompt_id, job.seed), {
                    "prompt": job.prompt, "prompt_id": job.prompt_id, "seed": job.seed, "variant": v.name,
                    "steps": gen.steps, "guidance": "default schedule" if gen.guidance is None else gen.guidance,
                    "size": f"{gen.size[0]}x{gen.size[1]}", "seconds": f"{seconds:.6f}", "device": device,
                    "software": f"ideoquant {__version__} bench"})
                reporter.advance("images", 1)
            timing = {"variant": v.name, "device": device, "load_seconds": load_seconds, "weight_bytes": nbytes,
                      "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if is_cuda else None}
            (Path(report) / TIMINGS).mkdir(exist_ok=True)
            write_json(Path(report) / TIMINGS / f"{v.name}-{rank}.json", timing)
            for c in model_mod.COMPONENTS:  # the next variant's backbones load into freed memory
                m = getattr(pipe, c)
                setattr(pipe, c, None)
                free(m)
                m = None
    finally:
        reporter.finish("images")
    return {"generated": total, "skipped": skipped}


def _call(job: Job, gen: Generation) -> dict:
    kw = dict(prompt=job.prompt, width=gen.size[0], height=gen.size[1], num_inference_steps=gen.steps,
              generator=torch.Generator("cpu").manual_seed(job.seed), output_type="pil")
    if gen.guidance is not None:  # a constant scale replaces the pipeline's per-step schedule
        kw.update(guidance_scale=gen.guidance, guidance_schedule=None)
    if gen.max_sequence_length is not None:
        kw["max_sequence_length"] = gen.max_sequence_length
    return kw


def read_timings(report: Path, variant: str) -> list[dict]:
    out = []
    for p in sorted((Path(report) / TIMINGS).glob(f"{variant}-*.json")):
        if p.stem.rsplit("-", 1)[0] == variant:
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue
    return out
