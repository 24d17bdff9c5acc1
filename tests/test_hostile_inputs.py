"""Every bad input is one clean error, names are data, secrets stay secret (issue 14).

The bulk (well over 120 bad inputs: study files, flags of every command, storage URLs, names, enqueues,
objectives, resumes) runs the real command line in process through typer's ``CliRunner`` against one prepared
SQLite database that holds a real study (two trained trials); a representative subset runs again as real ``hpo``
subprocesses. Each case asserts: exit status 2, exactly one ``error:`` line, naming what was wrong (file, field or
flag), no traceback, no canary password anywhere in stdout or stderr, and Optuna's tables holding the same rows as
before.

Then: no table of a PostgreSQL study database holds the password written in the study file's ``storage:``, and the
dashboard serves none; the dashboard answers only the hosts it is served as; CSV cells are neutralised; hostile
study and parameter names are printed literally by every command.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
import yaml
from typer.testing import CliRunner

from hpo.cli import app
from hpo.render import FORMULA_START

from .conftest import ROOT, _fresh_database, hpo_cli
from .timing import ceiling

#: Two halves, so a password cut at an unescaped "@" is still found: no output may hold either.
CANARY_A, CANARY_B = "Q7f3a9x", "Z8e2b1y"
CANARY = CANARY_A + CANARY_B
CANARY_AT = CANARY_A + "@" + CANARY_B  # unescaped "@" in a password

BASE: dict[str, Any] = {
    "name": "base",
    "direction": "maximize",
    "metric": "val_accuracy",
    "objective": {
        "kind": "training",
        "data": {"source": "spirals", "n_train": 200, "n_val": 100, "n_test": 100, "seed": 0},
        "model": {"kind": "mlp", "layers": [8]},
        "loss": "bce",
        "defaults": {"batch_size": 64, "lr": 0.01, "epochs": 2, "optimizer": "adam"},
    },
    "space": {
        "lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True},
        "epochs": {"type": "int", "low": 1, "high": 2},
        "optimizer": {"choices": ["sgd", "adam"]},
        "layers": {"choices": [[8], [16]]},
    },
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "budget": {"n_trials": 2},
}


def variant(**changes: Any) -> dict[str, Any]:
    """BASE with dotted paths set (``{"objective.model.layers": [32]}``); a value of ``...`` deletes the key."""
    doc = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value
    return doc


@dataclass
class Case:
    """One bad input: ``args`` (``{dir}`` is the case's folder), the files to write there, and what the error line
    must contain (each of ``expect``)."""

    id: str
    args: list[str]
    expect: list[str]
    files: dict[str, Any] = field(default_factory=dict)  # name -> dict (YAML), str or bytes
    env: dict[str, str | None] = field(default_factory=dict)
    code: int = 2


def bad_file(id_: str, doc: Any, *expect: str, cmd: str = "run") -> Case:
    """A study file that must be refused, naming the file and ``expect``."""
    return Case(id_, [cmd, "{dir}/s.yaml"], ["s.yaml", *expect], {"s.yaml": doc})


def raw_file(id_: str, content: str | bytes, *expect: str, cmd: str = "run") -> Case:
    return Case(id_, [cmd, "{dir}/s.yaml"], ["s.yaml", *expect], {"s.yaml": content})


FILES = [
    raw_file("file-not-utf8", b"name: caf\xe9\nobjective: {kind: training}\n", "not UTF-8"),
    raw_file("file-5000-brackets", "x: " + "[" * 5000, "nested"),
    raw_file("file-deep-mapping", "x: " + "{a: " * 60 + "1" + "}" * 60, "nested deeper"),
    raw_file("file-duplicate-key", yaml.safe_dump(BASE, sort_keys=False) + "name: other\n", "duplicate key 'name'"),
    raw_file(
        "file-duplicate-space-key",
        "name: dup\nobjective: {kind: training, data: {source: spirals}}\nspace:\n  lr: 0.1\n  lr: 0.2\n",
        "line 5: duplicate key 'lr'",
    ),
    raw_file("file-yaml-syntax", "name: [unclosed\n", "YAML syntax error"),
    raw_file("file-empty", "", "mapping"),
    raw_file("file-a-list", "- 1\n- 2\n", "mapping"),
    raw_file("file-a-scalar", "just text\n", "mapping"),
    raw_file("file-python-tag", "name: !!python/object/apply:os.system ['true']\n", "YAML"),
    raw_file("file-tab-indent", "name: x\nspace:\n\tlr: 1\n", "YAML syntax error"),
    bad_file("file-missing-name", variant(name=...), "name"),
    bad_file("file-empty-name", variant(name=""), "name"),
    bad_file("file-name-too-long", variant(name="n" * 600), "name"),
    bad_file("file-unknown-top-key", variant(frobnicate=1), "frobnicate", "unknown key"),
    bad_file("file-direction", variant(direction="sideways"), "direction"),
    bad_file("file-metric", variant(metric="f1"), "metric"),
    bad_file("file-no-objective", variant(objective=...), "objective"),
    bad_file("file-objective-kind", variant(objective__kind="nosuch"), "objective"),
    bad_file("file-objective-module", variant(objective={"kind": "nosuch_module_x.sub:fn"}), "objective.kind"),
    bad_file("file-objective-function", variant(objective={"kind": "os.path:nosuchfn"}), "objective.kind", "nosuchfn"),
    bad_file("file-objective-not-callable", variant(objective={"kind": "os:sep"}), "objective.kind"),
    bad_file("file-objective-kind-spaces", variant(objective={"kind": "a b:c"}), "objective"),
    bad_file(
        "file-data-path-missing",
        variant(objective__data={"source": "idx", "path": "/no/such/mnist"}),
        "objective.data.path",
        "/no/such/mnist",
    ),
    bad_file("file-data-source", variant(objective__data={"source": "nosuch"}), "objective.data"),
    bad_file("file-data-n-train", variant(objective__data={"source": "spirals", "n_train": -1}), "n_train"),
    bad_file("file-data-extra", variant(objective__data={"source": "spirals", "colour": 1}), "colour"),
    bad_file("file-model-layers-zero", variant(objective__model={"layers": [0]}), "objective.model.layers"),
    bad_file("file-model-activation", variant(objective__model={"activation": "swish"}), "activation"),
    bad_file("file-loss", variant(objective__loss="hinge"), "objective.loss"),
    bad_file("file-defaults-lr", variant(objective__defaults={"lr": -1}), "objective.defaults.lr"),
    bad_file("file-threads-zero", variant(objective__threads=0), "objective.threads"),
    bad_file("file-unknown-param", variant(space__frobnicate={"choices": [1, 2]}), "space.frobnicate"),
    bad_file(
        "file-when-below",
        variant(space={"momentum": {"value": 0.9, "when": {"optimizer": ["sgd"]}}, "optimizer": {"choices": ["sgd"]}}),
        "space.momentum.when",
        "below",
    ),
    bad_file("file-when-missing", variant(space__epochs={"value": 1, "when": {"nosuch": [1]}}), "space.epochs.when"),
    bad_file("file-low-above-high", variant(space__lr={"type": "float", "low": 1, "high": 0.1}), "space.lr"),
    bad_file("file-log-zero", variant(space__lr={"type": "float", "low": 0, "high": 1, "log": True}), "space.lr"),
    bad_file("file-nan-low", variant(space__lr={"type": "float", "low": float("nan"), "high": 1}), "space.lr"),
    bad_file("file-inf-high", variant(space__lr={"type": "float", "low": 0.1, "high": float("inf")}), "space.lr"),
    bad_file("file-empty-choices", variant(space__optimizer={"choices": []}), "space.optimizer"),
    bad_file("file-duplicate-choices", variant(space__optimizer={"choices": ["sgd", "sgd"]}), "space.optimizer"),
    bad_file("file-step-zero", variant(space__epochs={"type": "int", "low": 1, "high": 2, "step": 0}), "space.epochs"),
    bad_file("file-param-type", variant(space__lr={"type": "complex", "low": 1, "high": 2}), "space.lr"),
    bad_file("file-param-shape", variant(space__lr={"low": 1}), "space.lr"),
    bad_file("file-optimizer-choice", variant(space__optimizer={"choices": ["sgd", "nadam"]}), "nadam"),
    bad_file("file-sampler", variant(sampler={"name": "annealing"}), "sampler.name"),
    bad_file("file-pruner", variant(pruner={"name": "nosuch"}), "pruner.name"),
    bad_file("file-budget-zero", variant(budget={"n_trials": 0}), "budget.n_trials"),
    bad_file("file-budget-negative-timeout", variant(budget={"timeout": -1}), "budget.timeout"),
    bad_file("file-budget-empty", variant(budget={}), "budget"),
    bad_file("file-enqueue-unknown", variant(enqueue=[{"frobnicate": 1}]), "enqueue.0.frobnicate"),
    bad_file("file-enqueue-range", variant(enqueue=[{"lr": 55}]), "enqueue.0.lr", "outside"),
    bad_file("file-enqueue-choice", variant(enqueue=[{"optimizer": "nadam"}]), "enqueue.0.optimizer"),
    bad_file("file-enqueue-type", variant(enqueue=[{"lr": "abc"}]), "enqueue.0.lr"),
    bad_file("file-enqueue-nested", variant(enqueue=[{"lr": [[0.01]]}]), "enqueue.0.lr"),
    bad_file("file-enqueue-int", variant(enqueue=[{"epochs": 1.5}]), "enqueue.0.epochs"),
    bad_file("file-enqueue-bool", variant(enqueue=[{"epochs": True}]), "enqueue.0.epochs"),
    bad_file("file-enqueue-list-choice", variant(enqueue=[{"layers": [9]}]), "enqueue.0.layers"),
    bad_file("file-enqueue-second", variant(enqueue=[{"lr": 0.01}, {"lr": 0}]), "enqueue.1.lr"),
    bad_file("file-enqueue-not-mapping", variant(enqueue=[5]), "enqueue.0"),
    bad_file("file-prediction-param", variant(predictions=[{"param": "nosuch", "claim": "increasing"}]), "nosuch"),
    bad_file("file-prediction-claim", variant(predictions=[{"param": "lr", "claim": "magic"}]), "predictions.0.claim"),
    bad_file("file-population-zero", variant(population={"size": 0}), "population.size"),
    bad_file(
        "file-grokking-direction",
        variant(objective={"kind": "grokking"}, metric="steps_to_generalise", space={}),
        "direction",
    ),
    bad_file("file-create-bad", variant(objective__loss="hinge"), "objective.loss", cmd="create"),
    bad_file("file-worker-bad", variant(space__frobnicate=1), "space.frobnicate", cmd="worker"),
    bad_file("file-check-bad", variant(direction="up"), "direction", cmd="check"),
    Case("file-missing", ["run", "{dir}/nosuch.yaml"], ["nosuch.yaml", "no such study file"]),
    Case("file-a-folder", ["create", "{dir}/"], ["no such study file"]),
]

PG = "postgresql+psycopg"
UNREACHABLE = {"HPO_CONNECT_RETRY_FOR": "0.3"}
URLS = [
    (f"{PG}:/u:{CANARY}@127.0.0.1/db", "malformed storage URL"),  # one slash
    (f"{PG}:/u:{CANARY_AT}@127.0.0.1/db", "malformed storage URL"),
    (f"{PG}://u:{CANARY_AT}@127.0.0.1:1/db", "malformed storage URL"),  # unescaped "@"
    (f"{PG}://u:{CANARY}@[bad", f"{PG}://u:***@[bad"),
    (f"{PG}://u:{CANARY}@127.0.0.1:notaport/db", "malformed storage URL"),
    (f"{PG}://postgres@127.0.0.1:1/db?password={CANARY}", "cannot connect"),
    (f"{PG}://u:{CANARY}@127.0.0.1:1/db", "cannot connect"),
    (f"mysql+pymysql://root:{CANARY}@127.0.0.1:1/db", "cannot connect"),
    (f"nosuchdb+driver://u:{CANARY}@h/db", "no database driver"),
    (f"notaurl{CANARY}", "malformed storage URL"),
    ("sqlite:////no/such/folder/x.db", "/no/such/folder"),
]
URL_CASES = [
    Case(f"url-{cmd}-{i}", [cmd, *extra, "--storage", url], [msg], env=UNREACHABLE)
    for i, (url, msg) in enumerate(URLS)
    for cmd, extra in (("studies", []), ("trials", ["base"]))
] + [
    Case(f"url-env-{i}", ["best", "base"], [msg], env={**UNREACHABLE, "HPO_STORAGE": url})
    for i, (url, msg) in enumerate(URLS[:6])
] + [
    Case(f"url-file-{i}", ["run", "{dir}/s.yaml"], [msg], {"s.yaml": variant(storage=url)}, {**UNREACHABLE, "HPO_STORAGE": None})
    for i, (url, msg) in enumerate(URLS[:7])
]  # fmt: skip

FLAGS = [
    (["run", "{dir}/s.yaml", "--n-trials", "-1"], "--n-trials"),
    (["run", "{dir}/s.yaml", "--n-trials", "0"], "--n-trials"),
    (["run", "{dir}/s.yaml", "--n-trials", "many"], "--n-trials"),
    (["run", "{dir}/s.yaml", "--timeout", "-5"], "--timeout"),
    (["run", "{dir}/s.yaml", "--timeout", "0"], "--timeout"),
    (["run", "{dir}/s.yaml", "--timeout", "nan"], "--timeout"),
    (["run", "{dir}/s.yaml", "--workers", "0"], "--workers"),
    (["run", "{dir}/s.yaml", "--threads", "-1"], "--threads"),
    (["run", "{dir}/s.yaml", "--threads", "0"], "--threads"),
    (["run", "{dir}/s.yaml", "--heartbeat", "0"], "--heartbeat"),
    (["run", "{dir}/s.yaml", "--heartbeat", "-3"], "--heartbeat"),
    (["run", "{dir}/s.yaml", "--grace", "0"], "--grace"),
    (["run", "{dir}/s.yaml", "--max-retry", "-1"], "--max-retry"),
    (["run", "{dir}/s.yaml", "--population", "0"], "population"),
    (["run", "{dir}/s.yaml", "--population", "lots"], "population"),
    (["run", "{dir}/s.yaml", "--frobnicate"], "--frobnicate"),
    (["run"], "study_file"),
    (["worker", "base", "--n-trials", "0"], "--n-trials"),
    (["worker", "base", "--timeout", "-1"], "--timeout"),
    (["worker", "base", "--db-retry-for", "-1"], "--db-retry-for"),
    (["worker", "base", "--seed-offset", "-1"], "--seed-offset"),
    (["worker", "base", "--heartbeat", "0"], "--heartbeat"),
    (["worker", "base", "--threads", "-2"], "--threads"),
    (["reap", "base", "--heartbeat", "0"], "--heartbeat"),
    (["reap", "base", "--max-retry", "-1"], "--max-retry"),
    (["dashboard", "--port", "99999"], "--port"),
    (["dashboard", "--port", "-1"], "--port"),
    (["dashboard", "--port", "http"], "--port"),
    (["trials", "base", "--limit", "-1"], "--limit"),
    (["trials", "base", "--format", "xml"], "--format"),
    (["trials", "base", "--state", "sleeping"], "sleeping"),
    (["best", "base", "--limit", "0"], "--limit"),
    (["importance", "base", "-n", "-1"], "--limit"),
    (["studies", "-f", "xlsx"], "--format"),
    (["evaluate", "base", "--trial", "-1"], "--trial"),
    (["evaluate", "base", "--trial", "99"], "trial 99"),
    (["report", "base", "-o", "{dir}/newdir/"], "newdir"),
    (["enqueue", "base"], "--param"),
    (["nosuchcommand"], "nosuchcommand"),
    (["db", "init", "--frobnicate"], "--frobnicate"),
]
FLAG_CASES = [
    Case(f"flag-{'-'.join(a for a in args if a != '{dir}/s.yaml')}", args, [flag], {"s.yaml": BASE})
    for args, flag in FLAGS
]

ENQUEUES = [
    ("lr=55", "outside"),
    ("lr=-1", "outside"),
    ("lr=abc", "number"),
    ("lr=.nan", "lr"),
    ("lr=[[0.01]]", "number"),
    ("lr={a: 1}", "number"),
    ("lr=true", "number"),
    ("epochs=1.5", "whole number"),
    ("epochs=7", "outside"),
    ("optimizer=nadam", "choices"),
    ("optimizer=[adam]", "choices"),
    ("layers=[9]", "choices"),
    ("layers=8", "choices"),
    ("frobnicate=1", "not in the study's space"),
    ("lr", "name=value"),
    ("=1", "name=value"),
    ("lr=[unclosed", "--param"),
    ("lr=1" + "0" * 400, "outside"),
    ("epochs=" + "9" * 400, "outside"),
]
ENQUEUE_CASES = [
    Case(f"enqueue-{p[:24]}", ["enqueue", "base", "-p", p], ["--param", p.split("=")[0] or "="]) for p, _ in ENQUEUES
]
ENQUEUE_CASES += [
    Case(f"enqueue-reason-{i}", ["enqueue", "base", "-p", "lr=0.01", "-p", p], [why]) for i, (p, why) in enumerate(ENQUEUES[:14])
]  # fmt: skip

RESUMES = [
    ("model-layers", {"objective__model": {"kind": "mlp", "layers": [32, 32]}}, "objective.model.layers"),
    ("model-activation", {"objective__model": {"kind": "mlp", "layers": [8], "activation": "tanh"}}, "activation"),
    ("loss", {"objective__loss": "mse"}, "objective.loss"),
    ("data-seed", {"objective__data": {**BASE["objective"]["data"], "seed": 7}}, "objective.data.seed"),
    ("data-size", {"objective__data": {**BASE["objective"]["data"], "n_train": 300}}, "objective.data.n_train"),
    ("defaults", {"objective__defaults": {**BASE["objective"]["defaults"], "batch_size": 32}}, "batch_size"),
    ("seed", {"objective__seed": 3}, "objective.seed"),
    ("space", {"space__lr": {"type": "float", "low": 0.0001, "high": 0.1, "log": True}}, "space.lr"),
    ("direction", {"direction": "minimize"}, "direction"),
    ("metric", {"metric": "val_loss"}, "metric"),
]
RESUME_CASES = [
    Case(f"resume-{id_}", ["run", "{dir}/s.yaml", "--n-trials", "3"], [want, "base"], {"s.yaml": variant(**ch)})
    for id_, ch, want in RESUMES
] + [
    Case(f"resume-worker-{id_}", ["worker", "{dir}/s.yaml", "--n-trials", "3"], [want], {"s.yaml": variant(**ch)})
    for id_, ch, want in RESUMES[:4]
]  # fmt: skip

NAMES = ["[bold]nosuch", "a\nerror: fake line", "\x1b[31mred\x1b[0m", "sec-[/]markup[bold", "$(touch pwned)", "n" * 600]
NAME_CASES = [
    Case(f"name-{cmd}-{i}", [cmd, name, *extra], ["no study named"])
    for i, name in enumerate(NAMES)
    for cmd, extra in (("trials", []), ("best", []), ("enqueue", ["-p", "lr=0.01"]), ("report", ["-o", "{dir}/"]))
]

CASES: list[Case] = FILES + URL_CASES + FLAG_CASES + ENQUEUE_CASES + RESUME_CASES + NAME_CASES


# --------------------------------------------------------------------------- running the cases


def table_counts(db: Path) -> dict[str, int]:
    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: con.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}
    finally:
        con.close()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SQLite database holding the study ``base`` with two trained trials (real training, in process)."""
    folder = tmp_path_factory.mktemp("prepared")
    study = folder / "base.yaml"
    study.write_text(yaml.safe_dump(BASE, sort_keys=False))
    url = f"sqlite:///{folder / 'hpo.db'}"
    res = CliRunner().invoke(app, ["run", str(study), "--threads", "1"], env={"HPO_STORAGE": url})
    assert res.exit_code == 0, res.output
    yield url


def materialise(case: Case, folder: Path) -> list[str]:
    for name, content in case.files.items():
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(yaml.safe_dump(content, sort_keys=False, allow_unicode=True))
    return [a.replace("{dir}", str(folder)) for a in case.args]


def check_clean_error(case: Case, code: int, stdout: str, stderr: str) -> None:
    text = stdout + stderr
    assert code == case.code, f"{case.id}: exit {code}, not {case.code}:\n{text}"
    assert "Traceback" not in text, f"{case.id}: a traceback:\n{text}"
    assert CANARY_A not in text and CANARY_B not in text, f"{case.id}: the password is printed:\n{text}"
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, f"{case.id}: {len(errors)} error: lines, not one:\n{text}"
    assert "\x1b" not in text, f"{case.id}: a raw escape character in the output:\n{text!r}"
    for want in case.expect:
        assert want in errors[0], f"{case.id}: the error line does not name {want!r}: {errors[0]}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clean_error(case: Case, prepared: str, tmp_path: Path) -> None:
    db = Path(prepared.removeprefix("sqlite:///"))
    before = table_counts(db)
    args = materialise(case, tmp_path)
    env = {"HPO_STORAGE": prepared, **case.env}
    res = CliRunner().invoke(app, args, env=env)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"{case.id}: raised {res.exception!r}") from res.exception
    check_clean_error(case, res.exit_code, res.stdout, res.stderr)
    assert table_counts(db) == before, f"{case.id}: the database changed"


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 120, len(CASES)
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be distinct"
    assert set(SUBPROCESS) <= {c.id for c in CASES}


