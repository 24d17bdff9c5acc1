"""README's first command, run as written on a fresh clone of the committed tree: it installs hpo in a new virtual
environment, runs the lesson's study on the embedded SQLite default and writes its report. (The second command, the tests, is what
``.ci/run`` runs.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest

from hpo.spec import load_spec

from .conftest import ROOT
from .timing import ceiling


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)[:2]


def test_readme_starts_with_the_two_commands() -> None:
    run, test = readme_commands()
    assert "hpo run studies/lesson.yaml && hpo report lesson" in run and "pip install torch==2.13.0" in run
    assert test.endswith("pytest -n 3") and "pip install -q torch==2.13.0" in test  # the whole suite, 3 processes
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci, ".ci/run must run README's test command word for word"


def test_readme_counts_no_tests_by_hand() -> None:
    """How many tests run and skip changes with every commit and every machine: README says where the counts come
    from (``pytest --collect-only -q``, ``pytest -rs``), never a typed number of them."""
    text = (ROOT / "README.md").read_text()
    typed = re.findall(r"\b\d[\d,]*\s+(?:of\s+\d[\d,]*\s+)?(?:tests?|skips?|skipped)\b", text)
    assert typed == [], f"README types test counts: {typed}"
    assert "pytest --collect-only -q" in text


@pytest.mark.slow(seconds=200)
def test_readme_main_command_on_a_fresh_clone(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to clone")
    clone = tmp_path / "hpo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    run, _ = readme_commands()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "HPO_STORAGE", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    res = subprocess.run(["bash", "-c", run], cwd=clone, env=env, capture_output=True, text=True, timeout=ceiling(1500))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "best trial #" in res.stdout
    study = optuna.load_study(study_name="lesson", storage=f"sqlite:///{clone / 'hpo.db'}")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == load_spec(clone / "studies" / "lesson.yaml").budget.n_trials
    report = (clone / "lesson.html").read_text()
    assert "supported" in report or "refuted" in report
