"""Studies with several objectives (issue 15, item 5): ``directions:`` / ``metrics:``, the Pareto front everywhere.

Real runs on small, fast objectives (``tests/fast_objectives.py:accuracy_and_cost``; one real training study), on
SQLite and PostgreSQL, through the command line where the output is what is tested."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from hpo.cli import app
from hpo.errors import SpecError
from hpo.spec import parse_spec

from .conftest import hpo_cli, write_study

MO = {"directions": ["maximize", "minimize"], "metrics": ["score", "cost"]}


def user_study(name: str, **overrides: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "name": name,
        **MO,
        "objective": {"kind": "tests.fast_objectives:accuracy_and_cost"},
        "space": {"x": {"type": "float", "low": 0.0, "high": 1.0}, "waste": {"type": "float", "low": 0.0, "high": 1.0}},
        "sampler": {"name": "nsgaii", "seed": 0, "kwargs": {"population_size": 4}},
        "budget": {"n_trials": 12},
    }
    doc.update(overrides)
    return doc


def write(path: Path, doc: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# --------------------------------------------------------------------------- the study file

TRAINING = {"kind": "training", "data": {"source": "spirals", "n_train": 100, "n_val": 50}}


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"direction": "maximize"}, "direction:", "not both"),
        ({"metric": "score"}, "metric:", "not both"),
        ({"directions": ["maximize"], "metrics": ["score"]}, "metrics:", "at least 2"),
        ({"directions": ["maximize", "minimize", "minimize"]}, "directions:", "one per metric"),
        ({"metrics": ["score", "score"]}, "metrics:", "named twice"),
        ({"metrics": ["score", "duration"]}, "metrics:", "column"),
        ({"pruner": {"name": "median"}}, "pruner:", "cannot prune"),
        ({"sampler": {"name": "cmaes"}}, "sampler.name:", "one objective"),
        ({"population": {"size": 4}}, "population:", "single-objective"),
        ({"predictions": [{"param": "x", "claim": "increasing"}]}, "predictions:", "one metric"),
        ({"objective": TRAINING, "space": {}, "metrics": None}, "metrics:", "required with directions"),
        ({"objective": TRAINING, "space": {}, "metrics": ["val_accuracy", "wall_time"]}, "metrics:", "wall_time"),
    ],
)
def test_spec_errors_name_the_field(change: dict[str, object], field: str, words: str) -> None:
    doc = {k: v for k, v in {**user_study("bad"), **change}.items() if v is not None}
    with pytest.raises(SpecError) as err:
        parse_spec(doc, "bad.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"bad.yaml: {field}") and words in message, message


def test_spec_both_forms_read_through_one_accessor() -> None:
    multi = parse_spec(user_study("m"))
    doc = {k: v for k, v in user_study("s").items() if k not in MO}
    single = parse_spec({**doc, "direction": "minimize"})
    assert (multi.metric_names, multi.directions_list, multi.multi_objective) == (
        ["score", "cost"],
        ["maximize", "minimize"],
        True,
    )
    assert multi.pruner.name == "none"  # the default pruner (median) cannot see several objectives
    assert (single.metric_names, single.directions_list, single.multi_objective) == (["value"], ["minimize"], False)


# --------------------------------------------------------------------------- real runs


def test_run_with_two_workers_best_trials_report(tmp_path: Path, sqlite_url: str, study_name: str) -> None:
    """A real run on SQLite, two workers (user objective returning a tuple): the budget exact, trial lines name both
    metrics, ``hpo best -f json`` is exactly study.best_trials, ``hpo trials`` has a column per metric, the report
    draws the front, optuna-dashboard's metric names are set."""
    from hpo.report import write_report

    env = {"HPO_STORAGE": sqlite_url}
    res = hpo_cli("run", str(write(tmp_path / "mo.yaml", user_study(study_name))), "--workers", "2", env=env)
    assert res.returncode == 0, res.stderr
    assert re.search(r"trial \d+ COMPLETE score=[\d.e-]+ cost=[\d.e-]+ in ", res.stderr), res.stderr
    assert "Pareto front of score (maximize) against cost (minimize)" in res.stdout

    study = optuna.load_study(study_name=study_name, storage=sqlite_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 12  # the budget, exactly
    assert study.metric_names == ["score", "cost"]  # what optuna-dashboard labels its axes with
    front = sorted(study.best_trials, key=lambda t: (-t.values[0], t.number))

    res = CliRunner().invoke(app, ["best", study_name, "-f", "json"], env=env)  # the command line, in process
    assert res.exit_code == 0, res.output
    best = json.loads(res.stdout)
    assert [r["number"] for r in best] == [t.number for t in front]
    assert [r["values"] for r in best] == [{"score": t.values[0], "cost": t.values[1]} for t in front]

    res = CliRunner().invoke(app, ["trials", study_name, "-f", "csv"], env=env)
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert list(rows[0])[:4] == ["number", "state", "score", "cost"] and "value" not in rows[0]
    assert {int(r["number"]): float(r["cost"]) for r in rows} == pytest.approx(
        {t.number: t.values[1] for t in study.trials}, rel=1e-5
    )

    page = write_report(sqlite_url, study_name, tmp_path / "mo.html").read_text()
    assert page.index("Accuracy against compute: the Pareto front") < page.index('id="plot-pareto"')
    traces = _plotly_data(page, "plot-pareto")
    assert sum(len(t["x"]) for t in traces) == 12  # every complete trial drawn, the front apart
    assert [len(t["x"]) for t in traces if t["name"].startswith("Pareto front")] == [len(front)]  # highlighted
    flat = page.replace(" ", "")
    assert '"title":{"text":"score"}' in flat and '"title":{"text":"cost"}' in flat  # metric names on the axes
    assert all('"params"' in text for t in traces for text in t["text"])  # the hover shows each trial's parameters
    table = page[page.index("id='best-trials'") :].split("</table>")[0]
    assert table.count("<tr>") == len(front) + 1 and "<th>score</th><th>cost</th>" in table


def test_api_run_and_queries_on_postgres(postgres_url: str, study_name: str) -> None:
    """hpo.run in process on PostgreSQL; query.best is the front, query.trials a column per metric."""
    import hpo
    from hpo import query

    study = hpo.run(parse_spec(user_study(study_name, budget={"n_trials": 8})), storage=postgres_url, progress=False)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 8 and study.metric_names == ["score", "cost"]
    front = sorted(study.best_trials, key=lambda t: (-t.values[0], t.number))
    assert [r["number"] for r in query.best(postgres_url, study_name)] == [t.number for t in front]
    assert len(query.best(postgres_url, study_name, n=1)) == 1
    df = query.trials(postgres_url, study_name)
    assert list(df.columns[:4]) == ["number", "state", "score", "cost"]
    assert list(df["score"]) == [t.values[0] for t in study.trials]
    summary = next(s for s in query.studies(postgres_url) if s["name"] == study_name)
    assert summary["direction"] == "maximize,minimize" and summary["metric"] == "score,cost"


def _plotly_data(page: str, div_id: str) -> list[dict]:
    """The traces plotly draws in the div ``div_id`` (Plotly.newPlot's second argument)."""
    start = page.index(f'"{div_id}",', page.index("Plotly.newPlot")) if f'"{div_id}",' in page else -1
    assert start >= 0, f"no plot {div_id}"
    body = page[start + len(div_id) + 3 :]
    data, _ = json.JSONDecoder().raw_decode(body.lstrip())
    return data


def test_worker_with_other_metrics_is_refused(tmp_path: Path, sqlite_url: str, study_name: str) -> None:
    from hpo.errors import StudyError
    from hpo.worker import create

    create(parse_spec(user_study(study_name)), sqlite_url)
    other = write(tmp_path / "b.yaml", user_study(study_name, metrics=["score", "seconds"]))
    res = CliRunner().invoke(app, ["worker", str(other)], env={"HPO_STORAGE": sqlite_url})
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "metric 'score, seconds' differs from the stored 'score, cost'" in res.stderr
    with pytest.raises(StudyError, match="direction maximize, minimize, the file says maximize, maximize"):
        create(parse_spec(user_study(study_name, directions=["maximize", "maximize"])), sqlite_url)
    single = {k: v for k, v in user_study(study_name).items() if k not in MO}
    with pytest.raises(StudyError, match="direction maximize, minimize, the file says minimize"):
        create(parse_spec({**single, "direction": "minimize"}), sqlite_url)
    assert optuna.load_study(study_name=study_name, storage=sqlite_url).trials == []


def test_wrong_number_of_values_fails_the_trial(sqlite_url: str, study_name: str) -> None:
    from hpo.worker import WorkerOptions, run_worker

    doc = user_study(study_name, budget={"n_trials": 1})
    doc["objective"] = {"kind": "tests.fast_objectives:accuracy_and_cost", "length": 3}
    result = run_worker(parse_spec(doc), sqlite_url, WorkerOptions(handle_signals=False, max_consecutive_failures=5))
    assert result.failed == 1
    (trial,) = optuna.load_study(study_name=study_name, storage=sqlite_url).trials
    assert trial.state == TrialState.FAIL
    assert "returned 3 value(s); the study file names 2 metric(s) (score, cost)" in trial.user_attrs["error"]


def test_training_objective_reports_compute(tmp_path: Path, sqlite_url: str, study_name: str) -> None:
    """The training objective's tuple, in metrics order: accuracy, steps (epochs x ceil(n_train / batch)), seconds;
    nothing reported per epoch (Optuna takes no reports of multi-objective trials), the curve kept."""
    from hpo.spec import load_spec
    from hpo.worker import WorkerOptions, run_worker

    path = write_study(
        tmp_path / "t.yaml",
        study_name,
        direction=None,
        metric=None,
        directions=["maximize", "minimize", "minimize"],
        metrics=["val_accuracy", "optimizer_steps", "train_seconds"],
        space={"batch_size": {"choices": [16, 150]}, "epochs": {"choices": [1, 2]}},
        budget={"n_trials": 3},
    )
    doc = yaml.safe_load(path.read_text())
    path = write(path, {k: v for k, v in doc.items() if v is not None})
    result = run_worker(load_spec(path), sqlite_url, WorkerOptions(handle_signals=False))
    assert result.complete == 3
    for t in optuna.load_study(study_name=study_name, storage=sqlite_url).trials:
        acc, steps, seconds = t.values
        assert 0 <= acc <= 1 and seconds == t.user_attrs["train_seconds"] and seconds > 0
        assert steps == t.params["epochs"] * math.ceil(400 / t.params["batch_size"]) == t.user_attrs["optimizer_steps"]
        assert t.user_attrs["samples_seen"] == 400 * t.params["epochs"]
        assert t.intermediate_values == {} and len(t.user_attrs["train_loss"]) == t.params["epochs"]
