"""Running backbones on evaluation inputs: the source model, velocities, error metrics and per-layer taps."""

from __future__ import annotations

import gc
from typing import Callable

import torch

from ..metrics import ErrorStats


@torch.no_grad()
def velocity(transformer: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's output on the image tokens only (text positions carry no prediction), in float32."""
    from diffusers.models.transformers.transformer_ideogram4 import OUTPUT_IMAGE_INDICATOR

    out = transformer(**inputs, return_dict=False)[0].float()
    return out[inputs["indicator"] == OUTPUT_IMAGE_INDICATOR]


# ---------------------------------------------------------------- models


def source_model(component, device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The source backbone in bf16, from the source reader (any layout, FP8 dequantized), built like
    `from_pretrained(torch_dtype=bfloat16)` builds it: the rotary buffer stays float32 (see pitfalls)."""
    from accelerate import init_empty_weights
    from diffusers import Ideogram4Transformer2DModel

    with init_empty_weights():
        m = Ideogram4Transformer2DModel.from_config(component.config)
    state = {n: t.read().to(device=device, dtype=dtype) for n, t in component.tensors.items()}
    m.load_state_dict(state, assign=True, strict=True)
    return m.to(device).eval()


def stored_bytes(m: torch.nn.Module) -> int:
    """Bytes of the parameters and persistent buffers as the model holds them (Int8Tensor: qdata + scale + ...,
    GGUF: the packed blocks)."""
    total = 0
    for p in m.parameters():
        total += _tensor_bytes(p)
    for mod in m.modules():
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and name not in mod._non_persistent_buffers_set:
                total += _tensor_bytes(b)
    return total


def _tensor_bytes(t: torch.Tensor) -> int:
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    names = getattr(data, "tensor_data_names", None)
    if names is not None:  # a torchao tensor subclass
        parts = list(names) + list(getattr(data, "optional_tensor_data_names", []) or [])
        return sum(getattr(data, n).numel() * getattr(data, n).element_size()
                   for n in parts if getattr(data, n, None) is not None)
    return t.numel() * t.element_size()


def free(m: torch.nn.Module | None) -> None:
    """Let a backbone go before the next one loads (the caller drops its own reference too). A full collection
    only pays off for a real-size model or on the GPU."""
    big = m is not None and (sum(p.numel() for p in m.parameters()) > 50_000_000
                             or any(p.is_cuda for p in m.parameters()))
    del m
    if big:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def to_device(kwargs: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in kwargs.items()}


@torch.no_grad()
def velocities(m: torch.nn.Module, calls: list[dict[str, torch.Tensor]], device: str = "cpu",
               taps: "LayerTaps | None" = None, progress: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """`demo.velocity` for each call (image tokens, float32, on the CPU)."""
    out = []
    for i, kw in enumerate(calls):
        if taps is not None:
            taps.start_call(i)
        out.append(velocity(m, to_device(kw, device)).cpu())
        if progress is not None:
            progress()
    return out


# ---------------------------------------------------------------- metrics


def compare(reference: torch.Tensor, approx: torch.Tensor) -> dict:
    """SQNR (dB, None when exact), cosine similarity and relative L2 error."""
    ref = reference.double().flatten()
    app = approx.double().flatten()
    s = ErrorStats()
    s.add(ref, app)
    norm = float(ref.norm())
    return {
        "sqnr_db": s.sqnr_db,
        "cosine": round(float(torch.nn.functional.cosine_similarity(ref, app, dim=0)), 7),
        "rel_error": round(float((ref - app).norm()) / norm, 7) if norm else None,
    }


def guided(v_cond: list[torch.Tensor], v_uncond: list[torch.Tensor], g: float) -> torch.Tensor:
    return torch.cat([g * c + (1.0 - g) * u for c, u in zip(v_cond, v_uncond)])


class LayerTaps:
    """Forward hooks on every nn.Linear (GGUFLinear included).

    Reference mode keeps, per call, a strided subset of at most `rows` rows of each layer's input and output.
    Compare mode measures two errors on the same rows: in situ (the variant's layer output inside the variant
    against the source's, so upstream error is included) and isolated (the variant's layer applied to the source's
    layer input: that layer's own quantization error)."""

    def __init__(self, m: torch.nn.Module, rows: int, reference: "LayerTaps | None" = None):
        self.rows = rows
        self.reference = reference
        self.records: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.stats: dict[str, ErrorStats] = {}
        self.isolated: dict[str, ErrorStats] = {}
        self.call = 0
        self._seen: dict[str, int] = {}
        linears = [(name, mod) for name, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
        self.order = [name for name, _ in linears]
        self._handles = [mod.register_forward_hook(self._hook(name)) for name, mod in linears]

    def start_call(self, i: int) -> None:
        self.call = i
        self._seen = {}

    def _subset(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().reshape(-1, t.shape[-1])
        if t.shape[0] > self.rows:
            t = t[torch.linspace(0, t.shape[0] - 1, self.rows, device=t.device).round().long()]
        return t

    def _hook(self, name: str):
        def hook(mod, args, output):
            n = self._seen.get(name, 0)
            self._seen[name] = n + 1
            key = (self.call, name, n)
            y = self._subset(output)
            if self.reference is None:
                self.records[key] = (self._subset(args[0]).to("cpu", copy=True), y.to("cpu", copy=True))
                return
            ref = self.reference.records.get(key)
            if ref is None:
                return
            x_ref, y_ref = ref
            self.stats.setdefault(name, ErrorStats()).add(y_ref, y.to("cpu"))
            own = mod.forward(x_ref.to(args[0].device))  # forward(), not __call__: no hooks, no recursion
            self.isolated.setdefault(name, ErrorStats()).add(y_ref, own.detach().to("cpu"))
        return hook

    def sqnr(self, isolated: bool = False) -> dict[str, float | None]:
        stats = self.isolated if isolated else self.stats
        return {name: stats[name].sqnr_db for name in self.order if name in stats}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
