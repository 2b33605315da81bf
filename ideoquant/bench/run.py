"""`bench` and `score_images`: the whole benchmark, and the scoring of images made elsewhere. See the package
docstring; `results.py` documents the REPORT folder and results.json."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path

from ..errors import IdeoquantError
from ..progress import Reporter
from ..write.staging import output_lock
from ..write.target import check_target, source_paths
from . import results as res
from .generate import Generation, Job, generate, jobs_for, png_text, read_timings, readable
from .metrics import (AGAINST_REFERENCE, DEFAULT_MODELS, HIGHER_IS_BETTER, OCR_READ, check_extras,
                      parse_metric_models, parse_metrics, scorers)
from .prompts import load_prompts
from .report import write_report
from .stats import summarize
from .variants import BASELINES, REFERENCE, bench_variants

REPORT_MARKER = res.SETTINGS
DEFAULT_STEPS = 48  # Ideogram4Pipeline's default, which its default guidance schedule (45 x 7.0, 3 x 3.0) fits
DEFAULT_GUIDANCE = 7.0  # the constant scale used at other step counts  # a folder holding it is a bench report (resumable, replaceable)


def bench(source: str, variants: list[str], out: str | Path, *, base: str | None = None,
          prompts: str | Path | None = None, seeds: int = 1, steps: int = 48, guidance: float | None = None,
          size: tuple[int, int] = (1024, 1024), max_sequence_length: int | None = None, limit: int | None = None,
          metrics: str | list[str] | None = None, metric_models=(), device: str | None = None, offload: bool = False,
          overwrite: bool = False, revision: str | None = None, token: str | None = None,
          reporter: Reporter | None = None) -> dict | None:
    """Generate the reference's and every variant's image for every (prompt, seed), score them, write REPORT.

    Under `accelerate launch`, call it in every process: each generates its share of the (prompt, seed) list; the
    main process gathers and scores, and returns results.json's dict (the others return None)."""
    from ..device import check_device
    from ..load import DEFAULT_BASE_PIPELINE
    from ..source import open_source

    reporter = reporter or Reporter()
    state = process_state(device)
    distributed = state.num_processes > 1
    device = str(state.device) if distributed else check_device(device or _default_device())
    metric_names = parse_metrics(metrics if not isinstance(metrics, list) else ",".join(metrics))
    models = parse_metric_models(metric_models)
    check_extras(metric_names)
    prompt_list = _select(load_prompts(Path(prompts) if prompts else None), limit)
    bench_vars = bench_variants(list(variants))
    src = open_source(source, revision=revision, token=token)
    base = str(base or DEFAULT_BASE_PIPELINE)
    if guidance is None and steps != DEFAULT_STEPS:  # the pipeline's own schedule has one entry per default step
        guidance = DEFAULT_GUIDANCE
    gen = Generation(steps=steps, size=tuple(size), guidance=guidance, max_sequence_length=max_sequence_length)
    settings = {
        "schema": res.SCHEMA, "mode": "generate", "source": str(source), "revision": revision, "base": base,
        "prompts_sha256": res.prompts_digest(prompt_list), "prompts": len(prompt_list), "seeds": seeds,
        "steps": steps, "guidance": guidance, "size": list(size), "max_sequence_length": max_sequence_length,
        "variants": [{"name": v.name, "kind": v.kind, "what": v.what} for v in bench_vars],
    }
    out = Path(out)
    protected = source_paths(source, [v for v in variants if v.lower() not in BASELINES], base, prompts,
                             _local_models(metric_models))
    jobs = jobs_for(prompt_list, seeds)
    if state.is_main_process:
        _prepare(out, settings, overwrite, protected)
    state.wait_for_everyone()
    if not state.is_main_process:
        res.check_settings(out, settings)
        mine = _share(state, jobs)
        generate(out, bench_vars, mine, src, base, gen, device=device, offload=offload, rank=state.process_index)
        state.wait_for_everyone()
        return None
    with output_lock(out):
        generate(out, bench_vars, _share(state, jobs), src, base, gen, device=device, offload=offload,
                 rank=state.process_index, reporter=reporter)
        state.wait_for_everyone()
        return _score_and_write(out, settings, prompt_list, jobs, [(v.name, v.kind, v.what) for v in bench_vars],
                                [v.name for v in bench_vars if v.is_baseline], metric_names, models, device,
                                steps, reporter)


