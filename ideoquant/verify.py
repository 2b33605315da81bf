"""Verify an output folder against its manifest before anyone uploads or trusts it.

Four questions: are the files the manifest lists there, unchanged (size, sha256)? Is anything there that a
loader would pick up but the manifest does not know? Does each backbone load? Is what is stored the recipe
the manifest records (which tensors are INT8 / which GGML type, which modules are protected)? The last one
reads only headers (safetensors headers, GGUF tensor infos), never tensor data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from . import manifest as manifest_mod
from .errors import IdeoquantError
from .model import module_of

# Files the manifest does not list but that are fine: the card (upload writes its own), git and cache leftovers.
IGNORED_NAMES = {manifest_mod.MANIFEST, "README.md", ".gitattributes"}
# An unlisted file with one of these suffixes could change what a loader reads: a problem, not a note.
LOADABLE_SUFFIXES = (".safetensors", ".gguf", ".json", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_PER_CHECK = 5  # problems listed per check before summarising the rest


@dataclass
class VerifyResult:
    folder: str
    problems: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # what was checked and passed, one line each

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, **asdict(self)}


class _Problems(list):
    """Collects problems of one check; capped so a wholesale mismatch stays readable."""

    def close(self, result: VerifyResult) -> bool:
        result.problems += self[:MAX_PER_CHECK]
        if len(self) > MAX_PER_CHECK:
            result.problems.append(f"... and {len(self) - MAX_PER_CHECK} more like these")
        return not self


def verify(folder, load: bool = True) -> VerifyResult:
    """Check `folder` (an ideoquant output) against its `ideoquant.json`. Raises IdeoquantError only when there is
    no readable manifest; everything else is reported in the result."""
    from .write.staging import sha256_file

    folder = Path(folder)
    if not folder.is_dir():
        raise IdeoquantError(f"no such folder: {folder}")
    m = manifest_mod.read(folder)
    result = VerifyResult(str(folder))

    # 1. Listed files: present, same size, same sha256.
    bad_files: set[str] = set()
    probs = _Problems()
    for rel, rec in sorted(m["files"].items()):
        path = _inside(folder, rel)
        if path is None:
            probs.append(f"{rel}: the manifest names a path outside the folder")
        elif not path.is_file():
            probs.append(f"{rel}: missing (listed in the manifest)")
        elif path.stat().st_size != rec.get("size"):
            probs.append(f"{rel}: size {path.stat().st_size} bytes, the manifest says {rec.get('size')}")
        elif sha256_file(path) != rec.get("sha256"):
            probs.append(f"{rel}: sha256 differs from the manifest (file modified or corrupted)")
        else:
            continue
        bad_files.add(rel)
    if probs.close(result):
        result.checks.append(f"{len(m['files'])} files match the manifest (size and sha256)")

    # 2. Unlisted files.
    probs, ignored = _Problems(), []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in m["files"] or rel in IGNORED_NAMES or any(part.startswith(".") for part in rel.split("/")):
            continue
        if path.name.endswith(LOADABLE_SUFFIXES):
            probs.append(f"{rel}: unexpected file, not in the manifest")
        else:
            ignored.append(rel)
    if probs.close(result):
        result.checks.append("no unlisted weight or config files"
                             + (f" ({len(ignored)} other files ignored, never uploaded)" if ignored else ""))

    # 3 and 4, per component: the recipe as stored, then loading.
    kind = m.get("kind")
    if kind not in ("int8", "gguf"):
        result.problems.append(f"manifest kind '{kind}' is neither int8 nor gguf")
        return result
    for name, comp in m.get("components", {}).items():
        unlisted = [f for f in comp.get("files", []) if f not in m["files"]]
        if unlisted:
            result.problems.append(f"{name}: {unlisted[0]} is a component file but has no size/sha256 in the manifest")
            continue
        damaged = [f for f in comp["files"] if f in bad_files]
        if damaged:
            result.problems.append(f"{name}: not checked further, {damaged[0]} is missing or changed")
            continue
        if kind == "int8":
            from .smoothquant import smoothed_modules

            checked = _check_int8(folder, name, comp, result, smoothed_modules(m, name))
        else:
            checked = _check_gguf(folder, name, comp, result)
        if checked and load:
            _check_load(folder, kind, name, comp, result)
    return result


def _inside(folder: Path, rel: str) -> Path | None:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return None
    return folder.joinpath(*p.parts)


# ---------------------------------------------------------------- INT8


def _safetensors_headers(paths: list[Path]) -> tuple[dict[str, tuple[str, tuple]], list[dict]]:
    """{key: (dtype, shape)} over the shards, and each shard's metadata. Headers only."""
    from safetensors import safe_open

    keys, metas = {}, []
    for p in paths:
        with safe_open(p, framework="pt") as f:
            metas.append(f.metadata() or {})
            for k in f.keys():
                sl = f.get_slice(k)
                keys[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    return keys, metas


def _check_int8(folder: Path, name: str, comp: dict, result: VerifyResult, smoothed: set[str] = frozenset()) -> bool:
    from . import smoothquant
    from .encode import int8
    from .write.safetensors import DTYPE_NAMES

    shards = [folder / f for f in comp["files"] if f.endswith(".safetensors")]
    try:
        stored, metas = _safetensors_headers(shards)
    except Exception as e:  # a damaged header: safetensors raises its own error types
        result.problems.append(f"{name}: cannot read safetensors headers: {str(e).splitlines()[0]}")
        return False
    probs = _Problems()
    expected: dict[str, tuple[str, tuple]] = {}
    n_q = n_kept = 0
    for t in comp["tensors"]:
        shape = tuple(t["shape"])
        if t["decision"] == "quantized":
            # The exact keys, dtypes and shapes torchao's safetensors format uses for this weight.
            smooth = t["name"].rsplit(".", 1)[0] in smoothed  # SmoothQuant adds `_weight_act_pre_scale`
            lay = (smoothquant.layout if smooth else int8.layout)(t["name"], shape)
            want = {k: (DTYPE_NAMES[dt], sh) for k, (dt, sh) in lay.keys.items()}
            n_q += 1
        else:
            want = {t["name"]: ("BF16", shape)}
            n_kept += 1
        expected.update(want)
        for k, (dt, sh) in want.items():
            if k not in stored:
                probs.append(f"{name}: {t['name']} is '{t['decision']}' in the manifest but {k} is not stored")
            elif stored[k] != (dt, sh):
                probs.append(f"{name}: {k} is stored as {stored[k][0]} {list(stored[k][1])}, "
                             f"the manifest implies {dt} {list(sh)}")
    for k in sorted(set(stored) - set(expected)):
        probs.append(f"{name}: stored tensor {k} is not in the manifest")
    # diffusers merges shard metadata with dict.update: a shard lacking names would leave weights random.
    names = sorted(t["name"] for t in comp["tensors"])
    for shard, meta in zip(shards, metas):
        try:
            listed = sorted(json.loads(meta.get("tensor_names", "null")) or [])
        except ValueError:
            listed = None
        if listed != names:
            probs.append(f"{name}: {shard.name} metadata 'tensor_names' does not list exactly the component's tensors")
    ok = probs.close(result)
    if ok:
        result.checks.append(f"{name}: stored as recorded ({n_q} INT8 weights, {n_kept} BF16 tensors)")

    cfg_path = folder / name / "config.json"
    try:
        qc = json.loads(cfg_path.read_text()).get("quantization_config") or {}
    except (OSError, ValueError) as e:
        result.problems.append(f"{name}: cannot read config.json: {e}")
        return False
    protected = comp.get("protected_modules", [])
    if qc.get("quant_method") != "torchao":
        result.problems.append(f"{name}: config.json quantization_config.quant_method is {qc.get('quant_method')!r}, "
                               "not 'torchao'")
        ok = False
    elif sorted(qc.get("modules_to_not_convert") or []) != sorted(protected):
        n = len(qc.get("modules_to_not_convert") or [])
        result.problems.append(f"{name}: config.json modules_to_not_convert ({n} modules) differs from the "
                               f"manifest's protected_modules ({len(protected)})")
        ok = False
    else:
        result.checks.append(f"{name}: config.json protects the manifest's {len(protected)} modules")
    return ok


# ---------------------------------------------------------------- GGUF


def _gguf_file(comp: dict) -> str | None:
    return next((f for f in comp["files"] if f.endswith(".gguf")), None)


def _check_gguf(folder: Path, name: str, comp: dict, result: VerifyResult) -> bool:
    import gguf

    rel = _gguf_file(comp)
    if rel is None:
        result.problems.append(f"{name}: the manifest lists no .gguf file for this component")
        return False
    try:
        stored = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name
                  for t in gguf.GGUFReader(str(folder / rel)).tensors}
    except Exception as e:  # gguf-py raises ValueError, IndexError... on damaged files
        result.problems.append(f"{name}: cannot read {rel}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return False
    probs = _Problems()
    for t in comp["tensors"]:
        if t["name"] not in stored:
            probs.append(f"{name}: {t['name']} is not in {rel}")
        elif stored[t["name"]] != t["dtype_out"]:
            probs.append(f"{name}: {t['name']} is {stored[t['name']]} in {rel}, the manifest says {t['dtype_out']}")
    for k in sorted(set(stored) - {t["name"] for t in comp["tensors"]}):
        probs.append(f"{name}: {rel} holds {k}, which is not in the manifest")
    ok = probs.close(result)
    if ok:
        counts: dict[str, int] = {}
        for v in stored.values():
            counts[v] = counts.get(v, 0) + 1
        result.checks.append(f"{name}: GGML types as recorded ("
                             + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")")
    return ok


# ---------------------------------------------------------------- loading


def _check_load(folder: Path, kind: str, name: str, comp: dict, result: VerifyResult) -> None:
    """Load the backbone the way a user would; for INT8 also check that loading kept what is stored (diffusers
    only warns when it leaves a weight at its random initialisation)."""
    target = folder / name if kind == "int8" else folder / _gguf_file(comp)
    try:
        from .load import load_transformer

        m = load_transformer(target)
    except Exception as e:  # noqa: BLE001  anything (ImportError of a GGUF loader included) is a verify problem
        msg = str(e).strip().splitlines()
        result.problems.append(f"{name}: does not load: {type(e).__name__}: {msg[0] if msg else ''}")
        return
    try:
        if kind == "int8":
            wrong = _int8_loaded_mismatches(folder, comp, m)
            if wrong:
                result.problems.append(f"{name}: loaded model differs from the files: {wrong[0]}"
                                       + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
                return
        result.checks.append(f"{name}: loads ({type(m).__name__})")
    finally:
        del m


def _int8_loaded_mismatches(folder: Path, comp: dict, m) -> list[str]:
    import torch
    from safetensors import safe_open

    params = dict(m.named_parameters())
    shards = [folder / f for f in comp["files"] if f.endswith(".safetensors")]
    where = {}
    for p in shards:
        with safe_open(p, framework="pt") as f:
            where.update({k: p for k in f.keys()})
    out = []
    for t in comp["tensors"]:
        p = params.get(t["name"])
        if p is None:
            out.append(f"{t['name']} missing")
            continue
        data = p.data
        if t["decision"] == "quantized":
            qdata = getattr(data, "qdata", None)
            key = module_of(t["name"]) + "._weight_qdata"
            if qdata is None:
                out.append(f"{t['name']} loaded as a plain {data.dtype} tensor, not INT8")
            elif key in where and not torch.equal(qdata, _read(where[key], key)):
                out.append(f"{t['name']} INT8 data differs from {key}")
        elif type(data) is not torch.Tensor or not torch.equal(data, _read(where[t["name"]], t["name"])):
            out.append(f"{t['name']} differs from the stored BF16 tensor")
    return out


def _read(path: Path, key: str):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)
