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
from ..errors import damaged_tensor
from ..metrics import ErrorStats
from ..plan import ComponentPlan, TensorPlan
from ..write.safetensors import ShardWriter
from . import CardText, Conversion, Output, Sink, resolve, take_options, torchao_common, usage

@dataclass(frozen=True)
class Options:
    shard_bytes: int
    device: str = "cpu"
    smoother: object | None = None  # formats.smoothquant.Smoother


class Int8Format(torchao_common.TorchaoFormat):
    name = "int8"
    label = "INT8"
    dtype = "int8"
    default_recipe = "int8-w8a8"
    codec = int8
    smoothquant = True  # `ideoquant calibrate` + `convert --smoothquant` apply to it

    def conversion(self, recipe, protect, no_protect, options) -> Conversion:
        from ..device import check_device
        from ..write.safetensors import parse_size
        from .smoothquant import smoother_for

        r = resolve(recipe or self.default_recipe, protect, no_protect)
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

    def quantized_bytes(self, shape: tuple[int, int]) -> int:
        rows, cols = shape
        return rows * cols + rows * 4 + rows  # qdata, float32 scale, int8 zero point per row

    def reason(self, src) -> str:
        return "linear weight: int8 per-channel"

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

    # ------------------------------------------------------------ evaluation, inspect, model card

    def fake_quantize(self, m: torch.nn.Module, types, threads: int | None = None) -> dict:
        return torchao_common.fake_quantize(m, int8.config(), types)

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
            raise damaged_tensor(t.name)
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
