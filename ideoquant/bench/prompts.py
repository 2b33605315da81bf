"""The prompts a bench generates: the built-in set, or the user's file.

A prompts file is either plain text (any name not ending in `.jsonl`): one prompt per line, blank lines skipped; or
JSONL (a name ending in `.jsonl`): one object per line with `prompt` and optional `text` (the string the image must
render, scored by OCR), `seed`, `group` and `id`. A prompt's id names its images (`<id>-<seed>.png`), so it is limited
to letters, digits, `.`, `_` and `-`; without one it is the prompt's line number from 1. The built-in set ships as
`prompts.jsonl` beside this module.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import IdeoquantError

BUILTIN_PROMPTS = Path(__file__).parent / "prompts.jsonl"
_FIELDS = {"id", "prompt", "text", "seed", "group"}
# A prompt id becomes part of a file name: no path separators, no leading dot, bounded length.
_ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    text: str | None = None  # the string the image must render (OCR-scored)
    group: str | None = None
    seed: int | None = None  # a fixed seed for this prompt instead of the run's seeds


def load_prompts(path: Path | None = None) -> list[Prompt]:
    """The prompts in `path` (plain text, or JSONL when its name ends in `.jsonl`); None: the built-in set."""
    source = BUILTIN_PROMPTS if path is None else Path(path)
    try:
        content = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IdeoquantError(f"prompts file {source} does not exist") from None
    except IsADirectoryError:
        raise IdeoquantError(f"prompts file {source} is a folder, not a file") from None
    except UnicodeDecodeError as e:
        raise IdeoquantError(f"prompts file {source} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise IdeoquantError(f"cannot read prompts file {source}: {e.strerror}") from None
    jsonl = source.name.lower().endswith(".jsonl")
    prompts = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        prompts.append(_from_json_line(line, number, where) if jsonl else Prompt(id=str(number), prompt=line.strip()))
    if not prompts:
        raise IdeoquantError(f"prompts file {source} holds no prompt")
    seen: set[str] = set()
    for prompt in prompts:
        if prompt.id in seen:
            raise IdeoquantError(f"prompts file {source}: id '{prompt.id}' is used twice")
        seen.add(prompt.id)
    return prompts


def _from_json_line(line: str, number: int, where: str) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise IdeoquantError(f"{where}: not valid JSON ({e.msg}); a .jsonl file holds one object per line") from None
    if not isinstance(row, dict):
        raise IdeoquantError(f"{where}: expected a JSON object with a 'prompt' field, got {type(row).__name__}")
    unknown = sorted(set(row) - _FIELDS)
    if unknown:
        raise IdeoquantError(f"{where}: unknown field '{unknown[0]}' (fields: {', '.join(sorted(_FIELDS))})")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise IdeoquantError(f"{where}: 'prompt' must be a non-empty string")
    text = row.get("text")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise IdeoquantError(f"{where}: 'text' must be a non-empty string (the text the image must show)")
    group = row.get("group")
    if group is not None and (not isinstance(group, str) or not group.strip()):
        raise IdeoquantError(f"{where}: 'group' must be a non-empty string")
    seed = row.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise IdeoquantError(f"{where}: 'seed' must be an integer from 0 to 2^63-1")
    prompt_id = row.get("id", number)
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)):
        raise IdeoquantError(f"{where}: 'id' must be a string or an integer")
    prompt_id = str(prompt_id)
    if not _ID_PATTERN.fullmatch(prompt_id):
        raise IdeoquantError(f"{where}: id {prompt_id!r} must be 1-64 letters, digits, '.', '_' or '-' "
                             "(it names the image files) and not start with '.'")
    return Prompt(id=prompt_id, prompt=prompt.strip(), text=text, group=group, seed=seed)
