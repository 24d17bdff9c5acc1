"""Analysts on big studies: 20,000 trials written by SQL (benchmarks/analysts_scale.py), read by the real CLI.

The streamed export (``hpo trials -f csv|json``) must give Optuna's own values (``study.trials_dataframe()``) and the
same records as loading every ``FrozenTrial``; the reads that show a little read a little.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from hpo import query

from .conftest import ROOT, hpo_cli
from .timing import ceiling

N = 20_000


def _bench() -> object:
    spec = importlib.util.spec_from_file_location("analysts_scale", ROOT / "benchmarks" / "analysts_scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def big(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(URL, study name) of a 20,000-trial study of every state, built by SQL in seconds."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('big') / 'hpo.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    name = f"big-{request.param}-{time.time_ns()}"
    _bench().build_study(url, name, N, mixed=True)  # type: ignore[attr-defined]
    yield url, name


def _num(cell: str) -> float | None:
    return None if cell == "" else float(cell)


def test_streamed_csv_equals_optunas_dataframe(big: tuple[str, str]) -> None:
    url, name = big
    result = hpo_cli("trials", name, "--storage", url, "-f", "csv", timeout=120)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    df = optuna.load_study(study_name=name, storage=url).trials_dataframe()
    assert len(rows) == len(df) == N
    assert list(rows[0]) == [
        "number",
        "state",
        "value",
        "params_layers",
        "params_lr",
        "params_optimizer",
        "datetime_start",
        "datetime_complete",
        "duration",
        "epochs_reached",
        "reason",
        "seed",
        "device",
        "worker",
    ]
    seen_states = set()
    for row, (_, ref) in zip(rows, df.iterrows(), strict=True):
        assert int(row["number"]) == ref["number"]
        assert row["state"] == ref["state"]
        seen_states.add(row["state"])
        value = _num(row["value"])
        if isinstance(ref["value"], float) and math.isnan(ref["value"]):
            assert value is None
        else:
            assert value == pytest.approx(ref["value"], rel=1e-5)  # %.6g as the table shows it
        for p in ("layers", "lr"):
            if isinstance(ref[f"params_{p}"], float) and math.isnan(ref[f"params_{p}"]):
                assert row[f"params_{p}"] == ""
            else:
                assert float(row[f"params_{p}"]) == pytest.approx(ref[f"params_{p}"], rel=1e-5)
        opt = ref["params_optimizer"]
        assert row["params_optimizer"] == ("'" + opt if opt.startswith("=") else opt)  # formula neutralised
        assert row["datetime_start"] == ref["datetime_start"].isoformat()
        if ref["datetime_complete"] is not None and not (ref["datetime_complete"] != ref["datetime_complete"]):
            assert row["datetime_complete"] == ref["datetime_complete"].isoformat()
            assert float(row["duration"]) == pytest.approx(ref["duration"].total_seconds(), rel=1e-5)
        else:
            assert row["datetime_complete"] == row["duration"] == ""
        assert int(row["seed"]) == ref["user_attrs_seed"]
        assert row["worker"] == ref["user_attrs_worker"]
        reason = ref["user_attrs_reason"]
        assert row["reason"] == ("'" + reason if isinstance(reason, str) else "")
    assert seen_states == {"COMPLETE", "PRUNED", "FAIL", "RUNNING"}


def test_streamed_json_equals_frozen_trials(big: tuple[str, str]) -> None:
    url, name = big
    result = hpo_cli("trials", name, "--storage", url, "-f", "json", "--state", "complete,pruned", timeout=120)
    assert result.returncode == 0, result.stderr
    streamed = json.loads(result.stdout)
    loaded = query.trial_records(url, name, states=["complete", "pruned"])  # every FrozenTrial, Optuna's way
    assert len(streamed) == len(loaded) > N // 2
    assert streamed == json.loads(json.dumps(loaded, default=str).replace("-Infinity", '"-inf"'))


def test_limits_and_first_row(big: tuple[str, str]) -> None:
    """``-n`` is the first trials by number; the first row arrives before the export ends (it streams)."""
    url, name = big
    head = hpo_cli("trials", name, "--storage", url, "-f", "csv", "-n", "7", "--state", "fail")
    assert head.returncode == 0, head.stderr
    numbers = [int(r["number"]) for r in csv.DictReader(io.StringIO(head.stdout))]
    ref = [
        t.number
        for t in optuna.load_study(study_name=name, storage=url).get_trials(states=[optuna.trial.TrialState.FAIL])
    ]
    assert numbers == ref[:7]
    empty = hpo_cli("trials", name, "--storage", url, "-f", "json", "-n", "0")
    assert empty.returncode == 0 and json.loads(empty.stdout) == []
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpo", "trials", name, "--storage", url, "-f", "csv"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    first = proc.stdout.readline()
    assert first.startswith("0,")
    assert proc.poll() is None  # still writing: rows are not all built before the first is written
    rest = proc.stdout.read()
    assert proc.wait(timeout=ceiling(120)) == 0
    assert rest.count("\n") == N - 1


def test_best_n_ranked_by_sql(big: tuple[str, str]) -> None:
    url, name = big
    result = hpo_cli("best", name, "--storage", url, "-n", "5", "-f", "json")
    assert result.returncode == 0, result.stderr
    complete = optuna.load_study(study_name=name, storage=url).get_trials(states=[optuna.trial.TrialState.COMPLETE])
    ranked = sorted(complete, key=lambda t: (-t.value, t.number))  # maximize
    assert [r["number"] for r in json.loads(result.stdout)] == [t.number for t in ranked[:5]]


def test_importance_and_report_state_their_sample(big: tuple[str, str], tmp_path: Path) -> None:
    """Over 2,000 trials: a sample of 2,000, said so (stderr for -f json, whose stdout stays data); the report's
    counts are the study's (SQL), its figures the sample's."""
    url, name = big
    imp = hpo_cli("importance", name, "--storage", url, "-f", "json", timeout=120)
    assert imp.returncode == 0, imp.stderr
    assert {r["param"] for r in json.loads(imp.stdout)} == {"lr", "optimizer"}  # layers: not in every trial
    said = "from 2,000 of 20,000 trials: the best 200 complete trials and 1,800 drawn uniformly at random"
    assert said in imp.stderr and "seed 0" in imp.stderr
    rep = hpo_cli("report", name, "--storage", url, "-o", str(tmp_path / "r.html"), timeout=120)
    assert rep.returncode == 0, rep.stderr
    page = (tmp_path / "r.html").read_text()
    assert "id='sample'" in page and said in page
    study = optuna.load_study(study_name=name, storage=url)
    complete = len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE]))
    assert f"{N} trials: " in page and f"{complete} complete" in page
    assert len(page) < 10 * 2**20
    assert query.sampled_study(url, name).get_trials() == query.sampled_study(url, name).get_trials()  # seeded


def test_small_study_is_read_whole(sqlite_url: str, study_name: str) -> None:
    _bench().build_study(sqlite_url, study_name, 300, mixed=True)  # type: ignore[attr-defined]
    s = query.sampled_study(sqlite_url, study_name)
    assert not hasattr(s, "sample") and len(s.trials) == 300
    imp = hpo_cli("importance", study_name, "--storage", sqlite_url)
    assert imp.returncode == 0 and "drawn" not in imp.stdout + imp.stderr
