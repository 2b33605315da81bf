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


def build_checkpoint(
    path: str | Path,
    *,
    config: dict | None = None,
    fmt: str = "bf16",
    layout: str = "diffusers",
    max_shard_size: str | int = "2MB",
    seed: int = 0,
) -> Path:
    """Write a pipeline folder (model_index.json, transformer/, unconditional_transformer/).

    fmt: "bf16", "fp16", "fp32" or "fp8" (float8_e4m3fn weights with float32 per-row `weight_scale`, the
    diffusers BFL fp8r scheme). layout "original" writes one `ideogram4.safetensors` file instead, with
    fused `attention.qkv`, `attention.o` and `conditional_transformer.` / `unconditional_transformer.` prefixes.
    """
    from diffusers.quantizers.bfl.utils import quantize_fp8r
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.bfloat16}[fmt]
    single: dict[str, torch.Tensor] = {}
    for i, component in enumerate(model.COMPONENTS):
        m = build_model(config, seed=seed + i)
        if layout == "diffusers" and fmt != "fp8":
            m.to(dtype).save_pretrained(path / component, max_shard_size=max_shard_size)
            continue
        sd = {k: v.to(dtype).contiguous() for k, v in m.state_dict().items()}
        if fmt == "fp8":
            linear = model.model_spec(dict(m.config)).linear_modules
            for k in list(sd):
                if k.endswith(".weight") and k[:-7] in linear:
                    sd[k], sd[k + "_scale"] = quantize_fp8r(sd[k].float())
        if layout == "original":
            prefix = "conditional_transformer." if component == "transformer" else "unconditional_transformer."
            single.update({prefix + k: v for k, v in _fuse(sd).items()})
        else:
            (path / component).mkdir(exist_ok=True)
            m.save_config(path / component)
            if fmt == "fp8":  # as an FP8 release marks itself for diffusers' BFL fp8r loader
                cfg_file = path / component / "config.json"
                cfg = json.loads(cfg_file.read_text())
                cfg["quantization_config"] = {"quant_method": "bfl", "compute_dtype": "bfloat16", "pre_quantized": True}
                cfg_file.write_text(json.dumps(cfg, indent=2))
            save_file(sd, path / component / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    if layout == "original":
        save_file(single, path / "ideogram4.safetensors", metadata={"format": "pt"})
        return path / "ideogram4.safetensors"
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": model.PIPELINE_CLASS,
        "_diffusers_version": _diffusers_version(),
        "transformer": ["diffusers", model.MODEL_CLASS],
        "unconditional_transformer": ["diffusers", model.MODEL_CLASS],
    }, indent=2))
    return path


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


