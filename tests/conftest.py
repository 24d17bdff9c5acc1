"""Shared fixtures: a storage URL parametrised over SQLite, PostgreSQL and MariaDB/MySQL, as Optuna's own tests do.

PostgreSQL and MySQL come from ``HPO_TEST_POSTGRES_URL`` and ``HPO_TEST_MYSQL_URL`` (``.ci/run`` exports both);
each test session works in a fresh database of its own, dropped at the end. Where a variable is unset, the tests
that need that server skip and say why.

Tests marked ``pg_restart`` restart or stop the machine's PostgreSQL server; they run only with
``HPO_TEST_PG_ADMIN=1``. The suite runs in parallel (pytest-xdist), so the server is guarded by a readers-writer lock
shared by every process of the run (:func:`postgres_server_lock`): a ``pg_restart`` test holds it alone, every other
test that may touch PostgreSQL holds it shared, and a waiting ``pg_restart`` test keeps new readers out.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.engine import make_url

from .timing import ceiling, describe

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "studies"
SERVERS = {"postgres": "HPO_TEST_POSTGRES_URL", "mysql": "HPO_TEST_MYSQL_URL"}


def _server_url(kind: str) -> str:
    var = SERVERS[kind]
    url = os.environ.get(var)
    if not url:
        pytest.skip(f"{var} is not set; this test needs a real {kind} server (.ci/run sets it)")
    return url


# --------------------------------------------------------------------------- the session: order and ceilings


def pytest_report_header(config: pytest.Config) -> str:
    return describe()


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist hands each worker its next test one at a time (by default the first quarter of the collection
    # goes out in three contiguous blocks, so every slow test at its front would queue on one worker)
    if getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 1


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected: positions count the tests that run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long tests first, longest first (``@pytest.mark.slow(seconds=...)``: their time on an idle machine, 60
    where not said), so that with ``-n 3`` they start at once on different workers and the many short tests fill in
    around them; the rest in file order. The same order in every process, as pytest-xdist requires."""

    def seconds(item: pytest.Item) -> float:
        mark = item.get_closest_marker("slow")
        return float(mark.kwargs.get("seconds", 60)) if mark else 0.0

    items.sort(key=lambda item: -seconds(item))  # stable: file order among equals
    # pytest-xdist (one test at a time, above) starts worker i on the tests at positions 2i and 2i + 1, then hands out
    # the rest in order as workers finish: the n longest start at once, each with a shorter one queued behind it
    # (two long restarts of PostgreSQL share a worker: on two they would wait for each other, holding both)
    n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if n < 2 or len(items) < 2 * n:
        return
    restarts = [item for item in items[: 2 * n] if item.get_closest_marker("pg_restart")][:2]
    pairs = [restarts] if len(restarts) == 2 else []
    rest = [item for item in items if not any(item is r for pair in pairs for r in pair)]
    k = n - len(pairs)
    pairs += [[rest[i], rest[2 * k - 1 - i]] for i in range(k)]
    items[:] = [item for pair in pairs for item in pair] + rest[2 * k :]


# --------------------------------------------------------------------------- the PostgreSQL server, shared

_LOCK_DIR = Path(tempfile.gettempdir())
_held = [0]  # this process's depth of postgres_server_lock


