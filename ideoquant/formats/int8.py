"""INT8 W8A8 in torchao's safetensors format: stock diffusers loads it with `from_pretrained`.

Plan: every linear weight not protected by the recipe becomes int8 per output channel; everything else is kept in
bf16. Sink: row blocks encoded on the job's pool (torchao-exact, `encode.int8`), written into preallocated
safetensors shards. Verify: the exact keys, dtypes and shapes torchao's format uses, and the config's
`modules_to_not_convert`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import manifest, model
from ..encode import int8
from ..encode.finite import check_finite
from ..errors import IdeoquantError
from ..metrics import ErrorStats
from ..plan import PROTECTED_DTYPE, ComponentPlan, TensorPlan, numel, protected_modules, row_blocks
from ..source import FileMaps
from ..write.safetensors import DTYPE_NAMES, ShardWriter, Slot, shard_groups
from . import CardText, Sink, usage

WEIGHTS_NAME = "diffusion_pytorch_model"


@dataclass(frozen=True)
class Options:
    shard_bytes: int
    device: str = "cpu"
    smoother: object | None = None  # formats.smoothquant.Smoother


class Int8Format:
    name = "int8"

    # ------------------------------------------------------------ plan

    def plan(self, component, recipe, layout: str = "diffusers") -> ComponentPlan:
        if recipe.format != "int8":
            raise IdeoquantError(f"recipe '{recipe.name}' is a {recipe.format} recipe; "
                                 f"use it with `ideoquant {recipe.format}`")
        spec = component.spec
        protected = protected_modules(component, recipe)
        tensors = []
        for name, src in component.tensors.items():
            module = model.module_of(name)
            if spec.is_linear_weight(name) and module not in protected:
                rows, cols = src.shape
                tensors.append(TensorPlan(name, (src,), src.shape, True, "int8", "linear weight: int8 per-channel",
                                          rows * cols + rows * 4 + rows))
            elif spec.is_linear_weight(name):
                tensors.append(TensorPlan(name, (src,), src.shape, False, PROTECTED_DTYPE,
                                          f"protected by recipe pattern '{protected[module]}'",
                                          numel(src.shape) * 2, protected[module]))
            else:
                tensors.append(TensorPlan(name, (src,), src.shape, False, PROTECTED_DTYPE,
                                          "not a linear weight (norm, bias or embedding)", numel(src.shape) * 2))
        return ComponentPlan(component, "int8", "diffusers", tensors, sorted(protected))

    # ------------------------------------------------------------ sink

    def write_component(self, plan: ComponentPlan, sink: Sink) -> tuple[list[dict], list[str]]:
        opts: Options = sink.options
        smooth = opts.smoother
        name = plan.component.name
        folder = sink.staging / name
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
                              opts.shard_bytes)
        if len(groups) == 1:
            filenames = [f"{WEIGHTS_NAME}.safetensors"]
        else:
            filenames = [f"{WEIGHTS_NAME}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        by_name = {t.name: t for t in plan.tensors}
        records, weight_map = [], {}
        for group, filename in zip(groups, filenames):
            writer = ShardWriter(folder / filename, {k: s for n in group for k, s in slots[n].items()},
                                 {"format": "pt", **metadata})
            try:
                records += _write_tensors([by_name[n] for n in group], writer, name, opts, sink)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            weight_map.update({k: filename for n in group for k in slots[n]})
            sink.hasher.add_known(sink.key(f"{name}/{filename}"), folder / filename, writer.sha256)
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
            sink.hasher.add(sink.key(f), sink.staging / f)
        return records, files

    # ------------------------------------------------------------ verify

    def check_stored(self, folder: Path, name: str, comp: dict, manifest_: dict) -> tuple[list[str], list[str]]:
        from .smoothquant import smoothed_modules

        smoothed = smoothed_modules(manifest_, name)
        problems: list[str] = []
        checks: list[str] = []
        shards = [folder / f for f in comp["files"] if f.endswith(".safetensors")]
        try:
            stored, metas = _safetensors_headers(shards)
        except Exception as e:  # noqa: BLE001  a damaged header: safetensors raises its own error types
            return [f"{name}: cannot read safetensors headers: {str(e).splitlines()[0]}"], []
        expected: dict[str, tuple[str, tuple]] = {}
        n_q = n_kept = 0
        for t in comp["tensors"]:
            shape = tuple(t["shape"])
            if t["decision"] == "quantized":
                # The exact keys, dtypes and shapes torchao's safetensors format uses for this weight.
                if model.module_of(t["name"]) in smoothed:  # SmoothQuant adds `_weight_act_pre_scale`
                    from .smoothquant import layout as smooth_layout

                    lay = smooth_layout(t["name"], shape)
                else:
                    lay = int8.layout(t["name"], shape)
                want = {k: (DTYPE_NAMES[dt], sh) for k, (dt, sh) in lay.keys.items()}
                n_q += 1
            else:
                want = {t["name"]: ("BF16", shape)}
                n_kept += 1
            expected.update(want)
            for k, (dt, sh) in want.items():
                if k not in stored:
                    problems.append(f"{name}: {t['name']} is '{t['decision']}' in the manifest but {k} is not stored")
                elif stored[k] != (dt, sh):
                    problems.append(f"{name}: {k} is stored as {stored[k][0]} {list(stored[k][1])}, "
                                    f"the manifest implies {dt} {list(sh)}")
        for k in sorted(set(stored) - set(expected)):
            problems.append(f"{name}: stored tensor {k} is not in the manifest")
        # diffusers merges shard metadata with dict.update: a shard lacking names would leave weights random.
        names = sorted(t["name"] for t in comp["tensors"])
        for shard, meta in zip(shards, metas):
            try:
                listed = sorted(json.loads(meta.get("tensor_names", "null")) or [])
            except (ValueError, TypeError):
                listed = None
            if listed != names:
                problems.append(f"{name}: {shard.name} metadata 'tensor_names' does not list exactly the "
                                "component's tensors")
        if not problems:
            checks.append(f"{name}: stored as recorded ({n_q} INT8 weights, {n_kept} BF16 tensors)")

        cfg_path = folder / name / "config.json"
        try:
            qc = json.loads(cfg_path.read_text()).get("quantization_config") or {}
        except (OSError, ValueError, AttributeError) as e:
            return problems + [f"{name}: cannot read config.json: {e}"], checks
        protected = comp.get("protected_modules", [])
        if not isinstance(qc, dict) or qc.get("quant_method") != "torchao":
            method = qc.get("quant_method") if isinstance(qc, dict) else qc
            problems.append(f"{name}: config.json quantization_config.quant_method is {method!r}, not 'torchao'")
        elif sorted(qc.get("modules_to_not_convert") or []) != sorted(protected):
            n = len(qc.get("modules_to_not_convert") or [])
            problems.append(f"{name}: config.json modules_to_not_convert ({n} modules) differs from the "
                            f"manifest's protected_modules ({len(protected)})")
        else:
            checks.append(f"{name}: config.json protects the manifest's {len(protected)} modules")
        return problems, checks

    def load_target(self, folder: Path, name: str, comp: dict) -> Path:
        return folder / name

    def check_loaded(self, folder: Path, comp: dict, m) -> list[str]:
        """What diffusers loaded against the stored tensors (it only warns when it leaves a weight random)."""
        from safetensors import safe_open

        params = dict(m.named_parameters())
        shards = [folder / f for f in comp["files"] if f.endswith(".safetensors")]
        where = {}
        for p in shards:
            with safe_open(p, framework="pt") as f:
                where.update({k: p for k in f.keys()})
        out = []
        for t in comp["tensors"]:
            p = params.get(t["name"])
            if p is None:
                out.append(f"{t['name']} missing")
                continue
            data = p.data
            if t["decision"] == "quantized":
                qdata = getattr(data, "qdata", None)
                key = model.module_of(t["name"]) + "._weight_qdata"
                if qdata is None:
                    out.append(f"{t['name']} loaded as a plain {data.dtype} tensor, not INT8")
                elif key in where and not torch.equal(qdata, _read(where[key], key)):
                    out.append(f"{t['name']} INT8 data differs from {key}")
            elif type(data) is not torch.Tensor or not torch.equal(data, _read(where[t["name"]], t["name"])):
                out.append(f"{t['name']} differs from the stored BF16 tensor")
        return out

    # ------------------------------------------------------------ model card

    def card(self, m: dict, repo_id: str, base: str, device: str = usage.CARD_DEVICE,
             call: dict | None = None, folder: str = "") -> CardText:
        comps = list(m["components"])
        backbones = [f'{c} = Ideogram4Transformer2DModel.from_pretrained(\n    {usage.py(repo_id)}, '
                     f'subfolder={usage.py(usage.in_folder(folder, c))}, torch_dtype=torch.bfloat16\n)' for c in comps]
        code = usage.pipeline_snippet(["from diffusers import Ideogram4Pipeline, Ideogram4Transformer2DModel"],
                                      backbones, comps, base, device, call)
        lines = ["```python", code, "```", "",
                 "Needs `diffusers>=0.42`, `transformers` and `torchao` (the weights are torchao's INT8 safetensors "
                 "format; activations are quantized per token at run time). Only stock diffusers is used."]
        # library_name: stock diffusers + torchao load it
        return CardText("INT8 W8A8 (torchao)", ["int8", "torchao", "w8a8"], "diffusers", [], "\n".join(lines))


def _write_tensors(tensors: list[TensorPlan], writer: ShardWriter, component: str, opts: Options,
                   sink: Sink) -> list[dict]:
    """Read, encode and write every row block of these tensors on the pool, in one stream (no wait between
    tensors, so small tensors do not leave a core idle). Returns their manifest records, in order."""
    smooth, device, pool = opts.smoother, opts.device, sink.pool
    prepared = []
    for t in tensors:
        smoothed = t.quantize and smooth is not None and smooth.applies(component, t.name)
        sm = smooth.prepare(component, t) if smoothed else None
        if sm is not None:
            writer.write(f"{model.module_of(t.name)}._weight_act_pre_scale", sm.act_pre_scale)
        prepared.append(sm)

    modules = [model.module_of(t.name) for t in tensors]
    row_elements = [math.prod(t.shape[1:]) if len(t.shape) > 1 else 0 for t in tensors]  # byte offsets of blocks
    maps = FileMaps()

    def encode(block) -> tuple[int, ErrorStats]:
        """One block of rows; runs on the pool's threads, each with its own workspace."""
        i, src, rows = block
        t, sm, module, row = tensors[i], prepared[i], modules[i], row_elements[i]
        ws = pool.workspace()
        start = rows[0] if rows else 0
        stats = ErrorStats()
        fp8 = src.scale is not None and rows is not None
        if fp8 and t.quantize and sm is None and device == "cpu":
            # dequantized row by row inside the encoder: the float32 weight never exists as a block
            codes, row_scale = src.read_fp8(rows, maps)
            n = codes.numel()
            data = None
        elif fp8:  # dequantized into this thread's buffers
            shape = (rows[1] - rows[0], *src.shape[1:])
            data = src.read(rows, maps, ws.take("fp8", shape, torch.float32))
        else:
            data = src.read(rows, maps)
        if t.quantize:
            if data is None:
                qdata, scale, zero_point, signal, noise = int8.quantize_fp8(codes, row_scale, ws)
            else:
                n = data.numel()
                qdata, scale, zero_point, signal, noise = int8.quantize(data if sm is None else sm.smooth(data),
                                                                        device, ws)
            if not math.isfinite(signal):  # a NaN or Inf in a row makes its scale, and so the signal, non-finite
                raise IdeoquantError(f"tensor {t.name} contains NaN or Inf; the source checkpoint is damaged")
            if sm is None:
                stats.add_energies(signal, noise)
            else:  # SmoothQuant: W * s was quantized; the weight in effect is dequant / s
                stats.add(data, sm.unsmooth(int8.dequantize(qdata, scale)))
            writer.write(f"{module}._weight_qdata", qdata, start * row)
            writer.write(f"{module}._weight_scale", scale, start * 4)
            writer.write(f"{module}._weight_zero_point", zero_point, start)
        else:
            n = data.numel()
            if src.scale is None:  # FP8 is checked for NaN/Inf as it is dequantized
                check_finite(t.name, data)
            kept = data
            # A bf16 tensor kept as bf16 is copied bit for bit: its error is zero by construction, not measured.
            if not (src.dtype == "BF16" and src.scale is None):
                kept = ws.take("kept", data.shape, torch.bfloat16).copy_(data)
                stats.add(data, kept, ws.take("error", data.shape, torch.float32))
            writer.write(t.name, kept, start * row * 2)
        maps.release(src, rows)
        return n, stats

    totals = [ErrorStats() for _ in tensors]

    def done(block, result) -> None:
        i, src, _ = block
        n, stats = result
        totals[i].add_energies(stats.signal, stats.noise)
        sink.reporter.advance(component, src.nbytes * n // max(1, math.prod(src.shape)))

    try:
        pool.run(encode, row_blocks(tensors, sink.block_elements), done)
    finally:
        maps.close()
    return [manifest.tensor_record(t, total.sqnr_db) for t, total in zip(tensors, totals)]


def _safetensors_headers(paths: list[Path]) -> tuple[dict[str, tuple[str, tuple]], list[dict]]:
    from safetensors import safe_open

    keys: dict[str, tuple[str, tuple]] = {}
    metas = []
    for p in paths:
        with safe_open(p, framework="pt") as f:
            metas.append(f.metadata() or {})
            for k in f.keys():
                sl = f.get_slice(k)
                keys[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    return keys, metas


def _read(path: Path, key: str):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


FORMAT = Int8Format()
