"""What a bench leaves for people: `index.html`, `summary.md` and `quality.png` beside `results.json`.

`results.json` (the stable interface, documented in docs/bench.md) is read and checked here: `read_results` refuses
a file that does not match the schema with one line naming the first problem. `index.html` is self-contained and
works offline (inline CSS and JS, images by relative path); every string that came from a user (prompts, OCR reads,
variant names, settings) is HTML-escaped. The same summary tables go into `summary.md` and, through `card_section`,
into the model card of `ideoquant upload --bench`.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from ..errors import IdeoquantError
from ..publish.card import BenchSection
from ..write.staging import human_bytes

RESULTS = "results.json"
REFERENCE = "reference"


@dataclass(frozen=True)
class Metric:
    label: str
    higher_is_better: bool
    decimals: int


# The metric names of `--metrics`, in the order tables show them.
METRICS = {
    "pick": Metric("PickScore", True, 3),
    "clip": Metric("CLIPScore", True, 2),
    "lpips": Metric("LPIPS", False, 4),
    "psnr": Metric("PSNR (dB)", True, 2),
    "ssim": Metric("SSIM", True, 4),
    "ocr_ned": Metric("OCR NED", False, 3),
    "ocr_exact": Metric("OCR exact", True, 3),
}
STAT_FIELDS = ("mean", "n", "delta_vs_reference", "ci_low", "ci_high", "verdict")
# Per-variant numbers of the summary (null where not measured: images scored with --images, memory on CPU).
VARIANT_NUMBERS = ("weight_bytes", "peak_memory_bytes", "seconds_per_image", "seconds_per_step", "load_seconds")
# The quality metrics the plot shows, first found first (at most PLOT_METRICS of them).
PLOT_PRIORITY = ("pick", "clip", "lpips", "ssim", "psnr", "ocr_ned")
PLOT_METRICS = 3


# ---------------------------------------------------------------- results.json: reading and checking


def read_results(report_dir: Path) -> dict:
    """`REPORT/results.json`, checked against the schema; one-line IdeoquantError for anything else."""
    report_dir = Path(report_dir)
    path = report_dir / RESULTS
    if not report_dir.is_dir():
        raise IdeoquantError(f"bench report {report_dir} is not a folder (expected the --out folder of "
                             "`ideoquant bench`)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IdeoquantError(f"bench report {report_dir} has no {RESULTS} (expected the --out folder of "
                             "`ideoquant bench`)") from None
    except UnicodeDecodeError:
        raise IdeoquantError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise IdeoquantError(f"cannot read {path}: {e.strerror}") from None
    try:
        results = json.loads(text)
    except ValueError as e:
        raise IdeoquantError(f"{path} is not valid JSON ({e})") from None
    check_results(results, str(path))
    return results


def check_results(results, where: str = RESULTS) -> None:
    """Raise a one-line IdeoquantError naming the first place where `results` leaves the schema."""
    def fail(place: str, problem: str):
        raise IdeoquantError(f"{where}: {place} {problem}")

    if not isinstance(results, dict):
        fail("the top level", "must be an object with settings, images and summary")
    for key, kind in (("settings", dict), ("images", list), ("summary", dict)):
        if not isinstance(results.get(key), kind):
            fail(f"'{key}'", f"must be {'a list' if kind is list else 'an object'}")
    summary = results["summary"]
    if REFERENCE not in summary:
        fail("'summary'", f"has no '{REFERENCE}' variant")
    for variant, entry in summary.items():
        if not isinstance(entry, dict):
            fail(f"summary.{variant}", "must be an object")
        for key, value in entry.items():
            place = f"summary.{variant}.{key}"
            if isinstance(value, dict):
                _check_stat(value, place, fail)
            elif not _is_number(value, none_ok=True):
                fail(place, "must be a number, null or a metric's statistics object")
    for i, row in enumerate(results["images"]):
        place = f"images[{i}]"
        if not isinstance(row, dict):
            fail(place, "must be an object")
        for key in ("variant", "prompt_id", "path"):
            if not isinstance(row.get(key), str) or not row[key]:
                fail(f"{place}.{key}", "must be a non-empty string")
        if row["variant"] not in summary:
            fail(f"{place}.variant", f"'{row['variant']}' is not a variant of the summary")
        seed = row.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            fail(f"{place}.seed", "must be a non-negative integer")
        image_path = PurePosixPath(row["path"])
        if image_path.is_absolute() or ".." in image_path.parts or "\\" in row["path"]:
            fail(f"{place}.path", f"'{row['path']}' must be a relative path inside the report folder")
        metrics = row.get("metrics")
        if not isinstance(metrics, dict):
            fail(f"{place}.metrics", "must be an object")
        for name, value in metrics.items():
            if not _is_number(value, none_ok=True):
                fail(f"{place}.metrics.{name}", "must be a number or null")
        if row.get("ocr_text") is not None and not isinstance(row["ocr_text"], str):
            fail(f"{place}.ocr_text", "must be a string or null")
    for key in ("prompts", "variants"):
        if key in results and not isinstance(results[key], list):
            fail(f"'{key}'", "must be a list")
    for i, prompt in enumerate(results.get("prompts", [])):
        if not isinstance(prompt, dict) or not isinstance(prompt.get("id"), str):
            fail(f"prompts[{i}]", "must be an object with a string 'id'")
        for key in ("prompt", "text", "group"):
            if prompt.get(key) is not None and not isinstance(prompt[key], str):
                fail(f"prompts[{i}].{key}", "must be a string or null")
    for i, variant in enumerate(results.get("variants", [])):
        if not isinstance(variant, dict) or not isinstance(variant.get("name"), str):
            fail(f"variants[{i}]", "must be an object with a string 'name'")
    if "metrics" in results and not isinstance(results["metrics"], dict):
        fail("'metrics'", "must be an object")


def _check_stat(stat: dict, place: str, fail) -> None:
    missing = [f for f in STAT_FIELDS if f not in stat]
    if missing:
        fail(place, f"lacks '{missing[0]}' (a metric's statistics: {', '.join(STAT_FIELDS)})")
    for field in ("mean", "delta_vs_reference", "ci_low", "ci_high"):
        if not _is_number(stat[field], none_ok=True):
            fail(f"{place}.{field}", "must be a number or null")
    n = stat["n"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        fail(f"{place}.n", "must be a non-negative integer")
    if stat["verdict"] is not None and not isinstance(stat["verdict"], str):
        fail(f"{place}.verdict", "must be a string or null")
    vs = stat.get("vs", {})
    if not isinstance(vs, dict):
        fail(f"{place}.vs", "must be an object (baseline -> paired comparison)")
    for baseline, comparison in vs.items():
        if not isinstance(comparison, dict) or not all(
                _is_number(comparison.get(k), none_ok=True) for k in ("delta", "ci_low", "ci_high")):
            fail(f"{place}.vs.{baseline}", "must be an object with numbers delta, ci_low, ci_high")


def _is_number(value, none_ok: bool = False) -> bool:
    return (value is None and none_ok) or (isinstance(value, (int, float)) and not isinstance(value, bool))


# ---------------------------------------------------------------- what the views share


def variants(results: dict) -> list[str]:
    """The reference first, then the other variants in the summary's order."""
    return [REFERENCE] + [v for v in results["summary"] if v != REFERENCE]


