"""What the output formats offer, as plain data: the command line's choices and the GGUF type table.

Free of heavy imports so that `ideoquant --help` can list the choices without loading torch; the format modules
(`formats/int8.py`, `formats/gguf.py`) read their tables from here.
"""

from __future__ import annotations

FORMATS = ("int8", "gguf")

# GGUF output names: ComfyUI and stable-diffusion.cpp read the original layout (fused attention.qkv).
GGUF_LAYOUTS = ("original", "diffusers")

# `ideoquant gguf --type`: a base type of recipe `gguf`, or a mixture that is a recipe of its own.
GGUF_TYPES = ("q8_0", "q4_k", "q5_k", "q6_k", "q4_k_m")
GGUF_MIXTURES = {"q4_k_m": "gguf-q4_k_m"}
# The label naming the files -> llama.cpp's `general.file_type` (gguf-py's LlamaFileType member).
GGUF_FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "Q4_K": "MOSTLY_Q4_K_S", "Q4_K_M": "MOSTLY_Q4_K_M",
                   "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K"}
# A type for a row length it cannot take (a K-quant needs a multiple of 256, Q8_0 of 32) -> the next that fits.
GGUF_FALLBACK = {"Q4_K": "Q8_0", "Q5_K": "Q8_0", "Q6_K": "Q8_0", "Q8_0": "BF16"}
GGUF_PLAIN = {"F32": 4, "BF16": 2, "F16": 2}  # stored unquantized: bytes per element
