"""What is evaluated: quantized outputs (INT8 folders, GGUF files) and baselines built from the source weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import formats
from .. import model as model_mod
from ..errors import IdeoquantError
from ..load import load_transformer
from ..manifest import MANIFEST
from . import baselines
from .runner import stored_bytes

BASELINES = ("fp8", "nf4", "w8a8")


# ---------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    kind: str  # the output format that wrote it ("int8", "gguf", ...), or the baseline ("fp8", "nf4", "w8a8")
    paths: dict[str, str] = field(default_factory=dict)  # component -> file or folder
    # (component, Component, device) -> (model, bytes as stored)
    load: Callable | None = None


def resolve_variants(paths) -> list[Variant]:
    """QUANTIZED arguments -> variants, in the order given, as the formats that wrote them recognise them
    (`formats.recognise`): a torchao output folder gives both (or its) backbones; a folder of GGUF files, or GGUF
    files of one folder, form one variant per type label; a lone .gguf names its backbone in its metadata."""
    entries: list = []  # Variant, or a group key of files of one folder and label, in argument order
    groups: dict[tuple[str, Path, str], dict[str, str]] = {}

    def check_quantized(folder: Path) -> None:
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise IdeoquantError(f"cannot read {folder / 'config.json'}: {e}") from None
        if not cfg.get("quantization_config"):
            raise IdeoquantError(f"{folder} is not quantized (no quantization_config in config.json)")
        raise IdeoquantError(f"{folder}: its quantization_config is no format ideoquant writes "
                             f"({', '.join(formats.NAMES)})")

    for p in _expand_multi_type(map(Path, paths)):
        if not p.exists():
            raise IdeoquantError(f"no such quantized output: {p}")
        found = formats.recognise(p)
        if not found:
            for folder in [p, *(p / c for c in model_mod.COMPONENTS)]:
                if (folder / "config.json").is_file():
                    check_quantized(folder)
            raise IdeoquantError(f"{p} holds no quantized backbone: no INT8 backbone (<component>/config.json) and "
                                 "no .gguf file")
        for fmt, r in found:
            if r.group is None:
                name = p.name if not (len(r.paths) == 1 and next(iter(r.paths.values())) == p) else \
                    (p.parent.name or p.name)
                entries.append(Variant(name, fmt.name, {c: str(f) for c, f in r.paths.items()}))
                continue
            key = (fmt.name, r.group, r.label)
            if key not in groups:
                groups[key] = {}
                entries.append(key)
            for c, f in r.paths.items():
                if c in groups[key] and groups[key][c] != str(f):
                    raise IdeoquantError(f"two {c} files for one variant: {groups[key][c]} and {f}")
                groups[key][c] = str(f)
    labels_per_folder: dict[Path, int] = {}
    for _, folder, _ in groups:
        labels_per_folder[folder] = labels_per_folder.get(folder, 0) + 1
    out: list[Variant] = []
    for e in entries:
        if not isinstance(e, Variant):
            kind, folder, label = e
            e = Variant(folder.name if labels_per_folder[folder] == 1 else f"{folder.name}:{label}", kind,
                        dict(sorted(groups[e].items())))
        base, name, i = e.name, e.name, 2
        while any(v.name == name for v in out):
            name, i = f"{base}-{i}", i + 1
        e.name = name
        e.load = _load_quantized(e)
        out.append(e)
    return out


def _load_quantized(v: Variant):
    fmt = formats.get(v.kind)

    def load(component: str, source_component, device: str):
        if device == "cpu" and not getattr(fmt, "runs_on_cpu", True):
            raise IdeoquantError(f"{v.name}: {fmt.runs_on} (give --device cuda on one)")
        m = load_transformer(v.paths[component], torch.bfloat16, device=device)
        return m, stored_bytes(m)

    return load


def baseline_variants(names=BASELINES) -> list[Variant]:
    out = []
    for n in names:
        n = n.strip().lower()
        if n not in baselines.BUILDERS:
            raise IdeoquantError(f"unknown baseline '{n}': choose from {', '.join(baselines.BUILDERS)}")
        label, build = baselines.BUILDERS[n]
        out.append(Variant(label, n, {c: "(built from the source weights)" for c in model_mod.COMPONENTS},
                           (lambda component, src, device, build=build: build(src, device))))
    return out


def _expand_multi_type(paths):
    """A folder written by one pass of several types (`gguf --type a,b`: OUT/<TYPE>/ each an output) stands for its
    outputs, in order."""
    for p in paths:
        several = p.is_dir() and not (p / MANIFEST).exists() and not any(p.glob("*.gguf"))
        subs = sorted(d for d in p.iterdir() if (d / MANIFEST).is_file()) if several else []
        yield from subs or [p]