def metric_names(results: dict) -> list[str]:
    """The metrics any variant has statistics for: the known ones in table order, then any others by name."""
    present = {k for entry in results["summary"].values() for k, v in entry.items()
               if isinstance(v, dict) and k not in VARIANT_NUMBERS}
    return [m for m in METRICS if m in present] + sorted(present - set(METRICS))


def variant_number(results: dict, variant: str, key: str):
    """A per-variant number of the summary (seconds_per_image, weight_bytes, ...): its mean, or None."""
    value = results["summary"][variant].get(key)
    return value.get("mean") if isinstance(value, dict) else value


def prompt_info(results: dict) -> dict[str, dict]:
    """Prompt id -> {prompt, text, group} (those that are set), in the order of `prompts`; ids only the image rows
    name map to an empty dict."""
    info: dict[str, dict] = {}
    for p in results.get("prompts", []):
        info[p["id"]] = {k: p[k] for k in ("prompt", "text", "group") if isinstance(p.get(k), str)}
    for row in results["images"]:
        info.setdefault(row["prompt_id"], {})
    return info


def _label(metric: str) -> str:
    return METRICS[metric].label if metric in METRICS else metric


def _arrow(metric: str, results: dict | None = None) -> str:
    if metric in METRICS:
        higher = METRICS[metric].higher_is_better
    else:
        higher = ((results or {}).get("metrics", {}).get(metric) or {}).get("higher_is_better")
    return "" if higher is None else " ↑" if higher else " ↓"


