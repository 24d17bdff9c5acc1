"""Optuna's documented example shapes (tests/optuna_examples_objectives.py) run through the real ``hpo run --workers
2`` on PostgreSQL, with what an Optuna user expects of them: pruning with report/should_prune and with an
integration-style callback, several objectives without ``metrics:``, ``enqueue_trial`` by the objective's own
parameter names, a sampler's ``constraints_func``, ``callbacks:`` with ``study.stop()``, a refused run that writes
nothing, and Ctrl-C on a plain objective that never checks in. Where plain Optuna answers the same objective, its
study is run side by side and compared. (The return-value table, NaN/None/inf/str/numpy/TrialPruned("msg"), is
tests/test_optuna_semantics.py's.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from . import optuna_examples_objectives as examples
from .conftest import hpo_cli
from .timing import ceiling

TESTS = Path(__file__).resolve().parent
MODULE = "optuna_examples_objectives"
ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def study_file(path: Path, name: str, kind: str, n_trials: int, **extra: Any) -> Path:
    doc: dict[str, Any] = {"name": name}
    if "directions" not in extra:
        doc["direction"] = "minimize"
    doc.update({"objective": {"kind": f"{MODULE}:{kind}"}, "sampler": {"name": "random", "seed": 0}})
    doc["budget"] = {"n_trials": n_trials}
    doc.update(extra)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(path: Path, url: str, *args: str, workers: int = 2) -> subprocess.CompletedProcess[str]:
    res = hpo_cli("run", str(path), "--storage", url, "--workers", str(workers), *args, env=ENV)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def finished(name: str, url: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, asserting none was left RUNNING or WAITING."""
    trials = optuna.load_study(study_name=name, storage=url).trials
    assert all(t.state.is_finished() for t in trials), [(t.number, t.state) for t in trials]
    return trials


def plain_optuna(objective: Any, n_trials: int, **kw: Any) -> optuna.Study:
    kw.setdefault("direction", "minimize")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), **kw)
    study.optimize(objective, n_trials=n_trials)
    return study


# --------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("kind", ["basic_pruning", "boosting"])
def test_pruning_as_in_optuna(postgres_url: str, study_name: str, tmp_path: Path, kind: str) -> None:
    """report/should_prune in the objective, and in an integration-style callback that raises TrialPruned("...")."""
    n = 14
    pruner = {"name": "median", "kwargs": {"n_startup_trials": 3, "n_warmup_steps": 1}}
    res = run(study_file(tmp_path / "p.yaml", study_name, kind, n, pruner=pruner), postgres_url)
    assert res.returncode == 0, res.stderr
    ours = finished(study_name, postgres_url)
    assert len(ours) == n  # the budget exactly
    theirs = plain_optuna(getattr(examples, kind), n, pruner=optuna.pruners.MedianPruner(3, 1))
    for trials in (ours, theirs.trials):
        pruned = [t for t in trials if t.state == TrialState.PRUNED]
        assert pruned and all(t.intermediate_values for t in pruned)  # pruned trials keep their curves
        assert all(t.value == t.intermediate_values[max(t.intermediate_values)] for t in pruned)  # as Optuna stores
    assert {t.state for t in ours} <= {TrialState.COMPLETE, TrialState.PRUNED}
    if kind == "boosting":  # the callback's message is kept where hpo keeps a pruned trial's why
        assert all(
            t.user_attrs["reason"].startswith("Trial was pruned at iteration")
            for t in ours
            if t.state == TrialState.PRUNED
        )


# --------------------------------------------------------------------------- several objectives


def test_several_objectives_need_only_directions(postgres_url: str, study_name: str, tmp_path: Path) -> None:
    path = study_file(tmp_path / "m.yaml", study_name, "quadratic_pair", 10, directions=["minimize", "minimize"])
    res = run(path, postgres_url)
    assert res.returncode == 0, res.stderr
    study = optuna.load_study(study_name=study_name, storage=postgres_url)
    assert len(finished(study_name, postgres_url)) == 10
    best = hpo_cli("best", study_name, "--storage", postgres_url, "-f", "json", env=ENV)
    assert best.returncode == 0, best.stderr
    assert sorted(r["number"] for r in json.loads(best.stdout)) == sorted(t.number for t in study.best_trials)


# --------------------------------------------------------------------------- enqueue_trial


