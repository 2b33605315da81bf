"""Source: what is there to quantize.

Resolves a Hub repo id, a local path or several local paths into components (`transformer`,
`unconditional_transformer`). Each component exposes its diffusers config and a lazy, canonical (diffusers-named)
list of tensors, built from the safetensors headers alone. Reading a tensor touches only that tensor's bytes.

Layouts read (see docs in the README and /work/shared/notes/real-release.md):
- diffusers pipeline or component folders (split `to_q/to_k/to_v`, `to_out.0`), bf16/fp16/fp32, sharded or not;
- the official FP8 release `ideogram-ai/ideogram-4-fp8`: original fused names (`attention.qkv` rows q|k|v,
  `attention.o`), every linear weight float8_e4m3fn with a float32 per-row `.weight_scale` [out]
  (`w = fp8 * scale[:, None]`), no `quantization_config`;
- single files in the original layout: DiffSynth's bf16 repack, ComfyUI's `ideogram4[_unconditional]_fp8_scaled`
  (per-tensor scalar `weight_scale`, `.comfy_quant` markers, branch in the metadata `model_type`), with an
  optional `model.diffusion_model.` / `diffusion_model.` wrapper, or both branches under
  `conditional_transformer.` / `unconditional_transformer.`;
- a folder of such single files, or several files given together: each lands in its component.
Refused by name: NF4 (bitsandbytes), NVFP4, INT8, text-encoder files, other quantization_configs, pickles.

Every check that can be made from the headers and JSON files is made before any tensor data is read: header
structure and sizes against the file size, companion tensors' shapes and dtypes, the config against the tensor
shapes (so that a config cannot make the planner allocate more than the headers describe).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import model
from ..errors import IdeoquantError
from .tensors import (DTYPE_BYTES, FLOAT_DTYPES, FP8_DTYPES, STORED_DTYPES, ReadBehind, SourceTensor, StoredTensor,
                      will_need)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_JSON_BYTES = 64 << 20  # a config or index is kilobytes; refuse a file that would only fill memory
SCALE_DTYPES = ("F32", "BF16", "F16")
FP8_RELEASE = "ideogram-ai/ideogram-4-fp8"
NF4_MESSAGE = f"a 4-bit NF4 checkpoint: quantizing it again compounds the error; use {FP8_RELEASE}"
NVFP4_MESSAGE = ("an NVFP4 checkpoint (4-bit weights, as ComfyUI's ideogram4_*nvfp4_mixed or ModelOpt NVFP4): "
                 "quantizing it again compounds the error; use ideogram4_fp8_scaled.safetensors and "
                 f"ideogram4_unconditional_fp8_scaled.safetensors (Comfy-Org/Ideogram-4) or {FP8_RELEASE}")
INT8_MESSAGE = ("an INT8 checkpoint (int8 weights, as ideogram4_int8_convrot, whose weights are rotated): it cannot "
                "be turned back into the model's weights; use ideogram4_fp8_scaled.safetensors (Comfy-Org/Ideogram-4) "
                f"or {FP8_RELEASE}")
TEXT_ENCODER_MESSAGE = ("a text-encoder file (Qwen3-VL `language_model.*` tensors), not an Ideogram 4 transformer; "
                        "give the transformer files")
MARKER_SUFFIX = ".comfy_quant"


@dataclass
class Component:
    """One backbone: its config, its canonical tensors (in the model's registration order) and its files."""

    name: str
    config: dict
    tensors: dict[str, SourceTensor]
    files: list[Path]
    layout: str  # "diffusers" or "original"
    fp8: bool
    notes: list[str] = field(default_factory=list)  # what was accepted but is worth knowing (lands in the manifest)

    @property
    def spec(self) -> model.ModelSpec:
        return model.model_spec(self.config)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@dataclass
class Source:
    """What the user pointed at, resolved."""

    spec: str | list[str]
    kind: str  # "hub", "folder", "file" or "files" (several paths given together)
    path: Path  # the folder, the file, or for "files" the folder that holds them all
    components: dict[str, Component]
    model_index: dict | None = None
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    file_hashes: dict[str, str] = field(default_factory=dict)  # known without reading (Hub LFS etags)
    notes: list[str] = field(default_factory=list)
    reads: ReadBehind = field(default_factory=ReadBehind, repr=False, compare=False)  # what a job is done reading

    def describe(self) -> dict:
        given = self.spec if isinstance(self.spec, str) else ", ".join(self.spec)
        d = {"spec": given, "kind": self.kind}
        if self.repo_id:
            d.update(repo_id=self.repo_id, revision=self.revision, commit=self.commit)
        else:
            d["path"] = given  # as the user gave it: manifests get published, absolute paths leak user names
            if not isinstance(self.spec, str):
                d["paths"] = list(self.spec)
        notes = [*self.notes, *(f"{name}: {n}" for name, c in self.components.items() for n in c.notes)]
        if notes:
            d["notes"] = notes
        return d

    def files(self) -> dict[str, Path]:
        """Every file of the source an output records (its path under `path` -> the file): the weights, each
        component folder's sidecars (config.json and the shard index, when there) and model_index.json."""
        if self.kind == "file":
            return {self.path.name: self.path}
        files: dict[str, Path] = {}
        if (self.path / "model_index.json").is_file():
            files["model_index.json"] = self.path / "model_index.json"
        for c in self.components.values():
            folder = c.files[0].parent
            side = [folder / "config.json", folder / INDEX_NAME]
            if self.kind == "files":  # several paths given: a config next to a file given alone is not part of it
                given = [Path(p).expanduser().absolute() for p in self.spec]
                side = [f for f in side if any(g == folder or g in folder.parents for g in given)]
            for f in [*c.files, *side]:
                if f.is_file():
                    files[str(f.relative_to(self.path))] = f
        return files

    def protected_paths(self) -> list[Path]:
        """Everything of the source an output must not touch: its folder (or file), every file read and, for a Hub
        source, the repo's folder in the Hugging Face cache (snapshots link into its blobs/)."""
        paths = [self.path, *self.files().values()]
        for c in self.components.values():
            paths += c.files
        if self.kind == "hub":
            paths.append(self.path.parent.parent)  # .../models--ORG--NAME/snapshots/<commit>
        return paths


@dataclass
class _Candidate:
    """A component found in the source, not read yet: where it comes from, why it is that component, its loader."""

    component: str
    origin: Path
    why: str
    load: Callable[[], Component]


def open_source(
    spec: str | os.PathLike | list | tuple | None = None,
    components: list[str] | None = None,
    revision: str | None = None,
    token: str | None = None,
    headers_only: bool = False,
) -> Source:
    """Resolve SOURCE: a local pipeline folder, component folder, folder of single files or .safetensors file, a
    Hub repo id, or a list of local files/folders (each lands in the component it holds).

    headers_only: for a Hub repo, fetch only the configs and the safetensors headers (range requests), not the
    weights; the tensors can be planned but not read (what `inspect` needs).
    """
    for c in components or ():
        if c not in model.COMPONENTS:
            raise IdeoquantError(f"unknown component '{c}': choose from {', '.join(model.COMPONENTS)}")
    items = _spec_items(spec)
    skipped: list[str] = []
    if len(items) > 1:
        candidates, model_index = [], None
        for item in items:
            path = Path(item).expanduser()
            if not path.exists():
                raise IdeoquantError(f"source not found: '{item}' (several sources must all be local files or folders)")
            found, index = _local(path.absolute(), skipped)
            candidates += found
            model_index = model_index or index
        paths = [Path(item).expanduser().absolute() for item in items]
        common = Path(os.path.commonpath(paths))
        source = Source(spec=list(items), kind="files", path=common if common.is_dir() else common.parent,
                        components={}, model_index=model_index)
    else:
        item = items[0]
        path = Path(item).expanduser()
        if path.exists():
            candidates, model_index = _local(path, skipped)
            source = Source(spec=item, kind="file" if path.is_file() else "folder", path=path, components={},
                            model_index=model_index)
        elif _looks_like_repo_id(item):
            from . import hub

            if headers_only:
                snapshot, commit, remote = hub.remote_headers(item, revision=revision, token=token,
                                                              components=components)
                hashes = {}
            else:
                snapshot, commit, hashes = hub.download_source(item, revision=revision, token=token,
                                                               components=components)
                remote = None
            candidates, model_index = _folder(snapshot, skipped, remote)
            source = Source(spec=item, kind="hub", path=snapshot, components={}, model_index=model_index,
                            repo_id=item, revision=revision or "main", commit=commit, file_hashes=hashes)
        else:
            raise IdeoquantError(f"source not found: '{item}' is neither a local path nor a Hub repo id (ORG/NAME)")

    found: dict[str, _Candidate] = {}
    for cand in candidates:
        other = found.get(cand.component)
        if other is not None:
            raise IdeoquantError(f"two sources for the {cand.component} backbone: {other.origin} ({other.why}) and "
                                 f"{cand.origin} ({cand.why}); give one per backbone")
        found[cand.component] = cand
    source.notes += [f"skipped {s}" for s in skipped]
    # A pipeline (folder with model_index.json, or a Hub repo) must hold both backbones; a component folder or
    # single files hold what they hold.
    default = model.COMPONENTS if source.model_index is not None or source.kind == "hub" else [
        c for c in model.COMPONENTS if c in found]
    wanted = list(components or default)
    for c in wanted:
        if c not in found:
            have = ", ".join(found) or "none"
            why = f"; skipped {'; '.join(skipped)}" if skipped else ""
            raise IdeoquantError(f"missing component '{c}' in {_show(source.spec)} (found: {have}){why}")
    if not wanted:
        raise IdeoquantError(f"not an Ideogram 4 checkpoint: no backbone found in {_show(source.spec)}"
                             + (f"; skipped {'; '.join(skipped)}" if skipped else ""))
    source.components = {c: found[c].load() for c in wanted}
    return source


def recorded_sha256(path: Path) -> str | None:
    """The sha256 of a source file where a download already recorded it (the Hugging Face cache, a folder written
    by `hf download --local-dir`), else None: the file is then hashed while it is read."""
    return _hf_cache_sha256(path) or _hf_local_dir_sha256(path)


def _hf_cache_sha256(path: Path) -> str | None:
    """The sha256 of a file in a Hugging Face cache snapshot, without reading it.

    Snapshot files link to `blobs/<sha256>` for LFS files (the weights): the name is the hash the Hub lists, which
    is also what a Hub source records. Hashing an 18 GB backbone would otherwise take ~12 s of a core.
    """
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and _is_sha256(target.name):
        return target.name
    return None


def _hf_local_dir_sha256(path: Path) -> str | None:
    """The sha256 of a file that `hf download --local-dir DIR` wrote, from the record it kept, without reading the
    file.

    huggingface_hub records each downloaded file in `DIR/.cache/huggingface/download/<path in repo>.metadata`
    (three lines: commit, etag, time of the download), and for an LFS file (the weights) the etag is its sha256.
    The record holds only while the file is as downloaded: huggingface_hub's own test, the file's mtime at most a
    second past the record, decides as it does when it skips a download. Read here without huggingface_hub's
    reader, which creates folders and lock files in DIR (a source is never modified).
    """
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    for root in path.parents:
        download = root / ".cache" / "huggingface" / "download"
        if not download.is_dir():
            continue
        record = download.joinpath(*path.relative_to(root).parts).with_name(path.name + ".metadata")
        try:
            lines = record.read_text(encoding="utf-8").splitlines()
            etag, timestamp = lines[1].strip(), float(lines[2])
        except (OSError, UnicodeDecodeError, IndexError, ValueError):
            return None
        if _is_sha256(etag) and mtime - 1 <= timestamp:
            return etag
        return None
    return None


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _spec_items(spec) -> list[str]:
    if spec is None:
        return [model.DEFAULT_SOURCE]
    if isinstance(spec, (list, tuple)):
        items = [str(s) for s in spec]
        if not items:
            return [model.DEFAULT_SOURCE]
        if len(set(items)) != len(items):
            raise IdeoquantError(f"source '{next(i for i in items if items.count(i) > 1)}' is given twice")
        return items
    return [str(spec)]


def _show(spec) -> str:
    return spec if isinstance(spec, str) else ", ".join(spec)


def _looks_like_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _local(path: Path, skipped: list[str]) -> tuple[list[_Candidate], dict | None]:
    if path.is_file():
        return _file_candidates(path), None
    if not path.is_dir():
        raise IdeoquantError(f"source not found: {path} is neither a file nor a folder")
    return _folder(path, skipped)


def _folder(path: Path, skipped: list[str], remote: dict | None = None) -> tuple[list[_Candidate], dict | None]:
    """A pipeline folder (model_index.json with component subfolders), a component folder, or a folder of single
    files (as ComfyUI's models/diffusion_models/).

    remote: {relative path: {tensor: (dtype, shape)}} when the weights were not downloaded (headers only).
    """
    index_file = path / "model_index.json"
    if index_file.is_file():
        model_index = _read_model_index(index_file)
        found = []
        for c in model.COMPONENTS:
            if (path / c).is_dir():
                found.append(_Candidate(c, path / c, f"{c}/ of the pipeline",
                                        lambda c=c: _component_folder(c, path / c, remote)))
        return found, model_index
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if (path / "config.json").is_file() or (path / INDEX_NAME).is_file():
        return [_component_folder_candidate(path, files)], None
    subs = [c for c in model.COMPONENTS if (path / c).is_dir()]
    if subs and not files:  # backbone folders without model_index.json (DiffSynth's repack)
        return [_Candidate(c, path / c, f"folder {c}/", lambda c=c: _component_folder(c, path / c, remote))
                for c in subs], None
    if not files:
        _refuse_pickles(path)
        raise IdeoquantError(f"not an Ideogram 4 checkpoint: {path} has no model_index.json, config.json or "
                             ".safetensors")
    if path.name in model.COMPONENTS or len(files) == 1:
        if path.name in model.COMPONENTS:
            return [_component_folder_candidate(path, files)], None
        return _file_candidates(files[0]), None
    # Several files and no config: shards of one backbone, or whole backbones side by side (each file holds the
    # model's marker tensors on its own).
    headers = {f: _read_header(f) for f in files}
    whole = [f for f, (stored, _) in headers.items() if _holds_markers(stored)]
    if len(whole) < 2:
        return [_component_folder_candidate(path, files)], None
    found, refused = [], []
    for f in files:
        if f not in whole:
            skipped.append(f"{f.name}: not an Ideogram 4 backbone")
            continue
        try:
            found += _file_candidates(f, headers[f])
        except IdeoquantError as e:
            refused.append(e)
            skipped.append(str(e))
    if not found:
        raise refused[0]
    return found, None


def _component_folder_candidate(path: Path, files: list[Path]) -> _Candidate:
    """A component folder: its name if it is a component's, else the branch its files' metadata records."""
    if path.name in model.COMPONENTS:
        name, why = path.name, f"folder {path.name}/"
    else:
        name, why = "transformer", "a component folder, taken as the conditional backbone"
        for f in files[:1]:
            branch = model.BRANCH_METADATA.get(_read_header(f)[1].get("model_type", ""))
            if branch:
                name, why = branch, "safetensors metadata model_type"
    return _Candidate(name, path, why, lambda: _component_folder(name, path))


def _component_folder(name: str, path: Path, remote: dict | None = None) -> Component:
    if remote is not None:
        files = sorted(path / Path(rel).name for rel in remote if rel.startswith(f"{name}/"))
    else:
        files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    config, notes = None, []
    config_file = path / "config.json"
    if config_file.is_file():
        config = _read_config(config_file)
        _refuse_quantization_config(config, config_file)
    index = path / INDEX_NAME
    index_keys = None
    if index.is_file():
        # Only the shards the index names: a folder may hold stale files from an older download.
        weight_map = _read_index(index)
        index_keys = set(weight_map)
        files = [path / n for n in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file() and (remote is None or f"{name}/{f.name}" not in remote):
                raise IdeoquantError(f"truncated checkpoint: shard {f.name} named in {index} is missing")
    if not files:
        _refuse_pickles(path)
        raise IdeoquantError(f"missing component '{name}': no .safetensors weights in {path}")
    if remote is not None:
        stored = _remote_headers(files, name, remote)
    else:
        stored = _headers(files)
        for f in files:
            branch = model.BRANCH_METADATA.get(_read_header(f)[1].get("model_type", ""))
            if branch and branch != name:
                raise IdeoquantError(f"{f}: its metadata says model_type {_read_header(f)[1]['model_type']} (the "
                                     f"{branch} backbone), but it is read as the {name} backbone")
    if index_keys is not None and index_keys != set(stored):
        notes.append(f"{index.name} is stale ({len(index_keys - set(stored))} listed tensors not in the files, "
                     f"{len(set(stored) - index_keys)} unlisted); the files' own headers were used")
    return _component(name, stored, files, config, config_file if config is not None else path, notes)


def _file_candidates(path: Path, header: tuple | None = None) -> list[_Candidate]:
    """The backbones one .safetensors file holds: both (per-branch prefixes) or one, its branch from the
    metadata `model_type` (ComfyUI), else from the file name ("unconditional"), else the conditional one."""
    if path.suffix != ".safetensors":
        if path.suffix in PICKLE_SUFFIXES:
            raise IdeoquantError(f"refusing pickle checkpoint {path.name}: ideoquant never unpickles; "
                                 "convert it to .safetensors first")
        if path.suffix == ".gguf":
            raise IdeoquantError(f"{path.name} is a GGUF file, already quantized; point ideoquant at the bf16 or "
                                 f"FP8 release ({FP8_RELEASE})")
        raise IdeoquantError(f"not an Ideogram 4 checkpoint: {path.name} is not a .safetensors file")
    stored, metadata = header or _read_header(path)
    groups: dict[str, dict[str, StoredTensor]] = {}
    for key, s in stored.items():
        group, name = "", key
        for prefix, comp in model.BRANCH_PREFIXES.items():
            if key.startswith(prefix):
                group, name = comp, key[len(prefix):]
                break
        else:
            for prefix in model.WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    name = key[len(prefix):]
                    break
        if name in groups.setdefault(group, {}):
            raise IdeoquantError(f"{path}: tensor {name} is stored twice (with and without a prefix): ambiguous")
        groups[group][name] = s
    out = []
    for group, tensors in groups.items():
        refusal = _refusal(tensors)
        if refusal:
            raise IdeoquantError(f"{path}: {refusal}")
        notes = []
        if group:
            comp, why = group, f"tensors prefixed {next(p for p, c in model.BRANCH_PREFIXES.items() if c == group)}"
        else:
            comp, why = _branch(path, metadata)
            notes.append(f"{path.name} is the {comp} backbone: {why}")
        out.append(_Candidate(comp, path, why, lambda comp=comp, t=tensors, n=notes:
                              _component(comp, t, [path], None, path, n)))
    if not out:
        raise IdeoquantError(f"not an Ideogram 4 checkpoint: {path} holds no tensors")
    return out


def _branch(path: Path, metadata: dict) -> tuple[str, str]:
    model_type = metadata.get("model_type")
    named_uncond = "uncond" in path.name.lower()
    if model_type in model.BRANCH_METADATA:
        comp = model.BRANCH_METADATA[model_type]
        if named_uncond and comp == "transformer":
            raise IdeoquantError(f"{path}: its metadata says model_type {model_type} (the conditional backbone) but "
                                 "its name says unconditional; rename the file or fix its metadata")
        return comp, f"safetensors metadata model_type {model_type}"
    if named_uncond:
        return "unconditional_transformer", "'unconditional' in the file name (no model_type metadata)"
    return "transformer", ("the file does not record its branch (no model_type metadata, no 'unconditional' in "
                           "its name): taken as the conditional backbone")


def _holds_markers(stored: dict[str, StoredTensor]) -> bool:
    names = set()
    for key in stored:
        for prefix in (*model.BRANCH_PREFIXES, *model.WRAPPER_PREFIXES):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        names.add(key)
    return all(m in names for m in model.MARKERS)


def _refusal(stored: dict[str, StoredTensor]) -> str | None:
    """Why a tensor set is a format ideoquant refuses by name, or None."""
    keys = list(stored)
    if any(k.startswith(("language_model.", "model.language_model.")) for k in keys):
        return TEXT_ENCODER_MESSAGE
    if any(k.endswith((".absmax", ".quant_map")) or ".quant_state." in k for k in keys):
        return NF4_MESSAGE
    if any(k.endswith(".weight_scale_2") for k in keys):
        return NVFP4_MESSAGE
    if any(s.dtype == "I8" for s in stored.values()):
        return INT8_MESSAGE
    return None


def _refuse_quantization_config(config: dict, path: Path) -> None:
    qc = config.get("quantization_config")
    if not qc:
        return
    method = qc.get("quant_method", "unknown method")
    four_bit = qc.get("load_in_4bit") or str(qc.get("bnb_4bit_quant_type", "")).lower() == "nf4"
    if method == "bitsandbytes" and four_bit:
        raise IdeoquantError(f"{path} is already quantized ({method}): {NF4_MESSAGE}")
    # The official FP8 release has no quantization_config (its scales are its own format, read from the tensors).
    raise IdeoquantError(f"{path} is already quantized ({method}); point ideoquant at the bf16 or FP8 release")


def _refuse_pickles(path: Path) -> None:
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise IdeoquantError(f"refusing pickle-only checkpoint in {path} ({pickles[0]}): ideoquant never unpickles; "
                             "convert it to .safetensors first")


# --- safetensors headers ---------------------------------------------------------------------------------------


def _headers(files: list[Path]) -> dict[str, StoredTensor]:
    """Read only the safetensors headers of the shards of one component: names, dtypes, shapes, offsets.

    Each header is checked as safetensors checks it (structure, dtypes, data offsets that tile the data exactly,
    the data size against the file size), and a tensor stored in two shards is refused: the source is ambiguous.
    """
    stored: dict[str, StoredTensor] = {}
    for f in files:
        tensors, _ = _read_header(f)
        for key, s in tensors.items():
            if key in stored:
                raise IdeoquantError(f"tensor {key} is stored in both {stored[key].file.name} and {f.name}: "
                                     "the source is ambiguous")
            stored[key] = s
        if f == files[0] and tensors:
            will_need(f, min(s.offset for s in tensors.values()), 256 << 20)  # the disk starts while libraries import
    return stored


_HEADER_CACHE: dict[tuple, tuple[dict[str, StoredTensor], dict[str, str]]] = {}


def _read_header(f: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """One file's tensors (as stored) and its `__metadata__`, checked before any data is read."""
    try:
        st = os.stat(f)
        cache_key = (str(f), st.st_size, st.st_mtime_ns, st.st_ino)
        if cache_key in _HEADER_CACHE:
            return _HEADER_CACHE[cache_key]
        with open(f, "rb") as raw:
            head = raw.read(8)
            if len(head) < 8:
                raise _corrupt(f, f"{st.st_size} bytes, shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or n > st.st_size - 8:
                raise _corrupt(f, f"the header claims {n} bytes but the file holds {st.st_size}")
            text = raw.read(n)
    except OSError as e:
        raise IdeoquantError(f"cannot read {f}: {e.strerror or e}") from None
    if len(text) != n:
        raise _corrupt(f, "the file ended inside its header")
    result = _parse_header(f, text, st.st_size - 8 - n, 8 + n)
    if len(_HEADER_CACHE) > 256:
        _HEADER_CACHE.clear()
    _HEADER_CACHE[cache_key] = result
    return result


def _parse_header(f: Path, text: bytes, data_size: int, data_start: int):
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _corrupt(f, f"the header is not valid JSON ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(header, dict):
        raise _corrupt(f, f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(f, "__metadata__ must be an object of strings")
    tensors: dict[str, StoredTensor] = {}
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise _corrupt(f, f"entry {key!r} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            raise _corrupt(f, f"tensor {key} has a dtype that is not a string")
        if dtype not in STORED_DTYPES:
            raise IdeoquantError(f"{f}: tensor {key} has dtype {dtype[:20]}, which ideoquant does not read "
                                 "(it reads BF16, F16, F32 and FP8 e4m3 with scales)")
        # Sizes are 64-bit unsigned in the format (safetensors' usize): a larger number is not a size.
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**64 for d in shape):
            raise _corrupt(f, f"tensor {key} has an invalid shape")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] < 2**64):
            raise _corrupt(f, f"tensor {key} has invalid data_offsets")
        if math.prod(shape) * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
            raise _corrupt(f, f"tensor {key}: data_offsets hold {offsets[1] - offsets[0]} bytes, its shape "
                              f"{shape} in {dtype} needs {math.prod(shape) * DTYPE_BYTES[dtype]}")
        spans.append((offsets[0], offsets[1], key))
        tensors[key] = StoredTensor(f, key, dtype, tuple(shape), data_start + offsets[0])
    end = 0
    for a, b, key in sorted(spans):
        if a != end:
            raise _corrupt(f, f"tensor {key} starts at {a}, not where the previous one ends ({end})")
        end = b
    if end != data_size:
        raise _corrupt(f, f"the header describes {end} bytes of data but the file holds {data_size}")
    return tensors, metadata


def _unique_keys(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"key {k[:80]!r} appears twice")
        d[k] = v
    return d


def _corrupt(f: Path, why: str) -> IdeoquantError:
    return IdeoquantError(f"corrupt or truncated safetensors file {f}: {why}")


def _remote_headers(files: list[Path], name: str, remote: dict) -> dict[str, StoredTensor]:
    stored: dict[str, StoredTensor] = {}
    for f in files:
        for key, (dtype, shape) in remote[f"{name}/{f.name}"].items():
            if dtype not in STORED_DTYPES:
                raise IdeoquantError(f"{f.name}: tensor {key} has dtype {dtype}, which ideoquant does not read")
            if key in stored:
                raise IdeoquantError(f"tensor {key} is stored in both {stored[key].file.name} and {f.name}: "
                                     "the source is ambiguous")
            stored[key] = StoredTensor(f, key, dtype, tuple(shape))
    return stored


# --- the canonical view ------------------------------------------------------------------------------------------


def _component(name: str, stored: dict[str, StoredTensor], files: list[Path], config: dict | None, where: Path,
               notes: list[str]) -> Component:
    """Map stored keys to the canonical diffusers view and check them against the model's own state dict."""
    notes = list(notes)
    refusal = _refusal(stored)
    if refusal:
        raise IdeoquantError(f"{files[0] if len(files) == 1 else files[0].parent}: {refusal}")
    cls = config.get("_class_name") if config is not None else None
    if not all(m in stored for m in model.MARKERS[:2]):
        if cls is not None and cls != model.MODEL_CLASS:
            raise IdeoquantError(f"not an Ideogram 4 checkpoint: {where} is a {cls}, not an {model.MODEL_CLASS}")
        missing = next(m for m in model.MARKERS[:2] if m not in stored)
        raise IdeoquantError(f"not an Ideogram 4 checkpoint ({name}): {where} has no {missing}")
    if config is not None and cls != model.MODEL_CLASS:
        notes.append(f"config.json {'has no _class_name' if cls is None else f'names {cls}'}; recognised as "
                     f"{model.MODEL_CLASS} by its tensors (embed_image_indicator, llm_cond_proj)")

    weights, scales = _companions(name, stored)
    original = model.is_original_layout(weights)
    tensors: dict[str, SourceTensor] = {}
    for key, s in weights.items():
        if s.dtype not in FLOAT_DTYPES and s.dtype not in FP8_DTYPES:
            raise IdeoquantError(f"{name}: tensor {key} has unsupported dtype {s.dtype} "
                                 "(ideoquant reads BF16, F16, F32 and FP8 e4m3 with scales)")
        scale = scales.get(key)
        parts = model.original_to_diffusers(key)
        if len(parts) == 1:
            tensors[parts[0][0]] = SourceTensor(parts[0][0], s.shape, s, None, scale)
        else:
            n = s.shape[0] // len(parts) if s.shape else 0
            if len(s.shape) != 2 or n * len(parts) != s.shape[0]:
                raise IdeoquantError(f"{name}: fused tensor {key} has shape {list(s.shape)}, not {len(parts)} "
                                     "equal row blocks")
            for new, i in parts:
                tensors[new] = SourceTensor(new, (n, *s.shape[1:]), s, (i * n, (i + 1) * n), scale)

    # The config must agree with the tensors before it sizes anything: the spec is then bounded by the headers.
    shapes = {k: t.shape for k, t in tensors.items()}
    try:
        inferred = model.infer_config(shapes)
    except KeyError as e:
        raise IdeoquantError(f"not an Ideogram 4 checkpoint ({name}): {e.args[0].replace('missing', 'missing tensor')}"
                             ) from None
    except ValueError as e:
        raise IdeoquantError(f"not an Ideogram 4 checkpoint ({name}): {e}") from None
    if config is None:
        config = {"_class_name": model.MODEL_CLASS, **inferred}
    else:
        for k in model.SHAPE_KEYS:
            have = config.get(k, model.DEFAULT_CONFIG[k])
            if have != inferred[k]:
                said = f"{k} = {have}" if k in config else f"{k} is left out (default {have})"
                raise IdeoquantError(f"{where}: {said} but the tensors hold {inferred[k]}")
    spec = model.model_spec(config)
    extra = [k for k in tensors if k not in spec.shapes]
    missing = [k for k in spec.shapes if k not in tensors]
    if extra or missing:
        what = f"unexpected tensor {extra[0]}" if extra else f"missing tensor {missing[0]}"
        raise IdeoquantError(f"not an Ideogram 4 checkpoint ({name}): {what} "
                             f"({len(extra)} unexpected, {len(missing)} missing)")
    for k, shape in spec.shapes.items():
        if tensors[k].shape != shape:
            raise IdeoquantError(f"{name}: {k} has shape {list(tensors[k].shape)}, the config implies {list(shape)}")
    for k, t in tensors.items():
        if t.scale is not None and not spec.is_linear_weight(k):
            raise IdeoquantError(f"{name}: {t.stored.key} is FP8 but is not a linear weight")
    ordered = {k: tensors[k] for k in spec.shapes}
    fp8 = any(t.scale is not None for t in ordered.values())
    if fp8:
        per_tensor = any(not t.scale.shape or t.scale.shape == (1,) for t in ordered.values() if t.scale is not None)
        notes.append("FP8 e4m3 weights with " + ("per-tensor scalar scales (ComfyUI fp8_scaled)" if per_tensor else
                     "float32 per-row scales (the official release)") + ", dequantized exactly in float32 as "
                     "w = fp8 * scale[:, None]")
    return Component(name, config, ordered, files, "original" if original else "diffusers", fp8, notes)


def _companions(name: str, stored: dict[str, StoredTensor]):
    """Split off the companion tensors (FP8 scales, activation scales, ComfyUI markers), each checked from the
    header: its weight exists and is FP8, its dtype is supported and its shape is exactly the expected one."""
    weights = {k: s for k, s in stored.items() if not k.endswith((".weight_scale", ".input_scale", MARKER_SUFFIX))}
    scales: dict[str, StoredTensor] = {}
    for key, s in stored.items():
        if key.endswith(".weight_scale"):
            wkey = key[: -len("_scale")]
            w = weights.get(wkey)
            if w is None:
                raise IdeoquantError(f"{name}: {key} has no weight {wkey}")
            if w.dtype not in FP8_DTYPES:
                raise IdeoquantError(f"{name}: {key} scales {wkey}, which is {w.dtype}, not FP8 e4m3")
            if s.dtype not in SCALE_DTYPES:
                raise IdeoquantError(f"{name}: {key} has dtype {s.dtype}; expected F32 (or BF16/F16)")
            if len(w.shape) != 2:
                raise IdeoquantError(f"{name}: FP8 tensor {wkey} has shape {list(w.shape)}; expected a 2-D weight")
            if s.shape not in ((w.shape[0],), (), (1,)):
                raise IdeoquantError(f"{name}: {key} has shape {list(s.shape)}; expected [{w.shape[0]}] (one per row "
                                     f"of {wkey} {list(w.shape)}) or [] (one per tensor)")
            scales[wkey] = s
        elif key.endswith(".input_scale") or key.endswith(MARKER_SUFFIX):
            module = key.rsplit(".", 1)[0]
            w = weights.get(module + ".weight")
            if w is None or w.dtype not in FP8_DTYPES:
                have = "no weight" if w is None else f"a {w.dtype} weight"
                raise IdeoquantError(f"{name}: {key} belongs to an FP8 layer, but {module} has {have}")
            if key.endswith(MARKER_SUFFIX):
                if s.dtype != "U8" or len(s.shape) != 1 or not 0 < s.shape[0] <= 4096:
                    raise IdeoquantError(f"{name}: {key} has dtype {s.dtype} and shape {list(s.shape)}; expected a "
                                         "U8 [n] JSON marker (ComfyUI's comfy_quant)")
            elif s.dtype not in SCALE_DTYPES or s.shape not in ((), (1,)):
                raise IdeoquantError(f"{name}: {key} has dtype {s.dtype} and shape {list(s.shape)}; expected a "
                                     "float [] or [1] scale")
    for key, w in weights.items():
        if w.dtype in FP8_DTYPES and key not in scales:
            raise IdeoquantError(f"{name}: FP8 tensor {key} has no {key}_scale")
    return weights, scales


# --- JSON inputs ----------------------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise IdeoquantError(f"cannot read {path}: {path.stat().st_size} bytes, too large for a JSON file here")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise IdeoquantError(f"cannot read {path}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
                             ) from None


def _kind(v) -> str:
    return {type(None): "null", bool: "a boolean", str: "a string", list: "a list", dict: "an object",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _read_config(path: Path) -> dict:
    """config.json: an object whose model keys, where present, have the types and ranges the model takes."""
    config = _read_json(path)
    if not isinstance(config, dict):
        raise IdeoquantError(f"{path}: expected a JSON object, found {_kind(config)}")
    for k in model.SHAPE_KEYS:
        if k in config:
            v = config[k]
            if type(v) is not int or not 1 <= v <= 1 << 31:
                raise IdeoquantError(f"{path}: {k} must be a positive integer, not {_kind(v)} ({str(v)[:40]})")
    for k in ("rope_theta", "norm_eps"):
        if k in config:
            v = config[k]
            if type(v) not in (int, float) or not math.isfinite(v) or v <= 0:
                raise IdeoquantError(f"{path}: {k} must be a positive number, not {_kind(v)} ({str(v)[:40]})")
    if "mrope_section" in config:
        v = config["mrope_section"]
        if not isinstance(v, list) or not 1 <= len(v) <= 8 or not all(type(x) is int and 0 <= x <= 1 << 20 for x in v):
            raise IdeoquantError(f"{path}: mrope_section must be a list of non-negative integers, not {_kind(v)}")
    for k in ("_class_name", "_diffusers_version", "_name_or_path"):
        if k in config and not isinstance(config[k], str):
            raise IdeoquantError(f"{path}: {k} must be a string, not {_kind(config[k])}")
    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise IdeoquantError(f"{path}: quantization_config must be an object, not {_kind(qc)}")
    if isinstance(qc, dict) and "quant_method" in qc and not isinstance(qc["quant_method"], str):
        raise IdeoquantError(f"{path}: quantization_config.quant_method must be a string, "
                             f"not {_kind(qc['quant_method'])}")
    return config


def _read_index(path: Path) -> dict[str, str]:
    """A shard index: {"weight_map": {tensor: file in this folder}}; entries that leave the folder are refused."""
    index = _read_json(path)
    if not isinstance(index, dict):
        raise IdeoquantError(f"{path}: expected a JSON object, found {_kind(index)}")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise IdeoquantError(f"{path}: weight_map must be a non-empty object of tensor -> file, not "
                             f"{_kind(weight_map)}")
    if "metadata" in index and not isinstance(index["metadata"], (dict, type(None))):
        raise IdeoquantError(f"{path}: metadata must be an object, not {_kind(index['metadata'])}")
    for key, file in weight_map.items():
        if not isinstance(file, str):
            raise IdeoquantError(f"{path}: weight_map[{key[:80]!r}] must be a file name, not {_kind(file)}")
        if (file in ("", ".", "..") or "/" in file or "\\" in file or "\0" in file or file != Path(file).name
                or os.path.isabs(file)):
            raise IdeoquantError(f"{path}: weight_map[{key[:80]!r}] = {file[:200]!r} leaves the folder; entries must "
                                 "name files in the same folder")
        if not file.endswith(".safetensors"):
            raise IdeoquantError(f"{path}: weight_map[{key[:80]!r}] = {file[:200]!r} is not a .safetensors file")
    return weight_map


def _read_model_index(path: Path) -> dict:
    """model_index.json: an object; each backbone entry, where present, is [library, class]."""
    index = _read_json(path)
    if not isinstance(index, dict):
        raise IdeoquantError(f"{path}: expected a JSON object, found {_kind(index)}")
    for k in ("_class_name", "_diffusers_version"):
        if k in index and not isinstance(index[k], str):
            raise IdeoquantError(f"{path}: {k} must be a string, not {_kind(index[k])}")
    for c in model.COMPONENTS:
        if c in index:
            v = index[c]
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, (str, type(None))) for x in v)):
                raise IdeoquantError(f"{path}: {c} must be [library, class], not {_kind(v)} ({str(v)[:60]})")
    return index
