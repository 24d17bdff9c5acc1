"""A password goes only to a host named on the user's side, and never in clear text (issue 21, items 5 and 22.1).

A fake PostgreSQL server on loopback asks every client for a cleartext password (``AuthenticationCleartextPassword``)
and records every byte it receives. hpo is pointed at it the two ways an attacker could arrange:

* a study file's ``storage:`` names it while the user has ``HPO_STORAGE_PASSWORD_FILE`` set and no ``HPO_STORAGE``
  (README's Slurm set-up leaves shells so): every command refuses in one line, and the server sees no connection;
* the user's own URL names it (a host taken over, a man in the middle): libpq's ``require_auth=!password`` refuses
  to answer, the command fails in one line, and the server receives no password.

``HPO_STORAGE_FILE`` (a file holding the URL, as the Slurm script reads it) is honoured by every command, so
``hpo create`` with README's exports creates the study where the workers will look.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from .conftest import hpo_cli, write_study
from .timing import ceiling

CANARY = "s3cret-Canary-21"


class FakePostgres:
    """Accepts connections on 127.0.0.1, declines SSL/GSS, asks for a cleartext password, records what comes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            with conn:
                conn.settimeout(2)
                try:
                    self._session(conn)
                except OSError:
                    pass

    def _read(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        self.received += data
        return data

    def _session(self, conn: socket.socket) -> None:
        while True:  # SSLRequest / GSSENCRequest come first: decline them, then the startup message
            head = self._read(conn, 8)
            if len(head) < 8:
                return
            length, code = struct.unpack("!II", head)
            if code in (80877103, 80877104):
                conn.sendall(b"N")
                continue
            self._read(conn, length - 8)
            break
        conn.sendall(b"R" + struct.pack("!II", 8, 3))  # AuthenticationCleartextPassword
        while chunk := conn.recv(4096):  # whatever the client answers (a 'p' message with the password)
            self.received += chunk

    def close(self) -> None:
        self._stop.set()
        self._thread.join(ceiling(5))
        self.sock.close()


@pytest.fixture
def fake_pg() -> Iterator[FakePostgres]:
    server = FakePostgres()
    yield server
    server.close()


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    pw = tmp_path / "pw"
    pw.write_text(CANARY + "\n")
    pw.chmod(0o600)
    return pw


def _one_error_line(res: object, what: str) -> str:
    stderr = res.stderr  # type: ignore[attr-defined]
    assert res.returncode != 0, f"{what}: exit 0\n{stderr}"  # type: ignore[attr-defined]
    assert "Traceback" not in stderr, f"{what}: a traceback\n{stderr}"
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, f"{what}: {stderr}"
    return errors[0]


def test_a_study_files_host_never_gets_the_password_file(
    tmp_path: Path, fake_pg: FakePostgres, password_file: Path
) -> None:
    url = f"postgresql+psycopg://hpo@127.0.0.1:{fake_pg.port}/hpo"
    study = write_study(tmp_path / "s.yaml", "sec-planted-host", storage=url)
    env = {"HPO_STORAGE": "", "HPO_STORAGE_PASSWORD_FILE": str(password_file)}
    for args in (["check", str(study)], ["create", str(study)], ["run", str(study)], ["worker", str(study)]):
        res = hpo_cli(*args, env=env, cwd=tmp_path)
        line = _one_error_line(res, args[0])
        assert "comes from the study file" in line and "HPO_STORAGE_PASSWORD_FILE" in line, line
    assert fake_pg.connections == 0
    assert CANARY.encode() not in fake_pg.received


def test_a_cleartext_password_request_is_refused(tmp_path: Path, fake_pg: FakePostgres, password_file: Path) -> None:
    """The user's own URL, but the server asks for the password in clear: libpq declines, hpo fails in one line
    at once (an authentication problem, not retried), and the server never sees the password."""
    study = write_study(tmp_path / "s.yaml", "sec-cleartext")
    url = f"postgresql+psycopg://hpo@127.0.0.1:{fake_pg.port}/hpo"
    for env in (
        {"HPO_STORAGE": url, "HPO_STORAGE_PASSWORD_FILE": str(password_file)},
        {"HPO_STORAGE": url.replace("hpo@", f"hpo:{CANARY}@"), "HPO_STORAGE_PASSWORD_FILE": ""},
    ):
        res = hpo_cli("create", str(study), env=env, cwd=tmp_path)
        line = _one_error_line(res, "create")
        assert CANARY not in res.stdout + res.stderr
        assert "authentication" in line or "password" in line, line
    assert fake_pg.connections >= 2  # it did reach the server, which asked
    assert CANARY.encode() not in fake_pg.received


def test_storage_file_is_read_by_every_command(tmp_path: Path) -> None:
    """README's Slurm exports (HPO_STORAGE_FILE, no HPO_STORAGE) put the study where the workers look."""
    db = tmp_path / "shared.db"
    url_file = tmp_path / "storage-url"
    url_file.write_text(f"sqlite:///{db}\n")
    study = write_study(tmp_path / "s.yaml", "sec-url-file", budget={"n_trials": 1})
    env = {"HPO_STORAGE": "", "HPO_STORAGE_FILE": str(url_file)}
    res = hpo_cli("create", str(study), env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "hpo.db").exists()
    assert optuna.load_study(study_name="sec-url-file", storage=f"sqlite:///{db}") is not None
    res = hpo_cli("worker", "sec-url-file", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(optuna.load_study(study_name="sec-url-file", storage=f"sqlite:///{db}").trials) == 1
    url_file.write_text("")
    res = hpo_cli("studies", env=env, cwd=tmp_path)
    assert "HPO_STORAGE_FILE" in _one_error_line(res, "studies")
