"""Issue 21 items 6, 7, 8 and 11 (part): what ``hpo db init`` sends and what the analyst role can take from workers.

PostgreSQL runs on a PRIVATE cluster started here (``initdb`` as the ``postgres`` user, password authentication over
TCP with SCRAM, ``log_statement=ddl`` and ``log_min_error_statement=error``, a log file read back), so that server
settings are ours and passwords are really checked. MariaDB uses the shared server (``HPO_TEST_MYSQL_URL``) with a
fresh database and uniquely named users, dropped afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from sqlalchemy.engine import make_url

from hpo.db import MIN_PASSWORD_LENGTH, PLACEHOLDER_PASSWORDS, READ_DATABASE_SUFFIX, scram_verifier
from hpo.storage import open_storage

from .conftest import _fresh_database, hpo_cli
from .timing import ceiling

ROOT = Path(__file__).resolve().parent.parent
WORKER_PW = "Wk-7f3a9c-secret"
ANALYST_PW = "An-2b8d4e-secret"
ROTATED_PW = "Rt-5c1e0f-secret"
NON_ASCII_PW = "\ufb01x\u00a0sp\u00e4\u00df-\u2168-1"  # SASLprep maps the ligature, the no-break space, the numeral


# --------------------------------------------------------------------------- a private PostgreSQL cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePG:
    """A throwaway cluster: trust over its Unix socket (the admin), SCRAM over TCP (the roles)."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.data, self.sock, self.log = root / "data", root / "sock", root / "log" / "server.log"

    def admin(self, database: str = "hpo") -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.sock}&port={self.port}"

    def tcp(self, user: str, password: str, database: str = "hpo") -> str:
        url = sqlalchemy.engine.URL.create("postgresql+psycopg", user, password, "127.0.0.1", self.port, database)
        return url.render_as_string(hide_password=False)

    def server_log(self) -> str:
        return self.log.read_text(errors="replace")

    def sql(self, statement: str, database: str = "hpo") -> list[tuple]:
        engine = sqlalchemy.create_engine(
            self.admin(database), isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool
        )
        try:
            with engine.connect() as conn:
                res = conn.exec_driver_sql(statement)
                return [tuple(r) for r in res] if res.returns_rows else []
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivatePG]:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("no initdb (/usr/lib/postgresql/*/bin/initdb): these tests start a private PostgreSQL cluster")
    if os.geteuid() != 0 or not shutil.which("runuser"):
        pytest.skip("starting a private cluster needs root (runuser -u postgres)")
    bindir = Path(found[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="hpo-pg-"))  # not under pytest's 0700 root-owned tmp: postgres must enter
    pg = PrivatePG(root, _free_port())
    for d in (pg.sock, pg.log.parent):
        d.mkdir()
    shutil.chown(root, "postgres")
    for d in (pg.sock, pg.log.parent):
        shutil.chown(d, "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_pg, str(bindir / "initdb"), "-D", str(pg.data), "-U", "postgres", "--auth-local=trust",
         "--auth-host=scram-sha-256"],
        check=True, capture_output=True, timeout=ceiling(120),
    )  # fmt: skip
    options = (
        f"-p {pg.port} -k {pg.sock} -c listen_addresses=127.0.0.1 -c log_statement=ddl "
        "-c log_min_error_statement=error -c max_connections=40 -c fsync=off"
    )
    subprocess.run(
        [*as_pg, str(bindir / "pg_ctl"), "-D", str(pg.data), "-l", str(pg.log), "-o", options, "-w", "start"],
        check=True, capture_output=True, timeout=ceiling(120),
    )  # fmt: skip
    try:
        pg.sql("CREATE DATABASE hpo", database="postgres")
        yield pg
    finally:
        subprocess.run(
            [*as_pg, str(bindir / "pg_ctl"), "-D", str(pg.data), "-m", "immediate", "stop"],
            capture_output=True, timeout=ceiling(120),
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def db_init(admin: str, worker: str, analyst: str, worker_pw: str | None, analyst_pw: str | None, *extra: str):
    env = {"HPO_STORAGE": admin, "HPO_WORKER_PASSWORD": worker_pw or "", "HPO_ANALYST_PASSWORD": analyst_pw or ""}
    return hpo_cli("db", "init", "--worker-role", worker, "--analyst-role", analyst, *extra, env=env, timeout=120)


@pytest.fixture(scope="module")
def roles(cluster: PrivatePG) -> tuple[str, str]:
    """The two roles, made by the real ``hpo db init``."""
    res = db_init(cluster.admin(), "w_role", "a_role", WORKER_PW, ANALYST_PW)
    assert res.returncode == 0, res.stderr
    return "w_role", "a_role"


def can_log_in(url: str) -> bool:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT 1").scalar() == 1
    except sqlalchemy.exc.OperationalError as exc:
        assert "password authentication failed" in str(exc), exc
        return False
    finally:
        engine.dispose()


def assert_no_password(text: str, *passwords: str) -> None:
    for pw in passwords:
        assert pw not in text, f"a role password is in the text:\n{text[-3000:]}"


# --------------------------------------------------------------------------- PostgreSQL: item 6


def test_scram_verifier_matches_rfc_7677_and_logs_in(cluster: PrivatePG, roles: tuple[str, str]) -> None:
    """Ours equals the server's own verifier for the same password, salt and iterations; and the roles log in."""
    cluster.sql("CREATE ROLE probe_role LOGIN PASSWORD 'pencil-pencil'")  # the server hashes it (scram-sha-256)
    stored = cluster.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'probe_role'")[0][0]
    cluster.sql("DROP ROLE probe_role")
    iterations, salt = stored.split("$")[1].split(":")
    ours = scram_verifier("pencil-pencil", salt=base64.b64decode(salt), iterations=int(iterations))
    assert ours == stored
    worker, analyst = roles
    assert can_log_in(cluster.tcp(worker, WORKER_PW)) and can_log_in(cluster.tcp(analyst, ANALYST_PW))
    assert not can_log_in(cluster.tcp(analyst, WORKER_PW))
    rows = dict(cluster.sql("SELECT rolname, rolpassword FROM pg_authid WHERE rolname IN ('w_role', 'a_role')"))
    assert all(v.startswith("SCRAM-SHA-256$4096:") for v in rows.values())


def test_non_ascii_password_is_saslprepped_like_the_server(cluster: PrivatePG, roles: tuple[str, str]) -> None:
    worker, analyst = roles
    res = db_init(cluster.admin(), worker, analyst, NON_ASCII_PW, None)
    assert res.returncode == 0, res.stderr
    try:
        assert can_log_in(cluster.tcp(worker, NON_ASCII_PW))
        assert not can_log_in(cluster.tcp(worker, WORKER_PW))
    finally:
        assert db_init(cluster.admin(), worker, analyst, WORKER_PW, None).returncode == 0


def test_no_role_password_in_the_server_log_or_pg_stat_activity(cluster: PrivatePG, roles: tuple[str, str]) -> None:
    """``log_statement=ddl`` logs every CREATE/ALTER ROLE; ``log_min_error_statement=error`` logs a failed one; a
    rotation held up by another session's lock on the role sits in ``pg_stat_activity`` while we look."""
    worker, analyst = roles
    # a rotation that waits: another session holds the analyst's pg_authid row (an uncommitted ALTER ROLE)
    blocker = sqlalchemy.create_engine(cluster.admin(), poolclass=sqlalchemy.pool.NullPool)
    seen: list[str] = []
    with blocker.connect() as conn:
        conn.exec_driver_sql(f"ALTER ROLE {analyst} VALID UNTIL 'infinity'")  # in a transaction, not committed
        result: list[subprocess.CompletedProcess[str]] = []
        thread = threading.Thread(
            target=lambda: result.append(db_init(cluster.admin(), worker, analyst, ROTATED_PW, ROTATED_PW))
        )
        thread.start()
        deadline = time.monotonic() + ceiling(60)
        while time.monotonic() < deadline and not seen:
            seen = [
                q
                for (q,) in cluster.sql(
                    "SELECT query FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND position('ROLE' in query) > 0"
                )
            ]
            time.sleep(0.05)
        conn.rollback()
    blocker.dispose()
    thread.join(ceiling(120))
    assert result and result[0].returncode == 0, result and result[0].stderr
    assert seen and "PASSWORD E'SCRAM-SHA-256$4096:" in seen[0], seen
    assert_no_password(seen[0], ROTATED_PW)
    assert can_log_in(cluster.tcp(analyst, ROTATED_PW)) and can_log_in(cluster.tcp(worker, ROTATED_PW))

    # a failed statement: an admin that owns the database but may not create roles
    cluster.sql("CREATE ROLE owner_role LOGIN", database="postgres")
    cluster.sql("CREATE DATABASE owned OWNER owner_role", database="postgres")
    owner_admin = cluster.admin("owned").replace("postgres@", "owner_role@")
    failed = db_init(owner_admin, "w_new_role", "a_new_role", WORKER_PW, ANALYST_PW)
    assert failed.returncode == 2
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("error:"), failed.stderr
    assert "permission denied to create role" in failed.stderr
    assert_no_password(failed.stdout + failed.stderr, WORKER_PW, ANALYST_PW)

    # restore the fixture's passwords (also logged), then read the whole log
    assert db_init(cluster.admin(), worker, analyst, WORKER_PW, ANALYST_PW).returncode == 0
    log = cluster.server_log()
    assert "permission denied to create role" in log and "STATEMENT:  CREATE ROLE" in log  # the failure was logged
    assert len(re.findall(r"(?:CREATE|ALTER) ROLE \S+ LOGIN.*PASSWORD E'SCRAM-SHA-256\$", log)) >= 6
    assert_no_password(log, WORKER_PW, ANALYST_PW, ROTATED_PW, NON_ASCII_PW)


# --------------------------------------------------------------------------- PostgreSQL: item 8


def test_analyst_connections_are_capped_and_workers_still_connect(cluster: PrivatePG, roles: tuple[str, str]) -> None:
    worker, analyst = roles
    res = db_init(cluster.admin(), worker, analyst, None, None, "--analyst-connections", "3")  # passwords kept
    assert res.returncode == 0, res.stderr
    engine = sqlalchemy.create_engine(cluster.tcp(analyst, ANALYST_PW), poolclass=sqlalchemy.pool.NullPool)
    with contextlib.ExitStack() as stack:
        for _ in range(3):
            stack.enter_context(engine.connect())
        with pytest.raises(sqlalchemy.exc.OperationalError, match="too many connections for role"):
            engine.connect()
        assert can_log_in(cluster.tcp(worker, WORKER_PW))
    engine.dispose()
    assert cluster.sql(f"SELECT rolconnlimit FROM pg_roles WHERE rolname = '{analyst}'") == [(3,)]
    assert cluster.sql(f"SELECT rolconnlimit FROM pg_roles WHERE rolname = '{worker}'") == [(-1,)]


def test_analyst_has_no_temp_tables_and_bounded_statements(cluster: PrivatePG, roles: tuple[str, str]) -> None:
    _, analyst = roles
    engine = sqlalchemy.create_engine(
        cluster.tcp(analyst, ANALYST_PW), isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool
    )
    with engine.connect() as conn:
        settings = {k: conn.exec_driver_sql(f"SHOW {k}").scalar() for k in (
            "statement_timeout", "temp_file_limit", "idle_in_transaction_session_timeout", "default_transaction_read_only"
        )}  # fmt: skip
        assert settings == {
            "statement_timeout": "5min",
            "temp_file_limit": "1GB",
            "idle_in_transaction_session_timeout": "5min",
            "default_transaction_read_only": "on",
        }
        conn.exec_driver_sql("SET default_transaction_read_only = off")  # the analyst may turn this guard off...
        for stmt in ("CREATE TEMP TABLE big (x int)", "CREATE TABLE big (x int)", "SET temp_file_limit = -1"):
            with pytest.raises(sqlalchemy.exc.DBAPIError) as exc:  # ...but not these
                conn.exec_driver_sql(stmt)
            assert exc.value.orig.sqlstate == "42501", (stmt, exc.value)  # insufficient privilege
        conn.exec_driver_sql("SET statement_timeout = '100ms'")
        with pytest.raises(sqlalchemy.exc.DBAPIError, match="statement timeout"):
            conn.exec_driver_sql("SELECT pg_sleep(2)")
    engine.dispose()
    assert cluster.sql("SELECT has_database_privilege('public', 'hpo', 'TEMP')") == [(False,)]


# --------------------------------------------------------------------------- placeholders (item 11, part)


def shipped_placeholders() -> set[str]:
    """The passwords that deploy/k8s/examples/secret.yaml ships, and those .env.example shipped (it ships empty
    values now, which compose refuses)."""
    secret = yaml.safe_load((ROOT / "deploy/k8s/examples/secret.yaml").read_text())["stringData"]
    env = dict(
        line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines() if re.match(r"^\w+=", line)
    )
    assert all(v == "" for k, v in env.items() if k.endswith("PASSWORD"))
    return set(secret.values()) | {"change-me-admin", "change-me-worker", "change-me-analyst"}


@pytest.mark.parametrize("which", ["worker", "analyst"])
def test_placeholder_and_short_passwords_are_refused_before_any_statement(cluster: PrivatePG, which: str) -> None:
    shipped = shipped_placeholders()
    assert len(shipped) == 6 and {p.lower() for p in shipped} <= PLACEHOLDER_PASSWORDS
    tag = uuid.uuid4().hex[:6]
    bad = sorted(shipped) + ["Short-1"[: MIN_PASSWORD_LENGTH - 1]]
    for pw in bad:
        pws = {"worker": WORKER_PW, "analyst": ANALYST_PW, which: pw}
        res = db_init(cluster.admin(), f"w_{tag}", f"a_{tag}", pws["worker"], pws["analyst"])
        assert res.returncode == 2, (pw, res.stdout, res.stderr)
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("error:"), res.stderr
        assert ("placeholder" in res.stderr) if pw in shipped else ("shorter than" in res.stderr), res.stderr
        assert pw not in res.stderr
    assert cluster.sql(f"SELECT count(*) FROM pg_roles WHERE right(rolname, 6) = '{tag}'") == [(0,)]


# --------------------------------------------------------------------------- MariaDB: items 7 and 8


@pytest.fixture
def maria(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """A fresh database and two uniquely named users made by ``hpo db init``: (admin URL, worker URL, analyst URL);
    the analyst's URL names the read database of views."""
    server = os.environ.get("HPO_TEST_MYSQL_URL")
    if not server:
        pytest.skip("HPO_TEST_MYSQL_URL is not set; this test needs a real MariaDB")
    tag = uuid.uuid4().hex[:8]
    worker, analyst = f"hpo_w_{tag}", f"hpo_a_{tag}"
    gen = _fresh_database(server)
    admin = next(gen)
    read_db = make_url(admin).database + READ_DATABASE_SUFFIX
    try:
        res = db_init(admin, worker, analyst, WORKER_PW, ANALYST_PW, "--analyst-connections", "2")
        assert res.returncode == 0, res.stderr
        assert f"through views in database {read_db}" in res.stdout
        yield (
            admin,
            make_url(admin).set(username=worker, password=WORKER_PW).render_as_string(hide_password=False),
            make_url(admin)
            .set(username=analyst, password=ANALYST_PW, database=read_db)
            .render_as_string(hide_password=False),
        )
    finally:
        engine = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            for user in (worker, analyst):
                conn.exec_driver_sql(f"DROP USER IF EXISTS '{user}'@'%%'")
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{read_db}`")
        engine.dispose()
        for _ in gen:
            pass


def test_mariadb_analyst_connections_are_capped(maria: tuple[str, str, str]) -> None:
    _, worker, analyst = maria
    engine = sqlalchemy.create_engine(analyst, poolclass=sqlalchemy.pool.NullPool)
    with contextlib.ExitStack() as stack:
        for _ in range(2):
            stack.enter_context(engine.connect())
        with pytest.raises(sqlalchemy.exc.OperationalError) as exc:
            engine.connect()
        assert exc.value.orig.args[0] == 1226, exc.value  # max_user_connections exceeded
        assert can_log_in_mysql(worker)
    engine.dispose()


def can_log_in_mysql(url: str) -> bool:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()


def fast_study(path: Path, name: str, n: int) -> Path:
    doc = {
        "name": name,
        "direction": "maximize",
        "metric": "value",
        "objective": {"kind": "tests.fast_objectives:quadratic", "steps": 2},
        "space": {"lr": {"type": "float", "low": 0.001, "high": 1.0, "log": True}},
        "sampler": {"name": "random", "seed": 1},
        "pruner": {"name": "none"},
        "budget": {"n_trials": n},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_mariadb_analyst_cannot_stall_workers_with_row_locks(
    maria: tuple[str, str, str], tmp_path: Path, study_name: str
) -> None:
    """The analyst reads ALGORITHM=TEMPTABLE views: its ``FOR UPDATE`` / ``LOCK IN SHARE MODE`` on the study's row
    lock nothing, and a worker completes its budget, with a lock wait shorter than the time the analyst holds on."""
    admin, worker, analyst = maria
    study = fast_study(tmp_path / "s.yaml", study_name, 6)
    env = {"HPO_STORAGE": worker}
    created = hpo_cli("create", str(study), env=env)
    assert created.returncode == 0, created.stderr
    base = make_url(admin).database
    engine = sqlalchemy.create_engine(analyst, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as a1, engine.connect() as a2:
        with pytest.raises(sqlalchemy.exc.DBAPIError) as exc:  # the workers' tables themselves: not readable
            a1.exec_driver_sql(f"SELECT * FROM `{base}`.studies FOR UPDATE")
        assert exc.value.orig.args[0] == 1142, exc.value
        a1.rollback()
        held = a1.exec_driver_sql("SELECT study_id FROM studies WHERE study_name = %s FOR UPDATE", (study_name,))
        assert held.scalar() is not None  # the view answers; the transaction stays open
        a2.exec_driver_sql("SELECT * FROM studies LOCK IN SHARE MODE").all()
        a2.exec_driver_sql("SELECT * FROM trials FOR UPDATE").all()
        started = time.monotonic()
        run = hpo_cli("worker", str(study), "--db-retry-for", "5", "--lock-timeout", "2", env=env, timeout=240)
        elapsed = time.monotonic() - started
        assert a1.exec_driver_sql("SELECT @@in_transaction").scalar() == 1  # still holding, all along
    engine.dispose()
    assert run.returncode == 0, run.stderr
    storage = open_storage(admin)
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials()
    storage.engine.dispose()
    assert sum(t.state.name == "COMPLETE" for t in trials) == 6, [t.state for t in trials]
    print(f"worker completed 6 trials in {elapsed:.1f} s while the analyst held FOR UPDATE and LOCK IN SHARE MODE")
    # and analysts' commands read through the views
    listed = hpo_cli("trials", study_name, "--format", "json", env={"HPO_STORAGE": analyst})
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count('"COMPLETE"') == 6
    studies = hpo_cli("studies", env={"HPO_STORAGE": analyst})
    assert studies.returncode == 0 and study_name in studies.stdout, studies.stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
