"""Everything ideoquant knows about Ideogram 4's module names and checkpoint layouts.

The canonical view of a backbone is the diffusers state dict of `Ideogram4Transformer2DModel`.
The original (single-file, ComfyUI / stable-diffusion.cpp) layout differs only in attention:
`attention.qkv` holds the rows of `to_q`, `to_k`, `to_v` stacked, and `attention.o` is `to_out.0`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

DEFAULT_SOURCE = "ideogram-ai/ideogram-4-fp8"
COMPONENTS = ("transformer", "unconditional_transformer")
MODEL_CLASS = "Ideogram4Transformer2DModel"
PIPELINE_CLASS = "Ideogram4Pipeline"

# Prefixes seen in original single-file checkpoints; the conditional backbone is the pipeline's `transformer`.
# A wrapper prefix (stripped, the branch then comes from the file's metadata or name) or a per-branch prefix.
WRAPPER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
BRANCH_PREFIXES = {"conditional_transformer.": "transformer", "unconditional_transformer.": "unconditional_transformer"}
ORIGINAL_PREFIXES = {**{p: "transformer" for p in WRAPPER_PREFIXES}, **BRANCH_PREFIXES}
# ComfyUI's files name their branch only in the safetensors metadata `model_type` (Comfy-Org/Ideogram-4).
BRANCH_METADATA = {"ideogram4_cond": "transformer", "ideogram4_uncond": "unconditional_transformer"}
# Tensors that identify an Ideogram 4 backbone, whatever its config says (same names in both layouts).
MARKERS = ("embed_image_indicator.weight", "llm_cond_proj.weight", "input_proj.weight")
# Config keys fixed by the tensor shapes (a config.json must agree with them).
SHAPE_KEYS = ("in_channels", "num_layers", "attention_head_dim", "num_attention_heads", "intermediate_size",
              "adaln_dim", "llm_features_dim")
_LAYER = re.compile(r"^layers\.(\d{1,6})\.")

_QKV = re.compile(r"^(layers\.\d+\.attention)\.qkv\.(weight)$")
_O = re.compile(r"^(layers\.\d+\.attention)\.o\.(weight)$")
_SPLIT = re.compile(r"^(layers\.\d+\.attention)\.to_([qkv])\.weight$")
_OUT = re.compile(r"^(layers\.\d+\.attention)\.to_out\.0\.weight$")


@dataclass(frozen=True)
class ModelSpec:
    """The diffusers state dict of one backbone: names in registration order, shapes, linear modules."""

    config: dict
    shapes: dict[str, tuple[int, ...]]
    linear_modules: frozenset[str]

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def is_linear_weight(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] in self.linear_modules


def _config_key(config: dict) -> tuple:
    """The constructor arguments that shape the model (other keys cannot change the state dict)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items()
                        if k in DEFAULT_CONFIG))


# Ideogram4Transformer2DModel's constructor defaults (the real model): a config.json may leave any of them out.
DEFAULT_CONFIG = {
    "in_channels": 128, "num_layers": 34, "attention_head_dim": 256, "num_attention_heads": 18,
    "intermediate_size": 12288, "adaln_dim": 512, "llm_features_dim": 53248, "rope_theta": 5_000_000,
    "mrope_section": [24, 20, 20], "norm_eps": 1e-5,
}


def model_spec(config: dict) -> ModelSpec:
    """The backbone's state dict (names in registration order, shapes) and its nn.Linear modules, from the config.

    Spelled out rather than built from the diffusers class on the meta device: importing that class costs 4.5 s
    of CPU (diffusers pulls in torchao, accelerate, ...), more than quantizing a layer. tests/test_model.py checks
    this against `Ideogram4Transformer2DModel` itself for several configs.
    """
    return _model_spec(_config_key(config))


