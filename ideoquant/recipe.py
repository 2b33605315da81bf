"""Recipes: which tensors are quantized, to what, and which stay in high precision.

A recipe is a TOML file (see `recipes/`). Protect patterns are globs over module names
(`layers.*.feed_forward.w2`, `*` matches across dots); GGUF type rules are regular expressions over
tensor names, as in stable-diffusion.cpp's `--tensor-type-rules`.

This module reads the keys every recipe has; the recipe's format (`formats.load_recipe`) validates its own keys
and which overrides it takes. Load recipes through `ideoquant.formats` (`load_recipe`, `resolve`, `list_recipes`).
"""

from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path

from .encode.ggml import registry
from .errors import IdeoquantError

RECIPE_DIR = Path(__file__).parent / "recipes"
MAX_REGEX_LENGTH = 1000
COMMON_KEYS = frozenset({"name", "format", "description", "source", "protect"})


@dataclass(frozen=True)
class Recipe:
    name: str
    format: str
    description: str
    source: str
    protect: tuple[str, ...] = ()
    no_protect: tuple[str, ...] = ()
    type: str | None = None  # GGUF: the type for every quantized linear weight
    rules: tuple[tuple[str, str], ...] = ()  # GGUF: (regex, type), first match wins
    path: str | None = None

    def with_overrides(self, protect=(), no_protect=(), type=None, rules=()) -> "Recipe":
        """CLI overrides: extra protect / no-protect patterns, another base type, extra rules (take precedence)."""
        for regex, _ in rules:
            _check_regex(regex)
        return replace(
            self,
            protect=self.protect + tuple(_module_pattern(p) for p in protect),
            no_protect=self.no_protect + tuple(_module_pattern(p) for p in no_protect),
            type=_check_type(type, "--type") if type else self.type,
            rules=tuple((r, _check_type(t, f"rule {r}")) for r, t in rules) + self.rules,
        )

    def protected_modules(self, modules: list[str]) -> list[str]:
        """The modules this recipe keeps in high precision; a pattern that matches nothing is an error."""
        for pattern in self.protect + self.no_protect:
            if not any(fnmatchcase(m, pattern) for m in modules):
                raise IdeoquantError(f"recipe '{self.name}': pattern '{pattern}' matches no module of the model")
        return [m for m in modules
                if any(fnmatchcase(m, p) for p in self.protect) and not any(fnmatchcase(m, p) for p in self.no_protect)]

    def type_for(self, *names: str) -> tuple[str, str]:
        """GGUF: (type, why) for a quantized linear weight known under these names (output and diffusers)."""
        for regex, qtype in self.rules:
            compiled = _compile(regex)
            if any(compiled.search(n) for n in names):
                return qtype, f"rule {regex}={qtype}"
        return self.type, f"recipe type {self.type}"

    def to_dict(self) -> dict:
        d = {"name": self.name, "format": self.format, "description": self.description, "source": self.source,
             "protect": list(self.protect)}
        if self.no_protect:
            d["no_protect"] = list(self.no_protect)
        if self.type is not None:  # a format with per-tensor types (GGUF)
            d["type"] = self.type
            d["rules"] = {r: t for r, t in self.rules}
        if self.path:
            d["path"] = self.path
        return d


def _module_pattern(pattern: str) -> str:
    pattern = pattern.strip()
    if not pattern:
        raise IdeoquantError("empty protect pattern")
    return pattern[: -len(".weight")] if pattern.endswith(".weight") else pattern


def _check_type(qtype, where: str) -> str:
    # The GGML types a gguf recipe's `type` and `rules` may name: every type ideoquant encodes (the registry's).
    if not isinstance(qtype, str) or qtype.strip().upper() not in registry.encoded():
        raise IdeoquantError(f"{where}: unknown GGUF type '{qtype}': choose from "
                             f"{', '.join(t.lower() for t in registry.encoded())}")
    return qtype.strip().upper()


def _re2():
    try:
        import re2
    except ImportError:  # pragma: no cover  (a dependency; the fallback below keeps matching bounded anyway)
        return None
    return re2


# Without re2: the constructs that make a backtracking engine slow (a quantified group holding a quantifier or an
# alternation, backreferences, lookaround) are refused, so matching a short tensor name stays linear.
_NESTED = re.compile(r"\((?:[^()\\]|\\.)*(?:[*+?}|])(?:[^()\\]|\\.)*\)[*+?{]")


