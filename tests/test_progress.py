"""Workers say what they do: one plain log line per finished trial off a terminal, nothing with ``--quiet``.

Real ``hpo worker`` / ``hpo run`` processes whose stderr is a pipe (not a terminal), as under docker or Slurm.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import optuna

from .conftest import TEST_OBJECTIVES, hpo_cli, write_study
from .timing import ceiling

TESTS = Path(__file__).resolve().parent
ENV = {
    "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    "HPO_ALLOW_OBJECTIVES": TEST_OBJECTIVES,
}
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d trial (\d+) (COMPLETE|PRUNED|FAIL) value=(\S+) in [\d.]+s")


def sleepy(tmp_path: Path, name: str, n: int) -> Path:
    return write_study(
        tmp_path / f"{name}.yaml",
        name,
        direction="maximize",
        metric="value",
        objective={"kind": "worker_objectives:sleepy", "sleep": 0.05},
        space={"x": {"type": "float", "low": 0.0, "high": 1.0}},
        sampler={"name": "random", "seed": 0},
        budget={"n_trials": n},
    )


def worker(path: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hpo", "worker", str(path), "--threads", "1", *extra],
        env={**os.environ, **ENV, "HPO_STORAGE": url},
        capture_output=True,
        text=True,
        timeout=ceiling(300),
    )


def test_worker_off_a_terminal_writes_one_line_per_trial(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    res = worker(sleepy(tmp_path, "lines", 5), url)
    assert res.returncode == 0, res.stderr
    lines = [m for m in map(LINE.match, res.stderr.splitlines()) if m]
    assert len(lines) == 5, res.stderr
    trials = {t.number: t for t in optuna.load_study(study_name="lines", storage=url).trials}
    assert sorted(int(m[1]) for m in lines) == sorted(trials)
    for m in lines:  # what the line says is what is stored
        t = trials[int(m[1])]
        assert m[2] == t.state.name and float(m[3]) == float(f"{t.value:.6g}")
    assert "━" not in res.stderr  # no progress bar drawn into a log file
    assert "worker done" in res.stdout


def test_quiet_worker_prints_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    res = worker(sleepy(tmp_path, "quiet", 3), url, "--quiet")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""
    assert len(optuna.load_study(study_name="quiet", storage=url).trials) == 3


def test_run_lists_each_trial_and_points_at_hpo_trials(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    res = hpo_cli("run", str(sleepy(tmp_path, "runlines", 3)), "--storage", url, env=ENV)
    assert res.returncode == 0, res.stderr
    numbers = [int(m[1]) for m in re.finditer(r"^trial (\d+) COMPLETE value=", res.stderr, flags=re.M)]
    assert sorted(numbers) == [0, 1, 2], res.stderr
    assert "read it with: hpo trials runlines" in res.stdout and "optuna trials" not in res.stdout


def test_worker_on_a_terminal_shows_a_live_progress_view(tmp_path: Path) -> None:
    """Under a pseudo-terminal: the study's progress bar, redrawn, with the trials' lines above it."""
    import pty

    url = f"sqlite:///{tmp_path / 'p.db'}"
    path = sleepy(tmp_path, "tty", 3)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpo", "worker", str(path), "--threads", "1"],
        env={**os.environ, **ENV, "HPO_STORAGE": url, "COLUMNS": "100", "TERM": "xterm"},
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the worker exited and closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=ceiling(120)) == 0
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert "━" in screen and "3/3" in screen  # the bar, complete
    lines = {int(m[1]) for m in re.finditer(r"trial (\d+) COMPLETE value=", screen)}
    assert lines == {0, 1, 2}


def test_the_bar_counts_trials_by_the_budgets_rule(tmp_path: Path) -> None:
    """A trial failed and re-queued gives its slot to its copy: three counted trials of a budget of 3 read 3/3
    (and "failed 1"), not 4/3, which would look like the budget over-run."""
    import io

    from rich.console import Console

    from hpo.progress import StudyProgress
    from hpo.storage import open_storage
    from hpo.worker import fail_and_requeue

    url = f"sqlite:///{tmp_path / 'p.db'}"
    storage = open_storage(url)
    study = optuna.create_study(study_name="bar", storage=storage, direction="maximize")
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    reaped = study.ask(x)
    assert fail_and_requeue(study, reaped._trial_id, {"reason": "reaped"})[1]  # failed, its copy waits
    for _ in range(3):  # the copy first, then two new trials
        trial = study.ask(x)
        study.tell(trial, trial.params["x"])
    out = io.StringIO()
    with StudyProgress("bar", url, 3, console=Console(file=out, width=100), lines=False, storage=storage) as poll:
        poll()
    screen = out.getvalue()
    assert "3/3" in screen and "4/3" not in screen and "failed 1" in screen, screen
    storage.engine.dispose()
