"""Every GGML type ideoquant writes, one entry each: the table everything else derives from.

The `--type` choices, the types a recipe may name, `general.file_type`, the row-length fallbacks, the unquantized
("plain") types and their sizes, which types take an importance matrix and which refuse to run without one, and which
consumer reads each type all come from `TYPES`. Registering a new type is one `GGMLType(...)` entry below, naming
its compiled encoder in this package.

Plain data only (no numpy, no numba), so that `ideoquant --help` lists the choices without loading the encoders.
"""

from __future__ import annotations

from dataclasses import dataclass

# Who reads a type (checked in their sources; see the README's type table).
DIFFUSERS = "diffusers"
COMFYUI_GGUF = "ComfyUI-GGUF"
SDCPP = "stable-diffusion.cpp"
EVERY_READER = (DIFFUSERS, COMFYUI_GGUF, SDCPP)
SDCPP_ONLY = (SDCPP,)

# What a type does with an importance matrix (ggml's `quant_weights`).
IGNORED = "ignored"  # ggml never reads it (Q8_0, the float types)
OPTIONAL = "optional"  # a weighted path with one, the reference path without
EXPECTED = "expected"  # ggml runs without one, llama-quantize refuses to (IQ2_S, IQ1_M): ideoquant refuses too
REQUIRED = "required"  # ggml asserts one (`ggml_quantize_requires_imatrix`: IQ2_XXS, IQ2_XS, IQ1_S)
IMATRIX_USES = (IGNORED, OPTIONAL, EXPECTED, REQUIRED)


@dataclass(frozen=True)
class GGMLType:
    name: str  # gguf-py's GGMLQuantizationType member name
    block_size: int  # values per block (1: a plain float type)
    type_size: int  # bytes per block
    encoder: str | None  # "<module>.<function>" of this package: the compiled rows encoder; None: not encoded here
    imatrix: str = IGNORED  # one of IMATRIX_USES
    fallback: str | None = None  # the type used instead when a row's length is not a multiple of block_size
    file_type: str | None = None  # gguf-py's LlamaFileType member for a file written in this type
    readers: tuple[str, ...] = EVERY_READER

    def __post_init__(self):
        if self.imatrix not in IMATRIX_USES:
            raise ValueError(f"{self.name}: imatrix must be one of {IMATRIX_USES}, not {self.imatrix!r}")

    @property
    def plain(self) -> bool:
        """Stored unquantized, one value per block (F32, F16, BF16)."""
        return self.block_size == 1

    @property
    def weighted(self) -> bool:
        """ggml quantizes this type differently when given an importance matrix."""
        return self.imatrix != IGNORED

    @property
    def needs_imatrix(self) -> bool:
        """Written only with an importance matrix (ggml asserts one, or llama-quantize refuses without)."""
        return self.imatrix in (EXPECTED, REQUIRED)


TYPES: dict[str, GGMLType] = {}


def register(t: GGMLType) -> GGMLType:
    if t.name in TYPES:
        raise ValueError(f"GGML type {t.name} registered twice")
    TYPES[t.name] = t
    return t


