"""Tiny Ideogram 4 checkpoints, built with diffusers' own class, and deterministic inputs for them.

Used by `ideoquant demo`, by the tests and by the benchmarks: the whole job runs offline on a model that
has every module of the real one, only narrower and shallower.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import model

# Widths are multiples of 256 so that the K-quants apply; in_channels (64) is not, so input_proj exercises
# the fallback. attention_head_dim must be 128: the default mrope_section (24, 20, 20) covers 64 frequencies.
TINY_CONFIG = dict(
    in_channels=64,
    num_layers=2,
    attention_head_dim=128,
    num_attention_heads=2,
    intermediate_size=512,
    adaln_dim=256,
    llm_features_dim=512,
)


def build_model(config: dict | None = None, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised float32 Ideogram4Transformer2DModel with non-trivial norms and biases."""
    from diffusers import Ideogram4Transformer2DModel

    torch.manual_seed(seed)
    m = Ideogram4Transformer2DModel(**(config or TINY_CONFIG))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:  # norms at 1 and biases at 0 would hide mistakes in how they are carried
                p.copy_((1.0 if "norm" in name else 0.0) + 0.05 * torch.randn_like(p))
    return m.eval()


LAYOUTS = ("diffusers", "official", "original", "diffsynth", "comfy", "int8_convrot", "nf4", "nf4-diffusers")
COMFY_FILES = {"transformer": "ideogram4_{fmt}.safetensors", "unconditional_transformer": "ideogram4_unconditional_{fmt}.safetensors"}
FP8_MAX = 448.0


