"""A GGUF file written by position: gguf-py's GGUFWriter writes the header and tensor infos from the plan, then
every block of every tensor goes to its place from any thread (`PositionalFile`: reserved up front, hashed while
written)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import IdeoquantError
from .positional import PositionalFile


class GGUFFile:
    """Declare every tensor up front (name, logical shape, GGML type); then `write` blocks of their bytes."""

    def __init__(self, path: Path, arch: str, kv: dict, tensors: list[tuple[str, tuple[int, ...], str]]):
        import gguf

        self.path = Path(path)
        writer = gguf.GGUFWriter(str(self.path), arch=arch)
        for key, value in kv.items():
            _add_kv(writer, key, value)
        sizes = []
        for name, shape, qtype in tensors:
            t = gguf.GGMLQuantizationType[qtype]
            block, size = gguf.GGML_QUANT_SIZES[t]
            byte_shape = (*shape[:-1], shape[-1] // block * size)
            nbytes = int(np.prod(byte_shape))
            # Byte shapes with raw_dtype: gguf-py turns them back into the logical ggml shape.
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=t)
            sizes.append((name, nbytes))
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            header_end = writer.fout[0].tell()
        finally:
            writer.close()
        align = writer.data_alignment
        pos = data_start = -(-header_end // align) * align
        self.tensors: dict[str, tuple[int, int]] = {}  # name -> (file offset, bytes)
        for name, nbytes in sizes:  # as gguf-py lays them out: each tensor's data padded to the alignment
            self.tensors[name] = (pos, nbytes)
            pos += -(-nbytes // align) * align
        self._file = PositionalFile(self.path, pos, data_start)  # the header is in the file already
        for offset, nbytes in self.tensors.values():
            self._file.skip(offset + nbytes, -(-nbytes // align) * align - nbytes)  # zero padding, as reserved
        self.expected = sum(n for _, n in sizes)
        self.sha256: str | None = None  # set by close

    def write(self, name: str, data: np.ndarray, byte_offset: int = 0) -> None:
        """Encoded bytes of tensor `name` (the whole tensor, or a block of its rows at `byte_offset` into it)."""
        offset, nbytes = self.tensors[name]
        data = np.ascontiguousarray(data).view(np.uint8)
        if byte_offset + data.nbytes > nbytes:
            raise RuntimeError(f"GGUF write out of plan: {name} holds {nbytes} B, got {data.nbytes} B at {byte_offset}")
        self._file.write_at(offset + byte_offset, data)

    def close(self) -> None:
        self.sha256 = self._file.close(self.expected)

    def abort(self) -> None:
        self._file.abort()


def _add_kv(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"GGUF metadata {key}: unsupported value {type(value).__name__}")


def read_metadata(path: str | Path) -> dict:
    """The GGUF key/value pairs as Python values (strings, numbers, lists)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise IdeoquantError(f"cannot read GGUF file {path}: {e}") from None
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
