"""The bench's report: index.html in a real browser, summary.md, results.json checks, and `upload --bench`.

The fixture is a small results.json in the documented schema with real PNGs (PIL) beside it, one prompt of which is
hostile HTML: the page must show it as text and run none of it.
"""

from __future__ import annotations

import copy
import io
import json
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import ideoquant
from ideoquant.bench.report import check_results, read_results, write_report
from ideoquant.errors import IdeoquantError
from tests.browser import chromium, screenshot

HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> & "quoted"'
PROMPTS = [
    {"id": "sign-1", "prompt": 'A shop sign that reads "BAKERY"', "text": "BAKERY", "group": "text"},
    {"id": "odd", "prompt": HOSTILE, "group": "scenes"},
    {"id": "3", "prompt": "a red fox | in snow"},
]
SEEDS = (0, 1)
OCR_READ = {"reference": "BAKERY", "int8": "BAKERY", "q4_k": "BAKEPY<b>", "nf4": "8AKERY"}


def _stat(mean, n, delta=None, low=None, high=None, verdict=None, vs=None):
    stat = {"mean": mean, "n": n, "delta_vs_reference": delta, "ci_low": low, "ci_high": high, "verdict": verdict}
    return stat if vs is None else {**stat, "vs": vs}


def _perf(values: dict) -> dict:
    """Per-variant numbers as the engine writes them: a mean and n, the rest null (n = 1 for a load)."""
    return {k: None if v is None else _stat(v, 6 if k.startswith("seconds") else 1) for k, v in values.items()}


SAME, WORSE = "indistinguishable from the reference", "worse"
SUMMARY = {
    "reference": {"pick": _stat(21.0, 6), "clip": _stat(30.0, 6),
                  **_perf({"weight_bytes": 20_400_000_000, "peak_memory_bytes": 23_000_000_000,
                           "seconds_per_image": 150.0, "seconds_per_step": 3.125, "load_seconds": 12.0})},
    "int8": {"pick": _stat(20.95, 6, -0.05, -0.12, 0.02, SAME,
                           vs={"nf4": {"delta": 1.2, "ci_low": 0.8, "ci_high": 1.6, "n": 6, "verdict": "better"}}),
             "clip": _stat(29.9, 6, -0.1, -0.3, 0.1, SAME),
             "lpips": _stat(0.243, 6, None, 0.2, 0.29), "psnr": _stat(31.5, 6, None, 30.0, 33.0),
             "ocr_ned": _stat(0.0, 2, 0.0, 0.0, 0.0, SAME),
             **_perf({"weight_bytes": 10_200_000_000, "peak_memory_bytes": 14_000_000_000,
                      "seconds_per_image": 184.0, "seconds_per_step": 3.833, "load_seconds": 9.5})},
    "q4_k": {"pick": _stat(20.1, 6, -0.9, -1.3, -0.5, WORSE), "clip": _stat(28.0, 6, -2.0, -2.6, -1.4, WORSE),
             "lpips": _stat(0.306, 6, None, 0.25, 0.36), "psnr": _stat(27.25, 6, None, 26.0, 28.5),
             "ocr_ned": _stat(0.286, 2, 0.286, 0.2, 0.37, WORSE),
             **_perf({"weight_bytes": 5_200_000_000, "peak_memory_bytes": None,
                      "seconds_per_image": 120.5, "seconds_per_step": 2.51, "load_seconds": 6.25})},
    "nf4": {"pick": _stat(19.75, 6, -1.25, -1.6, -0.9, WORSE), "clip": _stat(27.5, 6, -2.5, -3.1, -1.9, WORSE),
            **_perf({"weight_bytes": 5_100_000_000, "peak_memory_bytes": 9_000_000_000,
                     "seconds_per_image": 165.0, "seconds_per_step": 3.4375, "load_seconds": 30.0})},
}


