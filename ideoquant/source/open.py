"""Source: what is there to quantize.

Resolves a Hub repo id or a local path into components (`transformer`, `unconditional_transformer`).
Each component exposes its diffusers config and a lazy, canonical (diffusers-named) list of tensors,
built from the safetensors headers alone. Reading a tensor touches only that tensor's bytes.
The original fused-qkv layout and the FP8 per-row format are resolved here, so that everything
downstream sees one view: diffusers names, float tensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .. import model
from ..errors import IdeoquantError
from .tensors import FLOAT_DTYPES, FP8_DTYPES, SourceTensor, StoredTensor, will_need

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
        stored = {k: StoredTensor(f, k, dtype, shape) for f in files for k, (dtype, shape) in remote[f"{name}/{f.name}"].items()}
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
    groups: dict[str, dict[str, StoredTensor]] = {}
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


def _headers(files: list[Path]) -> dict[str, StoredTensor]:
    """Read only the safetensors headers: names, dtypes, shapes. safe_open checks that each file is complete."""
    stored: dict[str, StoredTensor] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as h:
                keys = list(h.keys())
            with open(f, "rb") as raw:
                n = int.from_bytes(raw.read(8), "little")
                header = json.loads(raw.read(n))
            for key in keys:
                info = header[key]
                stored[key] = StoredTensor(f, key, info["dtype"], tuple(info["shape"]), 8 + n + info["data_offsets"][0])
            if f == files[0]:
                will_need(f, 8 + n, 256 << 20)  # the disk starts on the first tensors while libraries import
        except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
            raise IdeoquantError(f"corrupt or truncated safetensors file {f.name}: {str(e).splitlines()[0]}") from None
    return stored


def _component(name: str, stored: dict[str, StoredTensor], files: list[Path], config: dict | None) -> Component:
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