def server_counts(url: str) -> dict[str, int]:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            tables = sqlalchemy.inspect(conn).get_table_names()
            return {t: conn.execute(sqlalchemy.text(f'SELECT COUNT(*) FROM "{t}"')).scalar_one() for t in tables}
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def prepared_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same prepared study on a fresh PostgreSQL database."""
    server = os.environ.get("HPO_TEST_POSTGRES_URL")
    if not server:
        pytest.skip("HPO_TEST_POSTGRES_URL is not set; this test needs a real PostgreSQL (.ci/run sets it)")
    gen = _fresh_database(server)
    url = next(gen)
    study = tmp_path_factory.mktemp("prepared_pg") / "base.yaml"
    study.write_text(yaml.safe_dump(BASE, sort_keys=False))
    res = CliRunner().invoke(app, ["run", str(study), "--threads", "1"], env={"HPO_STORAGE": url})
    assert res.exit_code == 0, res.output
    yield url
    for _ in gen:
        pass


#: The cases that reach the stored study (resumes, enqueues) and some files, again on PostgreSQL.
PG_CASES = [c for c in CASES if c.id.startswith(("resume-", "enqueue-", "file-enqueue", "file-objective", "file-data"))]


@pytest.mark.parametrize("case", PG_CASES, ids=[c.id for c in PG_CASES])
def test_bad_input_leaves_postgresql_unchanged(case: Case, prepared_pg: str, tmp_path: Path) -> None:
    before = server_counts(prepared_pg)
    args = materialise(case, tmp_path)
    res = CliRunner().invoke(app, args, env={"HPO_STORAGE": prepared_pg, **case.env})
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"{case.id}: raised {res.exception!r}") from res.exception
    check_clean_error(case, res.exit_code, res.stdout, res.stderr)
    assert server_counts(prepared_pg) == before, f"{case.id}: the database changed"


SUBPROCESS = [
    "file-not-utf8",
    "file-5000-brackets",
    "file-duplicate-key",
    "file-objective-module",
    "file-data-path-missing",
    "url-studies-0",
    "url-trials-2",
    "url-file-5",
    "flag-dashboard---port-99999",
    "flag-run---threads--1",
    "enqueue-lr=55",
    "resume-model-layers",
    "name-trials-1",
    "name-enqueue-3",
]


@pytest.mark.parametrize("case_id", SUBPROCESS)
def test_bad_input_as_a_real_process(case_id: str, prepared: str, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == case_id)
    db = Path(prepared.removeprefix("sqlite:///"))
    before = table_counts(db)
    args = materialise(case, tmp_path)
    merged = {**os.environ, "HPO_STORAGE": prepared, **case.env}
    env = {k: v for k, v in merged.items() if v is not None}  # None: unset (the file's storage: is used)
    res = subprocess.run(
        [sys.executable, "-m", "hpo", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=ceiling(120),
    )
    check_clean_error(case, res.returncode, res.stdout, res.stderr)
    assert table_counts(db) == before, f"{case.id}: the database changed"


# --------------------------------------------------------------------------- credentials never stored


def _all_text(url: str) -> str:
    """Every row of every table of the database, as text."""
    engine = sqlalchemy.create_engine(url)
    try:
        chunks = []
        with engine.connect() as conn:
            for table in sqlalchemy.inspect(conn).get_table_names():
                for row in conn.execute(sqlalchemy.text(f'SELECT * FROM "{table}"')):
                    chunks.append(" ".join(str(v) for v in row))
        return "\n".join(chunks)
    finally:
        engine.dispose()


@pytest.fixture
def pg_db() -> Iterator[str]:
    server = os.environ.get("HPO_TEST_POSTGRES_URL")
    if not server:
        pytest.skip("HPO_TEST_POSTGRES_URL is not set; this test needs a real PostgreSQL (.ci/run sets it)")
    yield from _fresh_database(server)


def test_no_table_holds_the_password_of_the_study_files_storage(pg_db: str, tmp_path: Path) -> None:
    """The local PostgreSQL trusts 127.0.0.1 and ignores the password, so the run is real with it in the URL."""
    from hpo.dashboard import create_app
    from hpo.worker import SPEC_ATTR

    from .test_dashboard import call

    url_with_pw = sqlalchemy.engine.make_url(pg_db).set(password=CANARY).render_as_string(hide_password=False)
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump(variant(name="pw-study", storage=url_with_pw), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "HPO_STORAGE"}
    res = hpo_cli("run", str(study), "--threads", "1", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert CANARY not in res.stdout + res.stderr
    stored = _all_text(pg_db)
    assert "pw-study" in stored and "postgres:***@" in stored  # the spec is stored, its password masked
    assert CANARY not in stored

    # a study stored by an older hpo, with the password in hpo:spec: a worker masks it when it opens the study
    import optuna

    s = optuna.load_study(study_name="pw-study", storage=pg_db)
    spec = dict(s.user_attrs[SPEC_ATTR], storage=url_with_pw)
    s.set_user_attr(SPEC_ATTR, spec)
    assert CANARY in _all_text(pg_db)
    res = hpo_cli("enqueue", "pw-study", "-p", "lr=0.01", "--storage", pg_db)
    assert res.returncode == 0, res.stderr
    assert CANARY not in _all_text(pg_db)

    app_ = create_app(pg_db)
    code, body = call(app_, "GET", "/api/studies")
    assert code == 200 and b"pw-study" in body
    sid = json.loads(body)["study_summaries"][0]["study_id"]
    code, body = call(app_, "GET", f"/api/studies/{sid}")
    assert code == 200 and b"postgres:***@" in body
    assert CANARY.encode() not in body


# --------------------------------------------------------------------------- the dashboard's Host check


def _get(app_: Any, host: str | None) -> int:
    from wsgiref.util import setup_testing_defaults

    env: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/studies", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(env)
    if host is None:
        env.pop("HTTP_HOST", None)
    else:
        env["HTTP_HOST"] = host
    status: list[str] = []
    b"".join(app_(env, lambda s, headers, exc_info=None: status.append(s)))
    return int(status[0].split()[0])


def test_dashboard_answers_only_the_hosts_it_is_served_as(prepared: str) -> None:
    from hpo.dashboard import create_app

    app_ = create_app(prepared, allowed_hosts=["0.0.0.0", "hpo.lab.example"])
    for host in ("127.0.0.1", "127.0.0.1:8080", "localhost:8080", "LOCALHOST", "[::1]:8080", "hpo.lab.example:80"):
        assert _get(app_, host) == 200, host
    for host in ("attacker.example", "attacker.example:8080", "127.0.0.1.attacker.example", "localhost.evil", "", None):
        assert _get(app_, host) == 421, host
    writable = create_app(prepared, allow_writes=True)
    assert _get(writable, "attacker.example") == 421
    # a loopback name glued to another host, or with a port that is not a number, is no loopback name
    for host in ("[::1]evil.com", "[::1]:80evil.com", "localhost:8080@evil.com", "127.0.0.1:x", "localhost evil"):
        assert _get(app_, host) == 421, host


def test_dashboard_redirects_never_follow_forwarded_host_headers(prepared: str) -> None:
    """X-Forwarded-Host (or Forwarded) would make bottle build its redirects to the page's chosen host: dropped."""
    from wsgiref.util import setup_testing_defaults

    from hpo.dashboard import create_app

    env: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(env)
    env.update(HTTP_HOST="127.0.0.1:8080", HTTP_X_FORWARDED_HOST="evil.example", HTTP_FORWARDED="host=evil.example")
    seen: list[tuple[str, list[tuple[str, str]]]] = []
    b"".join(create_app(prepared)(env, lambda s, h, exc_info=None: seen.append((s, h))))
    status, headers = seen[0]
    location = dict(headers).get("Location", "")
    assert status.startswith("302") and location.endswith("/dashboard"), (status, headers)
    assert "evil" not in location


