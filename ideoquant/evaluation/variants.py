"""What is evaluated: quantized outputs (INT8 folders, GGUF files) and baselines built from the source weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import model as model_mod
from ..errors import IdeoquantError
from ..formats.gguf import KEY_COMPONENT, read_metadata
from ..load import load_transformer
from ..manifest import MANIFEST
from . import baselines
from .runner import stored_bytes

BASELINES = ("fp8", "nf4", "w8a8")


# ---------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    kind: str  # "int8", "gguf", "fp8", "nf4", "w8a8"
    paths: dict[str, str] = field(default_factory=dict)  # component -> file or folder
    # (component, Component, device) -> (model, bytes as stored)
    load: Callable | None = None


def resolve_variants(paths) -> list[Variant]:
    """QUANTIZED arguments -> variants, in the order given. An INT8 output folder gives both (or its) backbones; a
    folder of GGUF files, or GGUF files of one folder, form one variant per type label; a lone .gguf names its
    backbone in its metadata (`ideogram4.component`)."""
    entries: list = []  # Variant (INT8) or a GGUF group key, in argument order
    gguf_groups: dict[tuple[Path, str], dict[str, str]] = {}

    def add_gguf(f: Path) -> None:
        meta = read_metadata(f)
        component = meta.get(KEY_COMPONENT) or next((c for c in sorted(model_mod.COMPONENTS, key=len, reverse=True)
                                                       if f"-{c}-" in f.name), "transformer")
        if component not in model_mod.COMPONENTS:
            raise IdeoquantError(f"{f.name}: component '{component}' is not an Ideogram 4 backbone")
        label = f.stem.split(f"-{component}-", 1)[-1] if f"-{component}-" in f.stem else f.stem
        key = (f.parent.resolve(), label)
        if key not in gguf_groups:
            gguf_groups[key] = {}
            entries.append(key)
        group = gguf_groups[key]
        if component in group and group[component] != str(f):
            raise IdeoquantError(f"two {component} files for one variant: {group[component]} and {f}")
        group[component] = str(f)

    def check_quantized(folder: Path) -> None:
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise IdeoquantError(f"cannot read {folder / 'config.json'}: {e}") from None
        if not cfg.get("quantization_config"):
            raise IdeoquantError(f"{folder} is not quantized (no quantization_config in config.json)")

    for p in _expand_multi_type(map(Path, paths)):
        if not p.exists():
            raise IdeoquantError(f"no such quantized output: {p}")
        if p.is_file():
            if p.suffix != ".gguf":
                raise IdeoquantError(f"{p.name}: give an INT8 output folder (or a component folder) or a .gguf file")
            add_gguf(p)
            continue
        comps = {c: str(p / c) for c in model_mod.COMPONENTS if (p / c / "config.json").is_file()}
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            for f in ggufs:
                add_gguf(f)
        elif comps:
            for c in comps:
                check_quantized(p / c)
            entries.append(Variant(p.name, "int8", comps))
        elif (p / "config.json").is_file():
            check_quantized(p)
            c = p.name if p.name in model_mod.COMPONENTS else "transformer"
            entries.append(Variant(p.parent.name or p.name, "int8", {c: str(p)}))
        else:
            raise IdeoquantError(f"{p} holds no INT8 backbone (<component>/config.json) and no .gguf file")
    labels_per_folder: dict[Path, int] = {}
    for folder, _ in gguf_groups:
        labels_per_folder[folder] = labels_per_folder.get(folder, 0) + 1
    out: list[Variant] = []
    for e in entries:
        if not isinstance(e, Variant):
            folder, label = e
            e = Variant(folder.name if labels_per_folder[folder] == 1 else f"{folder.name}:{label}", "gguf",
                        dict(sorted(gguf_groups[e].items())))
        base, name, i = e.name, e.name, 2
        while any(v.name == name for v in out):
            name, i = f"{base}-{i}", i + 1
        e.name = name
        e.load = _load_quantized(e)
        out.append(e)
    return out


def _load_quantized(v: Variant):
    def load(component: str, source_component, device: str):
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
