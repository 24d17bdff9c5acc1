"""An Optuna user's objective gets Optuna's answers: the same trial states for odd return values, constraints
honoured wherever hpo names a best, and a second parameter with a default left to the user.

Each objective (tests/optuna_like.py) runs through the real ``hpo run`` and, side by side, through plain
``optuna.create_study(...).optimize(...)``; their stored trials are compared.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hpo.errors import SpecError
from hpo.objectives import Context, _check_callable, adapt, context_parameter
from hpo.storage import best_of

from . import optuna_like
from .conftest import TEST_OBJECTIVES, hpo_cli

TESTS = Path(__file__).resolve().parent
ENV = {
    "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    "HPO_ALLOW_OBJECTIVES": TEST_OBJECTIVES,
}


def study_file(path: Path, name: str, kind: str, n_trials: int, direction: str = "maximize") -> Path:
    doc = {
        "name": name,
        "direction": direction,
        "objective": {"kind": f"optuna_like:{kind}"},
        "sampler": {"name": "random", "seed": 0},
        "budget": {"n_trials": n_trials},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def hpo_json(*args: str) -> Any:
    res = hpo_cli(*args, "-f", "json", env=ENV)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def plain_optuna(objective: Any, n_trials: int, direction: str = "maximize", **kw: Any) -> tuple[optuna.Study, str]:
    """The objective under plain Optuna: its study and what Optuna logged."""
    records = _Records()
    logger = logging.getLogger("optuna")
    logger.addHandler(records)
    try:
        study = optuna.create_study(direction=direction, sampler=optuna.samplers.RandomSampler(seed=0), **kw)
        study.optimize(objective, n_trials=n_trials)
    finally:
        logger.removeHandler(records)
    return study, "\n".join(records.messages)


def test_return_values_as_plain_optuna_stores_them(postgres_url: str, study_name: str, tmp_path: Path) -> None:
    n = len(optuna_like.CASES)
    path = study_file(tmp_path / "odd.yaml", study_name, "odd_values", n)
    res = hpo_cli("run", str(path), "--storage", postgres_url, "--workers", "2", env=ENV)
    assert res.returncode == 0, res.stderr  # failed trials are the trials', not the run's: it reaches its budget
    assert "Traceback" not in res.stderr
    ours = {t.number: t for t in optuna.load_study(study_name=study_name, storage=postgres_url).trials}
    theirs_study, log = plain_optuna(optuna_like.odd_values, n)
    theirs = {t.number: t for t in theirs_study.trials}
    assert sorted(ours) == sorted(theirs) == list(range(n))
    for number, case in enumerate(optuna_like.CASES):
        mine, plain = ours[number], theirs[number]
        assert mine.state == plain.state, (case, mine.state, plain.state)
        if plain.state == TrialState.COMPLETE:
            assert type(mine.value) is float
            if math.isinf(plain.value):  # type: ignore[arg-type]
                assert mine.value == plain.value
            else:  # x is drawn by each run's own sampler: the value is its own x, as the objective returns it
                assert mine.value == pytest.approx(mine.params["x"], rel=1e-6)
        else:
            assert mine.value is None and plain.value is None
    by_case = {case: ours[i] for i, case in enumerate(optuna_like.CASES)}
    # FAIL with Optuna's wording, where hpo keeps a failure's why (reason / error)
    for case, wording in (("nan", "The value nan is not acceptable"), ("none", "The value None could not be cast")):
        assert by_case[case].user_attrs["reason"] == "error"
        assert by_case[case].user_attrs["error"].startswith(wording)
        assert wording in log  # what plain Optuna said about the same value
    assert "could not be cast to float" in by_case["string"].user_attrs["error"]
    assert "could not be cast to float" in log
    # TrialPruned("msg"): the message kept
    assert by_case["pruned"].user_attrs["reason"] == "too slow: pruned by the objective itself"
    # a plain objective never saw hpo's seed, device or threads: none stored
    assert all(not {"seed", "device", "threads"} & t.user_attrs.keys() for t in ours.values())


def test_constraints_decide_every_best(postgres_url: str, study_name: str, tmp_path: Path) -> None:
    path = study_file(tmp_path / "con.yaml", study_name, "constrained", 12)
    res = hpo_cli("run", str(path), "--storage", postgres_url, "--workers", "2", env=ENV)
    assert res.returncode == 0, res.stderr
    study = optuna.load_study(study_name=study_name, storage=postgres_url)
    best = study.best_trial  # Optuna's own pick: the best feasible trial
    assert best.constraints["x_at_most_3"] <= 0
    top = max((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)  # type: ignore[arg-type,return-value]
    assert top.constraints["x_at_most_3"] > 0  # the best by value alone breaks the constraint
    assert f"best trial #{best.number}:" in res.stdout  # the run's summary
    assert [r["number"] for r in hpo_json("best", study_name, "--storage", postgres_url)] == [best.number]
    three = hpo_json("best", study_name, "--storage", postgres_url, "-n", "3")
    feasible = sorted(
        (t for t in study.trials if t.state == TrialState.COMPLETE and t.constraints["x_at_most_3"] <= 0),
        key=lambda t: -t.value,  # type: ignore[operator]
    )
    assert [r["number"] for r in three] == [t.number for t in feasible[:3]]
    row = next(r for r in hpo_json("studies", "--storage", postgres_url) if r["name"] == study_name)
    assert (row["best_trial"], row["best_value"]) == (best.number, pytest.approx(best.value))


def test_a_samplers_constraints_func_is_honoured_too(sqlite_url: str) -> None:
    """A sampler's ``constraints_func`` stores a list under ``constraints`` (not ``constraints:NAME``)."""
    sampler = optuna.samplers.TPESampler(seed=1, constraints_func=lambda t: [t.params["x"] - 3.0])
    study = optuna.create_study(study_name="tpe-con", storage=sqlite_url, direction="maximize", sampler=sampler)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(lambda t: t.suggest_float("x", 0.0, 10.0), n_trials=15)
    assert any(t.params["x"] > 3 for t in study.trials) and study.best_trial.params["x"] <= 3
    assert [r["number"] for r in hpo_json("best", "tpe-con", "--storage", sqlite_url)] == [study.best_trial.number]
    assert all(r["params"]["x"] <= 3 for r in hpo_json("best", "tpe-con", "--storage", sqlite_url, "-n", "5"))
    (row,) = hpo_json("studies", "--storage", sqlite_url)
    assert row["best_trial"] == study.best_trial.number
    top = best_of(study.trials, study.direction)  # the progress bar's and the report's pick
    assert top is not None and top.number == study.best_trial.number