def test_enqueue_by_the_objectives_own_names(postgres_url: str, study_name: str, tmp_path: Path) -> None:
    """No ``space:``: the values reach the objective's own suggest calls, as Optuna's enqueue_trial hands them."""
    path = study_file(tmp_path / "e.yaml", study_name, "own_names", 4, enqueue=[{"x": 1.5, "kind": "b"}])
    assert hpo_cli("create", str(path), "--storage", postgres_url, env=ENV).returncode == 0
    queued = hpo_cli("enqueue", study_name, "-p", "x=-2.5", "-p", "kind=a", "--storage", postgres_url, env=ENV)
    assert queued.returncode == 0, queued.stderr
    bad = hpo_cli("enqueue", study_name, "-p", "x=[1]", "--storage", postgres_url, env=ENV)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --param x: give a number")
    res = run(path, postgres_url)
    assert res.returncode == 0, res.stderr
    by_number = {t.number: t for t in finished(study_name, postgres_url)}
    assert by_number[0].params == {"x": 1.5, "kind": "b"} and by_number[0].value == 2.25
    assert by_number[1].params == {"x": -2.5, "kind": "a"} and by_number[1].value == 7.25
    plain = optuna.create_study()
    plain.enqueue_trial({"x": 1.5, "kind": "b"})
    plain.optimize(examples.own_names, n_trials=1)
    assert plain.trials[0].params == by_number[0].params  # what Optuna gives the same objective


def test_a_narrower_space_is_said_not_silent(sqlite_url: str, tmp_path: Path) -> None:
    space = {"x": {"type": "float", "low": 0.0, "high": 1.0}}
    path = study_file(tmp_path / "n.yaml", "narrow", "own_names", 2, space=space)
    res = run(path, sqlite_url, workers=1)
    assert res.returncode == 0, res.stderr
    assert "parameter 'x': the objective asks FloatDistribution(high=10.0" in res.stderr
    assert "the study file's space.x says FloatDistribution(high=1.0" in res.stderr
    assert res.stderr.count("the space decides") == 1  # once per worker and name
    assert all(0.0 <= t.params["x"] <= 1.0 for t in finished("narrow", sqlite_url))


# --------------------------------------------------------------------------- a sampler's callable kwargs


def test_constraints_func_as_a_reference(postgres_url: str, study_name: str, tmp_path: Path) -> None:
    sampler = {"name": "tpe", "seed": 0, "kwargs": {"constraints_func": f"{MODULE}:x_at_most_3"}}
    path = study_file(tmp_path / "c.yaml", study_name, "maximise_x", 12, direction="maximize", sampler=sampler)
    res = run(path, postgres_url)
    assert res.returncode == 0, res.stderr
    study = optuna.load_study(study_name=study_name, storage=postgres_url)
    assert any(t.params["x"] > 3 for t in study.trials)  # infeasible trials were drawn ...
    assert study.best_trial.params["x"] <= 3  # ... and Optuna's best is feasible
    assert f"best trial #{study.best_trial.number}:" in res.stdout


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (3, "sampler.kwargs.constraints_func: Optuna calls it, so name a function as module:function (got 3)"),
        ("no_such_module_q:f", "sampler.kwargs.constraints_func: cannot import 'no_such_module_q'"),
        (f"{MODULE}:maximise_x_typo", f"sampler.kwargs.constraints_func: '{MODULE}' has no function"),
        (f"{MODULE}:record", f"{MODULE}:record cannot be called as constraints_func(trial)"),
    ],
)
def test_a_bad_constraints_func_is_one_line(sqlite_url: str, tmp_path: Path, value: Any, said: str) -> None:
    sampler = {"name": "tpe", "kwargs": {"constraints_func": value}}
    res = run(study_file(tmp_path / "b.yaml", "bad", "maximise_x", 2, sampler=sampler), sqlite_url, workers=1)
    assert res.returncode == 2 and said in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not Path(sqlite_url.removeprefix("sqlite:///")).exists()  # refused before anything was written


# --------------------------------------------------------------------------- callbacks and study.stop()


def test_callbacks_and_study_stop(postgres_url: str, study_name: str, tmp_path: Path) -> None:
    callbacks = [f"{MODULE}:record", f"{MODULE}:stop_after_four"]
    path = study_file(tmp_path / "cb.yaml", study_name, "maximise_x", 30, direction="maximize", callbacks=callbacks)
    res = run(path, postgres_url)
    assert res.returncode == 0, res.stderr
    trials = finished(study_name, postgres_url)
    assert all(t.state == TrialState.COMPLETE for t in trials)  # stopped cleanly: nothing failed after the stop
    assert 4 <= len(trials) < 30  # each worker stopped after its trial that saw four complete
    attrs = optuna.load_study(study_name=study_name, storage=postgres_url).user_attrs
    assert {f"seen.{t.number}": ["COMPLETE", t.value] for t in trials} == {
        k: v for k, v in attrs.items() if k.startswith("seen.")
    }  # every trial, frozen after it was stored, passed to the callback once