def score_images(images: str | Path, prompts: str | Path, out: str | Path, *, metrics=None, metric_models=(),
                 device: str | None = None, overwrite: bool = False, reporter: Reporter | None = None) -> dict:
    """Score images made elsewhere, laid out as IMAGES/<variant>/<prompt id>-<seed>.png with the reference in
    IMAGES/reference/; they are copied into REPORT/images/ so the report is self-contained."""
    from ..device import check_device

    reporter = reporter or Reporter()
    device = check_device(device or _default_device())
    metric_names = parse_metrics(metrics if not isinstance(metrics, list) else ",".join(metrics))
    models = parse_metric_models(metric_models)
    prompt_list = load_prompts(Path(prompts))
    by_id = {p.id: p for p in prompt_list}
    images = Path(images)
    if not images.is_dir():
        raise IdeoquantError(f"--images {images}: no such folder")
    folders = sorted(d for d in images.iterdir() if d.is_dir() and not d.name.startswith("."))
    names = [d.name for d in folders]
    if REFERENCE not in names:
        raise IdeoquantError(f"--images {images} has no {REFERENCE}/ folder (the reference variant's images)")
    names.remove(REFERENCE)
    names.insert(0, REFERENCE)
    found: dict[str, list[Job]] = {}
    for name in names:
        for f in sorted((images / name).glob("*.png")):
            pid, sep, seed = f.stem.rpartition("-")
            if not sep or not seed.isdigit():
                raise IdeoquantError(f"{f}: images are named <prompt id>-<seed>.png")
            if pid not in by_id:
                raise IdeoquantError(f"{f}: no prompt with id '{pid}' in {prompts}")
            found.setdefault(name, []).append(Job(pid, by_id[pid].prompt, int(seed)))
    if not found.get(REFERENCE):
        raise IdeoquantError(f"--images {images}/{REFERENCE}/ holds no <prompt id>-<seed>.png images")
    settings = {"schema": res.SCHEMA, "mode": "images", "images": str(images.resolve()),
                "prompts_sha256": res.prompts_digest(prompt_list), "prompts": len(prompt_list),
                "variants": [{"name": n, "kind": "images", "what": str(images / n)} for n in names]}
    out = Path(out)
    _prepare(out, settings, overwrite, source_paths(images, prompts, _local_models(metric_models)))
    with output_lock(out):
        for name, jobs in found.items():
            for j in jobs:
                dest = res.image_path(out, name, j.prompt_id, j.seed)
                if not readable(dest):
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
                    shutil.copyfile(images / name / dest.name, tmp)
                    os.replace(tmp, dest)
        all_jobs = sorted({j for js in found.values() for j in js}, key=lambda j: (j.prompt_id, j.seed))
        return _score_and_write(out, settings, prompt_list, all_jobs, [(n, "images", str(images / n)) for n in names],
                                [], metric_names, models, device, None, reporter, present=found)


