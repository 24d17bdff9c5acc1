"""The analysts' reads by SQL (``hpo.query`` on a bare read-only engine, ``hpo.hypotheses.check_study``) give Optuna's
own answers: the same best trials, counts, rows and verdicts as loading every ``FrozenTrial``, on every backend."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from hpo import hypotheses, query
from hpo.spec import Prediction

from .analyst_helpers import mixed_study
from .conftest import ROOT
from .timing import ceiling


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


def test_reads_equal_optunas_own(storage_url: str, study_name: str) -> None:
    study = mixed_study(storage_url, study_name, n=40)
    frozen = study.get_trials()
    complete = sorted(
        (t for t in frozen if t.state == TrialState.COMPLETE), key=lambda t: (-t.value, t.number)
    )  # maximize
    assert query.best(storage_url, study_name)[0] == query.trial_record(study.best_trial)
    assert query.best(storage_url, study_name, n=5) == [query.trial_record(t) for t in complete[:5]]
    (row,) = [r for r in query.studies(storage_url) if r["name"] == study_name]
    assert row["best_value"] == study.best_value and row["best_trial"] == study.best_trial.number
    for state in ("complete", "pruned", "fail"):
        assert row[state] == sum(t.state.name.lower() == state for t in frozen)
    assert row["n_trials"] == len(frozen) and row["metric"] == "val_accuracy"
    assert query.trial_records(storage_url, study_name) == [query.trial_record(t, ["value"]) for t in frozen]
    df = query.trials(storage_url, study_name, states=["complete", "pruned"], limit=7)
    chosen = [t for t in frozen if t.state in (TrialState.COMPLETE, TrialState.PRUNED)][:7]
    assert list(df["number"]) == [t.number for t in chosen]
    assert list(df.columns[:3]) == ["number", "state", "value"]
    for (_, r), t in zip(df.iterrows(), chosen, strict=True):
        assert all(_same(r[f"params_{k}"], v) for k, v in t.params.items())
        assert _same(r["value"], t.value if t.value is not None else math.nan) and r["seed"] == t.user_attrs["seed"]
    assert query.study_params(storage_url, study_name) == sorted(frozen[0].params)
    assert query.study_metrics(storage_url, study_name) == ["val_accuracy"]


def test_best_skips_infeasible_as_optuna_does(sqlite_url: str, study_name: str) -> None:
    study = optuna.create_study(study_name=study_name, storage=sqlite_url, direction="minimize")
    for i, (x, c) in enumerate([(0.1, 1.0), (0.2, -1.0), (0.05, 2.0), (0.3, 0.0)]):
        dist = {"x": optuna.distributions.FloatDistribution(0, 9)}
        study.add_trial(
            optuna.trial.create_trial(
                value=x, params={"x": float(i)}, distributions=dist, system_attrs={"constraints": [c]}
            )
        )
    assert study.best_trial.number == 1
    assert [r["number"] for r in query.best(sqlite_url, study_name, n=3)] == [1, 3]
    (row,) = query.studies(sqlite_url)
    assert row["best_trial"] == 1 and row["best_value"] == 0.2


def test_check_by_sql_equals_check_on_the_loaded_study(storage_url: str, study_name: str) -> None:
    mixed_study(storage_url, study_name, n=80)
    preds = [
        Prediction(param="lr", claim="interior_optimum"),
        Prediction(param="epochs", claim="no_effect"),
        Prediction(param="optimizer", claim="no_effect"),
    ]
    ours = hypotheses.check_study(storage_url, study_name, SimpleNamespace(predictions=preds))
    loaded = hypotheses.check(optuna.load_study(study_name=study_name, storage=storage_url), preds)
    assert [v.as_dict() for v in ours] == [v.as_dict() for v in loaded]
    assert ours[0].evidence["source"] == "every complete trial"


def test_check_reads_a_stated_uniform_sample_of_a_big_study(sqlite_url: str, study_name: str) -> None:
    spec = importlib.util.spec_from_file_location("analysts_scale", ROOT / "benchmarks" / "analysts_scale.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.build_study(sqlite_url, study_name, query.SAMPLE_SIZE + 500)
    preds = [Prediction(param="layers", claim="decreasing")]
    (verdict,) = hypotheses.check_study(sqlite_url, study_name, SimpleNamespace(predictions=preds))
    assert verdict.n_trials == query.SAMPLE_SIZE
    said = f"{query.SAMPLE_SIZE:,} of {query.SAMPLE_SIZE + 500:,} complete trials, drawn uniformly at random (seed 0)"
    assert verdict.evidence["source"] == said
    assert verdict.verdict == hypotheses.SUPPORTED  # the built study's value falls with layers
    again = hypotheses.check_study(sqlite_url, study_name, SimpleNamespace(predictions=preds))
    assert again[0].as_dict() == verdict.as_dict()  # seeded


@pytest.mark.parametrize("command", [["studies"], ["best", "{name}"], ["trials", "{name}", "-n", "3"]])
def test_reads_load_no_pandas_plotly_or_torch(sqlite_url: str, study_name: str, command: list[str]) -> None:
    """The CLI's reads import what they use: not pandas, plotly, scipy or torch (seconds of start-up)."""
    mixed_study(sqlite_url, study_name, n=8)
    args = [a.replace("{name}", study_name) for a in command]
    code = (
        "import sys, runpy; sys.argv = ['hpo', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('hpo', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in ('pandas', 'plotly', 'scipy', 'torch') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *args, "--storage", sqlite_url],
        capture_output=True,
        text=True,
        timeout=ceiling(120),
    )
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout
