"""What the torchao formats (INT8 W8A8, FP8 W8A8, NVFP4) share: an output stock diffusers loads with
`from_pretrained`, recognised by the torchao config its `config.json` names; the plan rules, the shards, verify,
loading and the card. Not a format itself: `TorchaoFormat` is the base of `int8`, `float8` and `float4`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .. import manifest, model
from ..encode import int8
from ..encode.finite import check_finite
from ..encode.fp8 import fp8r_to_bf16
from ..errors import IdeoquantError
from ..metrics import ErrorStats
from ..plan import PROTECTED_DTYPE, ComponentPlan, TensorPlan, numel, protected_modules, row_blocks
from ..source import FileMaps
from ..write.safetensors import DTYPE_NAMES, ShardWriter, Slot, shard_groups
from . import CardText, Conversion, FitRow, Output, Recognised, resolve, take_options, usage

WEIGHTS_NAME = "diffusion_pytorch_model"


def config_type(folder: Path) -> str | None:
    """The torchao config class a component folder's `config.json` names (`Int8DynamicActivationInt8WeightConfig`),
    or None (no such file, not torchao)."""
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != "torchao":
        return None
    quant_type = qc.get("quant_type")
    default = quant_type.get("default") if isinstance(quant_type, dict) else None
    return default.get("_type") if isinstance(default, dict) else None


def recognise(path: Path, config_name: str) -> list[Recognised]:
    """A component folder, or an output folder of component folders, quantized with this torchao config."""
    if not path.is_dir():
        return []
    if config_type(path) == config_name:
        return [Recognised({path.name if path.name in model.COMPONENTS else "transformer": path})]
    comps = {c: path / c for c in model.COMPONENTS if config_type(path / c) == config_name}
    return [Recognised(comps)] if comps else []


def load(path: Path, compute_dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import Ideogram4Transformer2DModel

    return Ideogram4Transformer2DModel.from_pretrained(path, torch_dtype=compute_dtype)


def fake_quantize(m: torch.nn.Module, config, types: Mapping[str, Any]) -> dict[str, torch.nn.Parameter]:
    """torchao's `quantize_` with `config` on exactly these linears (torchao computes with the result)."""
    from torchao.quantization import quantize_

    modules = dict(m.named_modules())
    wanted = set(types)
    saved = {n: modules[n].weight for n in types}
    quantize_(m, config, filter_fn=lambda mod, fqn: fqn in wanted)
    return saved


def write_component(plan, sink, shard_bytes: int, layout_of: Callable, write_tensors: Callable,
                    quantization_config: dict) -> tuple[list[dict], list[str]]:
    """One component in torchao's safetensors format: preallocated shards whose header holds each quantized weight's
    keys (`layout_of(tensor plan)`: keys, dtypes, shapes, torchao metadata), filled by `write_tensors(tensors,
    writer)` (-> manifest records); the index when sharded; config.json with `quantization_config`."""
    name = plan.component.name
    folder = sink.staging / name
    folder.mkdir()
    plain = int8.plain_metadata()
    slots: dict[str, dict[str, Slot]] = {}
    metadata: dict[str, str] = {}
    for t in plan.tensors:
        if t.quantize:
            lay = layout_of(t)
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
    for group, filename in zip(groups, filenames):
        writer = ShardWriter(folder / filename, {k: s for n in group for k, s in slots[n].items()},
                             {"format": "pt", **metadata})
        try:
            records += write_tensors([by_name[n] for n in group], writer)
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
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    files.append(f"{name}/config.json")
    for f in files[len(filenames):]:
        sink.hasher.add(sink.key(f), sink.staging / f)
    return records, files


def check_stored(folder: Path, name: str, comp: dict, layout_of: Callable, label: str) -> tuple[list[str], list[str]]:
    """The stored keys, dtypes and shapes against what the manifest implies (`layout_of(tensor name, shape)` for a
    quantized weight), every shard's `tensor_names`, and config.json's torchao block."""
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
            lay = layout_of(t["name"], shape)
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
        checks.append(f"{name}: stored as recorded ({n_q} {label} weights, {n_kept} BF16 tensors)")

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


def check_loaded(folder: Path, comp: dict, m, label: str) -> list[str]:
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
                out.append(f"{t['name']} loaded as a plain {data.dtype} tensor, not {label}")
            elif key in where and not torch.equal(_bits(qdata), _bits(_read(where[key], key))):
                out.append(f"{t['name']} {label} data differs from {key}")
        elif type(data) is not torch.Tensor or not torch.equal(data, _read(where[t["name"]], t["name"])):
            out.append(f"{t['name']} differs from the stored BF16 tensor")
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """One-byte tensors (int8, float8) compared as bytes: torch.equal has no float8 kernel on CPU."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


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


def read_block(src, rows, maps: FileMaps, ws) -> torch.Tensor:
    """A block of rows in its stored float dtype; FP8 dequantized into this thread's buffers."""
    if src.scale is not None and rows is not None:
        return src.read(rows, maps, ws.take("fp8", (rows[1] - rows[0], *src.shape[1:]), torch.float32))
    return src.read(rows, maps)