# 32-value blocks: a row that is not a multiple of 32 stays BF16.
register(GGMLType("Q4_0", 32, 18, "legacy.encode_q4_0", OPTIONAL, "BF16", "MOSTLY_Q4_0"))
register(GGMLType("Q4_1", 32, 20, "legacy.encode_q4_1", OPTIONAL, "BF16", "MOSTLY_Q4_1"))
register(GGMLType("Q5_0", 32, 22, "legacy.encode_q5_0", OPTIONAL, "BF16", "MOSTLY_Q5_0"))
register(GGMLType("Q5_1", 32, 24, "legacy.encode_q5_1", OPTIONAL, "BF16", "MOSTLY_Q5_1"))
register(GGMLType("Q8_0", 32, 34, "legacy.encode_q8_0", fallback="BF16", file_type="MOSTLY_Q8_0"))
# K-quants: 256-value super-blocks, Q8_0 for other rows. A pure K type is the _S file type, as llama.cpp labels
# its --pure runs.
register(GGMLType("Q2_K", 256, 84, "kquants.encode_q2_k", OPTIONAL, "Q8_0", "MOSTLY_Q2_K"))
register(GGMLType("Q3_K", 256, 110, "kquants.encode_q3_k", OPTIONAL, "Q8_0", "MOSTLY_Q3_K_S"))
register(GGMLType("Q4_K", 256, 144, "kquants.encode_q4_k", OPTIONAL, "Q8_0", "MOSTLY_Q4_K_S"))
register(GGMLType("Q5_K", 256, 176, "kquants.encode_q5_k", OPTIONAL, "Q8_0", "MOSTLY_Q5_K_S"))
register(GGMLType("Q6_K", 256, 210, "kquants.encode_q6_k", OPTIONAL, "Q8_0", "MOSTLY_Q6_K"))
# Non-linear 4-bit levels (every reader). IQ4_XS is a 256-value super-block; other rows take IQ4_NL (32), as
# llama.cpp falls back.
register(GGMLType("IQ4_NL", 32, 18, "iq4.encode_iq4_nl", OPTIONAL, "BF16", "MOSTLY_IQ4_NL"))
register(GGMLType("IQ4_XS", 256, 136, "iq4.encode_iq4_xs", OPTIONAL, "IQ4_NL", "MOSTLY_IQ4_XS"))
# FP4 (E2M1 codes; only stable-diffusion.cpp reads them). NVFP4's 64-value blocks fall back to MXFP4's 32.
register(GGMLType("MXFP4", 32, 17, "fp4.encode_mxfp4", fallback="BF16", file_type="MOSTLY_MXFP4_MOE",
                  readers=SDCPP_ONLY))
register(GGMLType("NVFP4", 64, 36, "fp4.encode_nvfp4", fallback="MXFP4", file_type="MOSTLY_NVFP4",
                  readers=SDCPP_ONLY))
# IQ types (256-value super-blocks, quantized against ggml's lattices; only stable-diffusion.cpp reads them), IQ4_NL
# for other rows, as llama.cpp falls back. The file type is llama.cpp's for a file of that type.
register(GGMLType("IQ3_S", 256, 110, "iquants.encode_iq3_s", OPTIONAL, "IQ4_NL", "MOSTLY_IQ3_S", SDCPP_ONLY))
register(GGMLType("IQ3_XXS", 256, 98, "iquants.encode_iq3_xxs", OPTIONAL, "IQ4_NL", "MOSTLY_IQ3_XXS", SDCPP_ONLY))
register(GGMLType("IQ2_S", 256, 82, "iquants.encode_iq2_s", EXPECTED, "IQ4_NL", "MOSTLY_IQ2_S", SDCPP_ONLY))
register(GGMLType("IQ2_XS", 256, 74, "iquants.encode_iq2_xs", REQUIRED, "IQ4_NL", "MOSTLY_IQ2_XS", SDCPP_ONLY))
register(GGMLType("IQ2_XXS", 256, 66, "iquants.encode_iq2_xxs", REQUIRED, "IQ4_NL", "MOSTLY_IQ2_XXS", SDCPP_ONLY))
register(GGMLType("IQ1_S", 256, 50, "iq1.encode_iq1_s", REQUIRED, "IQ4_NL", "MOSTLY_IQ1_S", SDCPP_ONLY))
register(GGMLType("IQ1_M", 256, 56, "iq1.encode_iq1_m", EXPECTED, "IQ4_NL", "MOSTLY_IQ1_M", SDCPP_ONLY))
# Plain types. F32 is what norms, biases and embeddings are stored in; it is never a `--type`.
register(GGMLType("F16", 1, 2, "floats.encode_f16", file_type="MOSTLY_F16"))
register(GGMLType("BF16", 1, 2, "floats.encode_bf16", file_type="MOSTLY_BF16"))
register(GGMLType("F32", 1, 4, None, file_type="ALL_F32"))


def get(name: str) -> GGMLType:
    """The entry of a registered type, by its canonical (upper-case) name; KeyError otherwise."""
    return TYPES[name]


def encoded() -> tuple[str, ...]:
    """Every type this package encodes, in registration order."""
    return tuple(n for n, t in TYPES.items() if t.encoder is not None)
