"""The job, end to end: source -> plan -> encode -> write -> manifest, one skeleton for every format.

`convert` writes an INT8 W8A8 checkpoint in torchao's safetensors format (stock diffusers loads it);
`convert_gguf` writes one GGUF file per backbone. Both stream one block of rows at a time through the format's
sink on one worker pool, write into a staging folder that replaces OUT only when complete, and finish with the
manifest. Nothing of a job outlives the call: its threads end with it, and no process setting is changed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import formats, manifest, model
from .device import check_device
from .errors import IdeoquantError
from .formats.gguf import gguf_recipe
from .plan import ComponentPlan
from .progress import Reporter
from .recipe import Recipe, resolve
from .source import ReadAhead, Source, hf_cache_sha256, open_source
from .workers import Pool
from .write.hashing import Hasher
from .write.safetensors import parse_size
from .write.staging import check_free_space, staged_output

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def prepare(source, recipe: Recipe, *, components=None, revision=None, token=None, layout=None,
            headers_only=False) -> tuple[Source, dict[str, ComponentPlan]]:
    """Open the source and plan every component with the recipe's format. Used by convert, gguf and inspect."""
    fmt = formats.get(recipe.format)
    src = open_source(source, components=components, revision=revision, token=token, headers_only=headers_only)
    args = () if layout is None else (layout,)
    return src, {name: fmt.plan(c, recipe, *args) for name, c in src.components.items()}


class _ReadAheadReporter(Reporter):
    """Progress is bytes read from the source: it also tells the read-ahead how far the job has got."""

    def __init__(self, inner: Reporter, ahead: ReadAhead):
        self.inner, self.ahead = inner, ahead

    def advance(self, task: str, n: int) -> None:
        self.ahead.consumed(n)
        self.inner.advance(task, n)


def _source_files(src: Source) -> dict[str, Path]:
    if src.kind == "file":
        return {src.path.name: src.path}
    files: dict[str, Path] = {}
    if (src.path / "model_index.json").is_file():
        files["model_index.json"] = src.path / "model_index.json"
    for c in src.components.values():
        folder = c.files[0].parent
        side = [folder / "config.json", folder / INDEX_NAME]
        if src.kind == "files":  # several paths given: a config next to a file given alone is not part of the source
            given = [Path(p).expanduser().absolute() for p in src.spec]
            side = [f for f in side if any(g == folder or g in folder.parents for g in given)]
        for f in [*c.files, *side]:
            if f.is_file():
                files[str(f.relative_to(src.path))] = f
    return files


def _model_index(src: Source) -> str:
    from importlib.metadata import version

    index = dict(src.model_index or {"_class_name": model.PIPELINE_CLASS, "_diffusers_version": version("diffusers")})
    for c in model.COMPONENTS:
        index.setdefault(c, ["diffusers", model.MODEL_CLASS])
    return json.dumps(index, indent=2) + "\n"


def run(src: Source, recipe: Recipe, plans: dict[str, ComponentPlan], out, *, overwrite: bool = False,
        options=None, threads: int | None = None, reporter: Reporter | None = None, extra: dict | None = None) -> dict:
    """Write every planned component with its format's sink, then the manifest; returns the manifest."""
    fmt = formats.get(recipe.format)
    reporter = reporter or Reporter()
    out = Path(out)
    check_free_space(out.parent if out.parent != Path("") else Path("."), sum(p.bytes_out for p in plans.values()))
    source_files = _source_files(src)
    with Hasher() as hasher, Pool(threads) as pool, staged_output(out, overwrite) as staging:
        # The source is hashed on the hasher's thread (GIL-free) while the first component is encoded.
        for rel, path in source_files.items():
            known = src.file_hashes.get(rel) or hf_cache_sha256(path)
            if known:
                src.file_hashes[rel] = known
            else:
                hasher.add("source:" + rel, path)
        records = {}
        for name, plan in plans.items():
            t0 = time.perf_counter()
            reporter.start(name, plan.bytes_in)
            ahead = ReadAhead([s for t in plan.tensors for s in t.sources])
            try:
                sink = formats.Sink(staging, pool, hasher, _ReadAheadReporter(reporter, ahead), src, recipe, options,
                                    formats.BLOCK_ELEMENTS)
                tensors, files = fmt.write_component(plan, sink)
            finally:
                ahead.close()
            reporter.finish(name)
            records[name] = manifest.component_record(plan, tensors, files, time.perf_counter() - t0)
        (staging / "model_index.json").write_text(_model_index(src))
        hasher.add("model_index.json", staging / "model_index.json")
        hashes = hasher.results()
        outputs = {k: v for k, v in sorted(hashes.items()) if not k.startswith("source:")}
        source = src.describe()
        source["files"] = {rel: {"size": p.stat().st_size,
                                 "sha256": src.file_hashes.get(rel) or hashes["source:" + rel]["sha256"]}
                           for rel, p in source_files.items()}
        m = manifest.build(fmt.name, recipe.to_dict(), source, records, outputs, extra)
        manifest.write(staging, m)
    return m


def convert(
    source: str | list[str] | None = None,
    out: str | Path = "ideogram4-int8",
    *,
    recipe: str | Recipe = "int8-w8a8",
    protect=(),
    no_protect=(),
    components: list[str] | None = None,
    revision: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    max_shard_size: str | int = "5GB",
    threads: int | None = None,
    reporter: Reporter | None = None,
    smoothquant: str | Path | None = None,
    alpha: float = 0.5,
) -> dict:
    """Quantize both Ideogram 4 backbones to INT8 W8A8 in torchao's safetensors format. Returns the manifest.

    smoothquant: statistics from `ideoquant calibrate`; each quantized linear is then smoothed as torchao's
    SmoothQuant does (factor from `alpha`, weight * s quantized, `act_pre_scale = 1 / s` stored)."""
    from .formats.int8 import Options
    from .formats.smoothquant import smoother_for

    r = resolve(recipe, protect, no_protect)
    if r.format != "int8":
        raise IdeoquantError(f"recipe '{r.name}' is a {r.format} recipe; use it with `ideoquant {r.format}`")
    device = check_device(device)
    shard_bytes = parse_size(max_shard_size)
    src, plans = prepare(source, r, components=components, revision=revision, token=token)
    smooth = smoother_for(smoothquant, alpha, plans)
    options = Options(shard_bytes, device, smooth)
    return run(src, r, plans, out, overwrite=overwrite, options=options, threads=1 if device != "cpu" else threads,
               reporter=reporter, extra={"smoothquant": smooth.record()} if smooth else None)


def convert_gguf(
    source: str | list[str] | None = None,
    out: str | Path = "ideogram4-gguf",
    *,
    qtype: str = "q4_k",
    recipe: str | Recipe | None = None,
    type_rules=(),
    protect=(),
    no_protect=(),
    layout: str = "original",
    components: list[str] | None = None,
    revision: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    reporter: Reporter | None = None,
) -> dict:
    """Write `ideogram4-<component>-<TYPE>.gguf` per backbone, the components' config.json and the manifest."""
    from .formats.gguf import Options

    r, label = gguf_recipe(qtype, recipe, type_rules, protect, no_protect)
    src, plans = prepare(source, r, components=components, revision=revision, token=token, layout=layout)
    return run(src, r, plans, out, overwrite=overwrite, options=Options(label), threads=threads, reporter=reporter)
