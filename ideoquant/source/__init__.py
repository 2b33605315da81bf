"""Source: what is there to quantize (a Hub repo, a pipeline or component folder, single files).

`open_source` resolves it into components with a canonical, diffusers-named view of their tensors, built from the
safetensors headers alone; `SourceTensor.read` reads rows on demand.
"""

from .open import Component, Source, open_source, recorded_sha256
from .tensors import FileMaps, ReadAhead, ReadBehind, SourceTensor, StoredTensor

__all__ = ["Component", "FileMaps", "ReadAhead", "ReadBehind", "Source", "SourceTensor", "StoredTensor", "open_source",
           "recorded_sha256"]
