"""The job, end to end: source -> plan -> encode -> write -> manifest, one skeleton for every format.

`convert` writes an INT8 W8A8 checkpoint in torchao's safetensors format (stock diffusers loads it);
`convert_gguf` writes one GGUF file per backbone. Both stream one block of rows at a time through the format's
sink on one worker pool, write into a staging folder that replaces OUT only when complete, and finish with the
manifest. Nothing of a job outlives the call: its threads end with it, and no process setting is changed.
"""

from __future__ import annotations

import contextlib
import json
import os
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
from .workers import Pool, thread_count
from .write.hashing import Hasher
from .write.safetensors import parse_size
from .write.staging import DISK_FULL, check_not_source, check_output, disk_full_error, output_lock, staged_output

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
        for f in [*c.files, folder / "config.json", folder / INDEX_NAME]:
            if f.is_file():
                files[str(f.relative_to(src.path))] = f
    return files


def _model_index(src: Source) -> str:
    from importlib.metadata import version

    index = dict(src.model_index or {"_class_name": model.PIPELINE_CLASS, "_diffusers_version": version("diffusers")})
    for c in model.COMPONENTS:
        index.setdefault(c, ["diffusers", model.MODEL_CLASS])
    return json.dumps(index, indent=2) + "\n"


def _early_source_paths(source) -> list[Path]:
    """What SOURCE names before it is opened: a local path, or a Hub repo's folder in the Hugging Face cache."""
    spec = str(source or model.DEFAULT_SOURCE)
    path = Path(spec).expanduser()
    if os.path.lexists(path):
        return [path]
    parts = spec.split("/")
    if len(parts) == 2 and all(parts):
        from huggingface_hub import constants

        return [Path(constants.HF_HUB_CACHE) / f"models--{parts[0]}--{parts[1]}"]
    return []


def _source_paths(src: Source) -> list[Path]:
    """Everything of the source OUT must not touch: its folder (or file), every file read and, for a Hub source,
    the repo's cache folder (snapshots link into its blobs/)."""
    paths = [src.path, *_source_files(src).values()]
    for c in src.components.values():
        paths += c.files
    if src.kind == "hub":
        paths.append(src.path.parent.parent)  # .../models--ORG--NAME/snapshots/<commit>
    return paths


def _check_out_vs_source(out: Path, paths: list[Path]) -> None:
    folders = [p for p in paths if p.is_dir()]
    check_not_source(out, paths, folders=folders, owned_marker=manifest.MANIFEST)


@contextlib.contextmanager
def _guarded_output(source, out: Path, overwrite: bool):
    """Before the Hub download and the source hash: refuse an OUT that exists (without --overwrite), cannot be
    written or is (part of) the source; then hold OUT's lock for the whole run."""
    out = Path(out)
    check_output(out, overwrite)
    _check_out_vs_source(out, _early_source_paths(source))
    with output_lock(out):
        yield


def run(src: Source, recipe: Recipe, plans: dict[str, ComponentPlan], out, *, overwrite: bool = False,
        options=None, threads: int | None = None, reporter: Reporter | None = None, extra: dict | None = None,
        locked: bool = False) -> dict:
    """Write every planned component with its format's sink, then the manifest; returns the manifest.

    Nothing under the source is modified: an OUT that is, contains or would replace the source is refused.
    locked: the caller holds OUT's lock already (`convert`, `convert_gguf`); otherwise it is taken here."""
    out = Path(out)
    _check_out_vs_source(out, _source_paths(src))
    needed = sum(p.bytes_out for p in plans.values())
    check_output(out, overwrite, needed)
    with contextlib.nullcontext() if locked else output_lock(out):
        try:
            return _run(src, recipe, plans, out, overwrite, options, threads, reporter, extra)
        except OSError as e:
            if e.errno in DISK_FULL:
                raise disk_full_error(out.parent if str(out.parent) else Path("."), e, needed) from None
            raise


def _run(src, recipe, plans, out: Path, overwrite, options, threads, reporter, extra) -> dict:
    fmt = formats.get(recipe.format)
    reporter = reporter or Reporter()
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
    source: str | None = None,
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
    thread_count(threads)
    with _guarded_output(source, out, overwrite):
        src, plans = prepare(source, r, components=components, revision=revision, token=token)
        smooth = smoother_for(smoothquant, alpha, plans)
        options = Options(shard_bytes, device, smooth)
        return run(src, r, plans, out, overwrite=overwrite, options=options,
                   threads=1 if device != "cpu" else threads, reporter=reporter,
                   extra={"smoothquant": smooth.record()} if smooth else None, locked=True)


def convert_gguf(
    source: str | None = None,
    out: str | Path = "ideogram4-gguf",
    *,
    qtype: str | None = None,
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
    """Write `ideogram4-<component>-<TYPE>.gguf` per backbone, the components' config.json and the manifest.

    qtype: `--type` (q8_0, q4_k, ..., or a mixture); None: the recipe's own type (recipe `gguf`: Q4_K)."""
    from .formats.gguf import Options

    r, label = gguf_recipe(qtype, recipe, type_rules, protect, no_protect)
    if r.format != "gguf":
        raise IdeoquantError(f"recipe '{r.name}' is an {r.format} recipe; use it with `ideoquant convert`")
    thread_count(threads)
    with _guarded_output(source, out, overwrite):
        src, plans = prepare(source, r, components=components, revision=revision, token=token, layout=layout)
        return run(src, r, plans, out, overwrite=overwrite, options=Options(label), threads=threads,
                   reporter=reporter, locked=True)
