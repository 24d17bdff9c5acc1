"""Many ``hpo worker`` processes on one study in a shared SQL database: budget, crashes, restarts, signals, errors.

Every test starts real ``python -m hpo worker`` processes against the real SQLite / PostgreSQL / MariaDB servers and
checks what ends up stored. The objective is ``tests/worker_objectives.py:sleepy`` (sleeps, returns ``x``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
import psutil
import pytest
import sqlalchemy
from optuna.trial import TrialState

from hpo.errors import STOPPED_EXIT
from hpo.storage import POOL_SIZE, open_storage
from hpo.worker import WorkerOptions, budget_used, count_budget, reap, take_slots

from .conftest import TEST_OBJECTIVES, hpo_cli, write_study
from .timing import ceiling

TESTS = Path(__file__).resolve().parent
ENV = {
    "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    "HPO_ALLOW_OBJECTIVES": TEST_OBJECTIVES,
}
FAST = ["--heartbeat", "1", "--grace", "3", "--threads", "1", "--quiet"]


def sleepy_study(tmp_path: Path, name: str, n_trials: int, sleep: float, **options: object) -> Path:
    return write_study(
        tmp_path / f"{name}.yaml",
        name,
        objective={"kind": "worker_objectives:sleepy", "sleep": sleep, **options},
        space={"x": {"type": "float", "low": 0.0, "high": 1.0}},
        sampler={"name": "random", "seed": 0},
        budget={"n_trials": n_trials},
    )


def start_worker(study: str | Path, url: str, *extra: str) -> subprocess.Popen[str]:
    """One ``hpo worker`` process; the URL travels in HPO_STORAGE, as ``hpo run --workers`` passes it."""
    return subprocess.Popen(
        [sys.executable, "-m", "hpo", "worker", str(study), *FAST, *extra],
        env={**os.environ, **ENV, "HPO_STORAGE": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _open_connections(pid: int, port: int) -> int:
    """How many TCP connections to ``port`` the process ``pid`` holds open now (0 once it has exited)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return 0
    return sum(1 for c in conns if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def finish(procs: list[subprocess.Popen[str]], timeout: float = 240) -> list[tuple[int, str]]:
    """Wait for every process; (exit status, stderr) each."""
    results = []
    for p in procs:
        _, stderr = p.communicate(timeout=ceiling(timeout))
        results.append((p.returncode, stderr))
    return results


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def counted(url: str, name: str) -> tuple[int, int]:
    storage = open_storage(url)
    try:
        return budget_used(optuna.load_study(study_name=name, storage=storage))
    finally:
        storage.engine.dispose()


def wait_for(
    cond: Callable[[], object], what: str, timeout: float = 120, watch: Sequence[subprocess.Popen[str]] = ()
) -> object:
    """``cond()`` once it is true; fails after ``timeout`` seconds, or at once if a watched process has exited
    (with what it printed: a worker that died or finished early is the answer, not a wait)."""
    deadline = time.monotonic() + ceiling(timeout)
    got: object = None
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        for proc in watch:
            if proc.poll() is not None:
                said = "".join(part or "" for part in proc.communicate())[-3000:]
                raise AssertionError(f"waiting for {what}: pid {proc.pid} exited {proc.returncode}: {said}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {ceiling(timeout):.0f} s waiting for {what} (last seen: {got!r})")


def assert_budget_exact(url: str, name: str, budget: int) -> list[optuna.trial.FrozenTrial]:
    ts = trials(url, name)
    assert [t.number for t in ts if t.state == TrialState.RUNNING] == []
    requeued = {n for t in ts for n in t.system_attrs.get("retry_history", ())}
    finished = [
        t
        for t in ts
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and t.number not in requeued)
    ]
    assert len(finished) == budget
    return ts


# --------------------------------------------------------------------------- the global budget


def test_four_workers_meet_the_budget_exactly(storage_url: str, study_name: str, tmp_path: Path) -> None:
    study = sleepy_study(tmp_path, study_name, n_trials=40, sleep=0.05)
    procs = [start_worker(study, storage_url) for _ in range(4)]
    results = finish(procs)
    assert [rc for rc, _ in results] == [0, 0, 0, 0], [e for _, e in results]
    ts = assert_budget_exact(storage_url, study_name, 40)
    assert all(t.state == TrialState.COMPLETE for t in ts)
    assert len({t.user_attrs["worker"] for t in ts}) > 1  # the work was shared


