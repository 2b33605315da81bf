"""Prompts for `ideoquant bench`: the built-in set (`prompts.jsonl` beside this module) or a user's file.

A file is plain text (one prompt per line; blank lines skipped) or JSONL (one object per line with `prompt` and
optional `id`, `text` = the string the image must render, `seed`, `group`). A prompt's id is its JSONL `id`, else
its line number from 1: images are named `<id>-<seed>.png` by it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import IdeoquantError

BUILTIN = Path(__file__).with_name("prompts.jsonl")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # ids name files: no separators, no dot-only names


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    text: str | None = None  # the string the image must render (scored by OCR)
    seed: int | None = None  # this prompt's own seed; None: the run's seeds
    group: str | None = None


def load_prompts(path: Path | None = None) -> list[Prompt]:
    """The prompts of `path` (plain text or JSONL), or the built-in set when None."""
    path = Path(path) if path is not None else BUILTIN
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise IdeoquantError(f"cannot read prompts {path}: {getattr(e, 'strerror', None) or e}") from None
    is_jsonl = any(line.lstrip().startswith("{") for line in lines if line.strip())
    out: list[Prompt] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        p = _parse_json(line, path, number) if is_jsonl else Prompt(str(number), line.strip())
        out.append(p)
    if not out:
        raise IdeoquantError(f"{path} holds no prompts")
    seen: set[str] = set()
    for p in out:
        if p.id in seen:
            raise IdeoquantError(f"{path}: prompt id '{p.id}' appears twice")
        seen.add(p.id)
    return out


def _parse_json(line: str, path: Path, number: int) -> Prompt:
    where = f"{path}:{number}"
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise IdeoquantError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise IdeoquantError(f"{where}: each line needs a non-empty \"prompt\" string")
    pid = str(obj.get("id", number))
    if not ID_PATTERN.fullmatch(pid) or pid.strip(".") == "":
        raise IdeoquantError(f"{where}: id '{pid}' must be letters, digits, '_', '-' or '.' (it names image files)")
    text, seed, group = obj.get("text"), obj.get("seed"), obj.get("group")
    if text is not None and not isinstance(text, str):
        raise IdeoquantError(f"{where}: \"text\" must be a string")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise IdeoquantError(f"{where}: \"seed\" must be a non-negative integer")
    if group is not None and not isinstance(group, str):
        raise IdeoquantError(f"{where}: \"group\" must be a string")
    return Prompt(pid, obj["prompt"].strip(), text or None, seed, group)
