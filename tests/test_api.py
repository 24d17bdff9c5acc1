"""The notebook API: ``hpo.run`` runs a study in this process (real training, real SQLite) and returns the study."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import hpo
from hpo.spec import load_spec

from .conftest import write_study


def test_run_in_process_returns_the_study(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    path = write_study(tmp_path / "nb.yaml", "notebook", budget={"n_trials": 5})
    study = hpo.run(str(path), storage=url, n_trials=3, threads=1, progress=False)
    assert isinstance(study, optuna.Study) and study.study_name == "notebook"
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert 0.0 <= study.best_value <= 1.0 and "lr" in study.best_params
    # resumed from a StudySpec up to the file's budget, with the progress bar drawn
    study = hpo.run(load_spec(path), storage=url, threads=1)
    assert len(study.trials) == 5 and all(t.state.is_finished() for t in study.trials)


def test_run_draws_a_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    path = write_study(tmp_path / "bar.yaml", "bar", budget={"n_trials": 2})
    hpo.run(path, storage=url, threads=1)
    out = capsys.readouterr().out  # rich's console on stdout, as in a notebook cell
    assert "2/2" in out and "bar" in out


def test_run_refuses_a_bad_file_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nobjective: {kind: m:f}\n")
    with pytest.raises(hpo.HpoError, match=r"direction: required"):
        hpo.run(bad, storage=f"sqlite:///{tmp_path / 'a.db'}")
    assert not (tmp_path / "a.db").exists()


def test_report_figures_of_the_returned_study(tmp_path: Path) -> None:
    import hpo.report

    if not hasattr(hpo.report, "figures"):
        pytest.skip("hpo.report.figures (issue 15) is not in this tree")
    path = write_study(tmp_path / "fig.yaml", "fig", budget={"n_trials": 4})
    study = hpo.run(path, storage=f"sqlite:///{tmp_path / 'a.db'}", threads=1, progress=False)
    figs = hpo.report.figures(study)
    assert figs and all(hasattr(f, "to_html") for f in figs.values())


def test_an_interrupt_stops_the_run_and_returns_the_study(tmp_path: Path) -> None:
    """SIGINT (Kernel > Interrupt) during a run: the running trial is stopped and re-queued, the study returned."""
    import os
    import signal
    import sys
    import threading
    import time

    markers = tmp_path / "markers"
    markers.mkdir()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        path = write_study(
            tmp_path / "int.yaml",
            "interrupted",
            metric="value",
            objective={"kind": "worker_objectives:sleepy", "sleep": 5.0, "marker_dir": str(markers)},
            space={"x": {"type": "float", "low": 0.0, "high": 1.0}},
            budget={"n_trials": 50},
        )

        def interrupt_mid_trial() -> None:  # once the first trial runs (its marker), whatever the machine's load
            while not any(markers.iterdir()):
                time.sleep(0.05)
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGINT)

        timer = threading.Thread(target=interrupt_mid_trial, daemon=True)
        before = signal.getsignal(signal.SIGINT)  # Python's default; pytest-xdist's worker processes ignore SIGINT
        timer.start()
        study = hpo.run(path, storage=f"sqlite:///{tmp_path / 'a.db'}", progress=False)
        timer.join()
    finally:
        sys.path.remove(str(Path(__file__).resolve().parent))
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 0 and states.count(TrialState.FAIL) == 1  # stopped mid-trial
    assert TrialState.RUNNING not in states and TrialState.WAITING in states  # the stopped trial waits, re-queued
    assert signal.getsignal(signal.SIGINT) is before  # restored