def test_study_stop_in_the_objective_as_plain_optuna(postgres_url: str, study_name: str, tmp_path: Path) -> None:
    res = run(study_file(tmp_path / "s.yaml", study_name, "stops_at_two", 10, direction="maximize"), postgres_url, workers=1)  # fmt: skip
    assert res.returncode == 0, res.stderr
    ours = finished(study_name, postgres_url)
    theirs = plain_optuna(examples.stops_at_two, 10, direction="maximize").trials
    assert [t.state for t in ours] == [t.state for t in theirs] == [TrialState.COMPLETE] * 3
    assert "stopped by study.stop() (in the objective or a callback) before the budget was met" in res.stdout


def test_callbacks_are_code_a_worker_by_name_must_allow(postgres_url: str, study_name: str, tmp_path: Path) -> None:
    path = study_file(tmp_path / "t.yaml", study_name, "maximise_x", 1, callbacks=[f"{MODULE}:record"])
    assert hpo_cli("create", str(path), "--storage", postgres_url, env=ENV).returncode == 0
    by_name = ("worker", study_name, "--storage", postgres_url, "--objective", f"{MODULE}:maximise_x")
    refused = hpo_cli(*by_name, env={**ENV, "HPO_ALLOW_OBJECTIVES": ""})
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"callbacks.0 '{MODULE}:record' is code named by the database" in refused.stderr
    assert not optuna.load_study(study_name=study_name, storage=postgres_url).trials  # nothing taken
    allowed = hpo_cli(*by_name, "--objective", f"{MODULE}:record", env={**ENV, "HPO_ALLOW_OBJECTIVES": ""})
    assert allowed.returncode == 0, allowed.stderr
    assert "seen.0" in optuna.load_study(study_name=study_name, storage=postgres_url).user_attrs
    sampler = {"name": "tpe", "kwargs": {"constraints_func": f"{MODULE}:x_at_most_3"}}
    path = study_file(tmp_path / "s.yaml", f"{study_name}-s", "maximise_x", 1, sampler=sampler)
    assert hpo_cli("create", str(path), "--storage", postgres_url, env=ENV).returncode == 0
    by_name = ("worker", f"{study_name}-s", "--storage", postgres_url, "--objective", f"{MODULE}:maximise_x")
    refused = hpo_cli(*by_name, env={**ENV, "HPO_ALLOW_OBJECTIVES": ""})
    assert refused.returncode == 2
    assert f"sampler.kwargs.constraints_func '{MODULE}:x_at_most_3' is code named by the database" in refused.stderr


# --------------------------------------------------------------------------- a refused run writes nothing


def _digest(db: Path) -> dict[str, tuple[int, str]]:
    """Every table of a SQLite file: its row count and a digest of its rows."""
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        out = {}
        for table in tables:
            rows = con.execute(f'SELECT * FROM "{table}" ORDER BY 1').fetchall()
            out[table] = (len(rows), hashlib.sha256(repr(rows).encode()).hexdigest())
    return out


def test_a_refused_run_leaves_a_plain_optuna_study_as_it_was(sqlite_url: str, tmp_path: Path) -> None:
    study = optuna.create_study(study_name="plain", storage=sqlite_url, direction="minimize")
    study.optimize(examples.maximise_x, n_trials=3)
    db = Path(sqlite_url.removeprefix("sqlite:///"))
    before = _digest(db)
    path = study_file(tmp_path / "p.yaml", "plain", "maximise_x", 5, direction="maximize")
    res = run(path, sqlite_url, workers=1)
    assert res.returncode == 2
    assert "study 'plain' is stored with direction minimize, the file says maximize" in res.stderr
    assert _digest(db) == before  # every table: same rows, byte for byte
    by_name = hpo_cli("worker", "plain", "--storage", sqlite_url, env=ENV)
    assert by_name.returncode == 2 and "was not created by hpo" in by_name.stderr  # no budget to run to


# --------------------------------------------------------------------------- Ctrl-C on a plain objective