def sample_inputs(
    config: dict,
    *,
    batch: int = 2,
    text_tokens: int = 12,
    grid: tuple[int, int] = (4, 4),
    timesteps: tuple[float, ...] = (0.3, 0.8),
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """Packed [left-pad][text][image] inputs shaped like the pipeline's, deterministic for a seed.

    Prompts of different lengths exercise the padding and the block-diagonal mask.
    """
    from diffusers.models.transformers.transformer_ideogram4 import (
        IMAGE_POSITION_OFFSET, LLM_TOKEN_INDICATOR, OUTPUT_IMAGE_INDICATOR, SEQUENCE_PADDING_INDICATOR)

    g = torch.Generator().manual_seed(seed)
    gh, gw = grid
    n_img = gh * gw
    total = text_tokens + n_img
    h = torch.arange(gh).repeat_interleave(gw)
    w = torch.arange(gw).repeat(gh)
    image_pos = torch.stack([torch.zeros_like(h), h, w], dim=1) + IMAGE_POSITION_OFFSET
    position_ids = torch.zeros(batch, total, 3, dtype=torch.long)
    segment_ids = torch.full((batch, total), SEQUENCE_PADDING_INDICATOR, dtype=torch.long)
    indicator = torch.zeros(batch, total, dtype=torch.long)
    for b in range(batch):
        n_text = max(1, text_tokens - 3 * b)
        off = text_tokens - n_text
        t = torch.arange(n_text)
        position_ids[b, off:text_tokens] = torch.stack([t, t, t], dim=1)
        position_ids[b, text_tokens:] = image_pos
        indicator[b, off:text_tokens] = LLM_TOKEN_INDICATOR
        indicator[b, text_tokens:] = OUTPUT_IMAGE_INDICATOR
        segment_ids[b, off:] = 1
    ts = torch.tensor([timesteps[b % len(timesteps)] for b in range(batch)])
    return {
        "hidden_states": torch.randn(batch, total, config["in_channels"], generator=g).to(dtype),
        "timestep": ts.to(dtype),
        "encoder_hidden_states": torch.randn(batch, total, config["llm_features_dim"], generator=g).to(dtype),
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "indicator": indicator,
    }


@torch.no_grad()
def velocity(transformer: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's output on the image tokens only (text positions carry no prediction), in float32."""
    from diffusers.models.transformers.transformer_ideogram4 import OUTPUT_IMAGE_INDICATOR

    out = transformer(**inputs, return_dict=False)[0].float()
    return out[inputs["indicator"] == OUTPUT_IMAGE_INDICATOR]


def run_demo(out: str | Path = "ideoquant-demo", reporter=None) -> dict:
    """The whole job on a tiny checkpoint: build it, convert to INT8 and GGUF, load each result, compare outputs."""
    import shutil

    from diffusers import Ideogram4Transformer2DModel

    from .job import convert, convert_gguf
    from .load import load_transformer
    from .metrics import sqnr_db

    out = Path(out)
    if out.exists():
        if not (out / ".ideoquant-demo").exists():
            from .errors import IdeoquantError

            raise IdeoquantError(f"{out} exists and is not an ideoquant demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / ".ideoquant-demo").write_text("made by `ideoquant demo`; safe to delete\n")
    source = build_checkpoint(out / "source", fmt="bf16")
    runs = [
        ("int8-w8a8", lambda: convert(source, out / "int8", reporter=reporter)),
        ("gguf q8_0", lambda: convert_gguf(source, out / "gguf-q8_0", qtype="q8_0", reporter=reporter)),
        ("gguf q4_k", lambda: convert_gguf(source, out / "gguf-q4_k", qtype="q4_k", reporter=reporter)),
        ("gguf q4_k_m", lambda: convert_gguf(source, out / "gguf-q4_k_m", qtype="q4_k_m", reporter=reporter)),
    ]
    variants = []
    refs = {c: Ideogram4Transformer2DModel.from_pretrained(source / c, torch_dtype=torch.bfloat16)
            for c in model.COMPONENTS}
    inputs = sample_inputs(TINY_CONFIG)
    ref_v = torch.cat([velocity(refs[c], inputs) for c in model.COMPONENTS])
    source_bytes = sum(f.stat().st_size for c in model.COMPONENTS for f in (source / c).glob("*.safetensors"))
    params = sum(p.numel() for p in refs["transformer"].parameters())
    for name, run in runs:
        m = run()
        target = out / ("int8" if name.startswith("int8") else f"gguf-{name.split()[1]}")
        quant_v = []
        for c in model.COMPONENTS:
            files = m["components"][c]["files"]
            weights = next(f for f in files if f.endswith((".gguf", ".safetensors")))
            path = target / weights if weights.endswith(".gguf") else target / c
            quant_v.append(velocity(load_transformer(path), inputs))
        v = torch.cat(quant_v)
        weight_bytes = sum(info["size"] for rel, info in m["files"].items() if rel.endswith((".gguf", ".safetensors")))
        variants.append({
            "name": name,
            "files": target.name + "/",
            "bytes": weight_bytes,
            "ratio": weight_bytes / source_bytes,
            "sqnr_db": sqnr_db(ref_v, v),
            "cosine": float(torch.nn.functional.cosine_similarity(ref_v.flatten(), v.flatten(), dim=0)),
        })
    return {"source": str(source), "params": params, "source_bytes": source_bytes, "variants": variants}
