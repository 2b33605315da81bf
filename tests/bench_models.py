"""Tiny metric models for the bench tests, built from configs with the real classes and saved locally: a CLIP (for
CLIPScore and, as a CLIP fine-tune, PickScore) with its processor, and torchvision AlexNet features for LPIPS."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def build_clip(path: Path, seed: int = 0) -> Path:
    """A CLIPModel (one layer per tower, 32x32 images) with a CLIPProcessor whose tokenizer knows single letters."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [",", "."]
    vocab = {t: i for i, t in enumerate(letters + [t + "</w>" for t in letters])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab_file=str(path / "vocab.json"), merges_file=str(path / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(path)
    return path


def build_alexnet_features(path: Path, seed: int = 0) -> Path:
    """torchvision's AlexNet `features.*` tensors (random init), saved as safetensors: the layout of its ImageNet
    state dict, which is what `--metric-model lpips=FILE` reads."""
    from safetensors.torch import save_file
    from torchvision.models import alexnet

    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in alexnet().state_dict().items() if k.startswith("features.")}
    save_file(state, path)
    return path