def test_dashboard_host_check_on_a_real_server(prepared: str) -> None:
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpo", "dashboard", "--port", str(port), "--storage", prepared],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + ceiling(60)

        def get(host: str) -> int:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/studies", headers={"Host": host})
            try:
                with urllib.request.urlopen(req, timeout=ceiling(5)) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code

        while True:
            try:
                code = get(f"127.0.0.1:{port}")
                break
            except OSError as exc:
                assert proc.poll() is None, f"the dashboard exited {proc.returncode} before answering"
                assert time.monotonic() < deadline, f"the dashboard did not answer in {ceiling(60):.0f} s: {exc}"
                time.sleep(0.3)
        assert code == 200
        assert get("attacker.example") == 421
        assert get(f"localhost:{port}") == 200
    finally:
        proc.terminate()
        proc.wait(timeout=ceiling(30))


# --------------------------------------------------------------------------- CSV and names


HOSTILE_CHOICES = ["=cmd|' /C calc'!A0", "@SUM(1+1)", "+1+1", "-2+3", "\tTAB", "\rCR", "plain"]


def hostile_study(folder: Path, name: str, url: str, param: str = "choice") -> Path:
    doc = {
        "name": name,
        "direction": "maximize",
        "metric": "value",
        "objective": {"kind": "tests.fast_objectives:quadratic", "steps": 2},
        "space": {"lr": {"type": "float", "low": 0.001, "high": 1.0, "log": True}, param: {"choices": HOSTILE_CHOICES}},
        "sampler": {"name": "random", "seed": 1},
        "pruner": {"name": "none"},
        "budget": {"n_trials": 8},
        "enqueue": [{param: c} for c in HOSTILE_CHOICES],
    }
    path = folder / "hostile.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return path


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    name = '=HYPERLINK("http://x.example","click")'
    study = hostile_study(tmp_path, name, url)
    runner = CliRunner()
    env = {"HPO_STORAGE": url}
    assert runner.invoke(app, ["run", str(study)], env=env).exit_code == 0
    negative = 0
    for args in (["trials", name], ["best", name, "-n", "8"], ["studies"], ["importance", name]):
        res = runner.invoke(app, [*args, "-f", "csv"], env=env)
        assert res.exit_code == 0, res.output
        rows = list(csv.reader(io.StringIO(res.stdout)))
        assert len(rows) >= 2, res.stdout
        for row in rows:
            for cell in row:
                if re.fullmatch(r"-\d+(\.\d+)?(e-?\d+)?", cell):
                    negative += 1  # numbers stay numbers
                    continue
                assert not cell.startswith(FORMULA_START), f"{args[0]}: a formula cell {cell!r}"
        text = res.stdout
        if args[0] in ("trials", "best"):
            for c in HOSTILE_CHOICES[:4]:
                assert "'" + c in text, f"{args[0]}: {c!r} not shown neutralised"
        if args[0] == "studies":
            assert "'" + name.replace('"', '""') in text
    assert negative > 0, "the quadratic's values are negative: they must stay plain numbers"


