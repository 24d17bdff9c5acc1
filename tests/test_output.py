"""Output for scripts (one JSON trial schema, CSV columns from the study) and for people (tables that fit).

A real study of a plain objective with nine long-named parameters, run by the real CLI; the output commands run as
subprocesses with ``COLUMNS`` set, as a terminal of that width sets it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from hpo import query

from .conftest import TEST_OBJECTIVES, hpo_cli

TESTS = Path(__file__).resolve().parent
ENV = {
    "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    "HPO_ALLOW_OBJECTIVES": TEST_OBJECTIVES,
}
NAME = "spirals-optimizer-nine-parameters"
PARAMS = [
    "activation",
    "batch_size",
    "dropout_rate",
    "epochs",
    "hidden_units",
    "learning_rate",
    "momentum",
    "optimizer",
    "weight_decay",
]
KEYS = {"number", "state", "value", "params", "datetime_start", "datetime_complete", "duration", "user_attrs"}


@pytest.fixture(scope="module")
def study_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("output")
    url = f"sqlite:///{tmp / 'o.db'}"
    path = tmp / "nine.yaml"
    doc = {
        "name": NAME,
        "direction": "maximize",
        "objective": {"kind": "plain_objectives:nine"},
        "sampler": {"name": "random", "seed": 3},
        "budget": {"n_trials": 12},
    }
    path.write_text(yaml.safe_dump(doc))
    res = hpo_cli("run", str(path), "--storage", url, env=ENV)
    assert res.returncode == 0, res.stderr
    return url


def test_trials_and_best_json_share_one_schema(study_url: str) -> None:
    res = hpo_cli("trials", NAME, "--storage", study_url, "-f", "json")
    assert res.returncode == 0, res.stderr
    trials = json.loads(res.stdout)
    res = hpo_cli("best", NAME, "--storage", study_url, "-f", "json", "--limit", "3")
    assert res.returncode == 0, res.stderr
    best = json.loads(res.stdout)
    assert len(trials) == 12 and len(best) == 3
    assert all(set(t) == KEYS for t in trials + best)
    by_number = {t["number"]: t for t in trials}
    for b in best:  # the same trial reads the same in both
        assert b == by_number[b["number"]]
    assert best[0]["value"] == max(t["value"] for t in trials)
    assert all(isinstance(t["params"], dict) and "learning_rate" in t["params"] for t in trials)


def test_csv_columns_come_from_the_study_whatever_the_limit(study_url: str) -> None:
    adam = [t["number"] for t in json.loads(hpo_cli("trials", NAME, "-s", study_url, "-f", "json").stdout)]
    headers = []
    for limit in ("1", "3", "12"):
        res = hpo_cli("trials", NAME, "--storage", study_url, "-f", "csv", "--limit", limit)
        assert res.returncode == 0, res.stderr
        rows = list(csv.reader(io.StringIO(res.stdout)))
        assert len(rows) == 1 + int(limit)
        headers.append(rows[0])
    assert headers[0] == headers[1] == headers[2]
    assert [h.removeprefix("params_") for h in headers[0] if h.startswith("params_")] == PARAMS
    assert adam  # the study has trials
    frame = query.trials(study_url, NAME, limit=1)
    assert [c for c in frame.columns if c.startswith("params_")] == [f"params_{p}" for p in PARAMS]


def _header_words(table: str) -> set[str]:
    """The words of a rich table's header: the lines between the top border and the rule under the header."""
    lines = table.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("┏"))
    rule = next(i for i, line in enumerate(lines) if line.startswith("┡"))
    words: set[str] = set()
    for line in lines[top + 1 : rule]:
        for cell in line.strip("┃").split("┃"):
            words.update(cell.split())
    return words


@pytest.mark.parametrize("width", [80, 150])
@pytest.mark.parametrize("command", ["trials", "best", "studies"])
def test_tables_fit_the_terminal_with_every_header_word_whole(study_url: str, width: int, command: str) -> None:
    args = [command, NAME] if command != "studies" else [command]
    res = hpo_cli(*args, "--storage", study_url, env={"COLUMNS": str(width)})
    assert res.returncode == 0, res.stderr
    assert all(len(line) <= width for line in res.stdout.splitlines()), res.stdout
    words = _header_words(res.stdout)
    known = {"number", "state", "value", "duration", "epochs", "reason", "seed", "device", "name", "direction"}
    known |= {"trials", "complete", "pruned", "fail", "running", "best", "created", "updated", "sampler", "pruner"}
    assert words and words <= known | set(PARAMS), words  # every header word whole: no fragments
    shown = words & set(PARAMS)
    if command != "studies":
        assert {"number", "value"} <= words
        if len(shown) < len(PARAMS):  # the rest are named, not silently dropped
            assert "not shown at this width" in res.stdout and "--columns" in res.stdout
    if command == "studies":
        assert NAME in res.stdout  # a name is never cut in two
    if width == 150 and command == "trials":
        assert len(shown) >= 5


@pytest.mark.parametrize("width", [80, 150])
def test_columns_picks_and_orders_columns(study_url: str, width: int) -> None:
    res = hpo_cli(
        "trials", NAME, "-s", study_url, "--columns", "number,learning_rate,params_batch_size,value",
        env={"COLUMNS": str(width)},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    header = next(line for line in res.stdout.splitlines() if line.startswith("┃"))
    assert re.findall(r"\w+", header) == ["number", "learning_rate", "batch_size", "value"]
    res = hpo_cli("trials", NAME, "-s", study_url, "-f", "csv", "--columns", "number,optimizer")
    assert res.stdout.splitlines()[0] == "number,params_optimizer"
    res = hpo_cli("trials", NAME, "-s", study_url, "--columns", "nope")
    assert res.returncode == 2 and res.stderr.startswith("error: --columns: no column 'nope'")
