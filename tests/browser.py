"""A real headless browser for tests: Debian's chromium driven by selenium through Debian's chromedriver (never a
browser download), a fresh profile, no network of its own. Screenshots go to tests/artifacts/ (ignored by git)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1700")


@contextlib.contextmanager
def chromium():
    """A selenium driver for headless chromium with a fresh profile; console messages kept (driver.get_log)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        opts = Options()
        opts.binary_location = CHROMIUM
        for flag in (*BROWSER_FLAGS, f"--user-data-dir={profile}"):
            opts.add_argument(flag)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        driver.set_page_load_timeout(60)
        try:
            yield driver
        finally:
            driver.quit()


def screenshot(driver, folder: str, name: str) -> Path:
    """A full-window PNG of the page under tests/artifacts/<folder>/, the path printed for the test log."""
    path = ARTIFACTS / folder / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path
