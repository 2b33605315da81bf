"""Where the math runs: a device the user named, checked once with a clear error."""

from __future__ import annotations

from .errors import IdeoquantError

DEVICES = ("cpu", "cuda")


def check_device(device: str) -> str:
    """`cpu`, `cuda` or `cuda:N`, normalised; an error naming the problem otherwise."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise IdeoquantError(f"unknown device '{device}' (use cpu or cuda)") from None
    if dev.type not in DEVICES:
        raise IdeoquantError(f"unsupported device '{device}' (use cpu or cuda)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise IdeoquantError("--device cuda: no CUDA device is available to this torch build")
    return str(dev)
