"""The streaming safetensors writer: layout, concurrent out-of-order block writes, the sha256 made while writing."""

import hashlib
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ideoquant.write.safetensors import ShardWriter, Slot
from ideoquant.write.hashing import sha256_file


def _tensors(seed: int, misaligned: bool):
    g = torch.Generator().manual_seed(seed)
    out = {
        "a.qdata": torch.randint(-128, 127, (300, 64), generator=g, dtype=torch.int8),
        "a.scale": torch.rand(300, 1, generator=g),
        "a.zero": torch.zeros(300, 1, dtype=torch.int8),
        "b.weight": torch.randn(96, 40, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(7, generator=g),
    }
    if misaligned:  # 3 int8 bytes before a float32 tensor: the given order cannot be aligned
        out = {"odd": torch.ones(3, dtype=torch.int8), **out}
    return out


@pytest.mark.parametrize("misaligned", [False, True], ids=["in-order", "fallback-order"])
def test_shard_writer_blocks_in_any_order(tmp_path, misaligned):
    tensors = _tensors(0, misaligned)
    path = tmp_path / "shard.safetensors"
    w = ShardWriter(path, {k: Slot(t.dtype, tuple(t.shape)) for k, t in tensors.items()}, {"format": "pt", "x": "1"})
    # laid out in the given order, unless that misaligns a tensor: then safetensors' own order
    expected = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k)) if misaligned else list(tensors)
    assert sorted(w.offsets, key=lambda k: w.offsets[k][0]) == expected
    blocks = []
    for k, t in tensors.items():
        rows = t.shape[0] if t.ndim > 1 else 1
        step = max(1, rows // 5)
        for a in range(0, rows, step):
            part = t[a : a + step] if t.ndim > 1 else t
            blocks.append((k, part, a * (t[0].numel() if t.ndim > 1 else 0) * t.element_size()))
    random.Random(1).shuffle(blocks)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda b: w.write(*b), blocks))
    w.close()
    assert w.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "x": "1"}


def test_shard_writer_incomplete_close_fails(tmp_path):
    w = ShardWriter(tmp_path / "s.safetensors", {"t": Slot(torch.float32, (4, 4))}, {})
    w.write("t", torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="wrote 32 of 64 bytes"):
        w.close()


def test_shard_writer_abort_stops_the_hash_thread(tmp_path):
    w = ShardWriter(tmp_path / "s.safetensors", {"t": Slot(torch.float32, (4, 4))}, {})
    w.write("t", torch.zeros(2, 4))
    w.abort()
    assert not w._file._hasher.is_alive() and w.sha256 is None
