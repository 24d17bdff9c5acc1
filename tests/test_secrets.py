"""No output of hpo contains a password it was given (issue 7).

A canary password goes in through each way hpo takes one (the URL in ``--storage``, ``HPO_STORAGE``,
``HPO_STORAGE_PASSWORD_FILE``, and ``hpo db init``'s role passwords) and every CLI command runs with ``-v`` logging,
on success paths and error paths (a refused connection on a closed port, a wrong password on MariaDB, a malformed
URL, a dashboard whose port is taken). stdout and stderr are searched for the canary, raw and URL-quoted.

The local PostgreSQL trusts connections from 127.0.0.1 and ignores the canary password, so the success paths run
for real with it in the URL; MariaDB checks passwords, so it gives the wrong-password path.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
import sqlalchemy
from sqlalchemy.engine import make_url

from .conftest import _fresh_database, hpo_cli, write_study

CANARY = "Cn@ry/p:w#7%q"  # needs quoting in a URL, so the quoted forms are searched as well
WORKER_CANARY = CANARY + "-W"
ANALYST_CANARY = CANARY + "-A"


def forms(secret: str) -> set[str]:
    rendered = make_url("postgresql://u@h/d").set(password=secret).render_as_string(hide_password=False)
    return {secret, quote_plus(secret), quote(secret, safe=""), rendered.split("u:", 1)[1].rsplit("@h", 1)[0]}


LEAKS = forms(CANARY) | forms(WORKER_CANARY) | forms(ANALYST_CANARY) | {"Cn@ry", "Cn%40ry"}


def assert_no_leak(res: subprocess.CompletedProcess[str], what: str) -> None:
    text = res.stdout + res.stderr
    found = [f for f in LEAKS if f in text]
    assert not found, f"{what}: output holds the password ({found}):\n{text}"
    assert "Traceback" not in res.stderr, f"{what}: a traceback instead of a one-line error:\n{res.stderr}"


def with_password(url: str, password: str) -> str:
    return make_url(url).set(password=password).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def pg_admin() -> Iterator[str]:
    server = os.environ.get("HPO_TEST_POSTGRES_URL")
    if not server:
        pytest.skip("HPO_TEST_POSTGRES_URL is not set; this test needs a real PostgreSQL (.ci/run sets it)")
    yield from _fresh_database(server)


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def commands(study: Path, name: str, tmp: Path, port: int, roles: str) -> list[list[str]]:
    return [
        ["create", str(study)],
        ["run", str(study), "--n-trials", "1"],
        ["worker", str(study), "--n-trials", "2", "--db-retry-for", "0.5"],
        ["studies"],
        ["trials", name],
        ["best", name],
        ["report", name, "-o", f"{tmp}/"],
        ["check", str(study)],
        ["db", "init", "--worker-role", f"{roles}_w", "--analyst-role", f"{roles}_a"],
        ["dashboard", "--port", str(port)],
    ]


def run_all(env: dict[str, str], study: Path, name: str, tmp: Path, port: int, roles: str) -> list[tuple[str, int]]:
    pw_file = tmp / "analyst_pw"
    pw_file.write_text(ANALYST_CANARY + "\n")
    env = {
        **env,
        "HPO_CONNECT_RETRY_FOR": "0.5",
        "HPO_WORKER_PASSWORD": WORKER_CANARY,
        "HPO_ANALYST_PASSWORD_FILE": str(pw_file),
    }
    codes = []
    for argv in commands(study, name, tmp, port, roles):
        res = hpo_cli("-v", *argv, env=env, timeout=120)
        assert_no_leak(res, " ".join(argv))
        codes.append((argv[0], res.returncode))
    return codes


def drop_roles(admin: str, prefix: str) -> None:
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        for role in (f"{prefix}_w", f"{prefix}_a"):
            if conn.execute(sqlalchemy.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).scalar():
                conn.exec_driver_sql(f'DROP OWNED BY "{role}"')
                conn.exec_driver_sql(f'DROP ROLE "{role}"')
    engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["HPO_STORAGE", "HPO_STORAGE_PASSWORD_FILE"])
def test_success_paths_never_show_the_password(how: str, pg_admin: str, tmp_path: Path, taken_port: int) -> None:
    name = f"canary-{uuid.uuid4().hex[:6]}"
    study = write_study(tmp_path / "s.yaml", name, budget={"n_trials": 2})
    if how == "HPO_STORAGE":
        env = {"HPO_STORAGE": with_password(pg_admin, CANARY)}
    else:
        (tmp_path / "pw").write_text(CANARY + "\n")
        env = {"HPO_STORAGE": pg_admin, "HPO_STORAGE_PASSWORD_FILE": str(tmp_path / "pw")}
    roles = f"hpo_canary_{uuid.uuid4().hex[:6]}"
    try:
        codes = run_all(env, study, name, tmp_path, taken_port, roles)
    finally:
        drop_roles(pg_admin, roles)
    assert dict(codes) == {
        "create": 0, "run": 0, "worker": 0, "studies": 0, "trials": 0, "best": 0, "report": 0, "check": 0, "db": 0,
        "dashboard": 2,  # its port is taken: one line, exit 2
    }  # fmt: skip


def test_password_on_the_command_line_is_masked_in_output(pg_admin: str, tmp_path: Path) -> None:
    """Discouraged (ps shows it), but even then hpo does not repeat it."""
    name = f"canary-{uuid.uuid4().hex[:6]}"
    study = write_study(tmp_path / "s.yaml", name, budget={"n_trials": 1})
    url = with_password(pg_admin, CANARY)
    for argv in (["run", str(study)], ["studies"], ["trials", name]):
        res = hpo_cli("-v", *argv, "--storage", url, timeout=120)
        assert res.returncode == 0, res.stderr
        assert_no_leak(res, argv[0])
    assert "***@" in hpo_cli("studies", "--storage", url).stdout.replace("\n", "")


def test_refused_connection_never_shows_the_password(tmp_path: Path, taken_port: int) -> None:
    name = "canary-refused"
    study = write_study(tmp_path / "s.yaml", name)
    env = {"HPO_STORAGE": f"postgresql+psycopg://hpo:{quote(CANARY, safe='')}@127.0.0.1:1/hpo"}
    codes = run_all(env, study, name, tmp_path, taken_port, "hpo_canary_refused")
    assert all(code == 2 for _, code in codes), codes


def test_wrong_password_on_mariadb_never_shows_it(tmp_path: Path, taken_port: int) -> None:
    admin = os.environ.get("HPO_TEST_MYSQL_URL")
    if not admin:
        pytest.skip("HPO_TEST_MYSQL_URL is not set; this test needs a real MariaDB (.ci/run sets it)")
    user = f"hpo_canary_{uuid.uuid4().hex[:6]}"
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY 'the-right-one'")
    try:
        name = "canary-wrong"
        study = write_study(tmp_path / "s.yaml", name)
        env = {"HPO_STORAGE": make_url(admin).set(username=user, password=CANARY).render_as_string(hide_password=False)}
        codes = run_all(env, study, name, tmp_path, taken_port, "hpo_canary_wrong")
        assert all(code == 2 for _, code in codes), codes
        res = hpo_cli("studies", env=env)
        assert "Access denied" in res.stderr and "***" in res.stderr
    finally:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"DROP USER IF EXISTS '{user}'@'%%'")
        engine.dispose()


def test_malformed_url_never_shows_the_password() -> None:
    for url in (f"postgresql+psycopg://hpo:{CANARY}@[bad", f"nosuchdb://hpo:{quote(CANARY, safe='')}@host/db"):
        res = hpo_cli("-v", "studies", env={"HPO_STORAGE": url, "HPO_CONNECT_RETRY_FOR": "0.5"})
        assert res.returncode == 2, res.stderr
        assert_no_leak(res, url.split(":")[0])
