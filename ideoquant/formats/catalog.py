"""What the output formats offer, as plain data: the command line's choices and the GGUF type table.

Free of heavy imports so that `ideoquant --help` can list the choices without loading torch; the format modules
(`formats/int8.py`, `formats/gguf.py`) read their tables from here. Adding a GGUF type or mixture: a row here,
its encoder in `encode/ggml/`, and for a mixture one recipe file `recipes/gguf-<name>.toml`.
"""

from __future__ import annotations

from ..recipe import GGUF_TYPES as RECIPE_TYPES

FORMATS = ("int8", "gguf")

# GGUF output names: ComfyUI and stable-diffusion.cpp read the original layout (fused attention.qkv).
GGUF_LAYOUTS = ("original", "diffusers")

# GGML types ideoquant quantizes to (bit-exact with ggml), and the unquantized ones a tensor can be stored in.
GGUF_PLAIN = {"F32": 4, "BF16": 2, "F16": 2}  # bytes per element
GGUF_QUANT_TYPES = tuple(t for t in RECIPE_TYPES if t not in GGUF_PLAIN)
# Mixtures: the image-model rules of ComfyUI-GGUF's patched llama-quantize (tools/lcpp.patch), one recipe each.
GGUF_MIXTURES = {m: f"gguf-{m}" for m in ("q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m")}
# `ideoquant gguf --type`: every type name (the base type of recipe `gguf`), every mixture, and the float types.
GGUF_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_0", "q4_1", "q4_k_s", "q4_k_m", "q5_0", "q5_1", "q5_k_s",
              "q5_k_m", "q6_k", "q8_0", "bf16", "f16", "q3_k", "q4_k", "q5_k")
# The label naming the files -> llama.cpp's `general.file_type` (gguf-py's LlamaFileType member). A pure K type
# is the _S file type, as llama.cpp's --pure runs are labelled.
GGUF_FILE_TYPES = {
    "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_S", "Q3_K_S": "MOSTLY_Q3_K_S", "Q3_K_M": "MOSTLY_Q3_K_M",
    "Q3_K_L": "MOSTLY_Q3_K_L", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q4_K": "MOSTLY_Q4_K_S",
    "Q4_K_S": "MOSTLY_Q4_K_S", "Q4_K_M": "MOSTLY_Q4_K_M", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
    "Q5_K": "MOSTLY_Q5_K_S", "Q5_K_S": "MOSTLY_Q5_K_S", "Q5_K_M": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K",
    "Q8_0": "MOSTLY_Q8_0", "BF16": "MOSTLY_BF16", "F16": "MOSTLY_F16",
}
# A type for a row length it cannot take (a K-quant needs a multiple of 256, the others of 32) -> the next that fits.
GGUF_FALLBACK = {"Q2_K": "Q8_0", "Q3_K": "Q8_0", "Q4_K": "Q8_0", "Q5_K": "Q8_0", "Q6_K": "Q8_0",
                 "Q4_0": "BF16", "Q4_1": "BF16", "Q5_0": "BF16", "Q5_1": "BF16", "Q8_0": "BF16"}