def test_workers_by_study_name_after_create(postgres_url: str, study_name: str, tmp_path: Path) -> None:
    study = sleepy_study(tmp_path, study_name, n_trials=12, sleep=0.05)
    created = hpo_cli("create", str(study), "--storage", postgres_url, env=ENV)
    assert created.returncode == 0, created.stderr
    assert hpo_cli("create", str(study), "--storage", postgres_url, env=ENV).returncode == 0  # idempotent
    # by name, a user's objective runs only when the worker names it (hpo.trust)
    results = finish(
        [start_worker(study_name, postgres_url, "--objective", "worker_objectives:sleepy") for _ in range(2)]
    )
    assert [rc for rc, _ in results] == [0, 0], [e for _, e in results]
    assert_budget_exact(postgres_url, study_name, 12)


def test_budget_counted_in_sql_as_over_trials(storage_url: str, study_name: str) -> None:
    """The one-statement count (hpo.storage.budget_counts) follows the rule count_budget applies to trials read:
    failed trials with a re-queued copy do not count, waiting trials do not count, a failed copy re-queued again
    cancels too."""
    from hpo.storage import retry_callback

    storage = open_storage(storage_url, heartbeat_interval=60, max_retry=3)
    try:
        study = optuna.create_study(study_name=study_name, storage=storage)
        requeue = retry_callback(3)
        for value in (1.0, 2.0):
            t = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
            study.tell(t, value)
        study.tell(study.ask(), state=TrialState.PRUNED)
        study.tell(study.ask(), state=TrialState.FAIL)  # failed, not re-queued: counts
        failed = study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), state=TrialState.FAIL)
        requeue(study, failed)  # failed + waiting copy: nothing counts
        copy = study.ask()  # pops the copy: it counts
        requeue(study, study.tell(copy, state=TrialState.FAIL))  # failed again, second copy waits
        study.ask()  # pops the second copy, running: counts
        study.enqueue_trial({"x": 0.5})  # waiting: does not count
        ts = study.get_trials(deepcopy=False)
        assert count_budget(ts) == budget_used(study) == (5, 1), [(t.number, t.state.name) for t in ts]
    finally:
        storage.engine.dispose()


def test_a_trial_that_never_beat_is_reaped(storage_url: str, study_name: str) -> None:
    """A worker killed between taking a slot and its first heartbeat leaves a running trial with no heartbeat row,
    which Optuna's stale-trial query never sees; hpo's reaper fails and re-queues it after the grace period."""
    grace = 3  # seconds; generous, so that a slow machine's set-up never looks stale (take_slots reaps first)
    storage = open_storage(storage_url, heartbeat_interval=1, grace_period=grace, max_retry=2)
    try:
        study = optuna.create_study(study_name=study_name, storage=storage)
        [slot], _ = take_slots(study, study_name, 10, storage, WorkerOptions(heartbeat_interval=1))  # beats once
        orphan = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # Optuna's ask: no heartbeat
        assert reap(study) == []  # within the grace period
        time.sleep(grace + 1.5)  # + MySQL's whole-second clock
        assert sorted(reap(study)) == sorted([orphan._trial_id, slot])
        ts = study.get_trials(deepcopy=False)
        assert [t.state for t in ts[:2]] == [TrialState.FAIL, TrialState.FAIL]
        assert {t.system_attrs.get("failed_trial") for t in ts[2:]} == {0, 1}  # both re-queued
        assert reap(study) == [] and budget_used(study) == (0, 0)
    finally:
        storage.engine.dispose()


