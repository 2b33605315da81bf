"""FP8 W8A8 in torchao's safetensors format, for GPUs with FP8 tensor cores (Ada, Hopper, Blackwell): stock
diffusers loads it with `from_pretrained`.

Plan: every linear weight the recipe quantizes becomes a torchao `Float8Tensor`
(`Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`): e4m3 `qdata` [N, K] and a float32 `scale`
[N, 1]; torchao quantizes the activations per token to e4m3 at run time and runs FP8 GEMMs. Everything else stays
bf16, and so does a weight torchao itself would not quantize (a dimension not a multiple of 16).

Sink: from the FP8 release (e4m3 weights with a float32 `weight_scale` per row) the codes and scales are the
representation already: they are carried over byte for byte (a repack; the weight in effect is exactly the
release's), never dequantized and re-quantized. From a bf16 source, torchao's own rule (`encode.float8`).
Verify: torchao's keys, dtypes and shapes, and the config's `modules_to_not_convert`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import model
from ..encode import float8
from ..encode.finite import check_finite
from ..errors import IdeoquantError
from ..metrics import ErrorStats
from ..plan import PROTECTED_DTYPE, ComponentPlan, TensorPlan, numel, protected_modules
from . import CardText, Conversion, FitRow, Output, Recognised, Sink, resolve, take_options, torchao_common, usage
from .int8 import check_untyped

DEFAULT_RECIPE = "fp8-w8a8"
DTYPE = "F8_E4M3"


@dataclass(frozen=True)
class Options:
    shard_bytes: int


class FP8Format:
    name = "float8"
    command = "convert"
    recipe_keys = frozenset()

    # ------------------------------------------------------------ recipe and options

    def parse_recipe(self, data, where: str) -> dict:
        return {}

    def check_recipe(self, r) -> None:
        check_untyped(self, r)

    def conversion(self, recipe, protect, no_protect, options) -> Conversion:
        from ..write.safetensors import parse_size

        r = resolve(recipe or DEFAULT_RECIPE, protect, no_protect)
        opts = take_options(self, r, options, max_shard_size="5GB", device="cpu", smoothquant=None, alpha=0.5)
        if opts["smoothquant"] is not None:
            raise IdeoquantError(f"--smoothquant applies to INT8 W8A8 recipes; '{r.name}' is FP8, whose activations "
                                 "need no smoothing range")
        if opts["device"] != "cpu":
            raise IdeoquantError(f"recipe '{r.name}' is written on the CPU (from the FP8 release it is a copy of the "
                                 "codes); drop --device")
        shard_bytes = parse_size(opts["max_shard_size"])

        def outputs(src) -> list[Output]:
            return [Output(r, {name: self.plan(c, r) for name, c in src.components.items()}, Options(shard_bytes))]

        return Conversion([r], outputs)

    def scheme(self, r) -> str:
        return ("fp8 W8A8 (torchao Float8DynamicActivationFloat8WeightConfig PerRow: e4m3 row-scaled weights, "
                "per-token dynamic e4m3 activations)")

    # ------------------------------------------------------------ plan

    def plan(self, component, recipe, layout: str = "diffusers") -> ComponentPlan:
        spec = component.spec
        protected = protected_modules(component, recipe)
        tensors = []
        for name, src in component.tensors.items():
            module = model.module_of(name)
            kept = numel(src.shape) * 2
            if spec.is_linear_weight(name) and module in protected:
                tensors.append(TensorPlan(name, (src,), src.shape, False, PROTECTED_DTYPE,
                                          f"protected by recipe pattern '{protected[module]}'", kept, protected[module]))
            elif spec.is_linear_weight(name) and not float8.fp8_mm_compatible(src.shape):
                # torchao leaves such a weight in bf16; diffusers must not look for a Float8Tensor there either.
                protected[module] = ""
                tensors.append(TensorPlan(name, (src,), src.shape, False, PROTECTED_DTYPE,
                                          f"kept by torchao: {tuple(src.shape)} is not a multiple of 16 (FP8 GEMM)",
                                          kept))
            elif spec.is_linear_weight(name):
                rows, cols = src.shape
                why = ("linear weight: the release's e4m3 codes and row scales, carried over unchanged"
                       if src.scale is not None else "linear weight: e4m3 per row (torchao Float8Tensor)")
                tensors.append(TensorPlan(name, (src,), src.shape, True, DTYPE, why, rows * cols + rows * 4))
            else:
                tensors.append(TensorPlan(name, (src,), src.shape, False, PROTECTED_DTYPE,
                                          "not a linear weight (norm, bias or embedding)", kept))
        return ComponentPlan(component, self.name, "diffusers", tensors, sorted(protected))

    # ------------------------------------------------------------ sink

    def write_component(self, plan: ComponentPlan, sink: Sink) -> tuple[list[dict], list[str]]:
        name = plan.component.name
        opts: Options = sink.options
        return torchao_common.write_component(
            plan, sink, opts.shard_bytes, lambda t: float8.layout(t.name, t.shape),
            lambda tensors, writer: torchao_common.stream_tensors(tensors, writer, name, sink,
                                                                  _encoder(tensors, writer)),
            float8.quantization_config(plan.protected))

    # ------------------------------------------------------------ its own output

    def recognise(self, path: Path) -> list[Recognised]:
        return torchao_common.recognise(path, type(float8.config()).__name__)

    def load(self, path: Path, compute_dtype: torch.dtype) -> torch.nn.Module:
        return torchao_common.load(path, compute_dtype)

    def check_stored(self, folder: Path, name: str, comp: dict, manifest_: dict) -> tuple[list[str], list[str]]:
        return torchao_common.check_stored(folder, name, comp, float8.layout, "FP8")

    def load_target(self, folder: Path, name: str, comp: dict) -> Path:
        return folder / name

    def check_loaded(self, folder: Path, comp: dict, m) -> list[str]:
        return torchao_common.check_loaded(folder, comp, m, "FP8")

    # ------------------------------------------------------------ evaluation, inspect, model card

    def fake_quantize(self, m: torch.nn.Module, types, threads: int | None = None) -> dict:
        """Each planned weight becomes the Float8Tensor torchao computes with (what `quantize_` does, which itself
        refuses to run without an FP8-capable GPU although torchao's FP8 linear runs on the CPU)."""
        modules = dict(m.named_modules())
        saved = {}
        for n, dtype in types.items():
            if dtype != DTYPE:
                continue
            w = modules[n].weight
            saved[n] = w
            q = float8.quantize(w.detach().to(torch.bfloat16))
            modules[n].weight = torch.nn.Parameter(q, requires_grad=False)
        return saved

    def torchao_config(self):
        """The torchao config diffusers applies at load time (`load.pipeline_quantization_config`)."""
        return float8.config()

    def fit_rows(self) -> list[FitRow]:
        return [FitRow(DEFAULT_RECIPE, resolve(DEFAULT_RECIPE))]

    def card(self, m: dict, repo_id: str, base: str, device: str = usage.CARD_DEVICE,
             call: dict | None = None) -> CardText:
        carried = any(t["decision"] == "quantized" and t["dtype_in"] == DTYPE for c in m["components"].values()
                      for t in c["tensors"])
        notes = ["",
                 "**GPU:** FP8 tensor cores, compute capability 8.9 or newer: Ada (RTX 40 series, L4, L40S), Hopper "
                 "(H100, H200) or Blackwell. On Ampere (RTX 30, A100), which has no FP8 tensor cores, use an INT8 "
                 "W8A8 checkpoint (`ideoquant convert --recipe int8-w8a8`)."]
        if carried:
            notes += ["", "The FP8 weights are the official release's own e4m3 codes and per-row scales, carried over "
                          "bit for bit (no re-quantization): only the activations are newly quantized."]
        return torchao_common.card(m, repo_id, base, device, call, "FP8 W8A8 (torchao)", ["fp8", "torchao", "w8a8"],
                                   "the weights are torchao's Float8Tensor safetensors format, e4m3 with a float32 "
                                   "scale per row; activations are quantized to e4m3 per token at run time", notes)


def _encoder(tensors: list[TensorPlan], writer):
    def encode(i: int, src, rows, maps, ws, start: int, row: int) -> tuple[int, ErrorStats]:
        """One block of rows of a quantized weight; runs on the pool's threads."""
        t = tensors[i]
        module = model.module_of(t.name)
        stats = ErrorStats()
        if src.scale is not None:  # the release's codes and scales are the Float8Tensor's: copied, error zero
            qdata, scale = src.read_fp8(rows, maps)
            if float8.has_nan(qdata) or not bool(torch.isfinite(scale).all()):
                raise IdeoquantError(f"tensor {t.name} contains NaN or Inf; the source checkpoint is damaged")
            scale = scale.reshape(-1, 1)
        else:
            data = torchao_common.read_block(src, rows, maps, ws)
            check_finite(t.name, data)
            q = float8.quantize(data.to(torch.bfloat16))  # torchao's rule takes the bf16 weight, as diffusers loads it
            qdata, scale = q.qdata, q.scale
            stats.add(data, float8.dequantize(qdata, scale))
        writer.write(f"{module}._weight_qdata", qdata, start * row)
        writer.write(f"{module}._weight_scale", scale, start * 4)
        return qdata.numel(), stats

    return encode


FORMAT = FP8Format()