@functools.lru_cache(maxsize=256)
def _compile(regex: str):
    """A type rule's regex, compiled by a linear-time engine (RE2): no pattern can make matching hang."""
    if len(regex) > MAX_REGEX_LENGTH:
        raise IdeoquantError(f"bad type rule regex '{regex[:40]}...': longer than {MAX_REGEX_LENGTH} characters")
    re2 = _re2()
    if re2 is not None:
        opts = re2.Options()
        opts.log_errors = False  # re2 would also print its own message on stderr
        try:
            return re2.compile(regex, opts)
        except re2.error as e:
            msg = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
            raise IdeoquantError(f"bad type rule regex '{regex}': {msg}") from None
    if _NESTED.search(regex) or re.search(r"\\[1-9]|\(\?[=!<]", regex):
        raise IdeoquantError(f"bad type rule regex '{regex}': nested quantifiers, backreferences and lookaround "
                             "are not supported")
    try:
        return re.compile(regex)
    except re.error as e:
        raise IdeoquantError(f"bad type rule regex '{regex}': {e}") from None


def _check_regex(regex: str) -> None:
    if not isinstance(regex, str) or not regex:
        raise IdeoquantError(f"bad type rule regex {regex!r}: must be a non-empty string")
    _compile(regex)


def parse_type_rule(rule: str) -> tuple[str, str]:
    """`REGEX=TYPE` (the last `=` separates them, so a regex may contain `=`)."""
    regex, sep, qtype = rule.rpartition("=")
    if not sep or not regex or not qtype:
        raise IdeoquantError(f"bad --type-rule '{rule}': expected REGEX=TYPE, e.g. 'attention\\.o\\.weight$=Q8_0'")
    _check_regex(regex)
    return regex, _check_type(qtype, f"--type-rule '{rule}'")


def apply_overrides(r: Recipe, protect=(), no_protect=(), qtype=None, type_rules=()) -> Recipe:
    """The command line's overrides: `--protect`, `--no-protect`, `--type` and `--type-rule REGEX=TYPE`."""
    return r.with_overrides(protect=protect, no_protect=no_protect, type=qtype,
                            rules=[parse_type_rule(x) for x in type_rules])


def recipe_files() -> list[Path]:
    return sorted(RECIPE_DIR.glob("*.toml"))


def read_recipe(name_or_path: str | Path) -> tuple[dict, Path, dict]:
    """A recipe file by name (from the packaged `recipes/`) or by path: (its TOML table, its path, the `Recipe`
    fields every format shares, validated). The format's own keys are left to the format."""
    path = Path(name_or_path)
    if not path.is_file():
        candidate = RECIPE_DIR / f"{name_or_path}.toml"
        if not candidate.is_file():
            names = ", ".join(p.stem for p in recipe_files())
            raise IdeoquantError(f"unknown recipe '{name_or_path}' (available: {names}; or give a path to a .toml)")
        path = candidate
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise IdeoquantError(f"recipe {path.name} does not parse: {e}") from None
    for key in ("name", "format", "description", "source"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise IdeoquantError(f"recipe {path.name}: '{key}' must be a non-empty string")
    protect = data.get("protect", [])
    if not isinstance(protect, list) or not all(isinstance(p, str) for p in protect):
        raise IdeoquantError(f"recipe {path.name}: 'protect' must be a list of strings")
    common = dict(
        name=data["name"], format=data["format"], description=data["description"].strip(),
        source=data["source"].strip(), protect=tuple(_module_pattern(p) for p in protect),
        # Packaged recipes are identified by name and ideoquant version; a custom one by the path it was given as.
        path=None if path.resolve().parent == RECIPE_DIR.resolve() else str(name_or_path),
    )
    return data, path, common


def parse_type_table(data: dict, where: str) -> dict:
    """The `type` and `rules` keys of a recipe with per-tensor types (GGUF) -> `Recipe` fields."""
    rules = data.get("rules", {})
    if not isinstance(rules, dict) or not all(isinstance(v, str) for v in rules.values()):
        raise IdeoquantError(f"recipe {where}: 'rules' must be a table of REGEX = \"TYPE\"")
    for regex, t in rules.items():
        try:
            _check_regex(regex)
            _check_type(t, f"rule '{regex}'")
        except IdeoquantError as e:
            raise IdeoquantError(f"recipe {where}: {e}") from None
    qtype = data.get("type")
    if not isinstance(qtype, str):
        raise IdeoquantError(f"recipe {where}: a gguf recipe needs 'type'")
    try:
        _check_type(qtype, "'type'")
    except IdeoquantError as e:
        raise IdeoquantError(f"recipe {where}: {e}") from None
    return {"type": qtype.upper(), "rules": tuple((r, t.upper()) for r, t in rules.items())}
