"""The grokking objective on real training: the published MLP set-up groks with weight decay and only memorises
without it; a study runs end to end through the CLI and stores its attributes; pruning stops laggards; bad input
gets one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from hpo.objectives import Context
from hpo.objectives.grokking import objective
from hpo.spec import parse_spec
from tests.conftest import STUDIES, hpo_cli

ATTRS = ("train_accuracy", "val_accuracy", "memorised_step", "generalised", "steps_to_generalise")


def grokking_doc(name: str = "grok", **objective_fields: Any) -> dict[str, Any]:
    """A grokking study; by default the MLP set-up of the must-show (p = 113, fraction 0.4, 2 x 200, AdamW 0.01)."""
    obj: dict[str, Any] = {
        "kind": "grokking",
        "data": {"source": "modular", "p": 113, "op": "+", "train_fraction": 0.4, "seed": 0},
        "model": {"kind": "mlp", "layers": [200, 200]},
        "steps": 2000,
        "eval_every": 25,
        "lr": 0.01,
        "threads": 1,
    }
    obj.update(objective_fields)
    return {"name": name, "direction": "minimize", "metric": "steps_to_generalise", "objective": obj}


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One torch thread for in-process training, as a worker on this 2-core machine would use; restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_once(doc: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    spec = parse_spec(doc)
    trial = optuna.trial.FixedTrial({})
    value = objective(trial, Context(spec=spec, params={}, seed=0, threads=1))
    return value, trial.user_attrs


@pytest.mark.slow(seconds=20)
def test_weight_decay_one_generalises_within_2000_steps() -> None:
    value, attrs = run_once(grokking_doc(weight_decay=1.0))
    assert attrs["generalised"] is True
    assert value == attrs["steps_to_generalise"] <= 2000
    assert attrs["val_accuracy"] >= 0.95
    # it memorised first, then generalised: the delay grokking is about
    assert attrs["memorised_step"] is not None and attrs["memorised_step"] < value


@pytest.mark.slow(seconds=45)
def test_weight_decay_zero_memorises_but_does_not_generalise() -> None:
    """The same set-up without weight decay, for 1,000 steps: about twice the step at which weight decay 1 generalises
    (525, measured; the curve's first 1,000 steps are those of a 2,000-step run, which stays below 0.1 % validation
    accuracy to the end: benchmarks/README.md)."""
    value, attrs = run_once(grokking_doc(weight_decay=0.0, steps=1000))
    curve = attrs["curve"]
    assert max(curve["train_accuracy"]) == 1.0
    assert attrs["memorised_step"] is not None
    assert attrs["generalised"] is False
    assert max(curve["val_accuracy"]) < 0.95
    assert attrs["steps_reached"] == 1000
    assert value == attrs["steps_to_generalise"] == 1000 + 25  # censored one evaluation past the budget


def small_study(tmp_path: Path, name: str, **top: Any) -> Path:
    """p = 47 at fraction 0.7 with width 128 groks in about 175 steps with weight decay 3: seconds per trial."""
    doc = grokking_doc(
        name,
        data={"source": "modular", "p": 47, "op": "+", "train_fraction": 0.7, "seed": 0},
        model={"kind": "mlp", "layers": [128, 128]},
        steps=400,
        weight_decay=3.0,
    )
    doc.update(
        space={"weight_decay": {"type": "float", "low": 2.0, "high": 4.0}},
        sampler={"name": "random", "seed": 0},
        pruner={"name": "none"},
        budget={"n_trials": 2},
    )
    doc.update(top)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_study_runs_end_to_end_and_stores_the_attributes(tmp_path: Path, sqlite_url: str) -> None:
    path = small_study(tmp_path, "grok-e2e")
    result = hpo_cli("run", str(path), "--storage", sqlite_url, "--threads", "1")
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="grok-e2e", storage=sqlite_url)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 2
    for t in trials:
        assert all(k in t.user_attrs for k in ATTRS)
        assert t.value == t.user_attrs["steps_to_generalise"]
        assert t.user_attrs["generalised"] is True and t.user_attrs["val_accuracy"] >= 0.95
        # the reported running value ends at the metric, and stays there to the budget after an early stop
        assert t.intermediate_values[t.user_attrs["steps_reached"]] == t.value
        assert t.intermediate_values[400] == t.value


def test_pruning_stops_the_trial_that_lags_and_the_one_that_cannot_memorise(tmp_path: Path, sqlite_url: str) -> None:
    path = small_study(
        tmp_path,
        "grok-prune",
        space={"weight_decay": {"choices": [3.0, 3.5, 0.0, 40.0]}},
        objective={**grokking_doc()["objective"], **_small_objective(), "memorise_by": 100},
        pruner={"name": "median", "kwargs": {"n_startup_trials": 2, "n_warmup_steps": 0}},
        enqueue=[{"weight_decay": 3.0}, {"weight_decay": 3.5}, {"weight_decay": 0.0}, {"weight_decay": 40.0}],
        budget={"n_trials": 4},
    )
    result = hpo_cli("run", str(path), "--storage", sqlite_url, "--threads", "1")
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="grok-prune", storage=sqlite_url)
    by_wd = {t.params["weight_decay"]: t for t in study.trials}
    assert [t.params["weight_decay"] for t in study.trials] == [3.0, 3.5, 0.0, 40.0]
    assert by_wd[3.0].state == by_wd[3.5].state == optuna.trial.TrialState.COMPLETE
    lagging, stuck = by_wd[0.0], by_wd[40.0]
    assert lagging.state == optuna.trial.TrialState.PRUNED and lagging.user_attrs["reason"] == "pruned"
    assert lagging.user_attrs["steps_reached"] < 400
    assert stuck.state == optuna.trial.TrialState.PRUNED and stuck.user_attrs["reason"] == "not_memorised"


def _small_objective() -> dict[str, Any]:
    return {
        "data": {"source": "modular", "p": 47, "op": "+", "train_fraction": 0.7, "seed": 0},
        "model": {"kind": "mlp", "layers": [128, 128]},
        "steps": 400,
    }


def test_diverged_loss_prunes_with_reason() -> None:
    doc = grokking_doc(**_small_objective(), lr=1e6)
    spec = parse_spec(doc)
    trial = optuna.trial.FixedTrial({})
    with pytest.raises(optuna.TrialPruned, match="diverged"):
        objective(trial, Context(spec=spec, params={}, seed=0, threads=1))
    assert trial.user_attrs["reason"] == "diverged"


def test_transformer_trains_on_the_objective() -> None:
    """The interpretability set-up's model, briefly: it fits the training set well above chance."""
    doc = grokking_doc(
        data={"source": "modular", "p": 23, "op": "+", "train_fraction": 0.5, "seed": 0},
        model={"kind": "transformer", "d_model": 32, "n_heads": 4, "d_mlp": 64},
        steps=100,
        lr=0.003,
        weight_decay=1.0,
    )
    value, attrs = run_once(doc)
    assert value == attrs["steps_to_generalise"]
    assert attrs["train_accuracy"] > 0.5