def process_state(device: str | None = None):
    """accelerate's view of this process (one process unless started by `accelerate launch`). CPU processes are
    asked for explicitly: accelerate forms a gloo group of CPU processes only when told to."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=(device or "").startswith("cpu") or not torch.cuda.is_available())


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _select(prompts, limit):
    if limit is not None:
        if limit < 1:
            raise IdeoquantError("--limit must be at least 1")
        prompts = prompts[:limit]
    return prompts


def _share(state, jobs: list[Job]) -> list[Job]:
    """This process's part of the (prompt, seed) list: accelerate's own split."""
    if state.num_processes == 1:
        return jobs
    with state.split_between_processes(jobs) as mine:
        return list(mine)


def _local_models(specs) -> list[str]:
    return [spec.partition("=")[2] for spec in specs or ()]


def _prepare(out: Path, settings: dict, overwrite: bool, protected) -> None:
    """REPORT: new, or a report of the same settings (resumed), or replaced with --overwrite; never an input (the
    output policy, `write.target`), never a folder that is not a bench report."""
    # An existing REPORT is not refused here: a report of the same settings is resumed (checked below).
    check_target(out, protected, overwrite=True, folder=True, owned_marker=REPORT_MARKER)
    if out.exists() and not out.is_dir():
        raise IdeoquantError(f"--out {out} is a file, not a report folder")
    is_report = (out / REPORT_MARKER).is_file()
    if out.exists() and any(out.iterdir()) and not is_report:
        if not overwrite:
            raise IdeoquantError(f"{out} exists and is not an ideoquant bench report (choose another --out, or "
                                 "--overwrite to replace it)")
    if overwrite and out.exists():
        shutil.rmtree(out)
    elif is_report:
        res.check_settings(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    for tmp in (out / res.IMAGES).glob("*/.*.tmp"):  # images a killed run was writing
        tmp.unlink(missing_ok=True)
    if not (out / REPORT_MARKER).is_file():
        res.write_json(out / REPORT_MARKER, settings)


def _score_and_write(out: Path, settings: dict, prompt_list, jobs: list[Job], variants: list[tuple[str, str, str]],
                     baselines: list[str], metric_names: list[str], models: dict, device: str, steps: int | None,
                     reporter: Reporter, present: dict[str, list[Job]] | None = None) -> dict:
    from PIL import Image

    by_id = {p.id: p for p in prompt_list}
    names = [n for n, _, _ in variants]
    todo = [(n, j) for n in names for j in (present[n] if present else jobs)]
    loaded = scorers(metric_names, models, device)
    cache = res.ScoreCache(out)
    reporter.start("scoring", len(todo))
    entries, scores, performance = [], {n: {} for n in names}, {}
    digests: dict[tuple, str] = {}

    def digest(n, j):
        key = (n, j.prompt_id, j.seed)
        if key not in digests:
            p = res.image_path(out, n, j.prompt_id, j.seed)
            digests[key] = res.file_digest(p) if p.exists() else ""
        return digests[key]

    try:
        for n, j in todo:
            path = res.image_path(out, n, j.prompt_id, j.seed)
            ref_path = res.image_path(out, REFERENCE, j.prompt_id, j.seed)
            metrics: dict = {}
            images: dict = {}
            for s in loaded:
                if s.against_reference and (n == REFERENCE or not ref_path.exists()):
                    continue
                key = f"{s.key} {digest(n, j)} {digest(REFERENCE, j) if s.against_reference else ''}"
                cached = [cache.get(n, j.prompt_id, j.seed, m, key) for m in s.names]
                if all(hit for hit, _ in cached):
                    metrics.update({m: v for m, (_, v) in zip(s.names, cached)})
                    continue
                if "image" not in images:
                    images["image"] = Image.open(path).convert("RGB")
                if s.against_reference and "reference" not in images:
                    images["reference"] = Image.open(ref_path).convert("RGB")
                got = s.fn(images["image"], images.get("reference"), by_id[j.prompt_id])
                for m in s.names:
                    cache.put(n, j.prompt_id, j.seed, m, key, got.get(m))
                metrics.update({m: got.get(m) for m in s.names})
            read = metrics.pop(OCR_READ, None)
            metrics = {m: v for m, v in metrics.items() if v is not None}
            entry = {"variant": n, "prompt_id": j.prompt_id, "seed": j.seed,
                     "path": path.relative_to(out).as_posix(), "metrics": metrics}
            if read is not None:
                entry["ocr_text"] = read  # results.json's name (docs/bench.md); the report shows it
            entries.append(entry)
            scores[n][(j.prompt_id, j.seed)] = metrics
            reporter.advance("scoring", 1)
    finally:
        cache.close()
        reporter.finish("scoring")
    for n in names:
        performance[n] = _performance(out, n, [e for e in entries if e["variant"] == n], steps)
    summary = summarize(scores, metric_names, REFERENCE, baselines, performance)
    result = {
        "schema": res.SCHEMA,
        "settings": settings,
        "images": entries,
        "summary": summary,
        "metrics": {m: {"higher_is_better": HIGHER_IS_BETTER[m], "against_reference": m in AGAINST_REFERENCE,
                        "model": _model_of(m, models)} for m in metric_names},
        "prompts": [{k: v for k, v in asdict(p).items() if k != "seed"} for p in prompt_list],
        "variants": [{"name": n, "kind": k, "what": w} for n, k, w in variants],
    }
    res.write_json(out / res.RESULTS, result)
    write_report(out, result)
    return result


def _model_of(metric: str, models: dict) -> str | None:
    if metric == "pick":
        return f"{models['pick']} (processor {models['pick-processor']})"
    return models.get(metric) if metric in DEFAULT_MODELS else None


def _performance(out: Path, variant: str, entries: list[dict], steps: int | None) -> dict:
    """Mean seconds per image (from each PNG's metadata) and per step; load seconds, peak GPU memory and weight
    bytes from the processes' timing records. Each: (value, n) or None."""
    seconds = []
    for e in entries:
        try:
            seconds.append(float(png_text(out / e["path"])["seconds"]))
        except (KeyError, ValueError, OSError):
            continue
    perf: dict = {}
    if seconds:
        mean = sum(seconds) / len(seconds)
        perf["seconds_per_image"] = (mean, len(seconds))
        if steps:
            perf["seconds_per_step"] = (mean / steps, len(seconds))
    timings = read_timings(out, variant)
    for key, combine in (("load_seconds", lambda xs: sum(xs) / len(xs)), ("peak_memory_bytes", max),
                         ("weight_bytes", max)):
        xs = [t[key] for t in timings if t.get(key) is not None]
        if xs:
            perf[key] = (combine(xs), len(xs))
    return perf