def build_checkpoint(
    path: str | Path,
    *,
    config: dict | None = None,
    fmt: str = "bf16",
    layout: str = "diffusers",
    max_shard_size: str | int = "2MB",
    seed: int = 0,
    class_name: str | None = model.MODEL_CLASS,
    quantization_config: dict | None = None,
) -> Path:
    """Write a tiny replica of one of the published Ideogram 4 layouts (see /work/shared/notes/real-release.md).

    layout / fmt:
    - "diffusers": a pipeline folder (model_index.json, transformer/, unconditional_transformer/) as
      `save_pretrained` writes it, split `to_q/to_k/to_v/to_out.0` names, sharded by max_shard_size; fmt "bf16",
      "fp16", "fp32" (the bf16 diffusers repacks), or "fp8" (the official release with split q/k/v keys, in case
      its PR #10 lands: one file per backbone, FP8 per-row).
    - "official": `ideogram-ai/ideogram-4-fp8` exactly: a pipeline folder whose backbone folders each hold one
      `diffusion_pytorch_model.safetensors` with the original fused names and no prefix (`layers.N.attention.qkv`
      rows q|k|v, `attention.o`), every linear weight float8_e4m3fn with a float32 per-row `.weight_scale` [out]
      (the release's own format, `w = fp8 * scale[:, None]`), everything else bf16, an index pointing every key at
      that file, and a config.json with diffusers keys and no quantization_config. fmt "fp8" (also the default).
    - "original": one `ideogram4.safetensors` with both backbones under `conditional_transformer.` /
      `unconditional_transformer.` prefixes, fused names (fmt bf16/fp16/fp32/fp8). Returns the file.
    - "diffsynth": DiffSynth-Studio's bf16 repack: transformer/ and unconditional_transformer/ each with one
      `diffusion_pytorch_model.safetensors`, fused names, bf16, no scales, no config, no model_index.json.
    - "comfy": Comfy-Org/Ideogram-4's diffusion_models/ folder: `ideogram4_fp8_scaled.safetensors` and
      `ideogram4_unconditional_fp8_scaled.safetensors`, fused names, FP8 weights with a per-tensor scalar F32
      `weight_scale` [] and a U8 `<module>.comfy_quant` JSON marker per quantized layer, the branch only in the
      metadata `model_type` (ideogram4_cond / ideogram4_uncond). fmt "fp8" (default) or "nvfp4" (the refused
      `ideogram4[_unconditional]_nvfp4_mixed.safetensors`: packed U8 weights, F8 block scales, `weight_scale_2`).
      Returns the folder.
    - "int8_convrot": `ideogram4_int8_convrot.safetensors`: I8 weights with F32 row scales, no branch metadata.
      Returns the file.
    - "nf4": `ideogram-ai/ideogram-4-nf4`: the official pipeline layout, fused names, every linear bitsandbytes NF4
      (blocksize 64, no nested statistics: `weight` U8 [out*in/2, 1], `weight.absmax`, `weight.quant_map`,
      `weight.quant_state.bitsandbytes__nf4`), config.json without or (quantization_config=...) with a
      quantization_config. "nf4-diffusers": `ideogram-4-nf4-diffusers`, the same tensors under diffusers names,
      config.json with a bitsandbytes quantization_config unless quantization_config={} is given.

    class_name: the configs' `_class_name` (None: left out). Returns the pipeline folder unless said otherwise.
    """
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: one of {LAYOUTS}")
    if layout in ("official", "comfy") and fmt == "bf16":
        fmt = "fp8"
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(fmt, torch.bfloat16)
    single: dict[str, torch.Tensor] = {}
    for i, component in enumerate(model.COMPONENTS):
        m = build_model(config, seed=seed + i)
        folder = path / component
        if layout == "diffusers" and fmt in ("bf16", "fp16", "fp32"):
            m.to(dtype).save_pretrained(folder, max_shard_size=max_shard_size)
            _set_class(folder / "config.json", class_name)
            continue
        linear = model.model_spec(dict(m.config)).linear_modules
        sd = {k: v.to(dtype).contiguous() for k, v in m.state_dict().items()}
        if layout != "diffusers" and layout != "nf4-diffusers":
            sd = _fuse(sd)
            linear = {model.diffusers_to_original(f"{x}.weight")[0][: -len(".weight")] for x in linear}
        metadata = {"format": "pt"}
        if fmt == "fp8" and layout != "comfy":
            for mod in sorted(linear):
                sd[f"{mod}.weight"], sd[f"{mod}.weight_scale"] = quantize_fp8_rows(sd[f"{mod}.weight"])
        elif layout == "comfy":
            for mod in sorted(linear):
                sd.update(_comfy_layer(mod, sd.pop(f"{mod}.weight"), fmt))
            metadata["model_type"] = "ideogram4_cond" if component == "transformer" else "ideogram4_uncond"
        elif layout == "int8_convrot":
            for mod in sorted(linear):
                w = sd[f"{mod}.weight"].float()
                scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-8)
                sd[f"{mod}.weight"] = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
                sd[f"{mod}.weight_scale"] = scale
        elif layout in ("nf4", "nf4-diffusers"):
            for mod in sorted(linear):
                sd.update(_nf4_layer(mod, sd.pop(f"{mod}.weight")))

        if layout == "original":
            prefix = "conditional_transformer." if component == "transformer" else "unconditional_transformer."
            single.update({prefix + k: v for k, v in sd.items()})
        elif layout in ("comfy", "int8_convrot"):
            if layout == "int8_convrot":
                if component == "transformer":
                    save_file(sd, path / "ideogram4_int8_convrot.safetensors", metadata=metadata)
                continue
            name = COMFY_FILES[component].format(fmt="fp8_scaled" if fmt == "fp8" else f"{fmt}_mixed")
            save_file(sd, path / name, metadata=metadata)
        else:
            folder.mkdir(exist_ok=True)
            weights = folder / "diffusion_pytorch_model.safetensors"
            save_file(sd, weights, metadata=metadata)
            if layout == "diffsynth":
                continue
            m.save_config(folder)
            _set_class(folder / "config.json", class_name)
            qc = quantization_config
            if layout == "nf4-diffusers" and qc is None:
                qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                      "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "bfloat16"}
            if qc:
                cfg = json.loads((folder / "config.json").read_text())
                cfg["quantization_config"] = qc
                (folder / "config.json").write_text(json.dumps(cfg, indent=2))
            if layout == "official":  # the release's index points every key at its one file
                index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                         "weight_map": {k: weights.name for k in sorted(sd)}}
                (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if layout == "original":
        save_file(single, path / "ideogram4.safetensors", metadata={"format": "pt"})
        return path / "ideogram4.safetensors"
    if layout == "int8_convrot":
        return path / "ideogram4_int8_convrot.safetensors"
    if layout in ("comfy", "diffsynth"):
        return path
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": model.PIPELINE_CLASS,
        "_diffusers_version": _diffusers_version(),
        "transformer": ["diffusers", model.MODEL_CLASS],
        "unconditional_transformer": ["diffusers", model.MODEL_CLASS],
    }, indent=2))
    return path


