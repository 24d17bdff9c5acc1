"""Shared fixtures: a storage URL parametrised over SQLite, PostgreSQL and MariaDB/MySQL, as Optuna's own tests do.

PostgreSQL and MySQL come from ``HPO_TEST_POSTGRES_URL`` and ``HPO_TEST_MYSQL_URL`` (``.ci/run`` exports both);
each test session works in a fresh database of its own, dropped at the end. Where a variable is unset, the tests
that need that server skip and say why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "studies"
SERVERS = {"postgres": "HPO_TEST_POSTGRES_URL", "mysql": "HPO_TEST_MYSQL_URL"}


def _server_url(kind: str) -> str:
    var = SERVERS[kind]
    url = os.environ.get(var)
    if not url:
        pytest.skip(f"{var} is not set; this test needs a real {kind} server (.ci/run sets it)")
    return url


def _fresh_database(admin_url: str) -> Iterator[str]:
    """CREATE a uniquely named database on the server, yield its URL, DROP it afterwards."""
    url = make_url(admin_url)
    name = f"hpo_test_{uuid.uuid4().hex[:10]}"
    # pre-ping: the engine survives a server restart
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            if url.get_backend_name() == "postgresql":
                conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name}"))
        engine.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    yield from _fresh_database(_server_url("postgres"))


@pytest.fixture(scope="session")
def mysql_url() -> Iterator[str]:
    yield from _fresh_database(_server_url("mysql"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hpo.db'}"


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One storage URL per backend; server databases are shared by the session, so use unique study names."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hpo.db'}"
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def study_name() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def hpo_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real ``hpo`` command line in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hpo", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout
    )


def write_study(path: Path, name: str, **overrides: object) -> Path:
    """A small, fast spirals study file (the lesson's data), with top-level keys overridden."""
    import yaml

    doc: dict[str, object] = {
        "name": name,
        "direction": "maximize",
        "metric": "val_accuracy",
        "objective": {
            "kind": "training",
            "data": {"source": "spirals", "n_train": 400, "n_val": 200, "n_test": 200, "seed": 0},
            "model": {"kind": "mlp", "layers": [16]},
            "loss": "bce",
            "defaults": {"batch_size": 64, "lr": 0.01, "epochs": 3, "optimizer": "adam"},
        },
        "space": {"lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True}},
        "sampler": {"name": "tpe", "seed": 0},
        "pruner": {"name": "none"},
        "budget": {"n_trials": 4},
    }
    doc.update(overrides)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