def test_dashboard_csv_export_holds_no_formula(tmp_path: Path) -> None:
    """optuna-dashboard's own CSV download (``/csv/<id>``) writes cells raw; hpo's dashboard neutralises them."""
    from wsgiref.util import setup_testing_defaults

    from hpo.dashboard import create_app

    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = hostile_study(tmp_path, "csv-dash", url)
    assert CliRunner().invoke(app, ["run", str(study)], env={"HPO_STORAGE": url}).exit_code == 0
    sid = optuna.load_study(study_name="csv-dash", storage=url)._study_id
    env: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/csv/{sid}", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(env)
    env["HTTP_HOST"] = "127.0.0.1"
    status: list[str] = []
    body = b"".join(create_app(url)(env, lambda s, h, exc_info=None: status.append(s))).decode()
    assert status[0].startswith("200")
    rows = list(csv.reader(io.StringIO(body)))
    assert len(rows) == 9, body  # a header and the 8 trials
    cells = [c for row in rows for c in row]
    assert not [c for c in cells if c.startswith(FORMULA_START) and not re.fullmatch(r"-[\d.e-]+", c)], body
    assert "'=cmd|' /C calc'!A0" in cells and any(re.fullmatch(r"-\d[\d.e-]*", c) for c in cells)


HOSTILE_NAME = "sec-[/]markup[bold \x1b[31mred\nerror: fake"
HOSTILE_PARAM = "[red]p\x1b[0m"