# --------------------------------------------------------------------------- crashes and signals


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_killed_worker_trial_is_failed_and_rerun(
    backend: str, request: pytest.FixtureRequest, study_name: str, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{backend}_url")
    markers = tmp_path / "markers"
    markers.mkdir()
    study = sleepy_study(tmp_path, study_name, n_trials=6, sleep=2.0, marker_dir=str(markers))
    assert hpo_cli("create", str(study), "--storage", url, env=ENV).returncode == 0
    victim = start_worker(study, url)
    started = wait_for(lambda: list(markers.glob(f"{victim.pid}-*")), "the victim to start a trial")
    killed_number = int(started[0].name.split("-")[1])
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    survivor = start_worker(study, url)
    [(rc, stderr)] = finish([survivor])
    assert rc == 0, stderr
    ts = assert_budget_exact(url, study_name, 6)
    killed = next(t for t in ts if t.number == killed_number)
    assert killed.state == TrialState.FAIL
    copies = [t for t in ts if t.system_attrs.get("failed_trial") == killed.number]
    assert len(copies) == 1
    assert copies[0].params == killed.params
    assert copies[0].state == TrialState.COMPLETE
    assert copies[0].user_attrs["worker"].endswith(f":{survivor.pid}")


def test_sigterm_mid_trial_exits_0_and_requeues(postgres_url: str, study_name: str, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    study = sleepy_study(tmp_path, study_name, n_trials=3, sleep=60.0, marker_dir=str(markers))
    proc = start_worker(study, postgres_url)
    started = wait_for(lambda: list(markers.glob(f"{proc.pid}-*")), "the worker to start a trial")
    number = int(started[0].name.split("-")[1])
    proc.send_signal(signal.SIGTERM)
    [(rc, stderr)] = finish([proc], timeout=60)
    assert rc == STOPPED_EXIT, stderr  # stopped before the budget: documented, engines run it again
    ts = trials(postgres_url, study_name)
    assert [t.number for t in ts if t.state == TrialState.RUNNING] == []
    stopped = next(t for t in ts if t.number == number)
    assert stopped.state == TrialState.FAIL
    assert stopped.user_attrs["reason"] == "interrupted"
    [copy] = [t for t in ts if t.system_attrs.get("failed_trial") == stopped.number]
    assert copy.state == TrialState.WAITING
    assert copy.params == stopped.params or copy.system_attrs.get("fixed_params") == stopped.params
    assert counted(postgres_url, study_name) == (0, 0)  # the interrupted trial gave its slot back


# --------------------------------------------------------------------------- databases


@pytest.mark.pg_restart
def test_postgres_restart_while_workers_run(postgres_url: str, study_name: str, tmp_path: Path) -> None:
    study = sleepy_study(tmp_path, study_name, n_trials=40, sleep=0.3)
    assert hpo_cli("create", str(study), "--storage", postgres_url, env=ENV).returncode == 0
    procs = [start_worker(study, postgres_url) for _ in range(3)]

    def done() -> list[int]:
        nums = [t.number for t in trials(postgres_url, study_name) if t.state == TrialState.COMPLETE]
        return nums if len(nums) >= 8 else []

    before = set(wait_for(done, "8 finished trials"))  # type: ignore[arg-type]
    cluster = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "restart"], check=True, timeout=ceiling(120)
    )
    results = finish(procs, timeout=300)
    for rc, stderr in results:
        assert rc == 0, stderr
        assert "Traceback" not in stderr
    ts = assert_budget_exact(postgres_url, study_name, 40)
    complete = {t.number for t in ts if t.state == TrialState.COMPLETE}
    assert before <= complete


