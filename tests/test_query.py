"""hpo.query and the analysts' CLI give the same answers as Optuna's own API, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpo import query
from hpo.errors import StudyError
from hpo.storage import open_read_only

from .analyst_helpers import mixed_study
from .conftest import hpo_cli
from .timing import ceiling


@pytest.fixture
def mixed(storage_url: str, study_name: str) -> tuple[str, str, optuna.Study]:
    return storage_url, study_name, mixed_study(storage_url, study_name)


def test_studies_match_optuna(mixed: tuple[str, str, optuna.Study]) -> None:
    url, name, study = mixed
    row = next(r for r in query.studies(url) if r["name"] == name)
    trials = study.get_trials(deepcopy=False)
    assert row["n_trials"] == len(trials) == 40
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING):
        assert row[state.name.lower()] == sum(t.state == state for t in trials)
    assert row["best_value"] == pytest.approx(study.best_value)
    assert row["best_trial"] == study.best_trial.number
    assert row["direction"] == "maximize"
    assert row["sampler"] == {"name": "tpe", "seed": 0, "kwargs": {}}
    assert row["pruner"]["name"] == "median"
    assert row["metric"] == "val_accuracy"
    assert row["created"] == min(t.datetime_start for t in trials).isoformat(sep=" ", timespec="seconds")
    summary = next(s for s in optuna.get_all_study_summaries(url) if s.study_name == name)
    assert summary.n_trials == row["n_trials"]


def test_trials_match_optuna_dataframe(mixed: tuple[str, str, optuna.Study]) -> None:
    url, name, study = mixed
    ours = query.trials(url, name)
    theirs = study.trials_dataframe()
    assert list(ours["number"]) == list(theirs["number"])
    assert list(ours["state"]) == list(theirs["state"])
    for a, b in zip(ours["value"], theirs["value"], strict=True):
        assert (a is None or math.isnan(a)) == math.isnan(b)
        if not math.isnan(b):
            assert a == pytest.approx(b)
    for p in ("lr", "batch_size", "epochs", "optimizer"):
        assert list(ours[f"params_{p}"]) == list(theirs[f"params_{p}"])
    assert list(ours["seed"]) == list(theirs["user_attrs_seed"])
    assert list(ours["reason"].fillna("-")) == list(theirs["user_attrs_reason"].fillna("-"))
    assert {"duration", "epochs_reached", "device"} <= set(ours.columns)


def test_trials_state_filter_and_limit(mixed: tuple[str, str, optuna.Study]) -> None:
    url, name, study = mixed
    pruned = [t.number for t in study.get_trials(states=(TrialState.PRUNED,))]
    assert list(query.trials(url, name, states=["pruned"])["number"]) == pruned
    assert list(query.trials(url, name, states=["pruned"], limit=3)["number"]) == pruned[:3]
    assert list(query.trials(url, name, limit=5)["number"]) == [0, 1, 2, 3, 4]
    assert query.trials(url, name, limit=0).empty


def test_best_matches_optuna(mixed: tuple[str, str, optuna.Study]) -> None:
    url, name, study = mixed
    top = query.best(url, name, n=5)
    assert top[0]["number"] == study.best_trial.number
    assert top[0]["params"] == study.best_trial.params
    complete = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: -t.value)
    assert [r["number"] for r in top] == [t.number for t in complete[:5]]


def test_importances_match_optuna(mixed: tuple[str, str, optuna.Study]) -> None:
    url, name, study = mixed
    ours = query.importances(url, name)
    theirs = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
    )
    assert list(ours) == list(theirs)
    assert ours == pytest.approx(dict(theirs))
    assert next(iter(ours)) == "lr"  # the synthetic metric depends on lr alone


def test_curves_match_intermediate_values(mixed: tuple[str, str, optuna.Study]) -> None:
    url, name, study = mixed
    df = query.curves(url, name)
    for t in study.get_trials():
        mine = df[df["number"] == t.number].set_index("step")["value"].to_dict()
        assert mine == pytest.approx(t.intermediate_values)


def test_unknown_study_is_a_study_error(storage_url: str, study_name: str) -> None:
    mixed_study(storage_url, study_name, n=4)
    with pytest.raises(StudyError, match="no study named 'missing'"):
        query.trials(storage_url, "missing")


def test_read_only_storage_refuses_writes(mixed: tuple[str, str, optuna.Study]) -> None:
    url, name, study = mixed
    ro = open_read_only(url)
    sid = ro.get_study_id_from_name(name)
    with pytest.raises(optuna.exceptions.StorageInternalError) as refused:
        ro.set_study_user_attr(sid, "x", 1)
    assert re.search(r"(?i)read.only|readonly", str(refused.value.__cause__))
    assert "x" not in optuna.load_study(study_name=name, storage=url).user_attrs


def test_optuna_cli_and_load_study_read_hpo_studies(mixed: tuple[str, str, optuna.Study]) -> None:
    url, name, study = mixed
    loaded = optuna.load_study(study_name=name, storage=url)
    assert len(loaded.trials) == 40 and loaded.best_value == pytest.approx(study.best_value)
    res = subprocess.run(
        [str(Path(sys.executable).parent / "optuna"), "trials", "--study-name", name, "--storage", url, "-f", "json"],
        capture_output=True,
        text=True,
        timeout=ceiling(120),
    )
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)) == 40


def test_cli_json_and_csv_parse(mixed: tuple[str, str, optuna.Study]) -> None:
    url, name, study = mixed
    env = {"HPO_STORAGE": url}
    res = hpo_cli("trials", name, "--state", "complete", "--limit", "4", "-f", "json", env=env)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["number"] for r in rows] == [t.number for t in study.get_trials(states=(TrialState.COMPLETE,))][:4]
    assert all(r["state"] == "COMPLETE" for r in rows)
    res = hpo_cli("studies", "-f", "json", env=env)
    assert res.returncode == 0, res.stderr
    assert any(s["name"] == name and s["n_trials"] == 40 for s in json.loads(res.stdout))
    res = hpo_cli("best", name, "-n", "2", "-f", "csv", env=env)
    assert res.returncode == 0, res.stderr
    parsed = list(csv.DictReader(io.StringIO(res.stdout)))
    assert int(parsed[0]["number"]) == study.best_trial.number and len(parsed) == 2
    res = hpo_cli("importance", name, "-f", "json", env=env)
    assert json.loads(res.stdout)[0]["param"] == "lr"
    res = hpo_cli("trials", name, "-n", "3", env=env)  # the rich table
    assert res.returncode == 0 and "trials of" in res.stdout


def test_cli_bad_input_one_line_exit_2(sqlite_url: str, study_name: str) -> None:
    mixed_study(sqlite_url, study_name, n=8)
    for args in (["trials", "no-such-study"], ["best", "no-such-study"], ["trials", study_name, "--state", "bogus"]):
        res = hpo_cli(*args, "--storage", sqlite_url)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    res = hpo_cli("studies", "--storage", "sqlite:////nonexistent/dir/x.db")
    assert res.returncode == 2 and res.stderr.startswith("error: ")