def test_second_parameter_with_a_default_is_the_users_own(sqlite_url: str, tmp_path: Path) -> None:
    for kind in ("with_data", "own_seed", "instance"):
        path = study_file(tmp_path / f"{kind}.yaml", kind, kind, 3, direction="minimize")
        res = hpo_cli("run", str(path), "--storage", sqlite_url, env=ENV)
        assert res.returncode == 0, res.stderr
        plain, _ = plain_optuna(getattr(optuna_like, kind), 3, direction="minimize")
        ours = optuna.load_study(study_name=kind, storage=sqlite_url).trials
        assert [t.state for t in ours] == [t.state for t in plain.trials] == [TrialState.COMPLETE] * 3, kind
        if kind == "own_seed":  # the user's own attribute is theirs; hpo adds none of its context's
            assert all(t.user_attrs["seed"] == "mine" and "device" not in t.user_attrs for t in ours)
        if kind == "instance":
            assert all(2.0 <= t.value <= 3.0 for t in ours)  # type: ignore[operator]


def test_a_class_as_kind_is_refused_in_one_line(sqlite_url: str, tmp_path: Path) -> None:
    path = study_file(tmp_path / "cls.yaml", "cls", "Objective", 2)
    res = hpo_cli("run", str(path), "--storage", sqlite_url, env=ENV)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "objective.kind: optuna_like:Objective is a class" in res.stderr
    assert not Path(sqlite_url.removeprefix("sqlite:///")).exists()  # refused before anything was written


def test_the_context_goes_only_where_it_is_asked_for() -> None:
    def names(fn: Any) -> str | None:
        p = context_parameter(fn)
        return p.name if p is not None else None

    def plain(trial: Any) -> float: ...
    def data_default(trial: Any, data: Any = None) -> float: ...
    def second(trial: Any, c: Any) -> float: ...  # hpo's documented f(trial, ctx), any name
    def by_name(trial: Any, data: Any = None, ctx: Any = None) -> float: ...
    def keyword(trial: Any, *, context: Any) -> float: ...
    def annotated(trial: Any, info: Context | None = None) -> float: ...
    def varargs(trial: Any, *args: Any) -> float: ...

    assert [names(f) for f in (plain, data_default, second, by_name, keyword, annotated, varargs)] == [
        None, None, "c", "ctx", "context", "info", None,
    ]  # fmt: skip
    ctx = Context(spec=None, params={}, seed=0)  # type: ignore[arg-type]
    assert adapt(optuna_like.with_data)(optuna.trial.FixedTrial({"x": 0.5}), ctx) == 0.25
    assert adapt(lambda trial, ctx=None: ctx)(None, ctx) is ctx  # type: ignore[arg-type]
    assert not adapt(optuna_like.with_data).uses_context  # type: ignore[attr-defined]
    with pytest.raises(SpecError, match=r"cannot be called as f\(trial\)"):
        _check_callable(lambda: 0.0, "m:f")
    with pytest.raises(SpecError, match=r"cannot be called as f\(trial, ctx\)"):
        _check_callable(lambda trial, c, d: 0.0, "m:f")
    assert inspect.signature(optuna_like.instance).parameters.keys() == {"trial"}
