"""Using an importance matrix: the vector ggml's weighted quantizers receive for a tensor, as llama-quantize or
stable-diffusion.cpp derives it from the same file (they differ by the factor ncall / counts), under any key form
either tool writes. The facts are in `shared/notes/imatrix.md`."""

from __future__ import annotations

import numpy as np

from ..errors import IdeoquantError
from .matrix import Entry, ImportanceMatrix, legacy_values

CONVENTIONS = ("llama", "sdcpp")
# stable-diffusion.cpp keys a weight by its full internal name: `--diffusion-model` files get this prefix, the
# `--uncond-diffusion-model` file the second one (shared/notes/imatrix.md 3.2, consumers.md 3).
SDCPP_PREFIX = "model.diffusion_model."
SDCPP_UNCOND_PREFIX = "model.diffusion_model.uncond."
# ideoquant's own files hold both backbones; the unconditional one's keys carry this prefix (sd.cpp's would not fit
# ggml's 64-byte tensor names with the `.in_sum2` suffix: `...uncond.final_layer.adaln_modulation.weight.in_sum2`).
UNCOND_PREFIX = "uncond."
_UNCOND = (SDCPP_UNCOND_PREFIX, UNCOND_PREFIX)
# Prefixes that name the same tensor: sd.cpp's `convert_tensor_name` maps these to `model.diffusion_model.`.
_ALIASES = (SDCPP_UNCOND_PREFIX, SDCPP_PREFIX, UNCOND_PREFIX, "diffusion_model.", "transformer.", "unet.")


def ones(n_cols: int) -> np.ndarray:
    """stable-diffusion.cpp's vector without an imatrix (or for a key it does not find): all 1.0."""
    return np.ones(n_cols, np.float32)


def canonical(key: str) -> str:
    """The tensor name in ideoquant's GGUF output (original layout, unprefixed) for an imatrix key of either tool."""
    for prefix in _ALIASES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def candidate_keys(tensor_name: str, convention: str = "llama", uncond: bool = False) -> list[str]:
    """The keys each tool writes for `tensor_name`, the preferred one first.

    llama.cpp keys an entry by the weight's GGUF name, which for ideoquant's files is the unprefixed original name
    (`layers.0.attention.qkv.weight`). stable-diffusion.cpp keys it by its full internal name,
    `model.diffusion_model.<name>` (`model.diffusion_model.uncond.<name>` for the unconditional backbone, whose
    loader prefix that is). The `sdcpp` convention tries sd.cpp's form first.
    """
    _convention(convention)
    name = canonical(tensor_name)
    sd = (SDCPP_UNCOND_PREFIX if uncond else SDCPP_PREFIX) + name
    keys = [sd, name] if convention == "sdcpp" else [name, sd]
    return [UNCOND_PREFIX + name, *keys] if uncond else keys


def lookup(
    imatrix: ImportanceMatrix, tensor_name: str, *, convention: str = "llama", uncond: bool = False
) -> Entry | None:
    """The entry for a tensor of ideoquant's GGUF output, under any key form either tool writes; None if absent.

    With `uncond=False` an `uncond.`-prefixed entry is never used, and with `uncond=True` a conditional one is
    never used, so one backbone's statistics do not silently quantize the other.
    """
    keys = candidate_keys(tensor_name, convention, uncond)
    if uncond and any(k.startswith(_UNCOND) for k in imatrix.entries):
        # A file holding both backbones: the unconditional one's entries are the prefixed ones, never the others.
        keys = [k for k in keys if k.startswith(_UNCOND)]
    elif not uncond:
        keys = [k for k in keys if not k.startswith(_UNCOND)]
    for key in keys:
        if key in imatrix.entries:
            return imatrix.entries[key]
    return None


def _convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise IdeoquantError(f"unknown imatrix convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")


def weights(
    imatrix: ImportanceMatrix, name: str, n_cols: int, convention: str, *, uncond: bool = False
) -> np.ndarray | None:
    """The float32 vector ggml_quantize_chunk receives for tensor `name` (n_cols = n_per_row), as each tool derives it.

    * `llama` (llama-quantize): GGUF entries give in_sum2 / counts per matrix (a float32 division; 1.0 for a matrix
      whose count is 0); `.dat` entries give stored / ncall (stored as is when ncall is 0). A missing entry gives
      None (ggml's `_ref` path).
    * `sdcpp` (sd-cli -M convert): the stored `.dat` values as they are, mean(x^2) * ncall, not divided; an entry
      from GGUF or the Accumulator gives what `llama-imatrix --output-format dat` (ncall = ceil(max count /
      chunk_size)) or sd.cpp's own collector (ncall = batches added) would store. A missing entry gives `ones`.

    The result has n_mat * n_cols values (n_mat > 1 only for MoE entries; matrix i is the slice i * n_cols). A size
    that does not match n_cols is an error here (sd.cpp would silently pad with 1.0 or truncate), and so is any
    non-finite value (as in llama-quantize).
    """
    _convention(convention)
    entry = lookup(imatrix, name, convention=convention, uncond=uncond)
    if entry is None:
        return ones(n_cols) if convention == "sdcpp" else None
    if entry.n_cols != n_cols:
        raise IdeoquantError(f"imatrix entry for {name} has {entry.n_cols} columns, the tensor has {n_cols}")
    sums = np.asarray(entry.in_sum2, np.float32)
    counts = np.asarray(entry.counts, np.float32)
    if convention == "sdcpp":
        if not entry.legacy and not counts.any():  # never stored in a `.dat`, so sd.cpp would not find it
            return ones(n_cols * entry.n_mat)
        _, vec = legacy_values(entry, int(imatrix.chunk_size), name, "imatrix")
    elif entry.legacy:  # llama-quantize's `.dat` path: stored / ncall
        vec = (sums / np.float32(entry.ncall) if entry.ncall > 0 else sums).reshape(-1)
    else:
        zero = counts == 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            vec = np.where(zero[:, None], np.float32(1), sums / np.where(zero, np.float32(1), counts)[:, None])
        vec = vec.astype(np.float32).reshape(-1)
    if not np.isfinite(vec).all():
        raise IdeoquantError(f"imatrix entry for {name} gives non-finite weights")
    return np.ascontiguousarray(vec, np.float32)
