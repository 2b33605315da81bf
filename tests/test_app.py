"""`ideoquant app` in a real browser: Debian's chromium, headless, driven by selenium through Debian's chromedriver.

The app runs as its own process (`python -m ideoquant app`), pointed at the test suite's fake Hub on 127.0.0.1 by
HF_ENDPOINT (read when huggingface_hub is imported, so a subprocess is the clean way), with HF_TOKEN as the local
token; Gradio stubs the sign-in outside a Space, with the profile of that token (the fake Hub's whoami). The Hub's
own state after each job (files, manifests that `verify` passes, the card) is the reference. Screenshots of the
form, the running job and the result are written to tests/artifacts/app/ (tests/browser.py; ignored by git).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from ideoquant import testing
from ideoquant.publish.verify import verify
from tests.conftest_hub import TEST_TOKEN

from tests.browser import REPO, chromium, screenshot


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


class AppProcess:
    """`python -m ideoquant app` on a free loopback port, its own HF_HOME and work folder."""

    def __init__(self, root: Path, hub_url: str, *args: str):
        self.root, self.work, self.home = root, root / "work", root / "hf_home"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env.update(HF_ENDPOINT=hub_url, HF_HUB_DISABLE_XET="1", HF_TOKEN=TEST_TOKEN, HF_HOME=str(self.home),
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_UPDATE_CHECK="1", GRADIO_ANALYTICS_ENABLED="False",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONPATH=str(REPO))
        env.pop("SPACE_ID", None)
        self.log = open(root / "app.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "ideoquant", "app", "--port", str(self.port),
                                      "--work-dir", str(self.work), *args], env=env, cwd=root,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> "AppProcess":
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the app exited with {self.proc.returncode}: {(self.root / 'app.log').read_text()}")
            try:
                with urllib.request.urlopen(self.url + "config", timeout=2):
                    return self
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"the app did not start: {(self.root / 'app.log').read_text()}")

    def work_files(self) -> list[str]:
        return [p.relative_to(self.work).as_posix() for p in self.work.rglob("*") if p.is_file()]

    def cached_repos(self) -> list[str]:
        hub = self.home / "hub"
        return sorted(p.name for p in hub.iterdir() if p.name.startswith("models--")) if hub.is_dir() else []

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def sources(fake_hub, fp8_source, tmp_path_factory):
    """On the fake Hub: the tiny FP8 release replica; a larger one (a job that lasts long enough to watch, queue
    behind and cancel); and a gated one the test token cannot read."""
    tiny = f"org/{_uid('tiny')}"
    fake_hub.hub.seed(tiny, _files(fp8_source))
    larger = testing.build_checkpoint(tmp_path_factory.mktemp("app_src") / "larger", fmt="fp8", layout="official",
                                      config={**testing.TINY_CONFIG, "num_layers": 6, "llm_features_dim": 4096})
    slow = f"org/{_uid('larger')}"
    fake_hub.hub.seed(slow, _files(larger))
    gated = f"org/{_uid('gated')}"
    fake_hub.hub.seed(gated, _files(fp8_source))
    fake_hub.hub.set_gated(gated, allowed_tokens=[])
    return {"tiny": tiny, "slow": slow, "gated": gated}


@pytest.fixture(scope="module")
def apps(fake_hub, sources, tmp_path_factory):
    """The app as a user runs it (one thread: the larger job lasts a few seconds), and a second one whose disk
    budget (12 MB) holds the tiny source's download (4.6 MB) and one of its outputs (5 MB each), not two. Both start
    at once."""
    main = AppProcess(tmp_path_factory.mktemp("app"), fake_hub.url, "--threads", "1")
    small = AppProcess(tmp_path_factory.mktemp("app_small_disk"), fake_hub.url, "--disk-budget", "12MB")
    try:
        yield {"main": main.wait_ready(), "small_disk": small.wait_ready()}
    finally:
        main.stop()
        small.stop()


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


# ---- page helpers -------------------------------------------------------------------------------------------
def _wait(driver, condition, timeout: float = 90, what: str = "", poll: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    _shot(driver, "timeout-" + re.sub(r"\W+", "-", what)[:40])
    pytest.fail(f"timed out waiting for {what}; page: {_text(driver, 'body')[:2000]}")


def _text(driver, css: str) -> str:
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)


def _shot(driver, name: str) -> Path:
    return screenshot(driver, "app", name)


def _open(driver, url: str, sign_in: bool = True) -> None:
    driver.get(url)
    _wait(driver, lambda: driver.execute_script(
        "const t = document.querySelector('#iq-target textarea, #iq-target input'); return t && t.placeholder;")
        not in (None, "", "ORG/NAME"), what="the page and its default target")
    # The button shows "Sign in" until Gradio has asked the server about this browser's session.
    deadline = time.time() + 3
    while time.time() < deadline and "Logout (user)" not in _text(driver, "body"):
        time.sleep(0.1)
    if sign_in and "Logout (user)" not in _text(driver, "body"):
        _button(driver, "Sign in with Hugging Face").click()  # Gradio's local stub: /login/huggingface -> back here
        _wait(driver, lambda: "Logout (user)" in _text(driver, "body"), what="the signed-in page")


def _button(driver, label: str):
    from selenium.webdriver.common.by import By

    return _wait(driver, lambda: next((b for b in driver.find_elements(By.TAG_NAME, "button")
                                       if b.text.strip() == label and b.is_displayed()), None), what=label)


def _fill(driver, elem_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    box.clear()
    box.send_keys(value)


def _choose_outputs(driver, wanted: set[str]) -> None:
    from selenium.webdriver.common.by import By

    for label in driver.find_elements(By.CSS_SELECTOR, "#iq-outputs label"):
        box = label.find_element(By.CSS_SELECTOR, "input[type=checkbox]")
        if (label.text.strip() in wanted) != box.is_selected():
            label.click()
    chosen = {lb.text.strip() for lb in driver.find_elements(By.CSS_SELECTOR, "#iq-outputs label")
              if lb.find_element(By.CSS_SELECTOR, "input").is_selected()}
    assert chosen == wanted


def _submit(driver, source: str, outputs: set[str], target: str) -> None:
    _fill(driver, "iq-source", source)
    _fill(driver, "iq-target", target)
    _choose_outputs(driver, outputs)
    _button(driver, "Convert and upload").click()


def _progress(driver) -> tuple:
    return tuple(driver.execute_script(
        "return Array.from(document.querySelectorAll('#iq-progress tr[data-fraction]'))"
        ".map(r => r.cells[0].innerText + '=' + r.dataset.fraction);"))


def _status(driver) -> str:
    return _text(driver, "#iq-status")


def _hub_writes(fake_hub, repo: str) -> list:
    return [(m, p) for m, p in fake_hub.hub.write_requests() if repo in p or m == "POST" and "repos/create" in p]


# ---- tests --------------------------------------------------------------------------------------------------
def test_convert_in_browser_then_hub_holds_verified_outputs(browser, apps, sources, fake_hub, tmp_path):
    app, target = apps["main"], f"user/{_uid('tiny-ideoquant')}"
    _open(browser, app.url)
    _shot(browser, "1-form")
    _submit(browser, sources["tiny"], {"INT8 W8A8 (torchao)", "Q4_K_M", "Q8_0"}, target)
    seen, running_shot = [], None
    link = None
    deadline = time.time() + 180
    while time.time() < deadline and link is None:
        state = _progress(browser)
        if state and (not seen or seen[-1] != state):
            seen.append(state)
            if running_shot is None:
                running_shot = _shot(browser, "2-running")
        link = browser.execute_script("const a = document.querySelector('#iq-result-link'); return a && a.href;")
        time.sleep(0.05)
    _shot(browser, "3-result")
    assert link == f"{fake_hub.url}/{target}", _status(browser)
    assert "done" in _status(browser) and target in _status(browser)
    # the progress moved: several states, per backbone and pass, the last one complete with bytes/s shown
    assert len(seen) >= 2, seen
    last = dict(x.split("=") for x in seen[-1])
    assert set(last) == {f"{p} · {c}" for p in ("INT8", "GGUF Q4_K_M, Q8_0")
                         for c in ("transformer", "unconditional_transformer")}
    assert all(float(v) == 1.0 for v in last.values())
    assert "/s" in _text(browser, "#iq-progress")
    assert "verified" in _text(browser, "#iq-summary")
    # the Hub holds the repo, every file of every output, and each output verifies after a download
    from huggingface_hub import snapshot_download

    listed = fake_hub.hub.files(target)
    folders = {"int8", "Q4_K_M", "Q8_0"}
    assert {f.split("/")[0] for f in listed if "/" in f} == folders
    local = Path(snapshot_download(target, local_dir=tmp_path / "download", endpoint=fake_hub.url, token=TEST_TOKEN))
    for folder in folders:
        m = yaml.safe_load((local / folder / "ideoquant.json").read_text())
        assert set(m["files"]) <= {f[len(folder) + 1:] for f in listed if f.startswith(folder + "/")}
        result = verify(local / folder)
        assert result.ok, result.problems
    card = (local / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == sources["tiny"] and meta["base_model_relation"] == "quantized"
    for folder in folders:
        assert f"`{folder}/`" in card
    assert f'"{target}", subfolder="int8/transformer"' in card
    assert f'hf_hub_download("{target}", "Q8_0/ideogram4-transformer-Q8_0.gguf")' in card
    assert app.work_files() == [] and app.cached_repos() == []


def test_two_sessions_queue_then_both_complete(browser, apps, sources, fake_hub):
    app = apps["main"]
    targets = [f"user/{_uid('first')}", f"user/{_uid('second')}"]
    first = browser.current_window_handle
    _open(browser, app.url)
    browser.switch_to.new_window("tab")  # a second page load is a second Gradio session
    second = browser.current_window_handle
    _open(browser, app.url)
    browser.switch_to.window(first)  # both pages ready: the second submits while the first job runs
    _submit(browser, sources["slow"], {"INT8 W8A8 (torchao)", "Q4_K_M"}, targets[0])
    _wait(browser, lambda: _status(browser), what="the first job running")
    browser.switch_to.window(second)
    _submit(browser, sources["tiny"], {"Q8_0"}, targets[1])
    queued = _wait(browser, lambda: re.search(r"queue: \d+/\d+", _text(browser, "body")), what="the queue position")
    _shot(browser, "4-queued")
    assert fake_hub.hub.repos.get(f"model/{targets[1]}") is None  # it waits: nothing of it exists yet
    for handle, target in ((first, targets[0]), (second, targets[1])):
        browser.switch_to.window(handle)
        _wait(browser, lambda: "done" in _status(browser), timeout=180, what=f"{target} done")
        assert target in _status(browser)
    assert {"int8/ideoquant.json", "Q4_K_M/ideoquant.json"} <= set(fake_hub.hub.files(targets[0]))
    assert "Q8_0/ideoquant.json" in fake_hub.hub.files(targets[1])
    assert queued.group(0)
    browser.switch_to.window(second)
    browser.close()
    browser.switch_to.window(first)


def test_cancel_leaves_no_repo_and_no_work_files(browser, apps, sources, fake_hub):
    app, target = apps["main"], f"user/{_uid('cancelled')}"
    _open(browser, app.url)
    _submit(browser, sources["slow"], {"INT8 W8A8 (torchao)", "Q4_K_M"}, target)
    _wait(browser, lambda: any(0 < float(x.split("=")[1]) for x in _progress(browser)), what="the conversion moving")
    _button(browser, "Cancel").click()
    _wait(browser, lambda: "cancelled" in _status(browser), timeout=60, what="cancelled")
    _shot(browser, "5-cancelled")
    assert "nothing was uploaded" in _status(browser)
    assert f"model/{target}" not in fake_hub.hub.repos
    assert app.work_files() == [] and app.cached_repos() == []


@pytest.mark.parametrize("case", ["inaccessible source", "existing target", "disk too small"])
def test_refusals_one_clear_message_nothing_uploaded(browser, apps, sources, fake_hub, case):
    target = f"user/{_uid('refused')}"
    app, source, expected = apps["main"], sources["tiny"], None
    if case == "inaccessible source":
        source, expected = sources["gated"], f"{sources['gated']} is gated: accept its licence"
    elif case == "existing target":
        fake_hub.hub.seed(target, {"README.md": b"# someone's work\n"})
        expected = f"Hub repo {target} already exists: choose a new name"
    else:
        app, expected = apps["small_disk"], "not enough disk space for this job"
    before = fake_hub.hub.head(target) if case == "existing target" else None
    fake_hub.hub.reset_log()
    _open(browser, app.url)
    _submit(browser, source, {"INT8 W8A8 (torchao)", "Q8_0"}, target)
    status = _wait(browser, lambda: "error:" in _status(browser) and _status(browser), what="the error")
    _shot(browser, "6-refused-" + case.replace(" ", "-"))
    assert expected in status and status.count("error:") == 1 and "nothing was uploaded" in status
    if case == "disk too small":
        assert "choose fewer outputs at once, e.g. int8, and the others in a second job" in status
    assert _hub_writes(fake_hub, target) == []
    assert (fake_hub.hub.head(target) if case == "existing target" else fake_hub.hub.repos.get(f"model/{target}")) \
        == before
    assert app.work_files() == [] and app.cached_repos() == []


def test_convert_api_for_gradio_client(apps, sources, fake_hub):
    """`/convert` is the page's job for scripts: same inputs, the status line first in what it returns."""
    from gradio_client import Client

    target = f"user/{_uid('api')}"
    status, *_ = Client(apps["main"].url, verbose=False).predict(
        sources["tiny"], ["q8_0"], target, True, None, api_name="/convert")
    assert status.startswith("**done**") and target in status and "private" in status
    assert fake_hub.hub.repos[f"model/{target}"]["private"] is True
    assert {"README.md", "Q8_0/ideoquant.json", "Q8_0/ideogram4-transformer-Q8_0.gguf"} <= set(
        fake_hub.hub.files(target))
    status, *_ = Client(apps["main"].url, verbose=False).predict(
        sources["tiny"], ["q8_0"], target, False, None, api_name="/convert")
    assert status.startswith("**error:**") and "already exists" in status


