"""Storage URLs: resolution order, masking, and one-line errors for bad URLs, unreachable servers, refused
passwords (never printed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy

from hpo.errors import StorageError
from hpo.storage import mask, open_storage, resolve_url, scrub

from .conftest import hpo_cli, write_study

CANARY = "Canary-Pw-7f3a9"


def test_resolution_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HPO_STORAGE", raising=False)
    monkeypatch.delenv("HPO_STORAGE_PASSWORD_FILE", raising=False)
    assert resolve_url() == "sqlite:///hpo.db"
    assert resolve_url(None, "sqlite:///file.db") == "sqlite:///file.db"
    monkeypatch.setenv("HPO_STORAGE", "sqlite:///env.db")
    assert resolve_url(None, "sqlite:///file.db") == "sqlite:///env.db"
    assert resolve_url("sqlite:///cli.db", "sqlite:///file.db") == "sqlite:///cli.db"
    pw = tmp_path / "pw"
    pw.write_text(CANARY + "\n")
    monkeypatch.setenv("HPO_STORAGE_PASSWORD_FILE", str(pw))
    url = resolve_url("postgresql+psycopg://hpo@db:5432/hpo")
    assert sqlalchemy.engine.make_url(url).password == CANARY


def test_mask_and_scrub() -> None:
    url = f"postgresql+psycopg://hpo:{CANARY}@db:5432/hpo"
    assert CANARY not in mask(url) and "***" in mask(url)
    assert CANARY not in scrub(f"FATAL: password {CANARY} wrong", url)
    assert CANARY not in mask(f"postgresql://hpo:{CANARY}@[bad")


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'w.db'}")
    with storage.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


@pytest.mark.parametrize(
    "url,message",
    [
        ("notaurl", "malformed storage URL"),
        ("nosuchdb+driver://x@y/z", "no database driver"),
        (f"postgresql+psycopg://postgres:{CANARY}@127.0.0.1:1/test", "cannot connect to"),
        ("sqlite:////no/such/folder/x.db", "folder /no/such/folder does not exist"),
    ],
    ids=["malformed", "no-driver", "unreachable", "sqlite-missing-folder"],
)
def test_bad_storage_is_one_line_exit_2(url: str, message: str, tmp_path: Path) -> None:
    path = write_study(tmp_path / "s.yaml", "bad-storage")
    res = hpo_cli("run", str(path), "--storage", url, env={"HPO_CONNECT_RETRY_FOR": "1"}, timeout=120)
    assert res.returncode == 2, res.stderr
    *retries, last = res.stderr.strip().splitlines()
    assert last.startswith("error: ") and message in last
    assert all("retrying" in line for line in retries)  # a retried connection says so while it waits
    assert "Traceback" not in res.stderr and CANARY not in res.stderr + res.stdout


def test_unreachable_server_is_retried_then_refused() -> None:
    with pytest.raises(
        StorageError, match="cannot connect to postgresql\\+psycopg://postgres:\\*\\*\\*@127.0.0.1:1/test"
    ):
        open_storage(f"postgresql+psycopg://postgres:{CANARY}@127.0.0.1:1/test", retry_for=1.0)


@pytest.fixture
def mysql_user_with_password() -> str:
    admin = os.environ.get("HPO_TEST_MYSQL_URL")
    if not admin:
        pytest.skip("HPO_TEST_MYSQL_URL is not set; the wrong-password test needs a real MariaDB (.ci/run sets it)")
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE USER IF NOT EXISTS 'hpo_pw'@'%%' IDENTIFIED BY 'right-password'")
        conn.exec_driver_sql("CREATE USER IF NOT EXISTS 'hpo_pw'@'127.0.0.1' IDENTIFIED BY 'right-password'")
    url = sqlalchemy.engine.make_url(admin)
    return url.set(username="hpo_pw", password=CANARY).render_as_string(hide_password=False)


def test_wrong_password_is_refused_at_once_and_masked(mysql_user_with_password: str, tmp_path: Path) -> None:
    path = write_study(tmp_path / "s.yaml", "wrong-pw")
    res = hpo_cli("run", str(path), "--storage", mysql_user_with_password, timeout=60)
    assert res.returncode == 2
    assert "Access denied" in res.stderr and "***" in res.stderr
    assert CANARY not in res.stderr + res.stdout and "Traceback" not in res.stderr
    # the same password through the environment, as the README recommends
    res = hpo_cli("run", str(path), env={"HPO_STORAGE": mysql_user_with_password}, timeout=60)
    assert res.returncode == 2 and CANARY not in res.stderr + res.stdout