@pytest.mark.parametrize(
    ("data", "fields", "expected"),
    [
        ({"p": 100, "op": "/"}, {}, "objective.data.p: must be prime for division (got 100)"),
        ({"train_fraction": 1.0}, {}, "objective.data.train_fraction: must be in (0, 1)"),
        ({"train_fraction": 0.0}, {}, "objective.data.train_fraction: must be in (0, 1)"),
        ({}, {"threshold": 1.5}, "objective.threshold: must be in (0, 1]"),
        ({}, {"threshold": 0.0}, "objective.threshold: must be in (0, 1]"),
    ],
)
def test_bad_input_is_a_one_line_error(
    tmp_path: Path, sqlite_url: str, data: dict[str, Any], fields: dict[str, Any], expected: str
) -> None:
    doc = grokking_doc(data={"source": "modular", **data}, **fields)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = hpo_cli("run", str(path), "--storage", sqlite_url)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


def test_train_fraction_searched_outside_its_range_is_a_one_line_error(tmp_path: Path, sqlite_url: str) -> None:
    path = small_study(tmp_path, "grok-bad-space", space={"train_fraction": {"type": "float", "low": 1.2, "high": 1.5}})
    result = hpo_cli("run", str(path), "--storage", sqlite_url, "--n-trials", "1")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "space.train_fraction: must be in (0, 1)" in errors[0], result.stderr


def test_shipped_grokking_studies_validate() -> None:
    from hpo.spec import load_spec

    for name in ("grokking-mlp", "grokking-transformer", "grokking-quick"):
        spec = load_spec(STUDIES / f"{name}.yaml")
        assert spec.metric == "steps_to_generalise" and spec.direction == "minimize"
        assert spec.enqueue or spec.design


def test_quick_study_report_keeps_censored_trials_apart_and_explains_its_terms() -> None:
    """The report on studies/grokking-quick.yaml's shape (trials written as a run stores them, without the 2-minute
    run): a seed that never generalised is a lower bound, so its configuration's mean reads "never" or "≥", the box
    plot draws it apart, the best table says "never"; the glossary holds the terms this report uses (chance is 1/p,
    the baseline is the study's), not the lesson's; fewer than 30 trials carry a caveat on importances."""
    from optuna.distributions import FloatDistribution

    from hpo.report import build_report
    from hpo.spec import load_spec

    spec = load_spec(STUDIES / "grokking-quick.yaml")
    study = optuna.create_study(direction="minimize")
    censor = spec.objective.steps + spec.objective.eval_every
    steps = list(range(0, 1501, 25))
    # weight decay -> steps to generalise per seed (None: never within the budget)
    runs = {0.3: [None, None, None], 1.0: [525, 550, None], 3.0: [300, 275, 325], 10.0: [None, None, None]}
    for wd, seeds in runs.items():
        for seed, gen in enumerate(seeds):
            val = [min(1.0, s / gen) if gen else 0.05 for s in steps]
            study.add_trial(
                optuna.trial.create_trial(
                    params={"weight_decay": wd},
                    distributions={"weight_decay": FloatDistribution(0.3, 10, log=True)},
                    value=gen if gen else censor,
                    user_attrs={
                        "seed": seed, "generalised": gen is not None, "steps_to_generalise": gen or censor,
                        "memorised_step": 100, "curve": {"step": steps, "train_accuracy": [1.0] * len(steps),
                                                         "val_accuracy": val},
                    },
                )
            )  # fmt: skip
    page = build_report(study, spec)
    table = page[page.index("id='best-configurations-table'") :]
    table = table[: table.index("</table>")]
    assert "≥ " in table and "(1 never)" in table  # weight decay 1: two seeds generalised, one is a lower bound
    assert table.count(">never<") == 2  # 0.3 and 10: no seed generalised
    assert "never (&gt; 1500)" in page  # the best-trials table names the censored value as such
    assert "did not generalise" in page
    glossary = page[page.index("id='glossary'") :]
    assert "1/p, 0.0169 for p = 59" in glossary and "weight decay 1" in glossary
    assert "Spearman" not in glossary and "bootstrap" not in glossary and "balanced classes" not in glossary
    if "id='importance'" in page:
        assert "Only 12 complete trials" in page