@pytest.mark.slow
def test_sixteen_workers_stay_within_the_connection_budget(postgres_url: str, study_name: str, tmp_path: Path) -> None:
    study = sleepy_study(tmp_path, study_name, n_trials=64, sleep=0.5)
    assert hpo_cli("create", str(study), "--storage", postgres_url, env=ENV).returncode == 0
    database = sqlalchemy.engine.make_url(postgres_url).database
    admin = sqlalchemy.create_engine(postgres_url, poolclass=sqlalchemy.pool.NullPool)
    procs = [start_worker(study, postgres_url) for _ in range(16)]
    peak_total = 0
    peak_per_worker = 0
    seen_apps: set[str] = set()
    port = sqlalchemy.engine.make_url(postgres_url).port or 5432
    # Each worker's connections are counted on its side (its open sockets to the server): a backend whose client
    # has closed is still listed in pg_stat_activity until it exits, which on a loaded machine can take seconds.
    # pg_stat_activity shows that the workers name themselves (application_name hpo:<pid>).
    try:
        while any(p.poll() is None for p in procs):
            with admin.connect() as conn:
                apps = conn.execute(
                    sqlalchemy.text("SELECT DISTINCT application_name FROM pg_stat_activity WHERE datname = :db"),
                    {"db": database},
                ).scalars()
                seen_apps |= {app for app in apps if app.startswith("hpo:")}
            counts = [_open_connections(p.pid, port) for p in procs if p.poll() is None]
            peak_total = max(peak_total, sum(counts))
            peak_per_worker = max([peak_per_worker, *counts])
            time.sleep(0.3)
        results = finish(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        admin.dispose()
    assert [rc for rc, _ in results] == [0] * 16, [e for _, e in results if e]
    assert all("error" not in stderr.lower() for _, stderr in results)
    assert {f"hpo:{p.pid}" for p in procs} & seen_apps  # the workers name themselves to the server
    assert 1 <= peak_per_worker <= POOL_SIZE
    assert peak_total <= 16 * POOL_SIZE
    assert_budget_exact(postgres_url, study_name, 64)


# --------------------------------------------------------------------------- bad input


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    return errors[0]


def test_unknown_study_name(storage_url: str) -> None:
    proc = hpo_cli("worker", "no-such-study", "--storage", storage_url, "--db-retry-for", "1", env=ENV)
    assert "no study named 'no-such-study'" in one_line_error(proc)


def test_study_file_disagreeing_with_stored_study(storage_url: str, study_name: str, tmp_path: Path) -> None:
    first = sleepy_study(tmp_path, study_name, n_trials=2, sleep=0.0)
    assert hpo_cli("create", str(first), "--storage", storage_url, env=ENV).returncode == 0
    other = write_study(
        tmp_path / "other.yaml",
        study_name,
        objective={"kind": "worker_objectives:sleepy"},
        space={"x": {"type": "float", "low": 0.0, "high": 2.0}},
        sampler={"name": "random", "seed": 0},
        budget={"n_trials": 2},
    )
    line = one_line_error(hpo_cli("worker", str(other), "--storage", storage_url, env=ENV))
    assert "space.x differs" in line
    assert trials(storage_url, study_name) == []  # nothing ran


def test_unreachable_database_fails_after_bounded_retries(tmp_path: Path) -> None:
    study = sleepy_study(tmp_path, "unreachable", n_trials=2, sleep=0.0)
    url = "postgresql+psycopg://hpo:pw-unreachable-7@127.0.0.1:9/hpo"
    proc = hpo_cli("worker", str(study), "--db-retry-for", "2", env={**ENV, "HPO_STORAGE": url})
    line = one_line_error(proc)
    assert "cannot connect to postgresql+psycopg://hpo:***@127.0.0.1:9/hpo" in line
    assert "retrying" in proc.stderr  # it did retry before giving up
    assert "pw-unreachable-7" not in proc.stdout + proc.stderr


def test_wrong_password_is_masked(mysql_url: str, tmp_path: Path) -> None:
    study = sleepy_study(tmp_path, "wrong-password", n_trials=2, sleep=0.0)
    secret = "Wr0ng-s3cret"
    url = sqlalchemy.engine.make_url(mysql_url).set(password=secret).render_as_string(hide_password=False)
    proc = hpo_cli("worker", str(study), "--storage", url, "--db-retry-for", "30", env=ENV)
    line = one_line_error(proc)
    assert "Access denied" in line
    assert secret not in proc.stdout + proc.stderr
    assert "retrying" not in proc.stderr  # refused credentials are final at once


def test_a_worker_for_a_users_objective_imports_no_heavy_library(tmp_path: Path) -> None:
    """Eight workers each paid ~1.5 s of CPU importing scipy (for designed experiments only) before their first
    trial: on 2 cores that was the worker benchmark's whole gap to plain Optuna. A worker imports what it runs."""
    path = write_study(
        tmp_path / "s.yaml", "light", objective={"kind": "tests.fast_objectives:quadratic"}, budget={"n_trials": 2}
    )
    code = (
        "import sys; from hpo.cli import app; sys.argv = ['hpo', 'worker', sys.argv[1], '--storage', sys.argv[2]]\n"
        "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('imported:', *(m for m in ('scipy', 'pandas', 'torch', 'plotly', 'sklearn') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path), f"sqlite:///{tmp_path / 'db.sqlite'}"],
        capture_output=True, text=True, timeout=ceiling(120), cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "imported:"
    stored = optuna.load_study(study_name="light", storage=f"sqlite:///{tmp_path / 'db.sqlite'}").trials
    assert [t.state for t in stored] == [TrialState.COMPLETE] * 2
