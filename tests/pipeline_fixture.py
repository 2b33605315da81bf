"""A tiny COMPLETE Ideogram 4 pipeline in diffusers layout, built offline with the real classes.

`Ideogram4Pipeline.from_pretrained(folder)` loads it with stock diffusers + transformers, as it loads
`ideogram-ai/ideogram-4-nf4-diffusers`: `model_index.json`, `scheduler/` (FlowMatchEulerDiscreteScheduler),
`vae/` (AutoencoderKLFlux2), `text_encoder/` (Qwen3VLModel), `tokenizer/` (a word-level fast
tokenizer with a chat template) and both backbones (`ideoquant.testing.build_checkpoint`).

The pipeline taps 13 hidden states of the text encoder (layers 0, 3, ..., 33, 35), so the encoder has 36 layers and
the backbones' `llm_features_dim` is 13 x its hidden size.
"""

from __future__ import annotations

import torch

# The builder lives in ideoquant.testing (`ideoquant demo` benches it too); the tests import it from here.
from ideoquant.testing import (CHAT_TEMPLATE, LATENT_CHANNELS, PIPELINE_CONFIG, PIXELS_PER_TOKEN, SPECIAL, TAPS,  # noqa: F401
                               TEXT_HIDDEN, TEXT_LAYERS, WORDS, build_pipeline, build_text_encoder, build_tokenizer,
                               build_vae)


def run_kwargs(seed: int = 0) -> dict:
    """The smallest generation: one step on an 8x8 image (a 4x4 token grid), latents out."""
    return dict(prompt="a red fox in fresh snow", height=4 * PIXELS_PER_TOKEN, width=4 * PIXELS_PER_TOKEN,
                num_inference_steps=1, max_sequence_length=24, guidance_scale=7.0, guidance_schedule=None,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="latent")
