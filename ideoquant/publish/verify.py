"""Verify an output folder against its manifest before anyone uploads or trusts it.

Four questions: are the files the manifest lists there, unchanged (size, sha256)? Is anything there that a
loader would pick up but the manifest does not know? Does each backbone load? Is what is stored the recipe
the manifest records (which tensors are INT8 / which GGML type, which modules are protected)? The last one
reads only headers (safetensors headers, GGUF tensor infos), never tensor data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from .. import formats
from .. import manifest as manifest_mod
from ..errors import IdeoquantError
from ..write.hashing import sha256_file

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
    if kind not in formats.NAMES:
        result.problems.append(f"manifest kind '{kind}' is not an output format ({', '.join(formats.NAMES)})")
        return result
    fmt = formats.get(kind)
    for name, comp in m.get("components", {}).items():
        unlisted = [f for f in comp.get("files", []) if f not in m["files"]]
        if unlisted:
            result.problems.append(f"{name}: {unlisted[0]} is a component file but has no size/sha256 in the manifest")
            continue
        damaged = [f for f in comp["files"] if f in bad_files]
        if damaged:
            result.problems.append(f"{name}: not checked further, {damaged[0]} is missing or changed")
            continue
        problems, checks = fmt.check_stored(folder, name, comp, m)
        result.checks += checks
        if _Problems(problems).close(result) and load:
            _check_load(fmt, folder, name, comp, result)
    return result


def _inside(folder: Path, rel: str) -> Path | None:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return None
    return folder.joinpath(*p.parts)


def _check_load(fmt, folder: Path, name: str, comp: dict, result: VerifyResult) -> None:
    """Load the backbone the way a user would, then ask the format whether what loaded is what is stored
    (diffusers only warns when it leaves a weight at its random initialisation)."""
    try:
        from ..load import load_transformer

        m = load_transformer(fmt.load_target(folder, name, comp))
    except Exception as e:  # noqa: BLE001  anything (ImportError of a GGUF loader included) is a verify problem
        msg = str(e).strip().splitlines()
        result.problems.append(f"{name}: does not load: {type(e).__name__}: {msg[0] if msg else ''}")
        return
    try:
        wrong = fmt.check_loaded(folder, comp, m)
        if wrong:
            result.problems.append(f"{name}: loaded model differs from the files: {wrong[0]}"
                                   + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
            return
        result.checks.append(f"{name}: loads ({type(m).__name__})")
    finally:
        del m