def stream_tensors(tensors: list, writer: ShardWriter, component: str, sink, encode: Callable) -> list[dict]:
    """Every row block of these tensors on the pool, in one stream (no wait between tensors, so small tensors do
    not leave a core idle): a quantized weight's block goes to `encode(i, src, rows, maps, workspace, first row,
    elements per row)` -> (elements, ErrorStats), which writes it; a kept tensor's block is written as bf16.
    Returns the manifest records, in order."""
    pool = sink.pool
    row_elements = [math.prod(t.shape[1:]) if len(t.shape) > 1 else 0 for t in tensors]  # byte offsets of blocks
    maps = FileMaps(sink.source.reads)

    def one(block) -> tuple[int, ErrorStats]:
        i, src, rows = block
        t, row = tensors[i], row_elements[i]
        ws = pool.workspace()
        start = rows[0] if rows else 0
        if t.quantize:
            result = encode(i, src, rows, maps, ws, start, row)
        elif src.scale is not None and rows is not None:  # FP8 kept as bf16: one pass, no float32 block
            codes, row_scale = src.read_fp8(rows, maps)
            kept = ws.take("kept", codes.shape, torch.bfloat16)
            stats = ErrorStats()
            stats.add_energies(*fp8r_to_bf16(codes, row_scale, kept, t.name))
            writer.write(t.name, kept, start * row * 2)
            result = codes.numel(), stats
        else:
            stats = ErrorStats()
            data = read_block(src, rows, maps, ws)
            if src.scale is None:  # FP8 is checked for NaN/Inf as it is dequantized
                check_finite(t.name, data)
            kept = data
            # A bf16 tensor kept as bf16 is copied bit for bit: its error is zero by construction, not measured.
            if not (src.dtype == "BF16" and src.scale is None):
                kept = ws.take("kept", data.shape, torch.bfloat16).copy_(data)
                stats.add(data, kept, ws.take("error", data.shape, torch.float32))
            writer.write(t.name, kept, start * row * 2)
            result = data.numel(), stats
        maps.release(src, rows)
        return result

    totals = [ErrorStats() for _ in tensors]

    def done(block, result) -> None:
        i, src, _ = block
        n, stats = result
        totals[i].add_energies(stats.signal, stats.noise)
        sink.reporter.advance(component, src.nbytes * n // max(1, math.prod(src.shape)))

    try:
        pool.run(one, row_blocks(tensors, sink.block_elements), done)
    finally:
        maps.close()
    return [manifest.tensor_record(t, total.sqnr_db) for t, total in zip(tensors, totals)]


def card(m: dict, repo_id: str, base: str, device: str, call: dict | None, what: str, tags: list[str], how: str,
         notes: tuple[str, ...] = (), folder: str = "") -> CardText:
    """The card text of a torchao output: stock diffusers loads each backbone with `from_pretrained` (from the
    repo's `folder` when the output was uploaded into one)."""
    comps = list(m["components"])
    backbones = [f'{c} = Ideogram4Transformer2DModel.from_pretrained(\n    {usage.py(repo_id)}, '
                 f'subfolder={usage.py(usage.in_folder(folder, c))}, torch_dtype=torch.bfloat16\n)' for c in comps]
    code = usage.pipeline_snippet(["from diffusers import Ideogram4Pipeline, Ideogram4Transformer2DModel"],
                                  backbones, comps, base, device, call)
    lines = ["```python", code, "```", "",
             f"Needs `diffusers>=0.42`, `transformers` and `torchao` ({how}). Only stock diffusers is used.", *notes]
    # library_name: stock diffusers + torchao load it
    return CardText(what, tags, "diffusers", [], "\n".join(lines))


@dataclass(frozen=True)
class ShardOptions:
    shard_bytes: int


class TorchaoFormat:
    """A torchao tensor subclass per quantized linear weight. A subclass names its codec (an `encode` module with
    `config()`, `layout(name, shape)` and `quantization_config(protected)`), its default recipe, the label and plan
    dtype of a quantized weight, and how many bytes one takes."""

    command = "convert"
    recipe_keys = frozenset()
    name: str
    label: str  # "FP8": verify's and the card's word for a quantized weight
    dtype: str  # the plan's dtype of a quantized weight
    default_recipe: str
    codec: Any

    def parse_recipe(self, data, where: str) -> dict:
        return {}

    def check_recipe(self, r) -> None:
        """One scheme for every quantized linear: no GGUF `type` or type rules."""
        if r.type is not None or r.rules:
            raise IdeoquantError(f"--type and --type-rule apply to gguf recipes; '{r.name}' is an {self.name} recipe")

    def conversion(self, recipe, protect, no_protect, options) -> Conversion:
        """Shards of `max_shard_size`, written on the CPU; SmoothQuant is INT8's alone."""
        from ..write.safetensors import parse_size

        r = resolve(recipe or self.default_recipe, protect, no_protect)
        opts = take_options(self, r, options, max_shard_size="5GB", device="cpu", smoothquant=None, alpha=0.5)
        if opts["smoothquant"] is not None:
            raise IdeoquantError(f"--smoothquant applies to INT8 W8A8 recipes, not '{r.name}'")
        if opts["device"] != "cpu":
            raise IdeoquantError(f"recipe '{r.name}' is written on the CPU; drop --device")
        shard_bytes = parse_size(opts["max_shard_size"])

        def outputs(src) -> list[Output]:
            return [Output(r, {n: self.plan(c, r) for n, c in src.components.items()}, ShardOptions(shard_bytes))]

        return Conversion([r], outputs)

    # ---- plan

    def compatible(self, shape: tuple[int, ...]) -> str | None:
        """Why torchao would keep a linear weight of this shape in high precision (None: it quantizes it)."""
        return None

    def quantized_bytes(self, shape: tuple[int, int]) -> int: ...

    def reason(self, src) -> str: ...

    def plan(self, component, recipe, layout: str = "diffusers") -> ComponentPlan:
        spec = component.spec
        protected = protected_modules(component, recipe)
        tensors = []
        for name, src in component.tensors.items():
            module = model.module_of(name)
            kept = numel(src.shape) * 2
            if not spec.is_linear_weight(name):
                tensors.append(TensorPlan(name, (src,), src.shape, False, PROTECTED_DTYPE,
                                          "not a linear weight (norm, bias or embedding)", kept))
            elif module in protected:
                tensors.append(TensorPlan(name, (src,), src.shape, False, PROTECTED_DTYPE,
                                          f"protected by recipe pattern '{protected[module]}'", kept, protected[module]))
            elif self.compatible(src.shape) is not None:
                # torchao leaves such a weight in bf16; diffusers must not look for a quantized tensor there either
                protected[module] = ""
                tensors.append(TensorPlan(name, (src,), src.shape, False, PROTECTED_DTYPE,
                                          f"kept by torchao: {self.compatible(src.shape)}", kept))
            else:
                tensors.append(TensorPlan(name, (src,), src.shape, True, self.dtype, self.reason(src),
                                          self.quantized_bytes(src.shape)))
        return ComponentPlan(component, self.name, "diffusers", tensors, sorted(protected))

    # ---- sink and fake quantizer

    whole_tensors = False  # True: each weight is encoded in one block (a per-tensor scale needs all of it)

    def encoder(self, tensors: list, writer: ShardWriter) -> Callable:
        """`stream_tensors`' encode function for these tensors."""

    def write_component(self, plan: ComponentPlan, sink) -> tuple[list[dict], list[str]]:
        name = plan.component.name
        if self.whole_tensors:
            sink = dataclasses.replace(sink, block_elements=1 << 62)
        return write_component(
            plan, sink, sink.options.shard_bytes, lambda t: self.codec.layout(t.name, t.shape),
            lambda tensors, writer: stream_tensors(tensors, writer, name, sink, self.encoder(tensors, writer)),
            self.codec.quantization_config(plan.protected))

    def fake_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The weight torchao computes with in place of `w` (a tensor subclass, or its dequantized value)."""

    def fake_quantize(self, m: torch.nn.Module, types, threads: int | None = None) -> dict:
        modules = dict(m.named_modules())
        saved = {}
        for n, dtype in types.items():
            if dtype != self.dtype:
                continue
            saved[n] = modules[n].weight
            modules[n].weight = torch.nn.Parameter(self.fake_weight(saved[n].detach()), requires_grad=False)
        return saved

    # ---- its own output

    def recognise(self, path: Path) -> list[Recognised]:
        return recognise(path, type(self.codec.config()).__name__)

    def load(self, path: Path, compute_dtype: torch.dtype) -> torch.nn.Module:
        return load(path, compute_dtype)

    def load_target(self, folder: Path, name: str, comp: dict) -> Path:
        return folder / name

    def check_stored(self, folder: Path, name: str, comp: dict, manifest_: dict) -> tuple[list[str], list[str]]:
        return check_stored(folder, name, comp, self.codec.layout, self.label)

    def check_loaded(self, folder: Path, comp: dict, m) -> list[str]:
        return check_loaded(folder, comp, m, self.label)

    # ---- inspect, load-time quantization

    def torchao_config(self):
        """The torchao config diffusers applies at load time (`load.pipeline_quantization_config`)."""
        return self.codec.config()

    def fit_rows(self) -> list[FitRow]:
        return [FitRow(self.default_recipe, resolve(self.default_recipe))]
