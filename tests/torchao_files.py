"""Reading back what a torchao safetensors folder stores, for the FP8 and NVFP4 tests."""

from __future__ import annotations

import torch
from safetensors import safe_open


def stored(folder):
    """Every tensor of the folder's safetensors files and the (shared) metadata of the last one."""
    tensors, metadata = {}, {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            metadata = h.metadata()
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
    return tensors, metadata


def bits(t):
    """The tensor's bytes, to compare float8 / float4 codes exactly (NaN codes included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)
