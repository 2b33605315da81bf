"""Prompts for `ideoquant bench`: the built-in set (`prompts.jsonl` beside this module) or a user's file.

A file whose name ends in `.jsonl` is JSONL: one object per line with `prompt` and optional `id`, `text` (the string
the image must render, scored by OCR), `seed` and `group`. Any other file is plain text: one prompt per line, taken as
typed (an Ideogram JSON caption on one line is a prompt like any other). Blank lines are skipped. A prompt's id is its
JSONL `id`, else its line number from 1; images are named `<id>-<seed>.png` by it, so it is limited to letters,
digits, `_`, `-` and `.`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import IdeoquantError

BUILTIN = Path(__file__).with_name("prompts.jsonl")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # ids name files: no separators, no leading dot
FIELDS = ("id", "prompt", "text", "seed", "group")


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    text: str | None = None  # the string the image must render (scored by OCR)
    seed: int | None = None  # this prompt's own seed; None: the run's seeds
    group: str | None = None


def load_prompts(path: Path | None = None) -> list[Prompt]:
    """The prompts of `path` (JSONL when its name ends in `.jsonl`, else plain text), or the built-in set when None."""
    path = Path(path) if path is not None else BUILTIN
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IdeoquantError(f"prompts file {path} does not exist") from None
    except IsADirectoryError:
        raise IdeoquantError(f"prompts file {path} is a folder, not a file") from None
    except UnicodeDecodeError as e:
        raise IdeoquantError(f"prompts file {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise IdeoquantError(f"cannot read prompts file {path}: {e.strerror}") from None
    is_jsonl = path.name.lower().endswith(".jsonl")
    out: list[Prompt] = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        if not is_jsonl and not out and _looks_like_jsonl(line):
            raise IdeoquantError(f"{path}:{number}: a JSON object with a \"prompt\" field: name the file *.jsonl "
                                 "to read it as JSONL (any other name is plain text, one prompt per line)")
        out.append(_parse_json(line, path, number) if is_jsonl else Prompt(str(number), line.strip()))
    if not out:
        raise IdeoquantError(f"prompts file {path} holds no prompt")
    seen: set[str] = set()
    for p in out:
        if p.id in seen:
            raise IdeoquantError(f"{path}: prompt id '{p.id}' appears twice")
        seen.add(p.id)
    return out


def _looks_like_jsonl(line: str) -> bool:
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    return isinstance(obj, dict) and "prompt" in obj


def _parse_json(line: str, path: Path, number: int) -> Prompt:
    where = f"{path}:{number}"
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise IdeoquantError(f"{where}: not valid JSON ({e.msg}); a .jsonl file holds one object per line") from None
    if not isinstance(obj, dict):
        raise IdeoquantError(f"{where}: expected a JSON object with a \"prompt\" field, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise IdeoquantError(f"{where}: unknown field '{unknown[0]}' (fields: {', '.join(FIELDS)})")
    prompt, text, seed, group = obj.get("prompt"), obj.get("text"), obj.get("seed"), obj.get("group")
    if not isinstance(prompt, str) or not prompt.strip():
        raise IdeoquantError(f"{where}: \"prompt\" must be a non-empty string")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise IdeoquantError(f"{where}: \"text\" must be a non-empty string (the text the image must show)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise IdeoquantError(f"{where}: \"seed\" must be an integer from 0 to 2^63-1")
    if group is not None and (not isinstance(group, str) or not group.strip()):
        raise IdeoquantError(f"{where}: \"group\" must be a non-empty string")
    pid = obj.get("id", number)
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise IdeoquantError(f"{where}: \"id\" must be a string or an integer")
    pid = str(pid)
    if not ID_PATTERN.fullmatch(pid):
        raise IdeoquantError(f"{where}: id {pid!r} must be 1-64 letters, digits, '_', '-' or '.', not starting "
                             "with '.' or '-' (it names image files)")
    return Prompt(pid, prompt.strip(), text, seed, group)
