"""Source: what is there to quantize.

Resolves a Hub repo id or a local path into components (`transformer`, `unconditional_transformer`).
Each component exposes its diffusers config and a lazy, canonical (diffusers-named) list of tensors,
built from the safetensors headers alone. Reading a tensor touches only that tensor's bytes.
The original fused-qkv layout and the FP8 per-row format are resolved here, so that everything
downstream sees one view: diffusers names, float tensors.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import model
from .errors import IdeoquantError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
FP8_DTYPES = {"F8_E4M3"}
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}
STORED_DTYPES = {**FLOAT_DTYPES, "F8_E4M3": torch.float8_e4m3fn}


@dataclass(frozen=True)
class _Stored:
    """One tensor as the file holds it."""

    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # where the data starts in the file

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES.get(self.dtype, 1)
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SourceTensor:
    """A tensor under its diffusers name: possibly a row block of a fused tensor, possibly FP8 with a row scale."""

    name: str
    shape: tuple[int, ...]
    stored: _Stored
    rows: tuple[int, int] | None = None  # row block of a fused original-layout tensor
    scale: _Stored | None = None  # FP8 per-row `weight_scale`

    @property
    def dtype(self) -> str:
        return self.stored.dtype

    @property
    def nbytes(self) -> int:
        """Bytes read from the source for this tensor (its share of a fused tensor, plus its FP8 scale)."""
        share = (self.rows[1] - self.rows[0]) / self.stored.shape[0] if self.rows else 1.0
        scale = self.scale.nbytes if self.scale is not None else 0
        return int((self.stored.nbytes + scale) * share)

    def read(self, rows: tuple[int, int] | None = None, maps: "FileMaps | None" = None,
             out: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor (or rows [a, b) of it) in its stored float dtype; FP8 is dequantized exactly in float32.

        maps: read through these memory maps (a view of the page cache, no copy) instead of a fresh buffer.
        out, index: float32 and int32 buffers of the block's shape for dequantizing FP8 (see `dequantize_fp8r`).
        """
        if self.scale is not None:
            return dequantize_fp8r(*self.read_fp8(rows, maps), out, index)
        return _read_rows(self.stored, self._file_rows(rows), maps)

    def read_fp8(self, rows: tuple[int, int] | None = None, maps: "FileMaps | None" = None):
        """An FP8 tensor's rows as stored, not dequantized: (e4m3fn codes [r, K], float32 scale per row [r])."""
        t = _read_rows(self.stored, self._file_rows(rows), maps)
        per_row = bool(self.scale.shape) and self.scale.shape[0] == self.stored.shape[0]
        s = _read_rows(self.scale, self._file_rows(rows) if per_row else None).to(torch.float32).reshape(-1)
        return t, (s.expand(t.shape[0]) if s.numel() == 1 else s)

    def _file_rows(self, rows: tuple[int, int] | None) -> tuple[int, int] | None:
        """Rows of this tensor -> rows of the stored tensor (a fused tensor holds several)."""
        if rows is None:
            rows = (0, self.shape[0]) if self.shape else None
        if rows is not None and self.rows is not None:
            rows = (self.rows[0] + rows[0], self.rows[0] + rows[1])
        return rows

    def row_ranges(self, max_elements: int = 1 << 20) -> list[tuple[int, int] | None]:
        """Row ranges [a, b) of about max_elements each, covering the tensor (None: a 1-D tensor, read whole)."""
        if len(self.shape) < 2:
            return [None]
        step = max(1, max_elements // math.prod(self.shape[1:]))
        return [(a, min(a + step, self.shape[0])) for a in range(0, self.shape[0], step)]

    def row_blocks(self, max_elements: int = 1 << 20):
        """Yield (first_row, block) covering the tensor, each block holding about max_elements: bounded memory."""
        for rows in self.row_ranges(max_elements):
            yield (rows[0] if rows else 0), self.read(rows)


# Every FP8 (e4m3fn) value in float32, by torch's own conversion: a table lookup gives the same bits as
# `.float()`, which is not vectorized on CPU (measured 4.4 ms per million values against 0.8 ms for the lookup).
FP8_E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def dequantize_fp8r(weight: torch.Tensor, weight_scale: torch.Tensor, out: torch.Tensor | None = None,
                    index: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' BFL fp8r dequantization, `weight.float() * weight_scale[:, None]`, bit for bit.

    tests/test_int8.py checks every FP8 value against diffusers' own function. Faster (a table lookup, into
    reusable buffers: `out` float32 and `index` int32, both of the weight's size) and without importing diffusers
    (seconds of CPU) to convert an FP8 release.
    """
    n = weight.numel()
    out = torch.empty(weight.shape, dtype=torch.float32) if out is None else out
    index = torch.empty(n, dtype=torch.int32) if index is None else index.view(-1)[:n]
    index.copy_(weight.contiguous().view(torch.uint8).view(-1))
    torch.index_select(FP8_E4M3_VALUES, 0, index, out=out.view(-1))
    return out.mul_(weight_scale.view(-1, 1))


def _byte_range(stored: _Stored, rows: tuple[int, int] | None) -> tuple[int, int, tuple[int, ...]]:
    """(file offset, length, shape) of rows [a, b) of a stored tensor (None: all of it)."""
    shape = stored.shape
    if rows is None or not shape:
        return stored.offset, stored.nbytes, shape
    row_bytes = stored.nbytes // shape[0]
    return stored.offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes, (rows[1] - rows[0], *shape[1:])


def _read_rows(stored: _Stored, rows: tuple[int, int] | None, maps: "FileMaps | None" = None) -> torch.Tensor:
    """Rows [a, b) of a stored tensor (None: all of it), at the offset its header gave (checked by safe_open when
    the source was opened): positional reads, or views of `maps`. Not safe_open per read: it maps the whole file
    on every call, and that costs more CPU than the copy."""
    start, n, shape = _byte_range(stored, rows)
    if maps is not None:
        data = maps.view(stored.file, start, n)
        if start % STORED_DTYPES[stored.dtype].itemsize:  # a misaligned tensor (hand-made file): an aligned copy
            data = data.clone()
    else:
        data = torch.empty(n, dtype=torch.uint8)
        try:
            fd = os.open(stored.file, os.O_RDONLY)
            try:
                got, view = 0, memoryview(data.numpy())
                while got < n and (k := os.preadv(fd, [view[got:]], start + got)):
                    got += k
            finally:
                os.close(fd)
        except OSError as e:
            raise IdeoquantError(f"cannot read {stored.key} from {stored.file}: {e}") from None
        if got != n:
            raise IdeoquantError(f"cannot read {stored.key} from {stored.file}: the file is truncated")
    return data.view(STORED_DTYPES[stored.dtype]).view(shape)


_CAN_DROP = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")  # not on Windows


class FileMaps:
    """Read-only memory maps of source files, shared by the encoder threads.

    A block of rows is then a view of the page cache: no copy into a buffer (measured: the kernel's copy cost about
    a third as much CPU as encoding the block). `release` unmaps a block once it is encoded, so the resident size
    stays a few blocks however large the file; the page cache itself is the kernel's to keep or drop.
    """

    def __init__(self) -> None:
        self._maps: dict[Path, tuple[mmap.mmap, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def view(self, path: Path, start: int, n: int) -> torch.Tensor:
        with self._lock:
            if path not in self._maps:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    # copy-on-write (never written): a writable buffer, which torch.frombuffer wants
                    mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
                self._maps[path] = (mm, torch.frombuffer(mm, dtype=torch.uint8))
            mm, whole = self._maps[path]
        if start + n > whole.numel():
            raise IdeoquantError(f"cannot read {path}: the file is truncated")
        return whole[start : start + n]

    def release(self, t: SourceTensor, rows: tuple[int, int] | None) -> None:
        """Unmap the pages of a block that is done with (re-reading it would just map them again)."""
        start, n, _ = _byte_range(t.stored, t._file_rows(rows))
        entry = self._maps.get(t.stored.file)
        if entry is not None and n and _CAN_DROP:
            first = start - start % mmap.PAGESIZE
            entry[0].madvise(mmap.MADV_DONTNEED, first, start + n - first)

    def close(self) -> None:
        with self._lock:
            maps, self._maps = self._maps, {}
        while maps:
            mm, whole = maps.popitem()[1]
            del whole
            try:
                mm.close()
            except BufferError:  # a block is still referenced somewhere: unmapped when it goes
                pass


@dataclass
class Component:
    """One backbone: its config, its canonical tensors (in the model's registration order) and its files."""

    name: str
    config: dict
    tensors: dict[str, SourceTensor]
    files: list[Path]
    layout: str  # "diffusers" or "original"
    fp8: bool

    @property
    def spec(self) -> model.ModelSpec:
        return model.model_spec(self.config)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@dataclass
class Source:
    """What the user pointed at, resolved."""

    spec: str
    kind: str  # "hub", "folder" or "file"
    path: Path
    components: dict[str, Component]
    model_index: dict | None = None
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    file_hashes: dict[str, str] = field(default_factory=dict)  # known without reading (Hub LFS etags)

    def describe(self) -> dict:
        d = {"spec": self.spec, "kind": self.kind}
        if self.repo_id:
            d.update(repo_id=self.repo_id, revision=self.revision, commit=self.commit)
        else:
            d["path"] = self.spec  # as the user gave it: manifests get published, absolute paths leak user names
        return d


def open_source(
    spec: str | os.PathLike | None = None,
    components: list[str] | None = None,
    revision: str | None = None,
    token: str | None = None,
    headers_only: bool = False,
) -> Source:
    """Resolve SOURCE: a local pipeline folder, component folder or .safetensors file, or a Hub repo id.

    headers_only: for a Hub repo, fetch only the configs and the safetensors headers (range requests), not the
    weights; the tensors can be planned but not read (what `inspect` needs).
    """
    spec = str(spec or model.DEFAULT_SOURCE)
    for c in components or ():
        if c not in model.COMPONENTS:
            raise IdeoquantError(f"unknown component '{c}': choose from {', '.join(model.COMPONENTS)}")
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            found = _single_file(path)
            kind = "file"
            source = Source(spec=spec, kind=kind, path=path, components={})
        else:
            found, model_index = _folder(path)
            source = Source(spec=spec, kind="folder", path=path, components={}, model_index=model_index)
    elif _looks_like_repo_id(spec):
        from . import hub

        if headers_only:
            snapshot, commit, remote = hub.remote_headers(spec, revision=revision, token=token, components=components)
            hashes = {}
        else:
            snapshot, commit, hashes = hub.download_source(spec, revision=revision, token=token, components=components)
            remote = None
        found, model_index = _folder(snapshot, remote)
        source = Source(spec=spec, kind="hub", path=snapshot, components={}, model_index=model_index,
                        repo_id=spec, revision=revision or "main", commit=commit, file_hashes=hashes)
    else:
        raise IdeoquantError(f"source not found: '{spec}' is neither a local path nor a Hub repo id (ORG/NAME)")

    # A pipeline (folder with model_index.json, or a Hub repo) must hold both backbones; a component folder or a
    # single file holds what it holds.
    default = model.COMPONENTS if source.model_index is not None or source.kind == "hub" else list(found)
    wanted = list(components or default)
    for c in wanted:
        if c not in found:
            have = ", ".join(found) or "none"
            raise IdeoquantError(f"missing component '{c}' in {spec} (found: {have})")
    source.components = {c: found[c]() for c in wanted}
    return source


def hf_cache_sha256(path: Path) -> str | None:
    """The sha256 of a file in a Hugging Face cache snapshot, without reading it.

    Snapshot files link to `blobs/<sha256>` for LFS files (the weights): the name is the hash the Hub lists, which
    is also what a Hub source records. Hashing an 18 GB backbone would otherwise take ~12 s of a core.
    """
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and len(target.name) == 64 and all(c in "0123456789abcdef" for c in target.name):
        return target.name
    return None


def _looks_like_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _folder(path: Path, remote: dict | None = None):
    """A pipeline folder (model_index.json with component subfolders) or a single component folder.

    remote: {relative path: {tensor: (dtype, shape)}} when the weights were not downloaded (headers only).
    """
    index_file = path / "model_index.json"
    if index_file.is_file():
        model_index = _read_json(index_file)
        found = {}
        for c in model.COMPONENTS:
            if (path / c).is_dir():
                found[c] = (lambda c=c: _component_folder(c, path / c, remote))
        return found, model_index
    if (path / "config.json").is_file() or list(path.glob("*.safetensors")):
        name = path.name if path.name in model.COMPONENTS else "transformer"
        return {name: lambda: _component_folder(name, path)}, None
    _refuse_pickles(path)
    raise IdeoquantError(f"not an Ideogram 4 checkpoint: {path} has no model_index.json, config.json or .safetensors")


def _component_folder(name: str, path: Path, remote: dict | None = None) -> Component:
    if remote is not None:
        files = sorted(path / Path(rel).name for rel in remote if rel.startswith(f"{name}/"))
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        _refuse_pickles(path)
        raise IdeoquantError(f"missing component '{name}': no .safetensors weights in {path}")
    config = None
    if (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        cls = config.get("_class_name")
        if cls != model.MODEL_CLASS:
            raise IdeoquantError(f"not an Ideogram 4 checkpoint: {path / 'config.json'} is a {cls}, "
                                 f"not an {model.MODEL_CLASS}")
        method = (config.get("quantization_config") or {}).get("quant_method")
        # "bfl" marks the FP8 per-row release (diffusers' fp8r scheme): a source format ideoquant dequantizes.
        if method and method != "bfl":
            raise IdeoquantError(f"{path} is already quantized ({method}); point ideoquant at the bf16 or FP8 release")
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        # Only the shards the index names: a folder may hold stale files from an older download.
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [path / n for n in names]
        for f in files:
            if not f.is_file() and (remote is None or f"{name}/{f.name}" not in remote):
                raise IdeoquantError(f"truncated checkpoint: shard {f.name} named in {index.name} is missing")
    if remote is not None:
        stored = {k: _Stored(f, k, dtype, shape) for f in files for k, (dtype, shape) in remote[f"{name}/{f.name}"].items()}
    else:
        stored = _headers(files)
    return _component(name, stored, files, config)


def _single_file(path: Path):
    if path.suffix != ".safetensors":
        if path.suffix in PICKLE_SUFFIXES:
            raise IdeoquantError(f"refusing pickle checkpoint {path.name}: ideoquant never unpickles; "
                                 "convert it to .safetensors first")
        raise IdeoquantError(f"not an Ideogram 4 checkpoint: {path.name} is not a .safetensors file")
    stored = _headers([path])
    groups: dict[str, dict[str, _Stored]] = {}
    for key, s in stored.items():
        for prefix, comp in model.ORIGINAL_PREFIXES.items():
            if key.startswith(prefix):
                groups.setdefault(comp, {})[key[len(prefix):]] = s
                break
        else:
            groups.setdefault("transformer", {})[key] = s
    return {c: (lambda c=c, g=g: _component(c, g, [path], None)) for c, g in groups.items()}


def _refuse_pickles(path: Path) -> None:
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise IdeoquantError(f"refusing pickle-only checkpoint in {path} ({pickles[0]}): ideoquant never unpickles; "
                             "convert it to .safetensors first")


def _headers(files: list[Path]) -> dict[str, _Stored]:
    """Read only the safetensors headers: names, dtypes, shapes. safe_open checks that each file is complete."""
    stored: dict[str, _Stored] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as h:
                keys = list(h.keys())
            with open(f, "rb") as raw:
                n = int.from_bytes(raw.read(8), "little")
                header = json.loads(raw.read(n))
            for key in keys:
                info = header[key]
                stored[key] = _Stored(f, key, info["dtype"], tuple(info["shape"]), 8 + n + info["data_offsets"][0])
            if f == files[0]:
                _will_need(f, 8 + n, 256 << 20)  # the disk starts on the first tensors while libraries import
        except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
            raise IdeoquantError(f"corrupt or truncated safetensors file {f.name}: {str(e).splitlines()[0]}") from None
    return stored


class ReadAhead:
    """Ask the kernel to read the next tensors while this one is encoded (posix_fadvise WILLNEED).

    Reading a cold checkpoint is disk-bound; with the hint, disk reads overlap with the CPU work instead of
    alternating with it. It affects only the page cache, never this process's memory.
    """

    def __init__(self, tensors: list[SourceTensor], window: int = 512 << 20):
        self.ranges = []
        for t in tensors:
            s = t.stored
            share = (t.rows[1] - t.rows[0]) / s.shape[0] if t.rows else 1.0
            start = s.offset + (int(s.nbytes * t.rows[0] / s.shape[0]) if t.rows else 0)
            self.ranges.append((s.file, start, int(s.nbytes * share)))
        self.window, self.done, self.hinted, self.next = window, 0, 0, 0
        self.fds: dict[Path, int] = {}
        self._hint()

    def consumed(self, nbytes: int) -> None:
        self.done += nbytes
        self._hint()

    def _hint(self) -> None:
        while self.next < len(self.ranges) and self.hinted < self.done + self.window:
            path, start, length = self.ranges[self.next]
            _will_need(path, start, length, self.fds)
            self.hinted += length
            self.next += 1

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _will_need(path: Path, start: int, length: int, fds: dict | None = None) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = fds.get(path) if fds is not None else None
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if fds is not None:
                fds[path] = fd
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
        if fds is None:
            os.close(fd)
    except OSError:
        pass


def _component(name: str, stored: dict[str, _Stored], files: list[Path], config: dict | None) -> Component:
    """Map stored keys to the canonical diffusers view and check them against the model's own state dict."""
    scales = {k[: -len("_scale")]: s for k, s in stored.items() if k.endswith(".weight_scale")}
    if any(k.endswith(".weight_scale_2") for k in stored):
        raise IdeoquantError(f"{name}: NVFP4 checkpoints are not supported; use the bf16 or FP8 release")
    original = model.is_original_layout(stored)
    tensors: dict[str, SourceTensor] = {}
    for key, s in stored.items():
        if key.endswith((".weight_scale", ".input_scale")):
            continue  # consumed with their weight; activation scales of the FP8 release are not used
        if s.dtype not in FLOAT_DTYPES and s.dtype not in FP8_DTYPES:
            raise IdeoquantError(f"{name}: tensor {key} has unsupported dtype {s.dtype}")
        scale = scales.get(key)
        if s.dtype in FP8_DTYPES and scale is None:
            raise IdeoquantError(f"{name}: FP8 tensor {key} has no {key}_scale")
        parts = model.original_to_diffusers(key)
        if len(parts) == 1:
            tensors[parts[0][0]] = SourceTensor(parts[0][0], s.shape, s, None, scale)
        else:
            n = s.shape[0] // len(parts)
            if n * len(parts) != s.shape[0]:
                raise IdeoquantError(f"{name}: fused tensor {key} has {s.shape[0]} rows, not divisible by {len(parts)}")
            for new, i in parts:
                tensors[new] = SourceTensor(new, (n, *s.shape[1:]), s, (i * n, (i + 1) * n), scale)
    if config is None:
        try:
            config = {"_class_name": model.MODEL_CLASS, **model.infer_config({k: t.shape for k, t in tensors.items()})}
        except (KeyError, ValueError) as e:
            raise IdeoquantError(f"not an Ideogram 4 checkpoint: {name} lacks {e}") from None
    spec = model.model_spec(config)
    extra = [k for k in tensors if k not in spec.shapes]
    missing = [k for k in spec.shapes if k not in tensors]
    if extra or missing:
        what = f"unexpected tensor {extra[0]}" if extra else f"missing tensor {missing[0]}"
        raise IdeoquantError(f"not an Ideogram 4 checkpoint ({name}): {what} "
                             f"({len(extra)} unexpected, {len(missing)} missing)")
    for k, shape in spec.shapes.items():
        if tensors[k].shape != shape:
            raise IdeoquantError(f"{name}: {k} has shape {tensors[k].shape}, the config implies {shape}")
    ordered = {k: tensors[k] for k in spec.shapes}
    fp8 = any(t.scale is not None for t in ordered.values())
    return Component(name, config, ordered, files, "original" if original else "diffusers", fp8)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IdeoquantError(f"cannot read {path}: {e}") from None