def test_time_limit_stops_the_job_like_cancel(hub_env, sources, tmp_path):
    """A job that outlives its time limit stops as Cancel stops it: no repo, no work files, one line saying why."""
    from ideoquant.webapp import jobs

    target = f"user/{_uid('late')}"
    job = jobs.Job(jobs.Request(sources["slow"], ["int8", "q4_k_m"], target), TEST_TOKEN, tmp_path / "work",
                   time_limit=0.5, threads=1).start()
    assert job.wait(120)
    snap = job.snapshot()
    assert snap["phase"] == "stopped", snap
    assert snap["error"] == "the job ran past the time limit and was stopped: nothing was uploaded, work files removed"
    assert f"model/{target}" not in hub_env.hub.repos
    assert not any(p.is_file() for p in (tmp_path / "work").rglob("*"))
    assert not jobs.cache_folder(sources["slow"]).exists()


def test_space_folder_runs_this_app():
    """space/ is a Space as the Hub reads it: Gradio SDK at the version tested here, OAuth with the repo scopes a job
    needs, and an app.py that serves this package's page."""
    import ast

    import gradio

    meta = yaml.safe_load((REPO / "space" / "README.md").read_text().split("---")[1])
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__
    assert meta["hf_oauth"] is True and {"read-repos", "write-repos", "manage-repos"} <= set(meta["hf_oauth_scopes"])
    app_py = REPO / "space" / meta["app_file"]
    calls = [n for n in ast.walk(ast.parse(app_py.read_text())) if isinstance(n, ast.ImportFrom)]
    assert [(n.module, [a.name for a in n.names]) for n in calls] == [("ideoquant.webapp.page", ["launch"])]
    assert "ideoquant[app]" in (REPO / "space" / "requirements.txt").read_text().split()


def test_shutdown_stops_running_jobs_and_cleans_up(hub_env, sources, tmp_path):
    """What the app does when it is stopped (Ctrl-C, SIGTERM): every running job cancelled, its cleanup waited for."""
    from ideoquant.webapp import jobs

    target = f"user/{_uid('shutdown')}"
    job = jobs.Job(jobs.Request(sources["slow"], ["int8", "q4_k_m"], target), TEST_TOKEN, tmp_path / "work",
                   threads=1).start()
    deadline = time.time() + 120
    while time.time() < deadline and job.phase in ("queued", "checking") and not job.done.is_set():
        time.sleep(0.01)
    jobs.stop_all()
    snap = job.snapshot()
    assert job.done.is_set() and snap["phase"] == "stopped", snap
    assert snap["error"] == "the app shut down: nothing was uploaded, work files removed"
    assert f"model/{target}" not in hub_env.hub.repos
    assert not any(p.is_file() for p in (tmp_path / "work").rglob("*"))
