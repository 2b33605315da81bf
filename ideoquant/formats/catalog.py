"""What the output formats offer, as plain data: the command line's choices and the GGUF tables.

Free of heavy imports so that `ideoquant --help` can list the choices without loading torch. Every GGUF table here
is derived from the type registry (`encode/ggml/registry.py`, one entry per type); adding a GGUF type is its entry
and its encoder there, and a mixture is one name below plus one recipe file `recipes/gguf-<name>.toml`.
"""

from __future__ import annotations

from ..encode.ggml import registry

FORMATS = ("int8", "gguf", "float8", "float4")

# GGUF output names: ComfyUI and stable-diffusion.cpp read the original layout (fused attention.qkv).
GGUF_LAYOUTS = ("original", "diffusers")

_ENCODED = [registry.TYPES[n] for n in registry.encoded()]
# The unquantized types a tensor can be stored in -> bytes per element.
GGUF_PLAIN = {t.name: t.type_size for t in registry.TYPES.values() if t.plain}
# The quantized types ideoquant writes (bit-exact with ggml).
GGUF_QUANT_TYPES = tuple(t.name for t in _ENCODED if not t.plain)
# Mixtures: the image-model rules of ComfyUI-GGUF's patched llama-quantize (tools/lcpp.patch), one recipe each.
GGUF_MIXTURES = {m: f"gguf-{m}" for m in ("q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m")}
# `ideoquant gguf --type`: every encoded type (the base type of recipe `gguf`), each followed by its mixtures.
GGUF_CHOICES = tuple(c for t in _ENCODED
                     for c in (t.name.lower(), *(m for m in GGUF_MIXTURES if m.startswith(t.name.lower() + "_"))))
# The label naming the files -> llama.cpp's `general.file_type` (gguf-py's LlamaFileType member).
GGUF_FILE_TYPES = {**{t.name: t.file_type for t in _ENCODED}, **{m.upper(): f"MOSTLY_{m.upper()}" for m in GGUF_MIXTURES}}
# A type for a row length it cannot take -> the next that fits (followed until one does).
GGUF_FALLBACK = {t.name: t.fallback for t in registry.TYPES.values() if t.fallback}
# Who reads each type (the registry's readers) and the types only stable-diffusion.cpp reads.
GGUF_READERS = {t.name: t.readers for t in registry.TYPES.values()}
GGUF_SDCPP_ONLY = tuple(t.name for t in _ENCODED if t.readers == registry.SDCPP_ONLY)
