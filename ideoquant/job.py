"""The job, end to end: source -> plan -> encode -> write -> manifest, one skeleton for every format.

`convert(source, out, recipe=...)` is the one entry point: the recipe's format parses the options, plans the
outputs and writes them (INT8 W8A8 in torchao's safetensors format, GGUF files, ...); `convert_gguf` is a thin
wrapper with GGUF's defaults. Every job streams one block of rows at a time through the format's sink on one worker
pool, writes into a staging folder that replaces OUT only when complete, and finishes with the manifest. Nothing of
a job outlives the call: its threads end with it, and no process setting is changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from . import formats, manifest, model
from .errors import IdeoquantError
from .formats import Output
from .plan import ComponentPlan
from .progress import Reporter
from .recipe import Recipe
from .source import ReadAhead, Source, open_source, recorded_sha256
from .workers import Pool, thread_count
from .write.hashing import Hasher
from .write.staging import DISK_FULL, disk_full_error, output_lock, staged_output
from .write.target import check_target, source_paths

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


def _model_index(src: Source) -> str:
    from importlib.metadata import version

    index = dict(src.model_index or {"_class_name": model.PIPELINE_CLASS, "_diffusers_version": version("diffusers")})
    for c in model.COMPONENTS:
        index.setdefault(c, ["diffusers", model.MODEL_CLASS])
    return json.dumps(index, indent=2) + "\n"


@contextlib.contextmanager
def _guarded_output(inputs: list[Path], out: Path, overwrite: bool):
    """Before the Hub download, the source hash or any other input is read: the output policy
    (`write.target.check_target`) for OUT against every input; then hold OUT's lock for the whole run."""
    out = check_target(out, inputs, overwrite=overwrite, folder=True, owned_marker=manifest.MANIFEST)
    with output_lock(out):
        yield


def run(src: Source, recipe: Recipe, plans: dict[str, ComponentPlan], out, *, overwrite: bool = False,
        options=None, threads: int | None = None, reporter: Reporter | None = None, extra: dict | None = None,
        locked: bool = False) -> dict:
    """Write every planned component with its format's sink, then the manifest; returns the manifest."""
    return run_outputs(src, [Output(recipe, plans, options, "", extra)], out, overwrite=overwrite, threads=threads,
                       reporter=reporter, locked=locked)[0]


def run_outputs(src: Source, outputs: list[Output], out, *, overwrite: bool = False, threads: int | None = None,
                reporter: Reporter | None = None, locked: bool = False) -> list[dict]:
    """The streaming skeleton: every output's components, then each output's manifest; returns the manifests.
    Outputs of one format that can share reads (`write_components`) are written from one read of the source.

    Nothing under the source is modified: an OUT that is, contains or would replace the source is refused.
    locked: the caller holds OUT's lock already (`convert`, `convert_gguf`); otherwise it is taken here."""
    needed = sum(p.bytes_out for o in outputs for p in o.plans.values())
    out = check_target(out, src.protected_paths(), overwrite=overwrite, folder=True, owned_marker=manifest.MANIFEST,
                       needed=needed)
    with contextlib.nullcontext() if locked else output_lock(out):
        try:
            return _run_outputs(src, outputs, out, overwrite, threads, reporter)
        except OSError as e:
            if e.errno in DISK_FULL:
                raise disk_full_error(out.parent if str(out.parent) else Path("."), e, needed) from None
            raise


def _run_outputs(src: Source, outputs: list[Output], out: Path, overwrite: bool, threads, reporter) -> list[dict]:
    fmt = formats.get(outputs[0].recipe.format)
    if any(o.recipe.format != fmt.name for o in outputs):
        raise IdeoquantError("one pass writes outputs of one format")
    reporter = reporter or Reporter()
    source_files = src.files()
    # Exits in reverse order: the source reads end (the hash no longer waits for the encoders) before the hasher.
    with Hasher() as hasher, src.reads, Pool(threads) as pool, staged_output(out, overwrite) as staging:
        # The source is hashed on the hasher's thread (GIL-free) while the first component is encoded, a bounded
        # distance ahead of the encoders, and each range leaves the page cache once both have read it.
        for rel, path in source_files.items():
            known = src.file_hashes.get(rel) or recorded_sha256(path)
            if known:
                src.file_hashes[rel] = known
            else:
                hasher.add("source:" + rel, path, *src.reads.hashing(path))
        records: list[dict] = [{} for _ in outputs]
        for o in outputs:
            (staging / o.folder).mkdir(parents=True, exist_ok=True)
        for name in outputs[0].plans:
            plans = [o.plans[name] for o in outputs]
            t0 = time.perf_counter()
            reporter.start(name, plans[0].bytes_in)
            ahead = ReadAhead([s for t in plans[0].tensors for s in t.sources])
            try:
                sinks = [formats.Sink(staging / o.folder, pool, hasher, _ReadAheadReporter(reporter, ahead), src,
                                      o.recipe, o.options, formats.BLOCK_ELEMENTS, f"{o.folder}/" if o.folder else "")
                         for o in outputs]
                if len(outputs) > 1 and hasattr(fmt, "write_components"):
                    written = fmt.write_components(list(zip(plans, sinks)))
                else:
                    written = [fmt.write_component(p, s) for p, s in zip(plans, sinks)]
            finally:
                ahead.close()
            reporter.finish(name)
            seconds = time.perf_counter() - t0
            for k, (tensors, files) in enumerate(written):
                records[k][name] = manifest.component_record(plans[k], tensors, files, seconds)
        src.reads.finish()  # bytes no encoder reads (headers, another component's half of a file) are hashed now
        for o in outputs:
            (staging / o.folder / "model_index.json").write_text(_model_index(src))
            hasher.add(f"{o.folder}/model_index.json" if o.folder else "model_index.json",
                       staging / o.folder / "model_index.json")
        hashes = hasher.results()
        source = src.describe()
        source["files"] = {rel: {"size": p.stat().st_size,
                                 "sha256": src.file_hashes.get(rel) or hashes["source:" + rel]["sha256"]}
                           for rel, p in source_files.items()}
        manifests = []
        for o, recs in zip(outputs, records):
            prefix = f"{o.folder}/" if o.folder else ""
            files = {k[len(prefix):]: v for k, v in sorted(hashes.items())
                     if not k.startswith("source:") and k.startswith(prefix)
                     and (prefix or not any(k.startswith(f"{x.folder}/") for x in outputs if x.folder))}
            m = manifest.build(fmt.name, o.recipe.to_dict(), source, recs, files, o.extra)
            manifest.write(staging / o.folder, m)
            manifests.append(m)
    return manifests


