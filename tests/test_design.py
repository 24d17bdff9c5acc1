"""Designed experiments (``design:`` in a study file): what they enqueue, how a real run stores them, and the lesson
study that settles the learner's three predictions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import optuna
import pytest

from hpo.design import SAMPLE, SWEEP, design_trials
from hpo.errors import SpecError
from hpo.spec import load_spec, parse_spec

from .conftest import STUDIES, hpo_cli, write_study

DESIGN = {
    "baseline": {"lr": 0.01, "batch_size": 64},
    "sweeps": {"lr": [0.001, 0.01, 0.1], "batch_size": [16, 64, 256]},
    "seeds": 3,
    "sample": {"n": 4, "params": ["lr", "batch_size"], "seed": 0},
}
SPACE = {
    "lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True},
    "batch_size": {"type": "int", "low": 16, "high": 256, "log": True},
}


def test_lesson_design_enqueues_every_point_once_per_seed() -> None:
    spec = load_spec(STUDIES / "lesson.yaml")
    assert spec.design is not None and spec.pruner.name == "none"
    trials = design_trials(spec.design, spec.space)
    assert len(trials) == spec.design.n_trials() == spec.budget.n_trials
    sweeps = [(repr(sorted(p.items())), tuple(a["sweeps"])) for p, a in trials if a["design"] == SWEEP]
    counts = Counter(sweeps)
    assert set(counts.values()) == {spec.design.seeds}  # every point, seeds times
    base = repr(sorted(spec.design.baseline.items()))
    assert counts[(base, ("batch_size", "lr", "epochs", "optimizer"))] == spec.design.seeds  # in every sweep
    sample = [p for p, a in trials if a["design"] == SAMPLE]
    assert len(sample) == spec.design.sample.n  # type: ignore[union-attr]
    for p in sample:  # inside the ranges, the rest at baseline
        assert 16 <= p["batch_size"] <= 1024 and 0.001 <= p["lr"] <= 10 and 1 <= p["epochs"] <= 40
        assert p["optimizer"] == "sgd"
    assert len({p["lr"] for p in sample}) == len(sample)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"baseline": {"lr": 0.01}}, "design.baseline: give a value for batch_size"),
        ({"sweeps": {"momentum": [0.9]}}, "design.sweeps: parameter 'momentum' is not in the space"),
        ({"sample": {"n": 2, "params": ["nope"]}}, "design.sample.params: 'nope' is not a range"),
    ],
)
def test_design_mistakes_are_one_line(change: dict, message: str) -> None:
    doc = {"name": "d", "objective": {"kind": "training", "data": {"source": "spirals"}}, "space": SPACE}
    doc["design"] = {**DESIGN, **change}
    doc["budget"] = {"n_trials": 100}
    with pytest.raises(SpecError) as exc:
        parse_spec(doc, "d.yaml")
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_budget_smaller_than_the_design_is_refused() -> None:
    doc = {"name": "d", "objective": {"kind": "training", "data": {"source": "spirals"}}, "space": SPACE}
    doc |= {"design": DESIGN, "budget": {"n_trials": 10}}
    with pytest.raises(SpecError, match=r"budget.n_trials: the design enqueues 19 trials \(got 10\)"):
        parse_spec(doc, "d.yaml")


@pytest.mark.parametrize("population", [1, 8])
def test_a_design_runs_as_written(tmp_path: Path, population: int) -> None:
    """A real run (single-trial and population mode): every designed trial ran once with its own seed, the metric
    is named for optuna-dashboard, and ``hpo check`` reads the parameter's sweep only."""
    url = f"sqlite:///{tmp_path / 'd.db'}"
    design = {**DESIGN, "baseline": {"lr": 0.01, "batch_size": 64}}
    path = write_study(
        tmp_path / "d.yaml",
        "d",
        space=SPACE,
        design=design,
        sampler={"name": "random", "seed": 0},
        budget={"n_trials": 19},
        population={"size": population},
        predictions=[{"param": "batch_size", "claim": "optimum_near_edge", "better": "lower"}],
    )
    res = hpo_cli("run", str(path), "--storage", url)
    assert res.returncode == 0, res.stderr
    study = optuna.load_study(study_name="d", storage=url)
    assert study.metric_names == ["val_accuracy"]
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 19
    assert len({t.user_attrs["seed"] for t in trials}) == 19  # repeats differ by seed only
    points = Counter((t.params["lr"], t.params["batch_size"]) for t in trials if t.user_attrs["design"] == SWEEP)
    assert points == {(0.01, 64): 3, (0.001, 64): 3, (0.1, 64): 3, (0.01, 16): 3, (0.01, 256): 3}
    res = hpo_cli("check", str(path), "--storage", url, "-f", "json")
    assert res.returncode == 0, res.stderr
    (v,) = json.loads(res.stdout)
    assert v["n_trials"] == 9 and v["evidence"]["source"] == "the batch_size sweep of the design"
    assert v["verdict"] == "not enough evidence" and "design.seeds" in v["next_step"]  # 9 < MIN_TRIALS
    assert v["plot"] == "plot-effect-batch_size"
    res = hpo_cli("report", str(path), "--storage", url, "-o", str(tmp_path / "d.html"))
    assert res.returncode == 0, res.stderr
    page = (tmp_path / "d.html").read_text()
    section = page[page.index("<h3>batch size</h3>") :]
    assert section.index("class='verdict") < section.index('id="plot-effect-batch_size"')  # verdict, then its plot
    assert "sweep of batch size, 3 seeds per point; others at the baseline: learning rate 0.01" in page


@pytest.mark.slow(seconds=1)  # slow where it runs the session's lesson; started after the browser test that shares it
def test_lesson_settles_the_three_predictions(lesson_url: str) -> None:
    """The must-show: a fresh run of studies/lesson.yaml (the session's, tests/conftest.py), then each prediction
    supported or refuted."""
    url = lesson_url
    res = hpo_cli("check", str(STUDIES / "lesson.yaml"), "--storage", url, "-f", "json")
    assert res.returncode == 0, res.stderr
    verdicts = json.loads(res.stdout)
    assert [v["param"] for v in verdicts] == ["batch_size", "lr", "epochs"]
    assert all(v["verdict"] in ("supported", "refuted") for v in verdicts), verdicts
    spec = load_spec(STUDIES / "lesson.yaml")
    assert all(v["n_trials"] >= 3 * spec.design.seeds for v in verdicts)  # type: ignore[union-attr]
    study = optuna.load_study(study_name="lesson", storage=url)
    assert {t.user_attrs["threads"] for t in study.trials} == {1}  # the file's threads: 1, not cores / workers
