"""INT8 W8A8 in torchao's safetensors format: stock diffusers loads it with `from_pretrained`.

Plan: every linear weight not protected by the recipe becomes int8 per output channel; everything else is kept in
bf16. Sink: row blocks encoded on the job's pool (torchao-exact, `encode.int8`), written into preallocated
safetensors shards. Verify: the exact keys, dtypes and shapes torchao's format uses, and the config's
`modules_to_not_convert`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import model
from ..encode import int8
from ..errors import IdeoquantError
from ..metrics import ErrorStats
from ..plan import PROTECTED_DTYPE, ComponentPlan, TensorPlan, numel, protected_modules
from ..write.safetensors import ShardWriter
from . import CardText, Conversion, FitRow, Output, Recognised, Sink, resolve, take_options, torchao_common, usage

@dataclass(frozen=True)
class Options:
    shard_bytes: int
    device: str = "cpu"
    smoother: object | None = None  # formats.smoothquant.Smoother


DEFAULT_RECIPE = "int8-w8a8"


def check_untyped(fmt, r) -> None:
    """A torchao recipe has one scheme for every quantized linear: no GGUF `type` or type rules."""
    if r.type is not None or r.rules:
        raise IdeoquantError(f"--type and --type-rule apply to gguf recipes; '{r.name}' is an {fmt.name} recipe")


class Int8Format:
    name = "int8"
    command = "convert"
    recipe_keys = frozenset()
    smoothquant = True  # `ideoquant calibrate` + `convert --smoothquant` apply to it

    # ------------------------------------------------------------ recipe and options

    def parse_recipe(self, data, where: str) -> dict:
        return {}

    def check_recipe(self, r) -> None:
        check_untyped(self, r)

    def conversion(self, recipe, protect, no_protect, options) -> Conversion:
        from ..device import check_device
        from ..write.safetensors import parse_size
        from .smoothquant import smoother_for

        r = resolve(recipe or DEFAULT_RECIPE, protect, no_protect)
        opts = take_options(self, r, options, max_shard_size="5GB", device="cpu", smoothquant=None, alpha=0.5)
        device = check_device(opts["device"])
        shard_bytes = parse_size(opts["max_shard_size"])

        def outputs(src) -> list[Output]:
            plans = {name: self.plan(c, r) for name, c in src.components.items()}
            smooth = smoother_for(opts["smoothquant"], opts["alpha"], plans)
            return [Output(r, plans, Options(shard_bytes, device, smooth), "",
                           {"smoothquant": smooth.record()} if smooth else None)]

        return Conversion([r], outputs, threads=1 if device != "cpu" else None, inputs=(opts["smoothquant"],))

    def scheme(self, r) -> str:
        return "int8 W8A8 (torchao Int8DynamicActivationInt8WeightConfig, per-token dynamic activations)"

    # ------------------------------------------------------------ plan

    def plan(self, component, recipe, layout: str = "diffusers") -> ComponentPlan:
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

        def layout_of(t: TensorPlan):
            smoothed = smooth is not None and smooth.applies(name, t.name)
            return smooth.layout(t.name, t.shape) if smoothed else int8.layout(t.name, t.shape)

        return torchao_common.write_component(
            plan, sink, opts.shard_bytes, layout_of, lambda tensors, writer: _write_tensors(tensors, writer, name, opts,
                                                                                            sink),
            int8.quantization_config(plan.protected))

    # ------------------------------------------------------------ verify

    def check_stored(self, folder: Path, name: str, comp: dict, manifest_: dict) -> tuple[list[str], list[str]]:
        from .smoothquant import layout as smooth_layout
        from .smoothquant import smoothed_modules

        smoothed = smoothed_modules(manifest_, name)

        def layout_of(tensor: str, shape: tuple):  # SmoothQuant adds `_weight_act_pre_scale`
            return smooth_layout(tensor, shape) if model.module_of(tensor) in smoothed else int8.layout(tensor, shape)

        return torchao_common.check_stored(folder, name, comp, layout_of, "INT8")

    def load_target(self, folder: Path, name: str, comp: dict) -> Path:
        return folder / name

    def recognise(self, path: Path) -> list[Recognised]:
        return torchao_common.recognise(path, type(int8.config()).__name__)

    def load(self, path: Path, compute_dtype: torch.dtype) -> torch.nn.Module:
        return torchao_common.load(path, compute_dtype)

    def check_loaded(self, folder: Path, comp: dict, m) -> list[str]:
        return torchao_common.check_loaded(folder, comp, m, "INT8")

    # ------------------------------------------------------------ evaluation, inspect, model card

    def fake_quantize(self, m: torch.nn.Module, types, threads: int | None = None) -> dict:
        return torchao_common.fake_quantize(m, int8.config(), types)

    def torchao_config(self):
        """The torchao config diffusers applies at load time (`load.pipeline_quantization_config`)."""
        return int8.config()

    def fit_rows(self) -> list[FitRow]:
        return [FitRow(DEFAULT_RECIPE, resolve(DEFAULT_RECIPE))]

    def card(self, m: dict, repo_id: str, base: str, device: str = usage.CARD_DEVICE,
             call: dict | None = None, folder: str = "") -> CardText:
        return torchao_common.card(m, repo_id, base, device, call, "INT8 W8A8 (torchao)", ["int8", "torchao", "w8a8"],
                                   "the weights are torchao's INT8 safetensors format; activations are quantized per "
                                   "token at run time", folder=folder)


def _write_tensors(tensors: list[TensorPlan], writer: ShardWriter, component: str, opts: Options,
                   sink: Sink) -> list[dict]:
    """Read, encode and write every row block of these tensors on the pool, in one stream (no wait between
    tensors, so small tensors do not leave a core idle). Returns their manifest records, in order."""
    smooth, device = opts.smoother, opts.device
    prepared = []
    for t in tensors:
        smoothed = t.quantize and smooth is not None and smooth.applies(component, t.name)
        sm = smooth.prepare(component, t) if smoothed else None
        if sm is not None:
            writer.write(f"{model.module_of(t.name)}._weight_act_pre_scale", sm.act_pre_scale)
        prepared.append(sm)

    def encode(i: int, src, rows, maps, ws, start: int, row: int) -> tuple[int, ErrorStats]:
        """One block of rows of a quantized weight; runs on the pool's threads, each with its own workspace."""
        t, sm, module = tensors[i], prepared[i], model.module_of(tensors[i].name)
        stats = ErrorStats()
        if src.scale is not None and sm is None and device == "cpu":
            # dequantized row by row inside the encoder: the float32 weight never exists as a block
            codes, row_scale = src.read_fp8(rows, maps)
            n = codes.numel()
            qdata, scale, zero_point, signal, noise = int8.quantize_fp8(codes, row_scale, ws)
        else:
            data = torchao_common.read_block(src, rows, maps, ws)
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
        return n, stats

    return torchao_common.stream_tensors(tensors, writer, component, sink, encode)


FORMAT = Int8Format()
