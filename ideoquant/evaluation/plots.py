"""PNG plots of evaluation and sensitivity reports (matplotlib's Agg canvas: no display, no global state)."""

from __future__ import annotations

import math
from pathlib import Path

from ..formatting import db


# ---------------------------------------------------------------- plot


def plot_format(path: str | Path) -> str:
    """The image format a plot file's name asks for (matplotlib's names: png, svg, pdf, ...; png without a
    suffix); an unknown one is refused before any work."""
    from matplotlib.backend_bases import FigureCanvasBase

    from ..errors import IdeoquantError

    fmt = Path(path).suffix[1:].lower() or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise IdeoquantError(f"--plot {path}: unknown image format '{fmt}' (one of {', '.join(sorted(supported))})")
    return fmt


EVALUATION_DPI = 100


def evaluation_plot(report: dict, path: str | Path, title: str | None = None, format: str | None = None) -> Path:
    """`evaluation_figure` saved to `path`. `format`: see `plot_format` [default: from `path`'s suffix]."""
    path = Path(path)
    fig = evaluation_figure(report, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=EVALUATION_DPI, format=format)
    return path


def evaluation_figure(report: dict, title: str | None = None):
    """Per-layer output SQNR of each variant: per component, the layers' own error (isolated) and in situ; one
    panel each, one line per variant (matplotlib through the Agg canvas: no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    comps = report["components"]
    panels = [(c, kind) for c in comps for kind in ("layers_isolated", "layers")]
    layer_names = {c: _layer_order(report, c) for c in comps}
    width = max(11.0, min(28.0, 0.28 * max(len(n) for n in layer_names.values()) + 7))
    fig = Figure(figsize=(width, 3.3 * len(panels) + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    markers = "os^Dv<>ph*"
    what = {"layers_isolated": "own error (the layer on the source's layer input)",
            "layers": "in situ (inside the quantized model: upstream error included)"}
    for ax, (c, kind) in zip(axes, panels):
        names = layer_names[c]
        x = list(range(len(names)))
        for i, v in enumerate(report["variants"]):
            comp = v["components"].get(c)
            if not comp:
                continue
            y = [comp.get(kind, {}).get(n) for n in names]
            y = [math.nan if s is None else s for s in y]
            ax.plot(x, y, marker=markers[i % len(markers)], markersize=3.5, linewidth=1.1, color=f"C{i % 10}",
                    label=f"{v['name']} ({db(comp['sqnr_db'])} end to end)")
        ax.set_title(f"{c}: per-layer output SQNR, {what[kind]}; a gap: exact", fontsize=9, loc="left")
        ax.set_ylabel("SQNR (dB)")
        ax.grid(True, alpha=0.3)
        step = max(1, len(names) // 60)
        ax.set_xticks(x[::step])
        ax.set_xticklabels([_short(n) for n in names[::step]], rotation=90, fontsize=6)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    src = report["source"].get("repo_id") or report["source"].get("spec", "")
    fig.suptitle(title or f"ideoquant eval of {src}", fontsize=11)
    return fig


def _layer_order(report: dict, component: str) -> list[str]:
    names: list[str] = []
    for v in report["variants"]:
        for n in (v["components"].get(component) or {}).get("layers", {}):
            if n not in names:
                names.append(n)
    return names


def _short(name: str) -> str:
    return (name.replace("layers.", "L").replace(".attention.", ".attn.").replace(".feed_forward.", ".ff.")
            .replace("adaln_modulation", "adaln"))


def sensitivity_plot(report: dict, path: str | Path, top: int = 40, format: str | None = None) -> Path:
    """Horizontal bars: end-to-end SQNR with only that unit quantized, most fragile at the top. `format`: see
    `plot_format`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    units = [u for u in report["units"] if u["sqnr_db_min"] is not None][:top]
    fig = Figure(figsize=(9, 1.2 + 0.22 * max(len(units), 4)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    y = list(range(len(units)))[::-1]
    ax.barh(y, [u["sqnr_db_min"] for u in units],
            color=["0.6" if u["protected_by_recipe"] else "C0" for u in units])
    ax.set_yticks(y)
    ax.set_yticklabels([u["unit"] for u in units], fontsize=7)
    ax.set_xlabel("end-to-end velocity SQNR with only this unit quantized (dB; lower = more fragile)")
    lo = min((u["sqnr_db_min"] for u in units), default=0)
    hi = max((u["sqnr_db_min"] for u in units), default=1)
    ax.set_xlim(min(0, lo - 2), hi + 3)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(f"sensitivity under {report['recipe']['name']} (grey: already protected by the recipe)",
                 fontsize=9, loc="left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format=format)
    return path
