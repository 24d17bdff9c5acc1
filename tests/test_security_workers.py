"""Issue 21 (items 2, 3, 11): what workers trust, on real processes and databases.

* A worker started by study NAME runs no code and uses no folder that only the database names (``hpo:spec`` can be
  rewritten by anyone with the worker login): refused in one line, trials untouched.
* ``hpo run --workers N`` children start with an isolated import path: a ``typer.py``/``optuna.py`` in the working
  folder is not imported; a user's objective next to the study file still is, with 1 or N workers.
* The storage password reaches child workers through an inherited pipe, never their environment.
* A role that may not write (the analyst's) fails a worker at once, not after ``--db-retry-for``.
* A run in which every trial failed exits non-zero with the first failure's reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from sqlalchemy.engine import make_url

from hpo.spec import parse_spec
from hpo.storage import open_storage
from hpo.trust import TrustError, check_stored
from hpo.worker import SPEC_ATTR

from .conftest import ROOT, hpo_cli, write_study
from .test_roles import pg  # noqa: F401  (the module-scoped fixture: a database with hpo db init's two roles)
from .timing import ceiling

HPO = str(Path(sys.executable).parent / "hpo")  # the console script: the working folder is not on its path


def _states(url: str, name: str) -> list[tuple[int, str]]:
    storage = open_storage(url)
    try:
        return [(t.number, t.state.name) for t in optuna.load_study(study_name=name, storage=storage).get_trials()]
    finally:
        storage.engine.dispose()


def _rewrite_stored(url: str, name: str, **objective: object) -> None:
    """What a colleague with the worker login can do: change the study's stored file."""
    storage = open_storage(url)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        stored = dict(study.user_attrs[SPEC_ATTR])
        stored["objective"] = {**stored["objective"], **objective}
        study.set_user_attr(SPEC_ATTR, stored)
    finally:
        storage.engine.dispose()


