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


def test_positional_file_write_behind_keeps_every_byte(tmp_path, monkeypatch):
    """Writeback and page-cache drops run behind the hash while blocks still arrive out of order: the file read back
    and its sha256 (from hashlib) are those of the bytes written."""
    from ideoquant.write import positional

    monkeypatch.setattr(positional, "WRITEBACK_LAG", 1 << 20)  # drops start after 2 MiB, not 128 MiB
    rng = random.Random(3)
    data = rng.randbytes(24 << 20)
    f = positional.PositionalFile(tmp_path / "out.bin", len(data) + 16, 16, b"h" * 16)
    blocks = [(a, data[a:a + (1 << 20)]) for a in range(0, len(data), 1 << 20)]
    rng.shuffle(blocks[4:])  # the first blocks in order, then any order
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda b: f.write_at(16 + b[0], b[1]), blocks))
    digest = f.close(len(data))
    on_disk = (tmp_path / "out.bin").read_bytes()
    assert on_disk == b"h" * 16 + data
    assert digest == hashlib.sha256(on_disk).hexdigest()


def test_read_behind_drops_what_encoders_and_hash_are_done_with(tmp_path):
    """A source range leaves the page cache once both the encoders (`FileMaps.release`) and the source hash are done
    with it, in either order; the hash waits while it is `lead` bytes ahead of the encoders, and its digest is
    hashlib's. Residency is the page cache's own answer: a non-blocking read of a dropped page fails (EAGAIN)."""
    import os
    import threading

    from ideoquant.source.tensors import FileMaps, ReadBehind, SourceTensor, StoredTensor

    mib = 1 << 20
    data = random.Random(5).randbytes(8 * mib)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # clean pages: dropping them needs no writeback
    blocks = [SourceTensor(f"t{i}", (1, mib), StoredTensor(path, f"t{i}", "U8", (1, mib), i * mib)) for i in range(8)]
    probe = bytearray(4096)

    def cached(block: int) -> bool:
        try:
            return os.preadv(fd, [probe], block * mib + 64 * 1024, os.RWF_NOWAIT) == len(probe)
        except BlockingIOError:
            return False

    try:
        with ReadBehind(lead=2 * mib) as reads:
            ready, hashed = reads.hashing(path)
            maps = FileMaps(reads)
            order = [3, 0, 1, 2, 5, 4, 6, 7]  # not file order: block 3 is done before the hash reaches it
            result = {}
            hasher = threading.Thread(target=lambda: result.update(
                sha256=sha256_file(path, None, ready, lambda a, b: (result.setdefault("ends", []).append(b),
                                                                   hashed(a, b))[1])))
            hasher.start()
            for i in order:
                t = blocks[i]
                assert bytes(maps.view(path, t.stored.offset, mib).numpy()) == data[i * mib:(i + 1) * mib]
                maps.release(t, None)
            hasher.join(10)
            maps.close()
        assert not hasher.is_alive()
        assert result["sha256"] == hashlib.sha256(data).hexdigest()
        assert not any(cached(i) for i in range(8))
    finally:
        os.close(fd)