@lru_cache(maxsize=8)
def _model_spec(key: tuple) -> ModelSpec:
    c = {**DEFAULT_CONFIG, **{k: list(v) if isinstance(v, tuple) else v for k, v in key}}
    hidden, head = c["attention_head_dim"] * c["num_attention_heads"], c["attention_head_dim"]
    ffn, adaln, llm, io = c["intermediate_size"], c["adaln_dim"], c["llm_features_dim"], c["in_channels"]
    shapes: dict[str, tuple[int, ...]] = {}
    linears: list[str] = []

    def linear(name: str, n_in: int, n_out: int, bias: bool) -> None:
        linears.append(name)
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    linear("input_proj", io, hidden, True)
    shapes["llm_cond_norm.weight"] = (llm,)
    linear("llm_cond_proj", llm, hidden, True)
    linear("t_embedding.mlp_in", hidden, hidden, True)
    linear("t_embedding.mlp_out", hidden, hidden, True)
    linear("adaln_proj", hidden, adaln, True)
    shapes["embed_image_indicator.weight"] = (2, hidden)  # nn.Embedding: not a linear
    for i in range(c["num_layers"]):
        p = f"layers.{i}"
        for proj in ("to_q", "to_k", "to_v"):
            linear(f"{p}.attention.{proj}", hidden, hidden, False)
        shapes[f"{p}.attention.norm_q.weight"] = (head,)
        shapes[f"{p}.attention.norm_k.weight"] = (head,)
        linear(f"{p}.attention.to_out.0", hidden, hidden, False)
        linear(f"{p}.feed_forward.w1", hidden, ffn, False)
        linear(f"{p}.feed_forward.w2", ffn, hidden, False)
        linear(f"{p}.feed_forward.w3", hidden, ffn, False)
        for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            shapes[f"{p}.{norm}.weight"] = (hidden,)
        linear(f"{p}.adaln_modulation", adaln, 4 * hidden, True)
    linear("final_layer.linear", hidden, io, True)
    linear("final_layer.adaln_modulation", adaln, hidden, True)
    return ModelSpec(config=c, shapes=shapes, linear_modules=frozenset(linears))


def infer_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Recover the constructor arguments from diffusers-named tensor shapes (for single files without a config).

    KeyError: a tensor it needs is missing; ValueError: a shape or the layer numbering does not fit the model.
    The result is bounded by the tensors themselves (num_layers counts the layers present), so a spec built from it
    is never larger than the headers it came from.
    """
    def dims(name: str, n: int) -> tuple[int, ...]:
        shape = shapes[name]
        if len(shape) != n or not all(shape):
            raise ValueError(f"{name} has shape {list(shape)}, not a {n}-D tensor of the model")
        return shape

    try:
        hidden, in_channels = dims("input_proj.weight", 2)
        _, llm_features_dim = dims("llm_cond_proj.weight", 2)
        adaln_dim, _ = dims("adaln_proj.weight", 2)
        intermediate_size, _ = dims("layers.0.feed_forward.w1.weight", 2)
        (head_dim,) = dims("layers.0.attention.norm_q.weight", 1)
    except KeyError as e:
        raise KeyError(f"missing {e.args[0]}") from None
    layers = {int(m[1]) for n in shapes if (m := _LAYER.match(n))}
    num_layers = len(layers)
    if layers != set(range(num_layers)):
        gap = min(set(range(max(layers) + 1)) - layers)
        raise ValueError(f"layers are numbered up to {max(layers)} but layer {gap} has no tensors")
    if hidden % head_dim:
        raise ValueError(f"hidden width {hidden} is not a multiple of the head width {head_dim}")
    return {
        "in_channels": in_channels,
        "num_layers": num_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "intermediate_size": intermediate_size,
        "adaln_dim": adaln_dim,
        "llm_features_dim": llm_features_dim,
    }


def is_original_layout(names) -> bool:
    return any(_QKV.match(n) or _O.match(n) for n in names)


def original_to_diffusers(name: str) -> list[tuple[str, int]]:
    """Diffusers names that one original-layout tensor holds, with their row-block index (qkv: 0, 1, 2)."""
    if m := _QKV.match(name):
        return [(f"{m[1]}.to_{p}.weight", i) for i, p in enumerate("qkv")]
    if m := _O.match(name):
        return [(f"{m[1]}.to_out.0.weight", 0)]
    return [(name, 0)]


def diffusers_to_original(name: str) -> tuple[str, int]:
    """The original-layout name a diffusers tensor goes into, and its row-block index within it."""
    if m := _SPLIT.match(name):
        return f"{m[1]}.qkv.weight", "qkv".index(m[2])
    if m := _OUT.match(name):
        return f"{m[1]}.o.weight", 0
    return name, 0


def module_of(name: str) -> str:
    """`layers.0.feed_forward.w2.weight` -> `layers.0.feed_forward.w2` (recipes speak in module names)."""
    return name.rsplit(".", 1)[0]
