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
from .timing import ceiling

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
    deadline = time.monotonic() + ceiling(timeout)
    text = ""
    while time.monotonic() < deadline:
        text = driver.find_element("tag name", "body").text
        if re.search(pattern, text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} not on the page after {ceiling(timeout):.0f} s; it shows: {text[:500]!r}")


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
        deadline, seen = time.monotonic() + ceiling(60), ""
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=ceiling(2))
                break
            except OSError as exc:
                seen = repr(exc)
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, f"the dashboard did not answer on port {port}: {seen}"
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
            urllib.request.urlopen(req, timeout=ceiling(5))
        assert refused.value.code == 403
        assert len(optuna.load_study(study_name=name, storage=postgres_url).trials) == n
    finally:
        proc.terminate()
        proc.wait(timeout=ceiling(10))


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
    deadline = time.monotonic() + ceiling(60)
    missing = ids
    while missing and time.monotonic() < deadline:
        missing = [i for i in ids if not browser.find_elements("css selector", f'[id="{i}"] svg.main-svg')]
        time.sleep(0.5)
    browser.save_screenshot(str(ARTIFACTS / "report.png"))
    assert missing == [], f"plots not rendered: {missing}"
    errors = _severe(browser)
    assert errors == [], errors
    assert "learning rate matters most" in browser.find_element("tag name", "body").text


#: JavaScript: for each plot on the page, its id, trace names and how many points each trace draws
_PLOTS_JS = """
return Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => ({
  id: d.id, drawn: d.querySelector('svg.main-svg') !== null,
  traces: (d.data || []).map(t => ({name: t.name || '', n: (t.x || t.y || []).length}))}));
"""


def _open_report(browser, path: Path, shot: str) -> list[dict]:  # noqa: ANN001
    """Load a report, wait until every plot is drawn, screenshot the whole page; the plots as _PLOTS_JS sees them."""
    browser.get("about:blank")
    browser.get_log("browser")
    browser.get(path.as_uri())
    ids = re.findall(r'id="(plot-[^"]+)"', path.read_text())
    deadline = time.monotonic() + ceiling(90)
    plots: list[dict] = []
    while time.monotonic() < deadline:
        plots = browser.execute_script(_PLOTS_JS)
        if len(plots) == len(ids) and all(p["drawn"] for p in plots):
            break
        time.sleep(0.5)
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1300, min(height + 100, 16000))
    time.sleep(1)
    browser.save_screenshot(str(ARTIFACTS / shot))
    browser.set_window_size(1400, 1000)
    assert sorted(p["id"] for p in plots) == sorted(ids)
    assert all(p["drawn"] for p in plots), [p["id"] for p in plots if not p["drawn"]]
    empty = [p["id"] for p in plots if not any(t["n"] > 0 for t in p["traces"])]
    assert empty == [], f"plots drawn without data: {empty}"
    errors = _severe(browser)
    assert errors == [], errors
    return plots


@pytest.mark.slow(seconds=60)
def test_lesson_and_grokking_reports_read_in_chromium(browser, lesson_url: str, tmp_path: Path) -> None:  # noqa: ANN001
    """The lesson's report (of the session's lesson run, tests/conftest.py) and a grokking report, as a learner opens
    them: every plot drawn with data, the chance line, the verdict sentences next to the plots, and training /
    validation accuracy over steps."""
    import yaml

    from .conftest import STUDIES

    res = hpo_cli("report", str(STUDIES / "lesson.yaml"), "--storage", lesson_url, "-o", str(tmp_path / "lesson.html"))
    assert res.returncode == 0, res.stderr
    plots = {p["id"]: p for p in _open_report(browser, tmp_path / "lesson.html", "report-lesson.png")}
    for param in ("batch_size", "lr", "epochs"):
        names = [t["name"] for t in plots[f"plot-effect-{param}"]["traces"]]
        assert "chance (0.5)" in names and "mean ± sd over seeds" in names, names
    assert {"plot-interaction", "plot-optimizer", "plot-curves", "plot-importances"} <= set(plots)
    sentences = browser.find_elements("css selector", ".verdict .sentence")
    texts = [e.text for e in sentences]
    assert len(texts) == 6  # three predictions, in the summary and next to their plots
    assert all(re.search(r"val_accuracy .*\d\.\d+", t) for t in texts), texts
    for param in ("batch_size", "lr", "epochs"):  # each section's verdict sits right above its plot
        link = browser.find_element("css selector", f"h3 + .verdict a[href='#plot-effect-{param}']")
        assert link.is_displayed()
    verdicts = [e.text for e in browser.find_elements("css selector", ".verdict .supported, .verdict .refuted")]
    assert len(verdicts) == 6 and not browser.find_elements("css selector", ".verdict .unknown")
    assert "Glossary" in browser.find_element("tag name", "body").text

    doc = {
        "name": "grok-browser",
        "direction": "minimize",
        "metric": "steps_to_generalise",
        "objective": {
            "kind": "grokking",
            "data": {"source": "modular", "p": 47, "op": "+", "train_fraction": 0.7, "seed": 0},
            "model": {"kind": "mlp", "layers": [128, 128]},
            "steps": 250,
            "eval_every": 25,
            "lr": 0.01,
            "threads": 1,
        },
        "space": {"weight_decay": {"type": "float", "low": 0.1, "high": 10, "log": True}},
        "design": {"baseline": {"weight_decay": 3.0}, "sweeps": {"weight_decay": [0.3, 3.0]}, "seeds": 2},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "budget": {"n_trials": 4},
    }
    (tmp_path / "grok.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    url = f"sqlite:///{tmp_path / 'grok.db'}"
    res = hpo_cli("run", str(tmp_path / "grok.yaml"), "--storage", url, timeout=900)
    assert res.returncode == 0, res.stderr
    res = hpo_cli("report", "grok-browser", "--storage", url, "-o", str(tmp_path / "grok.html"))
    assert res.returncode == 0, res.stderr
    plots = {p["id"]: p for p in _open_report(browser, tmp_path / "grok.html", "report-grokking.png")}
    curves = plots["plot-grokking-curves"]["traces"]
    train = [t for t in curves if t["name"] == "training accuracy"]
    val = [t for t in curves if t["name"] == "validation accuracy"]
    assert len(train) == len(val) == 4 and all(t["n"] >= 2 for t in train + val)
    assert any(t["name"] == "step it generalised" for t in curves)  # weight decay 3 groks within 250 steps
    assert "plot-curves" not in plots  # the censored running metric is not drawn as a learning curve


def test_pareto_front_draws_its_points(browser, sqlite_url: str, tmp_path: Path) -> None:  # noqa: ANN001
    """A study with several objectives: the report's Pareto-front plot draws every complete trial, the front in a
    trace of its own, and the page logs no error."""
    import hpo
    from hpo.report import write_report
    from hpo.spec import parse_spec

    from .test_multi_objective import user_study

    study = hpo.run(parse_spec(user_study("browser-front")), storage=sqlite_url, progress=False)
    path = write_report(sqlite_url, "browser-front", tmp_path / "front.html")
    plots = {p["id"]: p for p in _open_report(browser, path, "report-pareto.png")}
    traces = {t["name"]: t["n"] for t in plots["plot-pareto"]["traces"]}
    assert traces == {
        "other trials": 12 - len(study.best_trials),
        f"Pareto front ({len(study.best_trials)} trials)": len(study.best_trials),
    }
    drawn = browser.execute_script("return document.querySelectorAll('#plot-pareto .scatterlayer .point').length")
    assert drawn == 12
