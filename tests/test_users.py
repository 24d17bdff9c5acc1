"""An Optuna user's own objective: plain ``f(trial)`` functions, honest defaults, a shadowing ``hpo`` folder.

Every test runs the real ``hpo`` command line in a subprocess on a real SQLite file.
"""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hpo.objectives import Context, adapt, wants_context
from hpo.spec import parse_spec

from .conftest import TEST_OBJECTIVES, hpo_cli

TESTS = Path(__file__).resolve().parent
ENV = {
    "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    "HPO_ALLOW_OBJECTIVES": TEST_OBJECTIVES,
}


def user_study(path: Path, name: str, **doc: object) -> Path:
    path.write_text(yaml.safe_dump({"name": name, **doc}, sort_keys=False))
    return path


def test_plain_objective_reaches_its_budget_with_complete_trials(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'u.db'}"
    path = user_study(
        tmp_path / "plain.yaml",
        "plain",
        direction="minimize",
        objective={"kind": "plain_objectives:loss"},
        sampler={"name": "tpe", "seed": 0},
        budget={"n_trials": 6},
    )
    res = hpo_cli("run", str(path), "--storage", url, env=ENV)
    assert res.returncode == 0, res.stderr
    study = optuna.load_study(study_name="plain", storage=url)
    assert len(study.trials) == 6
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert all(t.value == pytest.approx((t.params["x"] - 1.0) ** 2) for t in study.trials)
    # the metric is named as the file does not name it: "value", not the training objective's val_accuracy
    assert f"best trial #{study.best_trial.number}: value = " in res.stdout
    assert "val_accuracy" not in res.stdout


def test_objective_asking_for_the_context_gets_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'u.db'}"
    path = user_study(
        tmp_path / "ctx.yaml",
        "ctx",
        direction="maximize",
        metric="score",
        objective={"kind": "plain_objectives:with_context", "offset": 10},
        space={"x": {"type": "float", "low": 0.0, "high": 1.0}},
        budget={"n_trials": 3},
    )
    res = hpo_cli("run", str(path), "--storage", url, env=ENV)
    assert res.returncode == 0, res.stderr
    trials = optuna.load_study(study_name="ctx", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert all(t.value == pytest.approx(10 + t.params["x"]) for t in trials)
    assert "score = " in res.stdout


def test_signature_decides_whether_the_context_is_passed() -> None:
    def plain(trial: object) -> float:
        return 0.0

    def two(trial: object, c: object) -> float:
        return 0.0

    def named(trial: object, *, context: object = None) -> float:
        return 0.0

    def annotated(trial: object, *, info: Context | None = None) -> float:
        return 0.0

    assert not wants_context(plain)
    assert wants_context(two) and wants_context(named) and wants_context(annotated)
    ctx = Context(spec=None, params={}, seed=0)  # type: ignore[arg-type]

    def keyword(trial: object, *, context: Context) -> float:
        return 1.0 if context is ctx else 0.0

    assert adapt(keyword)(None, ctx) == 1.0  # type: ignore[arg-type]
    assert adapt(lambda trial: 2.0)(None, ctx) == 2.0  # type: ignore[arg-type]


def test_user_objective_without_direction_is_refused_in_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'u.db'}"
    path = user_study(tmp_path / "nodir.yaml", "nodir", objective={"kind": "plain_objectives:loss"})
    res = hpo_cli("run", str(path), "--storage", url, env=ENV)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "direction" in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "u.db").exists()  # refused before anything was written


def test_defaults_for_users_and_for_training() -> None:
    user = parse_spec({"name": "u", "direction": "minimize", "objective": {"kind": "m:f"}})
    assert user.metric == "value" and user.direction == "minimize"
    named = parse_spec({"name": "u", "direction": "minimize", "metric": "loss", "objective": {"kind": "m:f"}})
    assert named.metric == "loss"
    training = parse_spec({"name": "t", "objective": {"kind": "training", "data": {"source": "spirals"}}})
    assert training.direction == "maximize" and training.metric == "val_accuracy"


def test_run_without_budget_says_how_many_trials_it_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'u.db'}"
    path = user_study(tmp_path / "nob.yaml", "nob", direction="minimize", objective={"kind": "plain_objectives:loss"})
    res = hpo_cli("run", str(path), "--storage", url, "--n-trials", "1", env=ENV)
    assert res.returncode == 0 and "no budget" not in res.stderr  # --n-trials given: nothing to say
    res = hpo_cli("run", str(path), "--storage", url, env=ENV)
    assert res.returncode == 0, res.stderr
    assert "no budget in" in res.stderr and "running 20 trials" in res.stderr
    assert len(optuna.load_study(study_name="nob", storage=url).trials) == 20


def test_a_folder_named_hpo_on_the_path_is_named_in_one_line(tmp_path: Path) -> None:
    """A folder ``hpo`` above the user's objective, on PYTHONPATH, is what Python imports as ``hpo``."""
    checkout = tmp_path / "work"
    (checkout / "hpo").mkdir(parents=True)
    (checkout / "hpo" / "my_objective.py").write_text("def f(trial):\n    return 1.0\n")
    url = f"sqlite:///{tmp_path / 'u.db'}"
    path = user_study(tmp_path / "s.yaml", "shadow", direction="minimize", objective={"kind": "hpo.my_objective:f"})
    env = {"PYTHONPATH": os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")])}
    res = hpo_cli("run", str(path), "--storage", url, env=env, cwd=tmp_path)  # not from the repository's root
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert str(checkout / "hpo") in lines[0] and "shadows the hpo package" in lines[0]
    assert not (tmp_path / "u.db").exists()  # said before anything was written