def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official release's quantizer (RyukoMatoiFan/ideogram4 quantized_loading.py), round to nearest:
    `scale = amax(|w|, row) / 448` (at least 1e-8), float8_e4m3fn codes `w / scale[:, None]`, float32 scale [out]."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-8)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _comfy_layer(mod: str, w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """One ComfyUI quantized layer: fp8 with a per-tensor scalar scale, or nvfp4 (packed nibbles, e4m3 scales per
    16 values, a global `weight_scale_2`), each with its `comfy_quant` JSON marker."""
    w = w.float()
    if fmt == "fp8":
        scale = (w.abs().max() / FP8_MAX).clamp_min(1e-8).reshape(())
        tensors = {f"{mod}.weight": (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn),
                   f"{mod}.weight_scale": scale.float()}
        marker = {"format": "float8_e4m3fn"}
    elif fmt == "nvfp4":
        out, n_in = w.shape
        tensors = {f"{mod}.weight": torch.zeros(out, n_in // 2, dtype=torch.uint8),
                   f"{mod}.weight_scale": torch.ones(out, n_in // 16).to(torch.float8_e4m3fn),
                   f"{mod}.weight_scale_2": torch.tensor(1.0)}
        marker = {"format": "nvfp4"}
    else:
        raise ValueError(f"comfy layout: fmt fp8 or nvfp4, not {fmt!r}")
    tensors[f"{mod}.comfy_quant"] = torch.tensor(list(json.dumps(marker).encode()), dtype=torch.uint8)
    return tensors


def _nf4_layer(mod: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """A bitsandbytes NF4 linear as bnb serializes it (blocksize 64, compress_statistics False)."""
    out, n_in = w.shape
    state = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [out, n_in]}
    return {f"{mod}.weight": torch.zeros(out * n_in // 2, 1, dtype=torch.uint8),
            f"{mod}.weight.absmax": w.float().reshape(-1, 64).abs().amax(dim=1),
            f"{mod}.weight.quant_map": torch.linspace(-1, 1, 16),
            f"{mod}.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(state).encode()),
                                                                       dtype=torch.uint8)}


def _set_class(config_file: Path, class_name: str | None) -> None:
    if class_name == model.MODEL_CLASS:
        return
    cfg = json.loads(config_file.read_text())
    cfg.pop("_class_name", None)
    if class_name is not None:
        cfg = {"_class_name": class_name, **cfg}
    config_file.write_text(json.dumps(cfg, indent=2))


def _fuse(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> original layout (fused qkv rows, `attention.o`); FP8 scales follow their rows."""
    out: dict[str, list] = {}
    for k, v in sd.items():
        base, suffix = (k[: -len("_scale")], "_scale") if k.endswith(".weight_scale") else (k, "")
        name, idx = model.diffusers_to_original(base)
        out.setdefault(name + suffix, []).append((idx, v))
    return {k: torch.cat([v for _, v in sorted(parts, key=lambda p: p[0])]) for k, parts in out.items()}


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def build_outlier_checkpoint(path: str | Path, outlier: float = 100.0) -> Path:
    """The tiny model with activation outlier channels, the way they arise in real transformers: a few channels of
    the norms before q/k/v, w1/w3 and llm_cond_proj are `outlier` times larger, and the weight columns that read
    them as much smaller, so the bf16 model computes the same function while those linears' inputs carry outliers
    (which per-token int8 activation quantization handles badly and SmoothQuant moves into the weights, and which
    make those small weight columns matter: what an importance matrix tells the GGUF quantizers)."""
    from safetensors.torch import load_file, save_file

    path = build_checkpoint(path, max_shard_size="100MB")
    ch, text_ch = [3, 77, 150, 201], [5, 300]

    def scale(sd, key, idx, factor, dim):
        w = sd[key].float()
        if dim == 0:
            w[idx] *= factor
        else:
            w[:, idx] *= factor
        sd[key] = w.bfloat16()

    for c in model.COMPONENTS:
        f = path / c / "diffusion_pytorch_model.safetensors"
        sd = load_file(f)
        for k in list(sd):
            if k.endswith(("attention_norm1.weight", "ffn_norm1.weight")):
                scale(sd, k, ch, outlier, 0)
            if k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "w1.weight", "w3.weight")):
                scale(sd, k, ch, 1 / outlier, 1)
        scale(sd, "llm_cond_norm.weight", text_ch, outlier, 0)
        scale(sd, "llm_cond_proj.weight", text_ch, 1 / outlier, 1)
        save_file(sd, f, metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------- a tiny COMPLETE pipeline
# `Ideogram4Pipeline.from_pretrained(folder)` loads it with stock diffusers + transformers, as it loads
# `ideogram-ai/ideogram-4-nf4-diffusers`: model_index.json, scheduler/ (FlowMatchEulerDiscreteScheduler), vae/
# (AutoencoderKLFlux2), text_encoder/ (Qwen3VLModel), tokenizer/ (a word-level fast tokenizer with a chat template)
# and both backbones. The pipeline taps 13 hidden states of the text encoder (layers 0, 3, ..., 33, 35), so the
# encoder has 36 layers and the backbones' `llm_features_dim` is 13 x its hidden size. Needs transformers (the
# `test` and `bench` extras); used by the tests and by `ideoquant demo`'s bench.

TEXT_HIDDEN = 16
TAPS = 13  # diffusers' QWEN3_VL_ACTIVATION_LAYERS
TEXT_LAYERS = 36
# The backbones: TINY_CONFIG with text features as wide as the tiny encoder makes them.
PIPELINE_CONFIG = dict(TINY_CONFIG, llm_features_dim=TAPS * TEXT_HIDDEN)
LATENT_CHANNELS = TINY_CONFIG["in_channels"] // 4  # the pipeline patchifies the VAE latent 2x2
PIXELS_PER_TOKEN = 2  # one VAE level (scale 1) x the pipeline's 2x2 patch: an 8x8 image is a 4x4 token grid

WORDS = ["a", "red", "fox", "in", "fresh", "snow", "photograph", "cat", "sign", "hello", "world", "user",
         "assistant", ",", ".", "\n"]
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                 "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(path: Path):
    """A word-level fast tokenizer (no download, no vocabulary file but its own), saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_text_encoder(path: Path, vocab_size: int, seed: int = 0):
    """A 36-layer Qwen3-VL at width 16 (its vision tower as small as the config allows; the pipeline never runs it)."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=32,
                         num_hidden_layers=TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=512, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                           patch_size=2, temporal_patch_size=1, spatial_merge_size=1, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
    )
    torch.manual_seed(seed)
    m = Qwen3VLModel(cfg).eval()
    m.to(torch.bfloat16).save_pretrained(path)
    return m


def build_vae(path: Path, seed: int = 0):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), layers_per_block=1, latent_channels=LATENT_CHANNELS,
                             norm_num_groups=4, sample_size=16, mid_block_add_attention=False)
    vae.save_pretrained(path)
    return vae


def build_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write the complete tiny pipeline folder; returns it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = Path(path)
    build_checkpoint(path, config=PIPELINE_CONFIG, fmt="bf16", max_shard_size="100MB", seed=seed)
    tok = build_tokenizer(path / "tokenizer")
    build_text_encoder(path / "text_encoder", vocab_size=len(tok), seed=seed)
    build_vae(path / "vae", seed=seed)
    FlowMatchEulerDiscreteScheduler().save_pretrained(path / "scheduler")
    index = json.loads((path / "model_index.json").read_text())
    index.update({
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
        "text_encoder": ["transformers", "Qwen3VLModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "prompt_enhancer_head": [None, None],
    })
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
