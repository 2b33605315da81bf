"""NaN / Inf detection for tensors that are kept or GGUF-encoded (INT8 weights are checked through their scales)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import damaged_tensor
from . import kernels
from .int8 import numpy_bits

# float dtype -> (integer view, magnitude mask, the smallest non-finite magnitude)
_NONFINITE_BITS = {torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80), torch.float16: (torch.int16, 0x7FFF, 0x7C00),
                   torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000)}


def check_finite(name: str, block: torch.Tensor) -> None:
    """A NaN or Inf is an error naming the tensor: found from the largest magnitude's bits, in one GIL-free pass
    without temporaries."""
    if block.dtype in _NONFINITE_BITS:
        view, magnitude, exponent = _NONFINITE_BITS[block.dtype]
        bits = numpy_bits(block, view).reshape(-1)
        bits = bits.view(np.uint16 if view == torch.int16 else np.uint32)
        bad = bits.size and int(kernels.max_magnitude_bits(bits, bits.dtype.type(magnitude))) >= exponent
    else:
        bad = not bool(torch.isfinite(block).all())
    if bad:
        raise damaged_tensor(name)