def _recipe_file(recipe) -> str | None:
    """A recipe given as a file (it is an input too); a packaged recipe's name or a Recipe object is not one."""
    return None if recipe is None or isinstance(recipe, Recipe) or not os.path.lexists(str(recipe)) else str(recipe)


def convert(
    source: str | list[str] | None = None,
    out: str | Path | None = None,
    *,
    recipe: str | Recipe | None = "int8-w8a8",
    protect=(),
    no_protect=(),
    components: list[str] | None = None,
    revision: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    reporter: Reporter | None = None,
    default_format: str | None = None,
    **options,
) -> dict | list[dict]:
    """Quantize both Ideogram 4 backbones with `recipe`; returns the manifest (a list of them when one pass writes
    several outputs). The recipe's format takes `options` and refuses those it does not know:

    - INT8 W8A8 (`int8-w8a8`, ...): `max_shard_size` ("5GB"), `device` ("cpu"), `smoothquant` (statistics from
      `ideoquant calibrate`; each quantized linear is then smoothed as torchao's SmoothQuant does) and `alpha`.
    - GGUF (`gguf`, `gguf-q4_k_m`, ...): see `convert_gguf`.

    out: default `ideogram4-<format>`; recipe None: the default recipe of `default_format`."""
    fmt = formats.of(recipe, default_format)
    conversion = fmt.conversion(recipe, protect, no_protect, options)
    thread_count(threads)
    out = Path(out) if out is not None else Path(f"ideogram4-{fmt.name}")
    inputs = source_paths(source or model.DEFAULT_SOURCE, *conversion.inputs, _recipe_file(recipe))
    with _guarded_output(inputs, out, overwrite):
        src = open_source(source, components=components, revision=revision, token=token)
        outputs = conversion.outputs(src)
        manifests = run_outputs(src, outputs, out, overwrite=overwrite, threads=conversion.threads or threads,
                                reporter=reporter, locked=True)
    return manifests if conversion.several else manifests[0]


def convert_gguf(
    source: str | list[str] | None = None,
    out: str | Path = "ideogram4-gguf",
    *,
    qtype: str | list[str] | None = None,
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
    imatrix: str | Path | None = None,
    imatrix_convention: str = "llama",
    reporter: Reporter | None = None,
    arch: str = "ideogram4",
) -> dict | list[dict]:
    """Write `ideogram4-<component>-<TYPE>.gguf` per backbone, the components' config.json and the manifest
    (`convert` with a GGUF recipe).

    qtype: a GGML type or a mixture (`formats.catalog.GGUF_CHOICES`); None: the recipe's own type. Several types
    (a list, or "q4_k_m,q5_k_m,q8_0") are written in one pass, each block of the source read and widened once:
    OUT then holds one complete output per type (`OUT/Q4_K_M/`, ...) and a list of their manifests is returned.
    imatrix: "ones" (stable-diffusion.cpp's converter: every weight 1.0) or an importance-matrix file (llama.cpp
    GGUF or `.dat`, or stable-diffusion.cpp's); ggml's weighted quantizers then use it, with the vector derived as
    llama-quantize (`imatrix_convention="llama"`) or sd-cli (`"sdcpp"`) derives it.
    arch: written as `general.architecture`; the manifest records it and the layout's `warnings`."""
    return convert(source, out, recipe=recipe, protect=protect, no_protect=no_protect, components=components,
                   revision=revision, token=token, overwrite=overwrite, threads=threads, reporter=reporter,
                   default_format="gguf", qtype=qtype, type_rules=type_rules, layout=layout, imatrix=imatrix,
                   imatrix_convention=imatrix_convention, arch=arch)
