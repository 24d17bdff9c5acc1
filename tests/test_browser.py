"""Headless Chromium (Selenium) on `hpo dashboard` over a PostgreSQL study written by real workers, and on the report.

Screenshots go to ``artifacts/``. Skips, saying why, where chromium / chromedriver are not installed (CI installs
the Debian packages ``chromium`` and ``chromium-driver``).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from .conftest import ROOT, hpo_cli, write_study

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "artifacts"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists() or not DRIVER.exists():
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (the test extras)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='hpo-chromium-')}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=opts)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_text(driver, pattern: str, timeout: float = 30) -> str:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = driver.find_element("tag name", "body").text
        if re.search(pattern, text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} not on the page; it shows: {text[:500]!r}")


def _severe(driver) -> list[dict]:  # noqa: ANN001
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def test_dashboard_shows_study_written_by_workers(browser, postgres_url: str, tmp_path: Path) -> None:  # noqa: ANN001
    name = f"browser-{os.getpid()}"
    study_file = write_study(tmp_path / "s.yaml", name, budget={"n_trials": 4})
    res = hpo_cli("run", str(study_file), "--workers", "2", env={"HPO_STORAGE": postgres_url}, timeout=600)
    assert res.returncode == 0, res.stderr
    study = optuna.load_study(study_name=name, storage=postgres_url)
    n = len(study.trials)
    assert n == 4
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpo", "dashboard", "--port", str(port)],
        env={**os.environ, "HPO_STORAGE": postgres_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                time.sleep(0.5)
        browser.get(f"http://127.0.0.1:{port}/dashboard")
        _wait_text(browser, re.escape(name))
        browser.save_screenshot(str(ARTIFACTS / "dashboard-studies.png"))
        browser.get(f"http://127.0.0.1:{port}/dashboard/studies/{study._study_id}/trials")
        _wait_text(browser, rf"\b{n} Trials\b")
        browser.save_screenshot(str(ARTIFACTS / "dashboard-trials.png"))
        errors = _severe(browser)
        assert errors == [], errors
        # the served dashboard is read-only
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/studies/{study._study_id}", method="DELETE")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=5)
        assert refused.value.code == 403
        assert len(optuna.load_study(study_name=name, storage=postgres_url).trials) == n
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_report_renders_every_plot(browser, sqlite_url: str, tmp_path: Path) -> None:  # noqa: ANN001
    from analyst_helpers import mixed_study

    from hpo.report import write_report

    mixed_study(sqlite_url, "browser-report", n=40)
    path = write_report(sqlite_url, "browser-report", tmp_path / "report.html")
    ids = re.findall(r'id="(plot-[^"]+)"', path.read_text())
    assert len(ids) >= 8
    browser.get("about:blank")
    browser.get_log("browser")  # drop what earlier pages logged
    browser.get(path.as_uri())
    deadline = time.monotonic() + 60
    missing = ids
    while missing and time.monotonic() < deadline:
        missing = [i for i in ids if not browser.find_elements("css selector", f'[id="{i}"] svg.main-svg')]
        time.sleep(0.5)
    browser.save_screenshot(str(ARTIFACTS / "report.png"))
    assert missing == [], f"plots not rendered: {missing}"
    errors = _severe(browser)
    assert errors == [], errors
    assert "lr matters most" in browser.find_element("tag name", "body").text
