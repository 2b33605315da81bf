"""The job, end to end: source -> plan -> encode -> write -> manifest.

`convert` writes an INT8 W8A8 checkpoint in torchao's safetensors format (stock diffusers loads it);
`convert_gguf` writes one GGUF file per backbone. Both stream one tensor (one block of rows) at a time,
write into a staging folder that replaces OUT only when complete, and finish with the manifest.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from . import manifest, model
from .encode import int8
from .errors import IdeoquantError
from .metrics import ErrorStats
from .plan import ComponentPlan, TensorPlan, plan_gguf, plan_int8
from .recipe import Recipe, load_recipe, parse_type_rule
from .source import FileMaps, ReadAhead, Source, hf_cache_sha256, open_source
from .write.safetensors import ShardWriter, Slot, parse_size, shard_groups
from .write.staging import check_free_space, sha256_file, staged_output

WEIGHTS_NAME = "diffusion_pytorch_model"
BLOCK_ELEMENTS = 1 << 20  # rows read, encoded and written at a time: bounds memory, keeps caches warm


class Reporter:
    """Progress hooks; the CLI renders them with Rich. The default does nothing."""

    def start(self, component: str, total_bytes: int) -> None: ...

    def advance(self, component: str, nbytes: int) -> None: ...

    def finish(self, component: str) -> None: ...


class _ReadAheadReporter(Reporter):
    """Progress is bytes read from the source: it also tells the read-ahead how far the job has got."""

    def __init__(self, inner: Reporter, ahead: ReadAhead):
        self.inner, self.ahead = inner, ahead

    def advance(self, component: str, nbytes: int) -> None:
        self.ahead.consumed(nbytes)
        self.inner.advance(component, nbytes)


def check_device(device: str) -> str:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise IdeoquantError(f"unknown device '{device}' (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise IdeoquantError("--device cuda: no CUDA device is available to this torch build")
    if dev.type not in ("cpu", "cuda"):
        raise IdeoquantError(f"unsupported device '{device}' (use cpu or cuda)")
    return str(dev)


def resolve_recipe(recipe: str | Recipe, protect=(), no_protect=(), qtype=None, type_rules=()) -> Recipe:
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    return r.with_overrides(protect=protect, no_protect=no_protect, type=qtype,
                            rules=[parse_type_rule(x) for x in type_rules])


def prepare(source, recipe: Recipe, *, components=None, revision=None, token=None, layout="original",
            headers_only=False):
    """Open the source and plan every component. Used by convert, convert_gguf and inspect."""
    src = open_source(source, components=components, revision=revision, token=token, headers_only=headers_only)
    if recipe.format == "int8":
        plans = {name: plan_int8(c, recipe) for name, c in src.components.items()}
    else:
        plans = {name: plan_gguf(c, recipe, layout) for name, c in src.components.items()}
    return src, plans


# float dtype -> (integer view, magnitude mask, the smallest non-finite magnitude)
_NONFINITE_BITS = {torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80), torch.float16: (torch.int16, 0x7FFF, 0x7C00),
                   torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000)}


def _check_finite(name: str, block: torch.Tensor) -> None:
    """A NaN or Inf in a kept (or GGUF-bound) tensor is an error: found from the largest magnitude's bits, in one
    GIL-free pass without temporaries. (Quantized INT8 weights are checked through their scales instead.)"""
    from .encode import kernels

    if block.dtype in _NONFINITE_BITS:
        view, magnitude, exponent = _NONFINITE_BITS[block.dtype]
        bits = int8.numpy_bits(block, view).reshape(-1)
        bits = bits.view(np.uint16 if view == torch.int16 else np.uint32)
        bad = bits.size and int(kernels.max_magnitude_bits(bits, bits.dtype.type(magnitude))) >= exponent
    else:
        bad = not bool(torch.isfinite(block).all())
    if bad:
        raise IdeoquantError(f"tensor {name} contains NaN or Inf; the source checkpoint is damaged")


@contextlib.contextmanager
def _preloading(*modules: str):
    """Import modules (or run `module:function`) on a background thread while the main thread plans and the
    source is hashed; joined when the block exits, so nothing of the job's outlives it (not even an import
    printing to a stream a caller has since closed).

    torchao's import alone is ~1.7 s of CPU, as long as converting a layer, and loading the compiled kernels
    another ~0.5 s; started early they overlap with the source hash (which releases the GIL) instead of delaying
    the first write. A failure here is ignored: the main thread's own import or call reports it.
    """

    def run() -> None:
        for m in modules:
            try:
                module, _, function = m.partition(":")
                loaded = importlib.import_module(module)
                if function:
                    getattr(loaded, function)()
            except Exception:  # noqa: BLE001
                return

    thread = threading.Thread(target=run, name="ideoquant-preload", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()


class _Hasher:
    """sha256 of finished files on a background thread, overlapping with the next tensor's work."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ideoquant-hash")
        self._jobs: dict[str, tuple[Path, Future]] = {}

    def add(self, key: str, path: Path) -> None:
        self._jobs[key] = (path, self._pool.submit(sha256_file, path))

    def add_known(self, key: str, path: Path, sha256: str) -> None:
        """A file whose digest was computed while it was written."""
        done: Future = Future()
        done.set_result(sha256)
        self._jobs[key] = (path, done)

    def results(self) -> dict[str, dict]:
        out = {k: {"size": p.stat().st_size, "sha256": f.result()} for k, (p, f) in self._jobs.items()}
        self._pool.shutdown()
        return out

    def cancel(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _source_files(src: Source) -> dict[str, Path]:
    files: dict[str, Path] = {}
    if src.kind == "file":
        return {src.path.name: src.path}
    if (src.path / "model_index.json").is_file():
        files["model_index.json"] = src.path / "model_index.json"
    for c in src.components.values():
        folder = c.files[0].parent
        for f in [*c.files, folder / "config.json", folder / f"{WEIGHTS_NAME}.safetensors.index.json"]:
            if f.is_file():
                files[str(f.relative_to(src.path))] = f
    return files


@contextlib.contextmanager
def _job_runtime(switch_interval: float = 0.0005):
    """Interpreter settings for the length of a job, restored after.

    - A 0.5 ms GIL switch interval: the encoder and hash threads need the GIL only briefly between their GIL-free
      kernel and sha256 calls; at Python's default 5 ms, a thread running Python (the torchao import, progress
      callbacks) keeps them waiting up to 5 ms each time. Measured: 3% faster on a 12-layer conversion.
    - No cyclic garbage collection: torchao's import (on the preload thread) and the job's loops allocate enough
      to trigger repeated full collections, each a walk over torch's whole heap. The job makes no cycles worth
      collecting (blocks and tensors are freed by reference counting). Measured: 0.6 CPU-s less on a 4-layer
      conversion, about 8% of its time.
    """
    before = sys.getswitchinterval()
    collecting = gc.isenabled()
    sys.setswitchinterval(min(before, switch_interval))
    gc.disable()
    try:
        yield
    finally:
        sys.setswitchinterval(before)
        if collecting:
            gc.enable()


@_job_runtime()
def _run(kind: str, src: Source, recipe: Recipe, plans: dict[str, ComponentPlan], out, overwrite: bool,
         write_component, reporter: Reporter | None, extra_files=None, extra=None) -> dict:
    reporter = reporter or Reporter()
    out = Path(out)
    check_free_space(out.parent if out.parent != Path("") else Path("."),
                     sum(p.bytes_out for p in plans.values()))
    hasher = _Hasher()
    source_files = _source_files(src)
    for rel, path in source_files.items():
        known = src.file_hashes.get(rel) or hf_cache_sha256(path)
        if known:
            src.file_hashes[rel] = known
        else:
            hasher.add("source:" + rel, path)
    try:
        with staged_output(out, overwrite) as staging:
            records = {}
            for name, plan in plans.items():
                t0 = time.perf_counter()
                reporter.start(name, plan.bytes_in)
                ahead = ReadAhead([s for t in plan.tensors for s in t.sources])
                try:
                    tensors, files = write_component(plan, staging, hasher, _ReadAheadReporter(reporter, ahead))
                finally:
                    ahead.close()
                reporter.finish(name)
                records[name] = manifest.component_record(plan, tensors, files, time.perf_counter() - t0)
            for rel, content in (extra_files(src, plans) if extra_files else {}).items():
                (staging / rel).write_text(content)
                hasher.add(rel, staging / rel)
            hashes = hasher.results()
            outputs = {k: v for k, v in sorted(hashes.items()) if not k.startswith("source:")}
            source = src.describe()
            source["files"] = {rel: {"size": p.stat().st_size,
                                     "sha256": src.file_hashes.get(rel) or hashes["source:" + rel]["sha256"]}
                               for rel, p in source_files.items()}
            m = manifest.build(kind, recipe.to_dict(), source, records, outputs, extra)
            manifest.write(staging, m)
    except BaseException:
        hasher.cancel()
        raise
    return m


def _model_index(src: Source, plans) -> dict[str, str]:
    from importlib.metadata import version

    index = dict(src.model_index or {"_class_name": model.PIPELINE_CLASS, "_diffusers_version": version("diffusers")})
    for c in model.COMPONENTS:
        index.setdefault(c, ["diffusers", model.MODEL_CLASS])
    return {"model_index.json": json.dumps(index, indent=2) + "\n"}


# ---------------------------------------------------------------- INT8


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
    reporter: Reporter | None = None,
    smoothquant: str | Path | None = None,
    alpha: float = 0.5,
) -> dict:
    """Quantize both Ideogram 4 backbones to INT8 W8A8 in torchao's safetensors format. Returns the manifest.

    smoothquant: statistics from `ideoquant calibrate`; each quantized linear is then smoothed as torchao's SmoothQuant
    does (factor from `alpha`, weight * s quantized, `act_pre_scale = 1 / s` stored), see `ideoquant.smoothquant`."""
    with _preloading("ideoquant.encode.kernels:load", "torchao.prototype.safetensors.safetensors_support",
                     "torchao.core.config"):
        r = resolve_recipe(recipe, protect, no_protect)
        device = check_device(device)
        shard_bytes = parse_size(max_shard_size)
        src, plans = prepare(source, r, components=components, revision=revision, token=token)
        from .smoothquant import smoother_for

        smooth = smoother_for(smoothquant, alpha, plans)

        def write_component(plan, staging, hasher, reporter):
            return _write_int8_component(plan, staging, shard_bytes, device, hasher, reporter, smooth)

        return _run("int8", src, r, plans, out, overwrite, write_component, reporter, _model_index,
                    {"smoothquant": smooth.record()} if smooth else None)