@contextlib.contextmanager
def postgres_server_lock(exclusive: bool) -> Iterator[None]:
    """The machine's PostgreSQL server, held shared (a test that uses it) or alone (one that restarts it), across
    every process on this machine (flock). Writer preference: a writer holds the turnstile while it waits, and a
    reader passes the turnstile before it takes its share, so a stream of readers cannot starve a restart. Re-entrant
    within a process (a test's fixtures may create a database while the test holds the server)."""
    if _held[0]:
        _held[0] += 1
        try:
            yield
        finally:
            _held[0] -= 1
        return
    with (
        open(_LOCK_DIR / "hpo-tests-postgres.turn", "a") as turn,
        open(_LOCK_DIR / "hpo-tests-postgres.lock", "a") as lock,
    ):
        fcntl.flock(turn, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(turn, fcntl.LOCK_UN)
        _held[0] = 1
        try:
            yield
        finally:
            _held[0] = 0
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(turn, fcntl.LOCK_UN)


@functools.cache
def _mentions_postgres(path: str) -> bool:
    return "postgres" in Path(path).read_text().lower()


def _touches_postgres(item: pytest.Item) -> bool:
    """Whether a test may talk to PostgreSQL: it asks for ``postgres_url``, or one of its parameters is "postgres", or
    (not parametrised over sqlite/mysql) its module mentions PostgreSQL at all. Errs on the side of yes."""
    if "postgres_url" in getattr(item, "fixturenames", ()):
        return True
    callspec = getattr(item, "callspec", None)
    values = {v for v in callspec.params.values() if isinstance(v, str)} if callspec else set()
    if "postgres" in values:
        return True
    if values & {"sqlite", "mysql"}:
        return False
    return _mentions_postgres(str(item.path))


@pytest.fixture(autouse=True)
def _postgres_server(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test holds the PostgreSQL server shared, or alone if marked ``pg_restart`` (skipped unless
    ``HPO_TEST_PG_ADMIN=1``); nothing where no server is configured."""
    restarts = request.node.get_closest_marker("pg_restart") is not None
    if restarts and os.environ.get("HPO_TEST_PG_ADMIN") != "1":
        pytest.skip("restarts the machine's PostgreSQL server; set HPO_TEST_PG_ADMIN=1 to allow it")
    if not os.environ.get(SERVERS["postgres"]) or not (restarts or _touches_postgres(request.node)):
        yield
        return
    with postgres_server_lock(exclusive=restarts):
        yield


def _fresh_database(admin_url: str) -> Iterator[str]:
    """CREATE a uniquely named database on the server, yield its URL, DROP it afterwards."""
    url = make_url(admin_url)
    name = f"hpo_test_{uuid.uuid4().hex[:10]}"
    shared = url.get_backend_name() == "postgresql"  # the server held shared while the database is made or dropped

    def held() -> contextlib.AbstractContextManager[None]:
        return postgres_server_lock(exclusive=False) if shared else contextlib.nullcontext()

    # pre-ping: the engine survives a server restart
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with held(), engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with held(), engine.connect() as conn:
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


#: The test suite's own objective modules, allowed for workers started by study name (hpo.trust: such a worker runs
#: only code its side names; tests/test_security_workers.py proves the refusal without this).
TEST_OBJECTIVES = ",".join(
    f"{m}:*" for m in ("fault_objectives", "worker_objectives", "plain_objectives", "fast_objectives",
                       "tests.fast_objectives", "optuna_like")
)  # fmt: skip


def hpo_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real ``hpo`` command line in a subprocess (``timeout``: the idle machine's ceiling, scaled by
    :func:`timing.ceiling`)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hpo", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=ceiling(timeout),
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


@pytest.fixture(scope="session")
def lesson_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``hpo run studies/lesson.yaml`` once per test session, into a SQLite file that every test needing a finished
    lesson study reads (``hpo check``, ``hpo report``, the browser): the first process of the session to ask runs it
    while any other waits on a lock, instead of a run of 216 trials in each. Its URL; read it, never write to it."""
    # pytest-xdist's workers have basetemp <session>/popen-gwN: their parent is the session's own folder
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / "lesson-run"
    folder.mkdir(exist_ok=True)
    url = f"sqlite:///{folder / 'lesson.db'}"
    with open(shared / "lesson-run.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the holder's run has its own ceiling (hpo_cli)
        try:
            if not (folder / "done").exists() and not (folder / "failed").exists():
                res = hpo_cli("run", str(STUDIES / "lesson.yaml"), "--storage", url, timeout=900)
                (folder / ("done" if res.returncode == 0 else "failed")).write_text(res.stderr[-3000:])
            if (folder / "failed").exists():  # once per session: not a second run into a half-written file
                pytest.fail(f"hpo run studies/lesson.yaml failed: {(folder / 'failed').read_text()}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return url