def _ci(metric: str, stat: dict) -> str:
    if stat.get("ci_low") is None or stat.get("ci_high") is None:
        return "–"
    signed = stat.get("delta_vs_reference", stat.get("delta")) is not None
    return f"[{_num(metric, stat['ci_low'], signed)}, {_num(metric, stat['ci_high'], signed)}]"


def _num(metric: str, value, signed: bool = False) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "∞" if value > 0 else "−∞" if value < 0 else "nan"
    decimals = METRICS[metric].decimals if metric in METRICS else 4
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def _bytes(n) -> str:
    return "–" if n is None else human_bytes(n)


def _seconds(s) -> str:
    return "–" if s is None else f"{s:.2f}"


def _md_cell(text: str) -> str:
    """A user string in a markdown table cell: HTML escaped (the Hub renders HTML), pipes and newlines neutralised."""
    return html.escape(" ".join(str(text).split())).replace("|", "\\|")


def summary_markdown(results: dict, heading_level: int = 2) -> str:
    """The summary as markdown: per variant and metric, the mean, n, the paired difference against the reference
    with its bootstrap 95 % CI and the verdict; then size, memory and time per variant."""
    h = "#" * heading_level
    summary = results["summary"]
    out = [f"{h} Quality against the reference", "",
           "Δ: the mean paired same-seed difference against the reference, with its bootstrap 95 % confidence "
           "interval; \"indistinguishable\": the interval holds 0. Metrics that compare each image with the "
           "reference's image (PSNR, SSIM, LPIPS) have no difference to take: their interval is that of the mean. "
           "↑: higher is better, ↓: lower is better.", "",
           "| variant | metric | mean | n | Δ vs reference | 95 % CI | verdict |",
           "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    comparisons = []
    for variant in variants(results):
        for metric in metric_names(results):
            stat = summary[variant].get(metric)
            if not isinstance(stat, dict):
                continue
            out.append(f"| {_md_cell(variant)} | {_label(metric)}{_arrow(metric, results)} | "
                       f"{_num(metric, stat['mean'])} | {stat['n']} | "
                       f"{_num(metric, stat['delta_vs_reference'], True)} | {_ci(metric, stat)} | "
                       f"{_md_cell(stat['verdict'] or '–')} |")
            for baseline, c in (stat.get("vs") or {}).items():
                comparisons.append(f"| {_md_cell(variant)} | {_md_cell(baseline)} | {_label(metric)}"
                                   f"{_arrow(metric, results)} | {_num(metric, c['delta'], True)} | {_ci(metric, c)} | "
                                   f"{_md_cell(c.get('verdict') or '–')} |")
    if comparisons:
        out += ["", f"{h} Against the baselines", "",
                "| variant | baseline | metric | Δ vs baseline | 95 % CI | verdict |",
                "| --- | --- | --- | ---: | --- | --- |", *comparisons]
    out += ["", f"{h} Size, memory and time", "",
            "| variant | weights | peak GPU memory | s / image | s / step | load s |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for variant in variants(results):
        n = {k: variant_number(results, variant, k) for k in VARIANT_NUMBERS}
        out.append(f"| {_md_cell(variant)} | {_bytes(n['weight_bytes'])} | {_bytes(n['peak_memory_bytes'])} | "
                   f"{_seconds(n['seconds_per_image'])} | {_seconds(n['seconds_per_step'])} | "
                   f"{_seconds(n['load_seconds'])} |")
    return "\n".join(out) + "\n"


def _settings_line(results: dict) -> str:
    s = results["settings"]
    prompts = {row["prompt_id"] for row in results["images"]}
    seeds = sorted({row["seed"] for row in results["images"]})
    parts = [f"{len(prompts)} prompts", f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"]
    for key in ("source", "base", "steps", "guidance", "size"):
        if isinstance(s.get(key), (str, int, float, list)) and not isinstance(s[key], bool):
            parts.append(f"{key} {s[key] if not isinstance(s[key], list) else 'x'.join(map(str, s[key]))}")
    return ", ".join(parts)


# ---------------------------------------------------------------- files: summary.md, quality.png, index.html


def write_report(report_dir: Path, results: dict) -> None:
    """Write `index.html`, `summary.md` and (when sizes or memory were measured) `quality.png` into `report_dir`,
    each replaced whole (a reader never sees half a file)."""
    report_dir = Path(report_dir)
    check_results(results, str(report_dir / RESULTS))
    plot = _quality_plot_png(results)
    if plot is not None:
        _replace(report_dir / "quality.png", plot)
    elif (report_dir / "quality.png").exists():
        (report_dir / "quality.png").unlink()  # a plot of an earlier run would describe other numbers
    _replace(report_dir / "summary.md",
             (f"# ideoquant bench\n\n{_settings_line(results)}\n\n" + summary_markdown(results)).encode())
    _replace(report_dir / "index.html", _index_html(results, has_plot=plot is not None).encode())


def _replace(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _quality_plot_png(results: dict) -> bytes | None:
    """Quality (mean, with the CI of the paired difference around it) against weight size and peak memory, one row
    per metric; None when no variant has a size or a memory number."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = results["summary"]
    axes_x = [(key, label) for key, label in (("weight_bytes", "weights"), ("peak_memory_bytes", "peak GPU memory"))
              if any(variant_number(results, v, key) is not None for v in summary)]
    plotted = [m for m in PLOT_PRIORITY
               if any(isinstance(summary[v].get(m), dict) and summary[v][m]["mean"] is not None for v in summary)
               and m in metric_names(results)]
    plotted = plotted[:PLOT_METRICS]
    if not axes_x or not plotted:
        return None
    fig = Figure(figsize=(4.6 * len(axes_x) + 0.4, 3.2 * len(plotted) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(plotted), len(axes_x), squeeze=False)
    for row, metric in enumerate(plotted):
        for col, (x_key, x_label) in enumerate(axes_x):
            ax = grid[row][col]
            largest = max(variant_number(results, v, x_key) or 0 for v in summary)
            unit, scale = next((u, 1024.0 ** p) for u, p in (("GiB", 3), ("MiB", 2), ("KiB", 1), ("bytes", 0))
                               if largest >= 1024.0 ** p or p == 0)
            for i, variant in enumerate(variants(results)):
                stat, x = summary[variant].get(metric), variant_number(results, variant, x_key)
                if not isinstance(stat, dict) or stat["mean"] is None or x is None or not math.isfinite(stat["mean"]):
                    continue
                y = stat["mean"]
                err = None
                if all(isinstance(stat[k], (int, float)) and math.isfinite(stat[k]) for k in ("ci_low", "ci_high")):
                    # The CI of the difference drawn around the mean; of the mean itself where there is no difference.
                    d = y if stat["delta_vs_reference"] is None else stat["delta_vs_reference"]
                    err = [[max(d - stat["ci_low"], 0.0)], [max(stat["ci_high"] - d, 0.0)]]
                ax.errorbar([x / scale], [y], yerr=err, fmt="o" if variant != REFERENCE else "*", markersize=7,
                            capsize=3, color=f"C{i % 10}")
                ax.annotate(variant, (x / scale, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
            ax.set_xlabel(f"{x_label} ({unit})")
            ax.set_ylabel(_label(metric) + _arrow(metric, results))
            ax.grid(True, alpha=0.3)
    fig.suptitle("bars: 95 % CI of the paired difference to the reference\n(of the mean for metrics against the "
                 "reference image)",
                 fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    return buffer.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5rem;color:#1d1d1f;background:#fff}
h1{font-size:1.4rem}h2{font-size:1.15rem;margin-top:2rem}h3{font-size:1rem;margin:0 0 .3rem}
.wide{overflow-x:auto}table{border-collapse:collapse;font-size:.85rem}
th,td{border:1px solid #d0d0d7;padding:.3rem .5rem;text-align:right;vertical-align:top}
th{background:#f3f3f6;cursor:pointer;user-select:none;white-space:nowrap}
th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}
td{white-space:nowrap}td.name,th.name{text-align:left}td.metric{min-width:9rem;max-width:13rem}
.delta{display:block;color:#555;font-size:.75rem;white-space:normal}
.better{background:#e6f4ea}.worse{background:#fce8e6}.same{background:#f6f6f6}
.prompt{border-top:1px solid #ddd;padding:1rem 0}.prompt p{margin:.2rem 0}
.row{display:flex;flex-wrap:wrap;gap:.8rem}figure{margin:0;width:260px;font-size:.75rem}
figure img{width:256px;height:auto;border:1px solid #ccc;display:block}figcaption b{font-size:.85rem}
.ocr{font-family:ui-monospace,monospace;word-break:break-all}.muted{color:#777}
"""

# Click a header to sort by that column (numbers numerically, empty cells last); click again to reverse.
_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir);
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.value, y = b.cells[col].dataset.value;
      if (x === "" || y === "") return (x === "") - (y === "");
      var nx = Number(x), ny = Number(y);
      var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
      return dir === "ascending" ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _sort_value(value) -> str:
    """A cell's sort key as JavaScript's Number() reads it (PSNR of identical images is infinite); empty: none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return _e(repr(float(value)) if isinstance(value, float) else value)


def _verdict_class(verdict: str | None) -> str:
    v = (verdict or "").lower()
    return "better" if v.startswith("better") else "worse" if v.startswith("worse") else "same" if v else ""


def _summary_table_html(results: dict) -> str:
    summary = results["summary"]
    metrics = metric_names(results)
    head = ['<th class="name">variant</th>', "<th>weights</th>", "<th>peak GPU memory</th>", "<th>s / image</th>",
            "<th>s / step</th>", "<th>load s</th>"]
    head += [f"<th>{_e(_label(m) + _arrow(m, results))}</th>" for m in metrics]
    rows = []
    for variant in variants(results):
        e = summary[variant]
        n = {k: variant_number(results, variant, k) for k in VARIANT_NUMBERS}
        cells = [f'<td class="name" data-value="{_e(variant)}">{_e(variant)}</td>']
        cells += [f'<td data-value="{_sort_value(n[k])}">{_bytes(n[k])}</td>'
                  for k in ("weight_bytes", "peak_memory_bytes")]
        cells += [f'<td data-value="{_sort_value(n[k])}">{_seconds(n[k])}</td>'
                  for k in ("seconds_per_image", "seconds_per_step", "load_seconds")]
        for m in metrics:
            stat = e.get(m)
            if not isinstance(stat, dict):
                cells.append('<td data-value=""><span class="muted">–</span></td>')
                continue
            lines = []
            if stat["delta_vs_reference"] is not None:
                lines.append(f"Δ {_num(m, stat['delta_vs_reference'], True)} {_ci(m, stat)}"
                             + (f" · {_e(stat['verdict'])}" if stat["verdict"] else ""))
            elif stat["ci_low"] is not None and stat["ci_high"] is not None:
                lines.append(f"CI {_ci(m, stat)}")
            lines += [f"vs {_e(b)}: {_num(m, c['delta'], True)} {_ci(m, c)}"
                      + (f" · {_e(c['verdict'])}" if c.get("verdict") else "") for b, c in (stat.get("vs") or {}).items()]
            delta = "".join(f'<span class="delta">{line}</span>' for line in lines + [f"n {stat['n']}"])
            cls = _verdict_class(stat["verdict"]) if variant != REFERENCE else ""
            cells.append(f'<td class="metric {cls}" data-value="{_sort_value(stat["mean"])}">{_num(m, stat["mean"])}'
                         f"{delta}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<div class="wide"><table class="sortable" id="summary"><thead><tr>{"".join(head)}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _image_src(path: str) -> str:
    return _e(quote(path, safe="/"))


def _prompts_html(results: dict) -> str:
    info = prompt_info(results)
    order = {v: i for i, v in enumerate(variants(results))}
    by_key: dict[tuple[str, int], list[dict]] = {}
    for row in results["images"]:
        by_key.setdefault((row["prompt_id"], row["seed"]), []).append(row)
    prompt_order = {pid: i for i, pid in enumerate(info)}
    out = []
    for (pid, seed) in sorted(by_key, key=lambda k: (prompt_order.get(k[0], len(prompt_order)), k[0], k[1])):
        p = info.get(pid, {})
        head = f"<h3>{_e(pid)} · seed {seed}{' · ' + _e(p['group']) if p.get('group') else ''}</h3>"
        text = f'<p>{_e(p["prompt"])}</p>' if p.get("prompt") else ""
        if p.get("text"):
            text += f'<p>must render: <span class="ocr">{_e(p["text"])}</span></p>'
        figures = []
        for row in sorted(by_key[(pid, seed)], key=lambda r: order.get(r["variant"], len(order))):
            scores = " · ".join(f"{_e(_label(m))} {_num(m, v)}" for m, v in row["metrics"].items())
            ocr = ("" if row.get("ocr_text") is None
                   else f'<br>OCR read: <span class="ocr">{_e(row["ocr_text"]) or "(nothing)"}</span>')
            src = _image_src(row["path"])
            figures.append(f'<figure><a href="{src}"><img src="{src}" loading="lazy" alt="{_e(row["variant"])}, '
                           f'prompt {_e(pid)}, seed {seed}"></a><figcaption><b>{_e(row["variant"])}</b><br>'
                           f"{scores}{ocr}</figcaption></figure>")
        out.append(f'<section class="prompt">{head}{text}<div class="row">{"".join(figures)}</div></section>')
    return "".join(out)


def _variants_html(results: dict) -> str:
    listed = [v for v in results.get("variants", []) if v.get("what") or v.get("kind")]
    if not listed:
        return ""
    items = "".join(f"<li><b>{_e(v['name'])}</b>: {_e(v.get('what') or v.get('kind'))}</li>" for v in listed)
    return f"<ul>{items}</ul>"


def _index_html(results: dict, has_plot: bool) -> str:
    plot = ('<img id="quality-plot" src="quality.png" alt="quality against weight size and peak memory">'
            if has_plot else '<p class="muted">No size or memory numbers (images scored with --images).</p>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<link rel="icon" href="data:,"><title>ideoquant bench</title><style>{_CSS}</style></head>
<body>
<h1>ideoquant bench</h1>
<p>{_e(_settings_line(results))}</p>
{_variants_html(results)}
<h2>Summary</h2>
<p>Each cell: the variant's mean; below it the paired same-seed difference (Δ) against the reference with its
bootstrap 95 % confidence interval and the verdict ("indistinguishable" when the interval holds 0), the same against
each baseline, and n. PSNR, SSIM and LPIPS compare each image with the reference's image: their interval is that of
the mean. ↑: higher is better, ↓: lower is better. Click a header to sort.</p>
{_summary_table_html(results)}
<h2>Quality against size and memory</h2>
{plot}
<h2>Images</h2>
<p>Per prompt and seed: the reference first, then every variant, with its scores against the reference and, for
prompts that ask for text, what OCR read.</p>
{_prompts_html(results)}
<script>{_JS}</script>
</body></html>
"""


# ---------------------------------------------------------------- the model card's part


GRID_ROWS = 4
GRID_TILE = 256


def image_grid(report_dir: Path, results: dict, rows: int = GRID_ROWS, tile: int = GRID_TILE) -> tuple[bytes, list]:
    """A PNG: up to `rows` (prompt, seed) pairs that every variant has an image of, one per row (spread over the
    prompt groups), the reference first in each row, each image fitted into a `tile` square; a header row names the
    variants. Returns the PNG and the rows' (prompt_id, seed)."""
    from PIL import Image, ImageDraw, ImageFont

    report_dir = Path(report_dir)
    names = [v for v in variants(results) if any(r["variant"] == v for r in results["images"])]
    paths: dict[tuple[str, int], dict[str, str]] = {}
    for row in results["images"]:
        paths.setdefault((row["prompt_id"], row["seed"]), {})[row["variant"]] = row["path"]
    complete = [key for key, have in paths.items() if all(v in have for v in names)]
    if not complete:
        raise IdeoquantError(f"bench report {report_dir}: no prompt has an image of every variant "
                             f"({', '.join(names)}) to show in the model card")
    info = prompt_info(results)
    chosen = _spread(complete, info, rows)
    header = 28
    font = ImageFont.load_default(size=16)
    grid = Image.new("RGB", (tile * len(names), header + tile * len(chosen)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(names):
        label = name if len(name) <= 28 else name[:27] + "…"
        draw.text((c * tile + tile // 2, header // 2), label, fill="black", font=font, anchor="mm")
    for r, key in enumerate(chosen):
        for c, name in enumerate(names):
            path = report_dir / paths[key][name]
            try:
                with Image.open(path) as image:
                    thumb = _fit(image.convert("RGB"), tile)
            except FileNotFoundError:
                raise IdeoquantError(f"bench report {report_dir}: image {paths[key][name]} is missing") from None
            except OSError as e:
                raise IdeoquantError(f"bench report {report_dir}: image {paths[key][name]} cannot be read ({e})") \
                    from None
            grid.paste(thumb, (c * tile + (tile - thumb.width) // 2, header + r * tile + (tile - thumb.height) // 2))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue(), chosen


def _fit(image, tile: int):
    """The image scaled (aspect kept) to fit a tile x tile square, by PIL's own thumbnail."""
    image.thumbnail((tile, tile))
    return image


def _spread(keys: list, info: dict, count: int) -> list:
    """Up to `count` of `keys` in prompt order, taking from each prompt group in turn (text, people, ...)."""
    prompt_order = {pid: i for i, pid in enumerate(info)}
    keys = sorted(keys, key=lambda k: (prompt_order.get(k[0], len(prompt_order)), k[0], k[1]))
    groups: dict[str, list] = {}
    for key in keys:
        groups.setdefault(info.get(key[0], {}).get("group", ""), []).append(key)
    chosen: list = []
    queues = list(groups.values())
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


def card_section(report_dir: Path) -> BenchSection:
    """The model card's part of a bench report: its summary tables and one image grid (uploaded beside the card)."""
    report_dir = Path(report_dir)
    results = read_results(report_dir)
    grid, rows = image_grid(report_dir, results)
    info = prompt_info(results)
    lines = ["## Image quality (ideoquant bench)", "",
             f"Measured with `ideoquant bench` against the reference (the source as released): "
             f"{_md_cell(_settings_line(results))}.", "",
             summary_markdown(results, heading_level=3).rstrip(), "",
             f"![The same prompt and seed for every variant, the reference first]({BenchSection.GRID_PATH})", "",
             "Rows, top to bottom:", ""]
    for pid, seed in rows:
        prompt = info.get(pid, {}).get("prompt")
        lines.append(f"- {_md_cell(pid)}, seed {seed}" + (f": {_md_cell(prompt)}" if prompt else ""))
    return BenchSection(markdown="\n".join(lines) + "\n", grid_png=grid)
