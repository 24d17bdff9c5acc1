"""Issue 7 on the machine's real PostgreSQL (and MariaDB): ``hpo db init`` roles, each layer of "analysts cannot
destroy data" on its own, and workers running a study to its budget under the worker role.

The local PostgreSQL trusts every connection from 127.0.0.1, so it does not check the passwords given here; the
roles still restrict what each connection may do, which is what these tests prove. MariaDB does check passwords,
so its test proves the passwords ``hpo db init`` sets as well.

Roles are cluster-wide in PostgreSQL: each module run uses its own database and uniquely named roles, and drops
both at the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from hpo.dashboard import create_app
from hpo.db import DELETE_TABLES, READ_ONLY_TABLES, _literal, optuna_tables
from hpo.storage import open_storage

from .analyst_helpers import mixed_study
from .conftest import _fresh_database, hpo_cli, write_study
from .test_dashboard import call
from .timing import ceiling

PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


class Cluster:
    """A fresh database with the two roles made by the real ``hpo db init``."""

    def __init__(self, admin: str, worker: str, analyst: str, worker_role: str, analyst_role: str) -> None:
        self.admin, self.worker, self.analyst = admin, worker, analyst
        self.worker_role, self.analyst_role = worker_role, analyst_role


def _as(url: str, user: str, password: str) -> str:
    return make_url(url).set(username=user, password=password).render_as_string(hide_password=False)


def _db_init(admin: str, tmp: Path, worker_role: str, analyst_role: str, worker_pw: str | None, analyst_pw: str | None):
    """``hpo db init`` as README says: admin URL in the environment, passwords from a file and the environment."""
    env = {"HPO_STORAGE": admin}
    if worker_pw is not None:
        (tmp / "worker_pw").write_text(worker_pw + "\n")
        env["HPO_WORKER_PASSWORD_FILE"] = str(tmp / "worker_pw")
    if analyst_pw is not None:
        env["HPO_ANALYST_PASSWORD"] = analyst_pw
    return hpo_cli("db", "init", "--worker-role", worker_role, "--analyst-role", analyst_role, env=env, timeout=120)


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    admin_server = os.environ.get("HPO_TEST_POSTGRES_URL")
    if not admin_server:
        pytest.skip("HPO_TEST_POSTGRES_URL is not set; these tests need a real PostgreSQL (.ci/run sets it)")
    tag = uuid.uuid4().hex[:8]
    worker_role, analyst_role = f"hpo_w_{tag}", f"hpo_a_{tag}"
    gen = _fresh_database(admin_server)
    admin = next(gen)
    try:
        res = _db_init(admin, tmp_path_factory.mktemp("pw"), worker_role, analyst_role, "w-pw-0001", "a-pw-0001")
        assert res.returncode == 0, res.stderr
        yield Cluster(
            admin,
            _as(admin, worker_role, "w-pw-0001"),
            _as(admin, analyst_role, "a-pw-0001"),
            worker_role,
            analyst_role,
        )
    finally:
        engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            for role in (worker_role, analyst_role):
                if conn.execute(sqlalchemy.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).scalar():
                    conn.exec_driver_sql(f'DROP OWNED BY "{role}"')
        engine.dispose()
        for _ in gen:  # drops the database
            pass
        engine = sqlalchemy.create_engine(
            admin_server, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool
        )
        with engine.connect() as conn:
            for role in (worker_role, analyst_role):
                conn.exec_driver_sql(f'DROP ROLE IF EXISTS "{role}"')
        engine.dispose()


def snapshot(url: str, name: str) -> list[tuple[Any, ...]]:
    """Every trial's number, state, value, params and intermediate values (read with the admin's URL)."""
    storage = open_storage(url)
    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    finally:
        storage.engine.dispose()
    return [(t.number, t.state.name, t.value, t.params, t.intermediate_values) for t in trials]


def study_names(url: str) -> list[str]:
    storage = open_storage(url)
    try:
        return [s.study_name for s in optuna.get_all_study_summaries(storage)]
    finally:
        storage.engine.dispose()


@pytest.fixture
def pg_study(pg: Cluster, study_name: str) -> optuna.Study:
    """A study with complete / pruned / failed trials, written by the worker role (so it can write)."""
    storage = open_storage(pg.worker)
    study = mixed_study(storage, study_name, n=12)  # type: ignore[arg-type]
    return study


def test_db_init_grants_exactly_the_stated_privileges_and_is_idempotent(pg: Cluster, tmp_path: Path) -> None:
    # again, without passwords: the roles exist, so their passwords are kept
    again = _db_init(pg.admin, tmp_path, pg.worker_role, pg.analyst_role, None, None)
    assert again.returncode == 0, again.stderr
    assert f"analyst role {pg.analyst_role}: SELECT on 13 tables" in again.stdout
    engine = sqlalchemy.create_engine(pg.admin, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:

        def held(role: str, table: str) -> set[str]:
            return {
                p
                for p in PRIVILEGES
                if conn.execute(
                    sqlalchemy.text("SELECT has_table_privilege(:r, :t, :p)"), {"r": role, "t": table, "p": p}
                ).scalar()
            }

        tables = optuna_tables()
        assert len(tables) == 13
        for t in tables:
            expected = {"SELECT"} if t in READ_ONLY_TABLES else {"SELECT", "INSERT", "UPDATE"}
            if t in DELETE_TABLES:
                expected.add("DELETE")
            assert held(pg.worker_role, t) == expected, t
            assert held(pg.analyst_role, t) == {"SELECT"}, t
        attrs = conn.execute(
            sqlalchemy.text(
                "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolcanlogin, rolconfig FROM pg_roles WHERE rolname IN (:w, :a)"
            ),
            {"w": pg.worker_role, "a": pg.analyst_role},
        ).all()
        create = conn.execute(
            sqlalchemy.text("SELECT has_schema_privilege(:r, 'public', 'CREATE')"), {"r": pg.worker_role}
        ).scalar()
    engine.dispose()
    by_name = {r.rolname: r for r in attrs}
    for role in (pg.worker_role, pg.analyst_role):
        r = by_name[role]
        assert r.rolcanlogin and not (r.rolsuper or r.rolcreaterole or r.rolcreatedb)
    assert "default_transaction_read_only=on" in by_name[pg.analyst_role].rolconfig  # and its bounds (issue 21)
    assert not by_name[pg.worker_role].rolconfig
    assert not create  # the worker cannot create tables


@pytest.mark.parametrize("server", ["postgres", "mysql"])
def test_password_literals_read_back_exactly(server: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(f"{server}_url")
    tricky = "a'b\\c\"d%e$f;--g"
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()
        cursor.execute("SELECT " + _literal(conn, tricky))  # no parameters: the driver leaves % alone
        assert cursor.fetchone()[0] == tricky
    engine.dispose()


def test_analyst_role_reads_with_the_cli(pg: Cluster, pg_study: optuna.Study, tmp_path: Path) -> None:
    name = pg_study.study_name
    env = {"HPO_STORAGE": pg.analyst}
    studies = hpo_cli("studies", "--format", "json", env=env)
    assert studies.returncode == 0, studies.stderr
    assert name in [s["name"] for s in json.loads(studies.stdout)]
    trials = hpo_cli("trials", name, "--format", "json", env=env)
    assert trials.returncode == 0, trials.stderr
    assert len(json.loads(trials.stdout)) == 12
    report = hpo_cli("report", name, "-o", f"{tmp_path}/", env=env)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / f"{name}.html").stat().st_size > 10_000
    # a writing command under the analyst role: one line, exit 2, nothing written
    other = write_study(tmp_path / "other.yaml", f"{name}-new")
    created = hpo_cli("create", str(other), env=env)
    assert created.returncode == 2 and created.stderr.startswith("error: the database refused this role")
    assert "Traceback" not in created.stderr and created.stderr.count("\n") == 1
    assert f"{name}-new" not in study_names(pg.admin)


def test_analyst_role_cannot_delete_even_in_a_read_write_transaction(pg: Cluster, pg_study: optuna.Study) -> None:
    name = pg_study.study_name
    before = snapshot(pg.admin, name)
    engine = sqlalchemy.create_engine(pg.analyst, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        with pytest.raises(sqlalchemy.exc.DBAPIError) as read_only:  # layer 1: sessions start READ ONLY
            conn.exec_driver_sql("DELETE FROM trials")
        conn.rollback()
        assert read_only.value.orig.sqlstate == "25006"
        conn.exec_driver_sql("SET TRANSACTION READ WRITE")  # anyone may lift that default...
        with pytest.raises(sqlalchemy.exc.DBAPIError) as denied:  # ...but the role has no DELETE privilege
            conn.exec_driver_sql("DELETE FROM trials")
        conn.rollback()
        assert denied.value.orig.sqlstate == "42501" and "permission denied for table trials" in str(denied.value)
        for stmt in ("TRUNCATE trials CASCADE", "DROP TABLE trials CASCADE", "UPDATE studies SET study_name = 'x'"):
            conn.exec_driver_sql("SET TRANSACTION READ WRITE")
            with pytest.raises(sqlalchemy.exc.DBAPIError) as exc:
                conn.exec_driver_sql(stmt)
            conn.rollback()
            assert exc.value.orig.sqlstate == "42501" or "must be owner" in str(exc.value), stmt
    engine.dispose()
    assert snapshot(pg.admin, name) == before


def test_worker_role_cannot_delete_trials_or_studies(pg: Cluster, pg_study: optuna.Study) -> None:
    name = pg_study.study_name
    before = snapshot(pg.admin, name)
    engine = sqlalchemy.create_engine(pg.worker, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        for stmt in ("DELETE FROM trials", "DELETE FROM studies", "TRUNCATE trials CASCADE"):
            with pytest.raises(sqlalchemy.exc.DBAPIError) as exc:
                conn.exec_driver_sql(stmt)
            conn.rollback()
            assert exc.value.orig.sqlstate == "42501", stmt
    engine.dispose()
    assert snapshot(pg.admin, name) == before


def test_guard_off_but_analyst_role_cannot_delete(pg: Cluster, pg_study: optuna.Study) -> None:
    """Layer 2 alone: optuna-dashboard with writes allowed, connected as the analyst role."""
    name = pg_study.study_name
    before = snapshot(pg.admin, name)
    app = create_app(pg.analyst, allow_writes=True)
    code, _ = call(app, "DELETE", f"/api/studies/{pg_study._study_id}")
    assert code >= 400
    tell_id = [t for t in pg_study.get_trials() if t.state == TrialState.FAIL][0]._trial_id
    code, _ = call(app, "POST", f"/api/trials/{tell_id}/tell", {"state": "Complete", "values": [1.0]})
    assert code >= 400
    assert name in study_names(pg.admin)
    assert snapshot(pg.admin, name) == before


def test_guard_on_with_the_worker_role_refuses(pg: Cluster, pg_study: optuna.Study) -> None:
    """Layer 1 alone: the guard refuses even where the role could write."""
    name = pg_study.study_name
    before = snapshot(pg.admin, name)
    app = create_app(pg.worker)
    assert call(app, "DELETE", f"/api/studies/{pg_study._study_id}")[0] == 403
    tell_id = [t for t in pg_study.get_trials() if t.state == TrialState.FAIL][0]._trial_id
    assert call(app, "POST", f"/api/trials/{tell_id}/tell", {"state": "Complete", "values": [1.0]})[0] == 403
    assert snapshot(pg.admin, name) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hpo_dashboard_process_refuses_writes_as_analyst(pg: Cluster, pg_study: optuna.Study) -> None:
    """The real ``hpo dashboard`` process, default options, analyst role: DELETE and tell answer 403."""
    name = pg_study.study_name
    before = snapshot(pg.admin, name)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpo", "dashboard", "--port", str(port)],
        env={**os.environ, "HPO_STORAGE": pg.analyst},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ceiling(60)
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/studies", timeout=ceiling(2)) as r:
                    assert name in r.read().decode()
                break
            except OSError as exc:  # URLError, a refused connection, a read timeout
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, f"the dashboard did not answer at {base}: {exc!r}"
                time.sleep(0.2)
        tell_id = [t for t in pg_study.get_trials() if t.state == TrialState.FAIL][0]._trial_id
        for method, path, body in [
            ("DELETE", f"/api/studies/{pg_study._study_id}", b""),
            ("POST", f"/api/trials/{tell_id}/tell", json.dumps({"state": "Complete", "values": [1.0]}).encode()),
        ]:
            req = urllib.request.Request(f"{base}{path}", data=body or None, method=method)
            req.add_header("Content-Type", "application/json")
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(req, timeout=ceiling(10))
            assert exc.value.code == 403 and json.loads(exc.value.read())["error"] == "read_only"
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=ceiling(30))
    assert "a-pw-0001" not in stderr and "read-only" in stderr
    assert snapshot(pg.admin, name) == before


def test_workers_under_the_worker_role_meet_the_budget(pg: Cluster, study_name: str, tmp_path: Path) -> None:
    study = write_study(
        tmp_path / "s.yaml",
        study_name,
        budget={"n_trials": 5},
        pruner={"name": "median", "kwargs": {"n_warmup_steps": 1}},
    )
    env = {**os.environ, "HPO_STORAGE": pg.worker}
    assert hpo_cli("create", str(study), env=env).returncode == 0
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "hpo", "worker", study_name, "--threads", "1", "--heartbeat", "1"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        _, stderr = p.communicate(timeout=ceiling(300))
        assert p.returncode == 0, stderr
    reap = hpo_cli("reap", study_name, env={"HPO_STORAGE": pg.worker})
    assert reap.returncode == 0, reap.stderr
    trials = snapshot(pg.admin, study_name)
    assert len(trials) == 5
    assert all(state in ("COMPLETE", "PRUNED") for _, state, *_ in trials)
    storage = open_storage(pg.admin)
    frozen = optuna.load_study(study_name=study_name, storage=storage).get_trials()
    storage.engine.dispose()
    assert all("seed" in t.user_attrs and t.intermediate_values for t in frozen)  # attrs (delete+insert) stored


def test_sqlite_has_no_roles(tmp_path: Path) -> None:
    res = hpo_cli("db", "init", "--storage", f"sqlite:///{tmp_path / 'x.db'}")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "roles do not apply to SQLite" in res.stderr


def test_new_role_without_password_is_refused(pg: Cluster, tmp_path: Path) -> None:
    res = _db_init(pg.admin, tmp_path, f"hpo_nopw_{uuid.uuid4().hex[:6]}", pg.analyst_role, None, None)
    assert res.returncode == 2
    assert "has no password" in res.stderr and "HPO_WORKER_PASSWORD" in res.stderr


def test_mariadb_roles(tmp_path: Path, study_name: str) -> None:
    """MariaDB checks passwords: the roles log in with the passwords hpo db init set, and the analyst cannot delete."""
    server = os.environ.get("HPO_TEST_MYSQL_URL")
    if not server:
        pytest.skip("HPO_TEST_MYSQL_URL is not set; this test needs a real MariaDB (.ci/run sets it)")
    tag = uuid.uuid4().hex[:8]
    worker_role, analyst_role = f"hpo_w_{tag}", f"hpo_a_{tag}"
    gen = _fresh_database(server)
    admin = next(gen)
    try:
        res = _db_init(admin, tmp_path, worker_role, analyst_role, "w'p%w\\1:x", "a-pw-0001")
        assert res.returncode == 0, res.stderr
        worker, analyst = _as(admin, worker_role, "w'p%w\\1:x"), _as(admin, analyst_role, "a-pw-0001")
        analyst = make_url(analyst).set(database=f"{make_url(admin).database}_read").render_as_string(False)
        storage = open_storage(worker)
        mixed_study(storage, study_name, n=8)  # type: ignore[arg-type]
        storage.engine.dispose()
        trials = hpo_cli("trials", study_name, "--format", "json", env={"HPO_STORAGE": analyst})
        assert trials.returncode == 0, trials.stderr
        assert len(json.loads(trials.stdout)) == 8
        wrong = hpo_cli("studies", env={"HPO_STORAGE": _as(admin, analyst_role, "not-it")})
        assert wrong.returncode == 2 and "Access denied" in wrong.stderr
        for url in (analyst, worker):
            engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
            with engine.connect() as conn, pytest.raises(sqlalchemy.exc.DBAPIError) as exc:
                conn.exec_driver_sql("DELETE FROM trials")
            engine.dispose()
            assert exc.value.orig.args[0] == 1142  # DELETE command denied to user
        assert len(snapshot(admin, study_name)) == 8
    finally:
        engine = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            for role in (worker_role, analyst_role):
                conn.exec_driver_sql(f"DROP USER IF EXISTS '{role}'@'%%'")
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{make_url(admin).database}_read`")  # the analyst's views
        engine.dispose()
        for _ in gen:
            pass


def test_analyst_cannot_undo_the_privilege_layer(pg: Cluster, pg_study: optuna.Study, tmp_path: Path) -> None:
    """Issue 14: the analyst role may turn its READ ONLY default off for good (PostgreSQL lets a role change its own
    settings), so that layer is a guard against accidents only; the privilege layer is what holds: with the
    default off, every write, every grant to itself and every change of its own attributes is still refused, and
    ``hpo db init`` run again puts the default back."""
    name = pg_study.study_name
    before = snapshot(pg.admin, name)
    engine = sqlalchemy.create_engine(pg.analyst, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET default_transaction_read_only = off")  # this session...
            conn.exec_driver_sql("ALTER ROLE CURRENT_USER SET default_transaction_read_only = off")  # ...and for good
        with engine.connect() as conn:  # a new session: the default is off now
            assert conn.exec_driver_sql("SHOW default_transaction_read_only").scalar() == "off"
            for stmt in (
                "DELETE FROM trials",
                "UPDATE studies SET study_name = 'x'",
                "INSERT INTO study_user_attributes (study_id, key, value_json) VALUES (1, 'k', '1')",
                "TRUNCATE trials CASCADE",
                "DROP TABLE trials CASCADE",
                "CREATE TABLE mine (x int)",
                "ALTER ROLE CURRENT_USER SUPERUSER",
                "ALTER ROLE CURRENT_USER CREATEROLE",
                "ALTER ROLE CURRENT_USER BYPASSRLS",
                f"GRANT {pg.worker_role} TO CURRENT_USER",
                "SET ROLE postgres",
            ):
                with pytest.raises(sqlalchemy.exc.DBAPIError) as exc:
                    conn.exec_driver_sql(stmt)
                assert exc.value.orig.sqlstate in ("42501", "42P01") or "must be" in str(exc.value), stmt
            conn.exec_driver_sql("GRANT DELETE, INSERT, UPDATE ON trials TO CURRENT_USER")  # a warning, no grant
            held = conn.exec_driver_sql(
                "SELECT has_table_privilege(current_user, 'trials', 'DELETE')"
                " OR has_table_privilege(current_user, 'trials', 'INSERT')"
                " OR has_table_privilege(current_user, 'trials', 'UPDATE')"
            ).scalar()
            assert held is False
    finally:
        engine.dispose()
    assert snapshot(pg.admin, name) == before
    res = _db_init(pg.admin, tmp_path, pg.worker_role, pg.analyst_role, None, None)
    assert res.returncode == 0, res.stderr
    admin = sqlalchemy.create_engine(pg.admin, poolclass=sqlalchemy.pool.NullPool)
    with admin.connect() as conn:
        config = conn.execute(
            sqlalchemy.text("SELECT rolconfig FROM pg_roles WHERE rolname = :r"), {"r": pg.analyst_role}
        ).scalar()
    admin.dispose()
    assert "default_transaction_read_only=on" in config