def _image(prompt_index: int, seed: int, variant_index: int) -> Image.Image:
    """64x48 (not square: the grid keeps the aspect), a gradient per prompt and seed, shifted per variant."""
    image = Image.new("RGB", (64, 48))
    image.putdata([((x * 4 + 40 * prompt_index) % 256, (y * 5 + 60 * seed) % 256, (30 * variant_index + x) % 256)
                   for y in range(48) for x in range(64)])
    return image


def make_report(folder: Path) -> dict:
    """REPORT/results.json and REPORT/images/<variant>/<id>-<seed>.png for three variants."""
    images = []
    for v, variant in enumerate(SUMMARY):
        for p, prompt in enumerate(PROMPTS):
            for seed in SEEDS:
                path = f"images/{variant}/{prompt['id']}-{seed}.png"
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                _image(p, seed, v).save(folder / path)
                metrics = {"pick": 21.0 - v * 0.4 + seed * 0.1, "clip": 30.0 - v}
                if variant != "reference":
                    metrics.update(lpips=0.2 + 0.05 * v, psnr=33.0 - 2 * v)
                row = {"variant": variant, "prompt_id": prompt["id"], "seed": seed, "path": path, "metrics": metrics}
                if "text" in prompt:
                    row["ocr_text"] = OCR_READ[variant]
                    metrics.update(ocr_ned=0.0 if v < 2 else 0.286, ocr_exact=1.0 if v < 2 else 0.0)
                images.append(row)
    settings = {"schema": 1, "mode": "generate", "source": "ideogram-ai/ideogram-4-fp8", "steps": 48,
                "guidance": 4.0, "size": [64, 48], "seeds": len(SEEDS), "prompts": len(PROMPTS)}
    results = {"schema": 1, "settings": settings, "images": images, "summary": copy.deepcopy(SUMMARY),
               "metrics": {m: {"higher_is_better": m not in ("lpips", "ocr_ned"), "against_reference": m in
                               ("psnr", "ssim", "lpips"), "model": None} for m in ("pick", "clip", "lpips", "psnr",
                                                                                     "ocr_ned", "ocr_exact")},
               "prompts": [{"text": None, "group": None, **p} for p in PROMPTS],
               "variants": [{"name": v, "kind": "output", "what": f"./ideogram4-{v}"} for v in SUMMARY]}
    (folder / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench") / "report"
    results = make_report(folder)
    write_report(folder, results)
    return folder, results


# ---------------------------------------------------------------- index.html in a real browser


def _wait(condition, timeout: float = 20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    return condition()


def _first_column(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#summary tbody tr')).map(r => r.cells[0].innerText.trim());")


def _click_header(driver, label: str) -> None:
    from selenium.webdriver.common.by import By

    header = next(th for th in driver.find_elements(By.CSS_SELECTOR, "#summary th") if th.text.startswith(label))
    header.click()


def _order(key: str, reverse: bool = False) -> list[str]:
    """The variants sorted by a summary number, computed here from the results; missing numbers last."""
    def value(variant):
        entry = SUMMARY[variant].get(key)
        return entry["mean"] if isinstance(entry, dict) else entry

    present = sorted((v for v in SUMMARY if value(v) is not None), key=value, reverse=reverse)
    return present + [v for v in SUMMARY if value(v) is None]


def test_index_html_in_chromium(report):
    folder, results = report
    with chromium() as driver:
        driver.get((folder / "index.html").as_uri())
        images = driver.execute_script("return document.images.length")
        assert images == len(results["images"]) + 1  # every image, and the plot
        for i in range(images):  # lazy images load when scrolled to, as a reader's would
            driver.execute_script("document.images[arguments[0]].scrollIntoView()", i)
            loaded = _wait(lambda: driver.execute_script(
                "const im = document.images[arguments[0]]; return im.complete && im.naturalWidth > 0;", i))
            assert loaded, driver.execute_script("return document.images[arguments[0]].src", i)
        widths = driver.execute_script("return Array.from(document.images).map(im => im.naturalWidth)")
        assert widths.count(64) == len(results["images"])

        # The hostile prompt is shown as text and never runs.
        assert driver.execute_script("return window.__pwned") is None
        assert driver.execute_script("return document.scripts.length") == 1
        body = driver.execute_script("return document.body.innerText")
        assert HOSTILE in body and "a red fox | in snow" in body and "OCR read: BAKEPY<b>" in body

        # Sorting: ascending on the first click, descending on the second, empty cells last both ways.
        assert _first_column(driver) == ["reference", "int8", "q4_k", "nf4"]
        _click_header(driver, "s / image")
        assert _first_column(driver) == _order("seconds_per_image") == ["q4_k", "reference", "nf4", "int8"]
        _click_header(driver, "s / image")
        assert _first_column(driver) == _order("seconds_per_image", reverse=True)
        _click_header(driver, "peak GPU memory")
        assert _first_column(driver) == _order("peak_memory_bytes") == ["nf4", "int8", "reference", "q4_k"]
        _click_header(driver, "peak GPU memory")
        assert _first_column(driver) == _order("peak_memory_bytes", reverse=True) == ["reference", "int8", "nf4",
                                                                                      "q4_k"]
        _click_header(driver, "LPIPS")  # the reference and nf4 have no LPIPS: last
        assert _first_column(driver) == _order("lpips") == ["int8", "q4_k", "reference", "nf4"]
        _click_header(driver, "PickScore")
        assert _first_column(driver) == _order("pick") == ["nf4", "q4_k", "int8", "reference"]
        driver.execute_script("window.scrollTo(0, 0)")
        assert screenshot(driver, "bench-report", "index").stat().st_size > 0

        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []


def test_index_html_escapes_user_strings(report):
    folder, _ = report
    page = (folder / "index.html").read_text(encoding="utf-8")
    assert "<script>window.__pwned" not in page and "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page
    assert "BAKEPY&lt;b&gt;" in page
    assert "https://" not in page and "http://" not in page  # nothing fetched from elsewhere


# ---------------------------------------------------------------- summary.md


def test_summary_md_holds_every_number(report):
    folder, _ = report
    lines = (folder / "summary.md").read_text(encoding="utf-8").splitlines()
    assert "3 prompts, 2 seeds, source ideogram-ai/ideogram-4-fp8, steps 48, guidance 4.0, size 64x48" in lines
    for line in [
        "| reference | PickScore ↑ | 21.000 | 6 | – | – | – |",
        "| int8 | PickScore ↑ | 20.950 | 6 | -0.050 | [-0.120, +0.020] | indistinguishable from the reference |",
        "| int8 | CLIPScore ↑ | 29.90 | 6 | -0.10 | [-0.30, +0.10] | indistinguishable from the reference |",
        "| int8 | LPIPS ↓ | 0.2430 | 6 | – | [0.2000, 0.2900] | – |",
        "| int8 | PSNR (dB) ↑ | 31.50 | 6 | – | [30.00, 33.00] | – |",
        "| q4_k | OCR NED ↓ | 0.286 | 2 | +0.286 | [+0.200, +0.370] | worse |",
        "| int8 | nf4 | PickScore ↑ | +1.200 | [+0.800, +1.600] | better |",
        "| reference | 19.00 GiB | 21.42 GiB | 150.00 | 3.12 | 12.00 |",
        "| q4_k | 4.84 GiB | – | 120.50 | 2.51 | 6.25 |",
    ]:
        assert line in lines, line
    # One row per variant and metric that has statistics, none for a metric a variant lacks.
    quality = lines[lines.index("## Quality against the reference"):lines.index("## Against the baselines")]
    rows = [line for line in quality if line.startswith("| ") and line.split(" | ")[1] not in ("metric", "---")]
    expected = sum(isinstance(v, dict) and k not in ("weight_bytes", "peak_memory_bytes", "seconds_per_image",
                                                     "seconds_per_step", "load_seconds")
                   for entry in SUMMARY.values() for k, v in entry.items())
    assert len(rows) == expected == 14


def test_identical_images_infinite_psnr(tmp_path):
    """PSNR of a variant identical to the reference is infinite (JSON's Infinity): shown as ∞, sorted as the largest."""
    results = make_report(tmp_path)
    results["summary"]["nf4"]["psnr"] = {"mean": float("inf"), "n": 6, "delta_vs_reference": None,
                                         "ci_low": float("inf"), "ci_high": float("inf"), "verdict": None}
    (tmp_path / "results.json").write_text(json.dumps(results), encoding="utf-8")
    write_report(tmp_path, read_results(tmp_path))
    assert "| nf4 | PSNR (dB) ↑ | ∞ | 6 | – | [∞, ∞] | – |" in (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert 'data-value="Infinity">∞' in (tmp_path / "index.html").read_text(encoding="utf-8")


def test_report_without_sizes_has_no_plot(tmp_path):
    results = make_report(tmp_path)
    (tmp_path / "quality.png").write_bytes(b"stale")
    for entry in results["summary"].values():
        entry.pop("weight_bytes")
        entry.update(peak_memory_bytes=None)
    write_report(tmp_path, results)
    assert not (tmp_path / "quality.png").exists()
    assert "images scored with --images" in (tmp_path / "index.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------- results.json checks


def _broken(mutate):
    results = {"settings": {}, "summary": copy.deepcopy(SUMMARY),
               "images": [{"variant": "int8", "prompt_id": "1", "seed": 0, "path": "images/int8/1-0.png",
                           "metrics": {"pick": 1.0}}]}
    mutate(results)
    return results


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("summary"), "'summary' must be an object"),
    (lambda r: r.update(images={}), "'images' must be a list"),
    (lambda r: r["summary"].pop("reference"), "'summary' has no 'reference' variant"),
    (lambda r: r["summary"]["int8"]["pick"].pop("ci_low"), "summary.int8.pick lacks 'ci_low'"),
    (lambda r: r["summary"]["int8"]["pick"].update(mean="high"), "summary.int8.pick.mean must be a number"),
    (lambda r: r["summary"]["int8"]["pick"].update(n=True), "summary.int8.pick.n must be a non-negative integer"),
    (lambda r: r["summary"]["int8"].update(weight_bytes="10 GB"), "summary.int8.weight_bytes must be a number"),
    (lambda r: r["summary"]["int8"]["pick"]["vs"]["nf4"].update(delta="+1"), "summary.int8.pick.vs.nf4 must be"),
    (lambda r: r.update(prompts=[{"id": 1}]), "prompts[0] must be an object with a string 'id'"),
    (lambda r: r.update(prompts=[{"id": "1", "text": 5}]), "prompts[0].text must be a string or null"),
    (lambda r: r.update(variants={}), "'variants' must be a list"),
    (lambda r: r["images"][0].update(variant="fp4"), "images[0].variant 'fp4' is not a variant of the summary"),
    (lambda r: r["images"][0].update(seed=-1), "images[0].seed must be a non-negative integer"),
    (lambda r: r["images"][0].update(path="../../etc/passwd"), "images[0].path '../../etc/passwd' must be"),
    (lambda r: r["images"][0].update(path="/etc/passwd"), "images[0].path '/etc/passwd' must be"),
    (lambda r: r["images"][0]["metrics"].update(pick="1"), "images[0].metrics.pick must be a number or null"),
    (lambda r: r["images"][0].update(ocr_text=3), "images[0].ocr_text must be a string or null"),
    (lambda r: r["images"][0].pop("prompt_id"), "images[0].prompt_id must be a non-empty string"),
])
def test_results_off_schema_are_refused_in_one_line(mutate, message):
    with pytest.raises(IdeoquantError) as error:
        check_results(_broken(mutate))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_read_results_errors(tmp_path):
    with pytest.raises(IdeoquantError, match="is not a folder"):
        read_results(tmp_path / "missing")
    with pytest.raises(IdeoquantError, match="has no results.json"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text('{"settings": ', encoding="utf-8")
    with pytest.raises(IdeoquantError, match="results.json is not valid JSON"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text("[]", encoding="utf-8")
    with pytest.raises(IdeoquantError, match="the top level must be an object"):
        read_results(tmp_path)


# ---------------------------------------------------------------- upload --bench


@pytest.fixture(scope="module")
def int8_out(tmp_path_factory, bf16_source) -> Path:
    out = tmp_path_factory.mktemp("bench_out") / "int8"
    ideoquant.convert(bf16_source, out)
    return out


def test_upload_bench_puts_table_and_grid_into_the_card(hub_env, int8_out, report):
    from ideoquant.cli import app

    folder, results = report
    target = f"me/bench-{uuid.uuid4().hex[:8]}"
    runner = CliRunner()
    dry = runner.invoke(app, ["upload", str(int8_out), "--repo-id", target, "--bench", str(folder), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "ideoquant-bench.png" in dry.output and "## Image quality (ideoquant bench)" in dry.output
    assert hub_env.hub.requests == []

    real = runner.invoke(app, ["upload", str(int8_out), "--repo-id", target, "--bench", str(folder), "--json"])
    assert real.exit_code == 0, real.output
    card = hub_env.hub.read(target, "README.md").decode()
    summary_lines = (folder / "summary.md").read_text(encoding="utf-8").splitlines()
    table = [line for line in summary_lines if line.startswith("| ")]
    assert all(line in card.splitlines() for line in table)  # the same tables as summary.md
    assert "![The same prompt and seed for every variant, the reference first](ideoquant-bench.png)" in card
    assert card.index("## Image quality") < card.index("## Use")
    assert "<script>" not in card and "&lt;script&gt;" in card

    grid = Image.open(io.BytesIO(hub_env.hub.read(target, "ideoquant-bench.png")))
    tile, header, variants = 256, 28, list(SUMMARY)
    assert variants[0] == "reference"
    # Four rows, taken from the groups in turn: text, scenes, no group, then text again.
    rows = [("sign-1", 0), ("odd", 0), ("3", 0), ("sign-1", 1)]
    assert grid.size == (tile * len(variants), header + tile * len(rows))
    for r, (pid, seed) in enumerate(rows):
        for c, variant in enumerate(variants):
            source = Image.open(folder / f"images/{variant}/{pid}-{seed}.png").convert("RGB")
            left, top = c * tile + (tile - source.width) // 2, header + r * tile + (tile - source.height) // 2
            assert grid.crop((left, top, left + source.width, top + source.height)).tobytes() == source.tobytes()
    for pid, seed in rows:
        assert f"- {pid}, seed {seed}" in card


def test_upload_bad_bench_sends_nothing(hub_env, int8_out, tmp_path):
    from ideoquant.cli import app

    runner = CliRunner()
    target = f"me/bench-{uuid.uuid4().hex[:8]}"
    r = runner.invoke(app, ["upload", str(int8_out), "--repo-id", target, "--bench", str(tmp_path)])
    assert r.exit_code == 2 and r.output.startswith("error: bench report") and r.output.count("\n") == 1, r.output
    make_report(tmp_path)
    (tmp_path / "images/int8/odd-0.png").unlink()
    r = runner.invoke(app, ["upload", str(int8_out), "--repo-id", target, "--bench", str(tmp_path)])
    assert r.exit_code == 2 and "image images/int8/odd-0.png is missing" in r.output and r.output.count("\n") == 1
    (tmp_path / "images/int8/odd-0.png").write_bytes(b"not a png")
    r = runner.invoke(app, ["upload", str(int8_out), "--repo-id", target, "--bench", str(tmp_path)])
    assert r.exit_code == 2 and "odd-0.png cannot be read" in r.output and r.output.count("\n") == 1
    make_report(tmp_path)
    r = runner.invoke(app, ["upload", str(int8_out), "--repo-id", target, "--bench", str(tmp_path), "--keep-card"])
    assert r.exit_code == 2 and "cannot be combined with --keep-card" in r.output
    assert hub_env.hub.write_requests() == []