def test_hostile_names_are_printed_literally_everywhere(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = hostile_study(tmp_path, HOSTILE_NAME, url, param=HOSTILE_PARAM)
    env = {**os.environ, "HPO_STORAGE": url, "PYTHONPATH": str(ROOT), "COLUMNS": "400"}  # no folded cells
    shown_name = "sec-[/]markup[bold \\x1b[31mred\\nerror: fake"
    outputs = {}
    run = hpo_cli("run", str(study), env=env, cwd=tmp_path)
    outputs["run"] = run
    assert "$'sec-[/]markup[bold \\x1b[31mred\\nerror: fake'" in run.stdout  # the hint, shell-quoted
    assert shown_name in run.stderr  # the progress bar
    enq = hpo_cli("enqueue", HOSTILE_NAME, "-p", "lr=0.01", env=env, cwd=tmp_path)
    outputs["enqueue"] = enq
    for cmd in (
        ["studies"],
        ["trials", HOSTILE_NAME],
        ["best", HOSTILE_NAME],
        ["importance", HOSTILE_NAME],
        ["report", HOSTILE_NAME, "-o", f"{tmp_path}/"],
        ["trials", HOSTILE_NAME, "--limit", "0", "--state", "nosuch"],  # an error naming the state
    ):
        outputs[" ".join(cmd[:1])] = hpo_cli(*cmd, env=env, cwd=tmp_path)
    for what, res in outputs.items():
        text = res.stdout + res.stderr
        assert "Traceback" not in text and "MarkupError" not in text, f"{what}:\n{text}"
        assert "\x1b" not in text, f"{what}: a raw escape in the output"
        assert not any(ln.startswith("error: fake") for ln in text.splitlines()), f"{what}: a forged error line"
        if what != "trials" or res.returncode == 0:
            assert res.returncode in (0, 2), f"{what}: exit {res.returncode}:\n{text}"
    for what in ("studies", "best", "enqueue"):
        assert outputs[what].returncode == 0, outputs[what].stderr
        assert shown_name in outputs[what].stdout, f"{what}:\n{outputs[what].stdout}"
    assert "[red]p\\x1b[0m" in outputs["best"].stdout  # the parameter name, literally
    import optuna

    waiting = optuna.load_study(study_name=HOSTILE_NAME, storage=url).get_trials(
        states=(optuna.trial.TrialState.WAITING,)
    )
    assert len(waiting) == 1  # enqueued once, and the command ended cleanly
    report = next(tmp_path.glob("*.html")).read_text()
    assert "sec-[/]markup[bold \\x1b[31mred\\nerror: fake" in report  # the title: literal, control characters shown
    assert "\x1b" not in report


@pytest.mark.parametrize(
    "url",
    [
        f"{PG}://u:{CANARY}@127.0.0.1/db",
        f"{PG}:/u:{CANARY}@127.0.0.1/db",
        f"{PG}:u:{CANARY}@127.0.0.1/db",
        f"{PG}://u:{CANARY_AT}@127.0.0.1/db",
        f"{PG}://u:{CANARY_A}@x/y{CANARY_B}@127.0.0.1/db",
        f"{PG}://u@127.0.0.1/db?sslmode=require&password={CANARY}",
        f"{PG}://u@127.0.0.1/db?PASSWORD={CANARY}",
        f"{PG}://:{CANARY}@127.0.0.1/db",
        f"{PG}://u:{CANARY}@[bad",
    ],
)
def test_mask_and_scrub_every_form(url: str) -> None:
    from hpo.storage import mask, scrub

    shown = mask(url)
    assert CANARY_A not in shown and CANARY_B not in shown and "***" in shown, shown
    secret = CANARY_AT if CANARY_AT in url else CANARY  # the password as the driver would echo it
    if f"{CANARY_A}@x/y{CANARY_B}" in url:
        secret = f"{CANARY_A}@x/y{CANARY_B}"
    message = f"FATAL: password {secret!r} for {url} refused"
    scrubbed = scrub(message, url)
    assert CANARY_A not in scrubbed and CANARY_B not in scrubbed, scrubbed


def test_worker_by_name_checks_the_data_folder_before_any_trial(tmp_path: Path) -> None:
    """A study created where its data folder exists, then pulled by name on a machine without it: one error line,
    no trial recorded."""
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    data = tmp_path / "mnist"
    data.mkdir()
    study = tmp_path / "s.yaml"
    doc = variant(name="idx-study", objective__data={"source": "idx", "path": str(data)})
    study.write_text(yaml.safe_dump(doc, sort_keys=False))
    runner = CliRunner()
    assert runner.invoke(app, ["create", str(study)], env={"HPO_STORAGE": url}).exit_code == 0
    data.rmdir()
    before = table_counts(tmp_path / "hpo.db")
    res = runner.invoke(app, ["worker", "idx-study"], env={"HPO_STORAGE": url})
    case = Case("worker-by-name", [], ["stored study 'idx-study'", "objective.data.path", str(data)])
    check_clean_error(case, res.exit_code, res.stdout, res.stderr)
    assert table_counts(tmp_path / "hpo.db") == before


@pytest.mark.parametrize(
    "name", ["plain", "it's", "a b;rm -rf x", "$(touch pwned)", "`id`", "x\ny\x1b[31m", "b\\s'q\t"]
)
def test_shell_quoted_names_are_one_word_for_bash(name: str, tmp_path: Path) -> None:
    """What the printed command hands the shell is the name itself, one word, and runs nothing."""
    import shutil

    from hpo.render import shell_quote

    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    for always in (False, True):
        quoted = shell_quote(name, always=always)
        assert "\n" not in quoted and "\x1b" not in quoted
        res = subprocess.run(["bash", "-c", f"printf '%s' {quoted}"], capture_output=True, text=True, cwd=tmp_path)
        assert res.stdout == name
    assert not (tmp_path / "pwned").exists()