def _error_line(res: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line (a worker off a terminal logs a "pulling trials" line first); no traceback."""
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    return errors[0]


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hpo.db'}"
    return request.getfixturevalue("postgres_url")


# --------------------------------------------------------------------------- item 2: a worker started by name


def test_name_worker_refuses_a_stored_objective_it_was_not_given(url: str, study_name: str, tmp_path: Path) -> None:
    study = write_study(tmp_path / "s.yaml", study_name, budget={"n_trials": 2})
    assert hpo_cli("create", str(study), env={"HPO_STORAGE": url}).returncode == 0
    storage = open_storage(url)
    optuna.load_study(study_name=study_name, storage=storage).enqueue_trial({"lr": 0.01})
    storage.engine.dispose()
    before = _states(url, study_name)
    _rewrite_stored(url, study_name, kind="sys:exit")
    start = time.monotonic()
    res = hpo_cli("worker", study_name, env={"HPO_STORAGE": url}, timeout=60)
    assert res.returncode == 2
    line = _error_line(res)
    assert "objective.kind 'sys:exit'" in line and "--objective sys:exit" in line and "HPO_ALLOW_OBJECTIVES" in line
    assert _states(url, study_name) == before  # nothing taken, nothing left RUNNING
    assert time.monotonic() - start < ceiling(30)
    # the worker's own side may allow code, and only code it names: another function is still refused
    res = hpo_cli("worker", study_name, env={"HPO_STORAGE": url, "HPO_ALLOW_OBJECTIVES": "os:getcwd,sys:exit2"})
    assert res.returncode == 2 and "objective.kind 'sys:exit'" in _error_line(res)
    res = hpo_cli("worker", study_name, "--objective", "tests.plain_objectives:loss", env={"HPO_STORAGE": url})
    assert res.returncode == 2 and "--objective tests.plain_objectives:loss" in _error_line(res)
    assert _states(url, study_name) == before


def test_name_worker_runs_a_user_objective_its_side_allows(sqlite_url: str, study_name: str, tmp_path: Path) -> None:
    kind = "tests.plain_objectives:loss"
    study = write_study(
        tmp_path / "s.yaml", study_name, direction="minimize", metric="loss", objective={"kind": kind}, space={}
    )
    env = {"HPO_STORAGE": sqlite_url}
    assert hpo_cli("create", str(study), env=env, cwd=ROOT).returncode == 0
    res = hpo_cli("worker", study_name, "--n-trials", "1", env=env, cwd=ROOT)
    assert res.returncode == 2 and f"objective.kind {kind!r}" in _error_line(res)
    res = hpo_cli("worker", study_name, "--n-trials", "1", "--objective", kind, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    res = hpo_cli(
        "worker",
        study_name,
        "--n-trials",
        "2",
        env={**env, "HPO_ALLOW_OBJECTIVES": "tests.plain_objectives:*"},
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    assert [s for _, s in _states(sqlite_url, study_name)] == ["COMPLETE", "COMPLETE"]
    # with a study file, --objective says which code it must name
    res = hpo_cli("worker", str(study), "--objective", "tests.plain_objectives:nine", env=env, cwd=ROOT)
    assert res.returncode == 2 and "runs objective.kind" in _error_line(res)


def test_name_worker_refuses_a_stored_checkpoint_folder(url: str, study_name: str, tmp_path: Path) -> None:
    objective = yaml.safe_load((write_study(tmp_path / "x.yaml", "x")).read_text())["objective"]
    mine, theirs = tmp_path / "mine", tmp_path / "world-writable"
    theirs.mkdir(mode=0o777)
    objective["checkpoint"] = {"path": str(mine), "keep": True}
    study = write_study(tmp_path / "s.yaml", study_name, objective=objective, budget={"n_trials": 1})
    assert hpo_cli("create", str(study), env={"HPO_STORAGE": url}).returncode == 0
    _rewrite_stored(url, study_name, checkpoint={**objective["checkpoint"], "path": str(theirs)})
    res = hpo_cli("worker", study_name, env={"HPO_STORAGE": url}, timeout=60)
    assert res.returncode == 2
    line = _error_line(res)
    assert f"objective.checkpoint.path {str(theirs)!r}" in line and "HPO_CHECKPOINT_DIR" in line
    assert _states(url, study_name) == [] and list(theirs.iterdir()) == []
    # the worker's own folder: the stored path is not used
    own = tmp_path / "own"
    res = hpo_cli("worker", study_name, env={"HPO_STORAGE": url, "HPO_CHECKPOINT_DIR": str(own)}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert [s for _, s in _states(url, study_name)] == ["COMPLETE"]
    assert list(own.iterdir()) and list(theirs.iterdir()) == []


def test_stored_data_folders_and_buckets_need_the_workers_word(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other paths a stored study file can name, checked in-process (no data or bucket needed)."""
    base = yaml.safe_load(write_study(tmp_path / "x.yaml", "x").read_text())
    data = tmp_path / "data" / "mnist"
    idx = {**base, "objective": {**base["objective"], "data": {"source": "idx", "path": str(data)}}}
    spec = parse_spec(idx, "test")
    for var in ("HPO_ALLOW_DATA", "HPO_CHECKPOINT_BUCKET", "HPO_CHECKPOINT_DIR", "HPO_ALLOW_OBJECTIVES"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(TrustError, match="objective.data.path .* set HPO_ALLOW_DATA"):
        check_stored(spec, "x")
    monkeypatch.setenv("HPO_ALLOW_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(TrustError):
        check_stored(spec, "x")
    monkeypatch.setenv("HPO_ALLOW_DATA", f"{tmp_path / 'elsewhere'}{os.pathsep}{tmp_path / 'data'}")
    check_stored(spec, "x")
    escape = {**idx, "objective": {**idx["objective"], "data": {"source": "idx", "path": f"{tmp_path}/data/../x"}}}
    with pytest.raises(TrustError):
        check_stored(parse_spec(escape, "test"), "x")
    bucket = {**base, "objective": {**base["objective"], "checkpoint": {"store": "boto3", "path": "their-bucket"}}}
    with pytest.raises(TrustError, match="HPO_CHECKPOINT_BUCKET=their-bucket"):
        check_stored(parse_spec(bucket, "test"), "x")
    monkeypatch.setenv("HPO_CHECKPOINT_BUCKET", "my-bucket")
    with pytest.raises(TrustError):
        check_stored(parse_spec(bucket, "test"), "x")
    monkeypatch.setenv("HPO_CHECKPOINT_BUCKET", "their-bucket")
    check_stored(parse_spec(bucket, "test"), "x")


# --------------------------------------------------------------------------- item 3: child workers' import path

SHADOW = "from pathlib import Path\nPath(__file__).with_suffix('.imported').write_text('ran')\n"


def test_child_workers_do_not_import_modules_from_the_working_folder(
    sqlite_url: str, study_name: str, tmp_path: Path
) -> None:
    for mod in ("typer", "optuna"):
        (tmp_path / f"{mod}.py").write_text(SHADOW)
    study = write_study(tmp_path / "s.yaml", study_name)
    res = subprocess.run(
        [HPO, "run", "s.yaml", "--workers", "2", "--n-trials", "2"],
        cwd=tmp_path,
        env={**os.environ, "HPO_STORAGE": sqlite_url},
        capture_output=True,
        text=True,
        timeout=ceiling(300),
    )
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.glob("*.imported")) == []
    assert study.exists() and [s for _, s in _states(sqlite_url, study_name)] == ["COMPLETE", "COMPLETE"]


@pytest.mark.parametrize("workers", [1, 2])
def test_objective_next_to_the_study_file_imports_with_any_number_of_workers(
    workers: int, sqlite_url: str, study_name: str, tmp_path: Path
) -> None:
    module = f"objective_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text("def f(trial):\n    return trial.suggest_float('x', 0, 1)\n")
    write_study(
        tmp_path / "s.yaml", study_name, direction="minimize", metric="v", objective={"kind": f"{module}:f"}, space={}
    )
    res = hpo_cli(
        "run", "s.yaml", "--workers", str(workers), "--n-trials", "4", env={"HPO_STORAGE": sqlite_url}, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert [s for _, s in _states(sqlite_url, study_name)] == ["COMPLETE"] * 4


# --------------------------------------------------------------------------- item 11: the password and children


def test_child_workers_get_the_password_through_a_pipe_not_their_environment(
    mysql_url: str, study_name: str, tmp_path: Path
) -> None:
    """MariaDB checks passwords (the local PostgreSQL trusts loopback): the children must really receive it."""
    server = mysql_url
    user, password = f"hpo_pw_{uuid.uuid4().hex[:8]}", f"s3cret-{uuid.uuid4().hex}"
    admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    db = make_url(server).database
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY '{password}'")
        conn.exec_driver_sql(f"GRANT ALL ON `{db}`.* TO '{user}'@'%%'")
    url = make_url(server).set(username=user, password=password).render_as_string(hide_password=False)
    markers = tmp_path / "markers"
    markers.mkdir()
    objective = {"kind": "worker_objectives:sleepy", "sleep": 1.0, "marker_dir": str(markers)}
    write_study(tmp_path / "s.yaml", study_name, direction="minimize", metric="v", objective=objective,
                space={"x": {"type": "float", "low": 0, "high": 1}})  # fmt: skip
    env = {**os.environ, "HPO_STORAGE": url, "PYTHONPATH": str(ROOT / "tests")}
    try:
        proc = subprocess.Popen(
            [HPO, "run", "s.yaml", "--workers", "2", "--n-trials", "4"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        environs: dict[int, bytes] = {}
        deadline = time.monotonic() + ceiling(120)
        while len(environs) < 2 and proc.poll() is None and time.monotonic() < deadline:
            for marker in markers.iterdir():
                pid = int(marker.name.split("-")[0])
                if pid not in environs:
                    try:
                        environs[pid] = Path(f"/proc/{pid}/environ").read_bytes()
                    except OSError:  # already gone
                        pass
            time.sleep(0.1)
        _, stderr = proc.communicate(timeout=ceiling(120))
        assert proc.returncode == 0, stderr
        assert len(environs) == 2 and all(b"HPO_STORAGE=" in e for e in environs.values())
        leaked = [v for e in environs.values() for v in e.split(b"\0") if password.encode() in v]
        assert not leaked, leaked
        assert [s for _, s in _states(url, study_name)] == ["COMPLETE"] * 4
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP USER IF EXISTS '{user}'@'%%'")
        admin.dispose()


# --------------------------------------------------------------------------- item 11: a role that may not write


@pytest.mark.parametrize("by", ["name", "file"])
def test_analyst_running_a_worker_fails_at_once(pg, by: str, study_name: str, tmp_path: Path) -> None:  # noqa: F811
    study = write_study(tmp_path / "s.yaml", study_name, budget={"n_trials": 2})
    assert hpo_cli("create", str(study), env={"HPO_STORAGE": pg.worker}).returncode == 0
    before = _states(pg.admin, study_name)
    start = time.monotonic()
    target = study_name if by == "name" else str(study)
    res = hpo_cli("worker", target, "--db-retry-for", "600", env={"HPO_STORAGE": pg.analyst}, timeout=60)
    took = time.monotonic() - start
    assert res.returncode == 2
    line = _error_line(res)
    assert "refused this role" in line and "read-only transaction" in line
    assert "a-pw-1" not in res.stderr + res.stdout
    assert took < min(ceiling(30), 300), took  # not --db-retry-for (600 s)
    assert _states(pg.admin, study_name) == before


# --------------------------------------------------------------------------- item 11: every trial failed

FAILING = """
import math
def raises(trial):
    trial.suggest_float('x', 0, 1)
    raise RuntimeError('boom in the objective')
def text(trial):
    trial.suggest_float('x', 0, 1)
    return 'not a number'
def nan(trial):
    trial.suggest_float('x', 0, 1)
    return math.nan
"""


@pytest.mark.parametrize(
    ("fn", "why"),
    [
        ("raises", "RuntimeError: boom in the objective"),
        ("text", "could not be cast to float"),
        ("nan", "is not acceptable"),
    ],
)
@pytest.mark.parametrize("how", ["run", "run2", "worker"])
def test_a_run_whose_trials_all_failed_exits_non_zero(
    fn: str, why: str, how: str, sqlite_url: str, study_name: str, tmp_path: Path
) -> None:
    module = f"failing_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(FAILING)
    write_study(tmp_path / "s.yaml", study_name, direction="minimize", metric="v", objective={"kind": f"{module}:{fn}"},
                space={}, budget={"n_trials": 3})  # fmt: skip
    args = {"run": ["run", "s.yaml"], "run2": ["run", "s.yaml", "--workers", "2"], "worker": ["worker", "s.yaml"]}[how]
    res = hpo_cli(*args, env={"HPO_STORAGE": sqlite_url}, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert "no trial completed" in errors[0] and "the first, trial #" in errors[0] and why in errors[0]


def test_a_run_with_one_completed_trial_exits_zero(sqlite_url: str, study_name: str, tmp_path: Path) -> None:
    """Failures among completed trials are a study's ordinary life: status 0."""
    module = f"mixed_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "def f(trial):\n    x = trial.suggest_float('x', 0, 1)\n"
        "    if trial.number != 1:\n        raise RuntimeError('odd')\n    return x\n"
    )
    write_study(tmp_path / "s.yaml", study_name, direction="minimize", metric="v", objective={"kind": f"{module}:f"},
                space={}, budget={"n_trials": 3})  # fmt: skip
    res = hpo_cli("run", "s.yaml", env={"HPO_STORAGE": sqlite_url}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