def _write_int8_component(plan: ComponentPlan, staging: Path, shard_bytes: int, device: str, hasher, reporter,
                          smooth=None):
    name = plan.component.name
    folder = staging / name
    folder.mkdir()
    plain = int8.plain_metadata()
    slots: dict[str, dict[str, Slot]] = {}
    metadata: dict[str, str] = {}
    for t in plan.tensors:
        if t.quantize:
            smoothed = smooth is not None and smooth.applies(name, t.name)
            lay = smooth.layout(t.name, t.shape) if smoothed else int8.layout(t.name, t.shape)
            slots[t.name] = {k: Slot(dt, sh) for k, (dt, sh) in lay.keys.items()}
            metadata[t.name] = lay.metadata
        else:
            slots[t.name] = {t.name: Slot(torch.bfloat16, t.shape)}
            metadata[t.name] = plain
    # diffusers merges shard metadata with dict.update: every shard must carry every name, or weights
    # silently stay random at load time.
    metadata["tensor_names"] = json.dumps([t.name for t in plan.tensors])
    groups = shard_groups([(t.name, sum(s.nbytes for s in slots[t.name].values())) for t in plan.tensors],
                          shard_bytes)
    if len(groups) == 1:
        filenames = [f"{WEIGHTS_NAME}.safetensors"]
    else:
        filenames = [f"{WEIGHTS_NAME}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    by_name = {t.name: t for t in plan.tensors}
    records, weight_map = [], {}
    with BlockPool(1 if device != "cpu" else None) as pool:
        for group, filename in zip(groups, filenames):
            writer = ShardWriter(folder / filename, {k: s for n in group for k, s in slots[n].items()},
                                 {"format": "pt", **metadata})
            try:
                records += _write_int8_tensors([by_name[n] for n in group], writer, device, reporter, name, smooth,
                                               pool)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            weight_map.update({k: filename for n in group for k in slots[n]})
            hasher.add_known(f"{name}/{filename}", folder / filename, writer.sha256)
    files = [f"{name}/{f}" for f in filenames]
    if len(groups) > 1:
        total = sum(s.nbytes for d in slots.values() for s in d.values())
        index = {"metadata": {"total_size": total, **metadata}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / f"{WEIGHTS_NAME}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        files.append(f"{name}/{WEIGHTS_NAME}.safetensors.index.json")
    config = {k: v for k, v in plan.component.config.items() if k != "_name_or_path"}
    config["_class_name"] = model.MODEL_CLASS
    config["quantization_config"] = int8.quantization_config(plan.protected)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    files.append(f"{name}/config.json")
    for f in files[len(filenames):]:
        hasher.add(f, staging / f)
    return records, files


def _write_int8_tensors(tensors: list[TensorPlan], writer: ShardWriter, device: str, reporter: Reporter,
                        component: str, smooth, pool: "BlockPool") -> list[dict]:
    """Read, encode and write every row block of these tensors on the pool, in one stream (no wait between
    tensors, so small tensors do not leave a core idle). Returns their manifest records, in order."""
    prepared = []
    for t in tensors:
        smoothed = t.quantize and smooth is not None and smooth.applies(component, t.name)
        sm = smooth.prepare(component, t) if smoothed else None
        if sm is not None:
            writer.write(f"{model.module_of(t.name)}._weight_act_pre_scale", sm.act_pre_scale)
        prepared.append(sm)

    modules = [model.module_of(t.name) for t in tensors]
    row_elements = [math.prod(t.shape[1:]) if len(t.shape) > 1 else 0 for t in tensors]  # byte offsets of blocks

    def encode(item) -> tuple[int, ErrorStats]:
        """One block of rows; runs on the pool's threads, each with its own workspace."""
        i, rows = item
        t, sm, module, row = tensors[i], prepared[i], modules[i], row_elements[i]
        src = t.sources[0]
        ws = int8.workspace()
        start = rows[0] if rows else 0
        stats = ErrorStats()
        fp8 = src.scale is not None and rows is not None
        if fp8 and t.quantize and sm is None and device == "cpu":
            # dequantized row by row inside the encoder: the float32 weight never exists as a block
            codes, row_scale = src.read_fp8(rows, maps)
            n = codes.numel()
            block = None
        elif fp8:  # dequantized into this thread's buffers
            shape = (rows[1] - rows[0], *src.shape[1:])
            block = src.read(rows, maps, ws.take("fp8", shape, torch.float32), ws.take("fp8 index", shape, torch.int32))
        else:
            block = src.read(rows, maps)
        if t.quantize:
            if block is None:
                qdata, scale, zero_point, signal, noise = int8.quantize_fp8(codes, row_scale, ws)
            else:
                n = block.numel()
                qdata, scale, zero_point, signal, noise = int8.quantize(block if sm is None else sm.smooth(block),
                                                                        device, ws)
            if not math.isfinite(signal):  # a NaN or Inf in a row makes its scale, and so the signal, non-finite
                raise IdeoquantError(f"tensor {t.name} contains NaN or Inf; the source checkpoint is damaged")
            if sm is None:
                stats.add_energies(signal, noise)
            else:  # SmoothQuant: W * s was quantized; the weight in effect is dequant / s
                stats.add(block, sm.unsmooth(int8.dequantize(qdata, scale)))
            writer.write(f"{module}._weight_qdata", qdata, start * row)
            writer.write(f"{module}._weight_scale", scale, start * 4)
            writer.write(f"{module}._weight_zero_point", zero_point, start)
        else:
            n = block.numel()
            _check_finite(t.name, block)
            kept = block
            # A bf16 tensor kept as bf16 is copied bit for bit: its error is zero by construction, not measured.
            if not (src.dtype == "BF16" and src.scale is None):
                kept = ws.take("kept", block.shape, torch.bfloat16).copy_(block)
                stats.add(block, kept, ws.take("error", block.shape, torch.float32))
            writer.write(t.name, kept, start * row * 2)
        maps.release(src, rows)
        return n, stats

    totals = [ErrorStats() for _ in tensors]
    items = [(i, rows) for i, t in enumerate(tensors) for rows in t.sources[0].row_ranges(BLOCK_ELEMENTS)]

    def done(item, result) -> None:
        i, (n, stats) = item[0], result
        src = tensors[i].sources[0]
        totals[i].add_energies(stats.signal, stats.noise)
        reporter.advance(component, src.nbytes * n // max(1, math.prod(src.shape)))

    maps = FileMaps()
    try:
        pool.run(encode, items, done)
    finally:
        maps.close()
    return [manifest.tensor_record(t, total.sqnr_db) for t, total in zip(tensors, totals)]


class BlockPool:
    """Blocks of rows encoded on every core, one torch thread each.

    Elementwise torch ops on ~1M-element blocks scale poorly across intra-op threads (each op waits for the
    slowest thread); independent blocks on separate threads keep both cores busy, and torch releases the GIL.
    """

    def __init__(self, workers: int | None = None):
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ideoquant-encode") if self.workers > 1 else None

    def run(self, fn, items, done) -> None:
        """fn(item) for every item on the workers; done(item, result) on this thread, in item order.

        On an error nothing new starts, and the blocks already running finish before it propagates: their
        writer is about to be aborted, and a write into a closed (or reused) descriptor must not happen.
        """
        if self._pool is None:
            for x in items:
                done(x, fn(x))
            return
        futures = [self._pool.submit(fn, x) for x in items]
        try:
            for x, f in zip(items, futures):
                done(x, f.result())
        finally:
            for f in futures:
                f.cancel()
            wait(futures)

    def __enter__(self):
        self._threads = torch.get_num_threads()
        if self._pool is not None:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self._threads)


# ---------------------------------------------------------------- GGUF

GGUF_TYPES = ("q8_0", "q4_k", "q5_k", "q6_k", "q4_k_m")
_FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "Q4_K": "MOSTLY_Q4_K_S", "Q4_K_M": "MOSTLY_Q4_K_M",
               "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K"}


def gguf_recipe(qtype: str = "q4_k", recipe: str | Recipe | None = None, type_rules=(), protect=(),
                no_protect=()) -> tuple[Recipe, str]:
    """`--type` is shorthand: q8_0/q4_k/q5_k/q6_k set the base type of recipe `gguf`; q4_k_m is recipe `gguf-q4_k_m`.

    Returns the recipe and the label that names the files (Q4_K, Q4_K_M, ...).
    """
    q = qtype.strip().lower()
    if q not in GGUF_TYPES:
        raise IdeoquantError(f"unknown --type '{qtype}': choose from {', '.join(GGUF_TYPES)}")
    if q == "q4_k_m":
        if recipe is not None and getattr(recipe, "name", recipe) != "gguf-q4_k_m":
            raise IdeoquantError("--type q4_k_m is the recipe gguf-q4_k_m; give --recipe or --type q4_k_m, not both")
        return resolve_recipe("gguf-q4_k_m", protect, no_protect, None, type_rules), "Q4_K_M"
    return resolve_recipe(recipe or "gguf", protect, no_protect, q, type_rules), q.upper()


def convert_gguf(
    source: str | None = None,
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
    r, label = gguf_recipe(qtype, recipe, type_rules, protect, no_protect)
    src, plans = prepare(source, r, components=components, revision=revision, token=token, layout=layout)

    def write_component(plan, staging, hasher, reporter):
        return _write_gguf_component(plan, staging, src, r, label, threads, hasher, reporter)

    return _run("gguf", src, r, plans, out, overwrite, write_component, reporter, _model_index)


def _gguf_kv(plan: ComponentPlan, src: Source, recipe: Recipe, label: str) -> dict:
    import gguf as ggufpy

    from . import __version__
    from .gguf import KEY_COMPONENT, KEY_CONFIG, KEY_LAYOUT, KEY_RECIPE, KEY_VERSION

    name = plan.component.name
    config = {k: v for k, v in plan.component.config.items() if k not in ("_name_or_path", "quantization_config")}
    kv = {
        "general.name": f"Ideogram 4 {name} {label}",
        "general.quantization_version": ggufpy.GGML_QUANT_VERSION,
        "general.file_type": int(ggufpy.LlamaFileType[_FILE_TYPES[label]]),
        "general.quantized_by": f"ideoquant {__version__}",
    }
    if src.repo_id:
        org, repo = src.repo_id.split("/", 1)
        kv.update({
            "general.base_model.count": 1,
            "general.base_model.0.name": repo,
            "general.base_model.0.organization": org,
            "general.base_model.0.repo_url": f"https://huggingface.co/{src.repo_id}",
        })
        if src.commit:
            kv["general.base_model.0.version"] = src.commit
    kv.update({KEY_COMPONENT: name, KEY_LAYOUT: plan.layout, KEY_CONFIG: json.dumps(config, sort_keys=True),
               KEY_RECIPE: recipe.name, KEY_VERSION: __version__})
    return kv


def _write_gguf_component(plan: ComponentPlan, staging: Path, src: Source, recipe: Recipe, label: str,
                          threads, hasher, reporter):
    from .gguf import gguf_filename
    from .write.gguf import GGUFFile

    name = plan.component.name
    filename = gguf_filename(name, label)
    f = GGUFFile(staging / filename, "ideogram4", _gguf_kv(plan, src, recipe, label),
                 [(t.name, t.shape, t.dtype) for t in plan.tensors])
    records = []
    try:
        for t in plan.tensors:
            data, sqnr = _encode_gguf_tensor(t, threads, reporter, name)
            f.write(t.name, data)
            records.append(manifest.tensor_record(t, sqnr))
        f.close()
    except BaseException:
        f.abort()
        raise
    hasher.add(filename, staging / filename)
    folder = staging / name
    folder.mkdir()
    config = {k: v for k, v in plan.component.config.items() if k not in ("_name_or_path", "quantization_config")}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    hasher.add(f"{name}/config.json", folder / "config.json")
    return records, [filename, f"{name}/config.json"]


def _encode_gguf_tensor(t: TensorPlan, threads, reporter: Reporter, component: str):
    """Encode one planned tensor (every row block of every source, e.g. q, k, v of a fused qkv) to GGUF bytes.

    Returns the bytes (flat uint8, preallocated: the output of one tensor is the memory bound) and the SQNR.
    """

    stats = ErrorStats()
    out = np.empty(t.bytes_out, np.uint8)
    pos = 0
    for src in t.sources:
        numel = max(1, int(np.prod(src.shape)))
        for _, block in src.row_blocks(BLOCK_ELEMENTS):
            _check_finite(t.name, block)
            data, approx = _encode_block(block, t.dtype, threads)
            stats.add(block, approx)
            out[pos : pos + data.size] = data
            pos += data.size
            reporter.advance(component, src.nbytes * block.numel() // numel)
    if pos != out.size:
        raise RuntimeError(f"{t.name}: encoded {pos} bytes, planned {out.size}")
    return out, stats.sqnr_db


def encode_rows(rows, qtype: str, threads) -> "np.ndarray":
    """ggml bytes of float32 rows [r, cols]: `ggml.encode` on row chunks split over `threads` threads (its kernels
    release the GIL; rows are independent, so the bytes do not depend on the split)."""
    from .encode import ggml

    n = rows.shape[0]
    threads = max(1, min(int(threads or os.cpu_count() or 1), n))
    if threads == 1:
        return ggml.encode(rows, qtype)
    bs, ts = ggml.type_size(qtype)
    out = np.empty((n, rows.shape[1] // bs * ts), np.uint8)
    step = -(-n // threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda r0: ggml.encode(rows[r0 : r0 + step], qtype, out=out[r0 : r0 + step]), range(0, n, step)))
    return out


def _encode_block(block: torch.Tensor, dtype: str, threads):
    """(flat uint8 bytes, the float values they decode to) for one block of rows."""
    from .encode import ggml

    if dtype in ggml.QTYPES and dtype not in ("F16", "BF16"):  # plain float outputs keep the path below
        rows = block.reshape(-1, block.shape[-1]).to(torch.float32).contiguous().numpy()
        q = encode_rows(rows, dtype, threads)
        return q.reshape(-1), torch.from_numpy(ggml.dequantize(q, dtype))
    kept = block.to(torch.bfloat16 if dtype == "BF16" else torch.float32).contiguous()
    return kept.reshape(-1).view(torch.uint8).numpy(), kept
