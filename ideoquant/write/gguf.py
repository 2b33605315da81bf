"""A streaming GGUF writer on gguf-py's GGUFWriter: header and tensor infos from the plan, then one tensor at a time."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np


class GGUFFile:
    """Declare every tensor up front (name, logical shape, GGML type), then `write` them in the same order."""

    def __init__(self, path: Path, arch: str, kv: dict, tensors: list[tuple[str, tuple[int, ...], str]]):
        import gguf

        self._gguf = gguf
        self.path = Path(path)
        self.writer = gguf.GGUFWriter(str(self.path), arch=arch)
        for key, value in kv.items():
            self._add_kv(key, value)
        self._expected = []
        for name, shape, qtype in tensors:
            t = gguf.GGMLQuantizationType[qtype]
            block, size = gguf.GGML_QUANT_SIZES[t]
            byte_shape = (*shape[:-1], shape[-1] // block * size)
            nbytes = int(np.prod(byte_shape))
            # Byte shapes with raw_dtype: gguf-py turns them back into the logical ggml shape.
            self.writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=t)
            self._expected.append((name, nbytes))
        self.writer.write_header_to_file()
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()

    def _add_kv(self, key: str, value) -> None:
        w = self.writer
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, (list, tuple)):
            w.add_array(key, list(value))
        else:
            raise TypeError(f"GGUF metadata {key}: unsupported value {type(value).__name__}")

    def write(self, name: str, data: np.ndarray) -> None:
        """The encoded bytes of the next declared tensor (uint8, any shape with the declared size)."""
        expected, nbytes = self._expected.pop(0)
        if name != expected or data.nbytes != nbytes:
            raise RuntimeError(f"GGUF write out of plan: got {name} ({data.nbytes} B), expected {expected} ({nbytes} B)")
        try:
            self.writer.write_tensor_data(np.ascontiguousarray(data).view(np.uint8))
        except OSError as e:
            if e.errno is not None:
                raise OSError(e.errno, e.strerror, str(self.path)) from None
            # numpy's tofile reports a short write without errno: the disk filled up or a size limit was hit
            raise OSError(errno.EIO, f"incomplete write ({e}): the disk is full or a file size limit was reached",
                          str(self.path)) from None

    def close(self) -> None:
        if self._expected:
            raise RuntimeError(f"GGUF file {self.path.name} closed with {len(self._expected)} tensors unwritten")
        self.writer.close()

    def abort(self) -> None:
        self.writer.close()
