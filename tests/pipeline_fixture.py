"""A tiny COMPLETE Ideogram 4 pipeline in diffusers layout, built offline with the real classes.

`Ideogram4Pipeline.from_pretrained(folder)` loads it with stock diffusers + transformers, as it loads
`ideogram-ai/ideogram-4-nf4-diffusers`: `model_index.json`, `scheduler/` (FlowMatchEulerDiscreteScheduler),
`vae/` (AutoencoderKLFlux2), `text_encoder/` (Qwen3VLModel), `tokenizer/` (a word-level fast
tokenizer with a chat template) and both backbones (`ideoquant.testing.build_checkpoint`).

The pipeline taps 13 hidden states of the text encoder (layers 0, 3, ..., 33, 35), so the encoder has 36 layers and
the backbones' `llm_features_dim` is 13 x its hidden size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ideoquant import testing

TEXT_HIDDEN = 16
TAPS = 13  # diffusers' QWEN3_VL_ACTIVATION_LAYERS
TEXT_LAYERS = 36
# The backbones: testing.TINY_CONFIG with text features as wide as the tiny encoder makes them.
PIPELINE_CONFIG = dict(testing.TINY_CONFIG, llm_features_dim=TAPS * TEXT_HIDDEN)
LATENT_CHANNELS = testing.TINY_CONFIG["in_channels"] // 4  # the pipeline patchifies the VAE latent 2x2
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
    testing.build_checkpoint(path, config=PIPELINE_CONFIG, fmt="bf16", max_shard_size="100MB", seed=seed)
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


def run_kwargs(seed: int = 0) -> dict:
    """The smallest generation: one step on an 8x8 image (a 4x4 token grid), latents out."""
    return dict(prompt="a red fox in fresh snow", height=4 * PIXELS_PER_TOKEN, width=4 * PIXELS_PER_TOKEN,
                num_inference_steps=1, max_sequence_length=24, guidance_scale=7.0, guidance_schedule=None,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="latent")
