"""How numbers read in tables, messages, plots and model cards: one formatter per kind of quantity."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """Binary units, two decimals above a KiB: `512 B`, `1.50 KiB`, `9.31 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def db(x: float | None) -> str:
    """An SQNR: `31.4 dB`, or `exact` for None (no error at all: the metrics' infinite SQNR)."""
    return "exact" if x is None else f"{x:.1f} dB"