@pytest.mark.parametrize(
    ("command", "sig", "workers"),
    [("run", signal.SIGINT, 2), ("worker", signal.SIGTERM, 1)],
    ids=["ctrl-c-to-hpo-run", "sigterm-to-hpo-worker"],
)
def test_ctrl_c_stops_a_plain_objective_at_once(
    postgres_url: str, study_name: str, tmp_path: Path, command: str, sig: signal.Signals, workers: int
) -> None:
    """A 60 s objective that never calls check_stop(): Ctrl-C to ``hpo run --workers 2`` (forwarded to its workers)
    or SIGTERM to one ``hpo worker`` (as Kubernetes and Slurm send it) ends it well inside --stop-timeout, each
    running trial failed ``interrupted`` and re-queued once."""
    stop_timeout = 20.0
    path = study_file(tmp_path / "c.yaml", study_name, "sleeps_a_minute", 4, direction="maximize")
    cmd = [sys.executable, "-m", "hpo", command, str(path), "--storage", postgres_url]
    cmd += ["--workers", "2"] if command == "run" else []
    proc = subprocess.Popen(
        [*cmd, "--stop-timeout", str(stop_timeout)],
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + ceiling(120)
        while time.monotonic() < deadline:  # both workers inside their objective
            with contextlib.suppress(KeyError):
                study = optuna.load_study(study_name=study_name, storage=postgres_url)
                if len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))) == workers:
                    break
            time.sleep(0.3)
        else:
            pytest.fail("the workers never started their trials")
        time.sleep(1.0)  # inside time.sleep(60) of the objective, past the parameter's suggest
        sent = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=ceiling(stop_timeout + 60))
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err  # stopped before the budget: run again
    assert took < stop_timeout, took  # not the stop timeout's full wait
    assert "still running" not in err and "Traceback" not in err
    trials = optuna.load_study(study_name=study_name, storage=postgres_url).trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == workers and all(t.user_attrs["reason"] == "interrupted" for t in failed)
    copies = [t.user_attrs.get("requeued_from") for t in trials if t.state == TrialState.WAITING]
    assert sorted(copies) == sorted(t.number for t in failed)  # each re-queued once


# --------------------------------------------------------------------------- the objective's module


def hpo_script(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The ``hpo`` console script's view (``-P``: the current folder is not on the import path, as for ``hpo``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-P", "-m", "hpo", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=ceiling(300))


def test_a_module_in_the_current_folder_is_found(tmp_path: Path) -> None:
    (tmp_path / "my_objective.py").write_text("def objective(trial):\n    return trial.suggest_float('x', 0, 1)\n")
    doc = {"name": "here", "direction": "maximize", "objective": {"kind": "my_objective:objective"}}
    doc["budget"] = {"n_trials": 4}
    (tmp_path / "here.yaml").write_text(yaml.safe_dump(doc))
    res = hpo_script("run", "here.yaml", "--storage", "sqlite:///here.db", "--workers", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    trials = optuna.load_study(study_name="here", storage=f"sqlite:///{tmp_path / 'here.db'}").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4


@pytest.mark.parametrize(
    ("source", "said"),
    [
        ("import math\n\nraise ValueError('no data here')\n", "ValueError: no data here ({file}:3)"),
        ("def objective(trial:\n    return 1\n", "SyntaxError: "),
        ("import no_such_dependency_q\n", "No module named 'no_such_dependency_q' ({file}:1)"),
        (None, "no module of that name on the import path or in the current folder"),
    ],
)
def test_an_objective_that_does_not_import_is_one_line(tmp_path: Path, source: str | None, said: str) -> None:
    module = tmp_path / "broken_objective.py"
    if source is not None:
        module.write_text(source)
    doc = {"name": "b", "direction": "maximize", "objective": {"kind": "broken_objective:objective"}}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(doc))
    res = hpo_script("run", "b.yaml", "--storage", "sqlite:///b.db", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error: b.yaml: objective.kind: ")
    assert said.format(file=module) in res.stderr
    if source is not None and source.startswith("def"):
        assert f"{module}:1" in res.stderr
    assert not (tmp_path / "b.db").exists()


def test_the_final_progress_line_is_whole_off_a_terminal(sqlite_url: str, tmp_path: Path) -> None:
    """Off a terminal (a log file) the run's last progress line keeps its elapsed time, whatever the name's length."""
    name = "a-study-name-long-enough-to-fill-most-of-an-eighty-column-line"
    res = run(study_file(tmp_path / "l.yaml", name, "maximise_x", 2), sqlite_url, workers=1)
    assert res.returncode == 0, res.stderr
    [line] = [line for line in res.stderr.splitlines() if line.startswith(name)]
    assert re.search(r" 2/2 best \S+  pruned 0  failed 0 \d+:\d\d:\d\d$", line), line
