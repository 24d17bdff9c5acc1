"""hpo.trial_cache: the windowed TPE sees a small study whole and a large one bounded; the incremental budget count
equals the whole-study count in SQL at every step, on every backend."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from hpo import trial_cache
from hpo.storage import budget_counts, open_storage, retry_callback
from hpo.worker import WorkerOptions, take_slots

from .conftest import ROOT, _server_url
from .timing import ceiling

X = {"x": FloatDistribution(-10.0, 10.0)}


def fill(study: optuna.Study, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        x = ((i * 7919) % 2000) / 100.0 - 10.0
        study.add_trial(optuna.create_trial(params={"x": x}, distributions=X, value=(x - 2.0) ** 2))


def test_window_holds_a_small_study_whole_and_samples_as_tpe_does(sqlite_url: str) -> None:
    storage = open_storage(sqlite_url)
    try:
        plain = optuna.create_study(study_name="plain", storage=storage, sampler=optuna.samplers.TPESampler(seed=3))
        sampler = trial_cache.windowed(optuna.samplers.TPESampler(seed=3))
        assert isinstance(sampler, trial_cache.WindowedSampler)
        windowed = optuna.create_study(study_name="windowed", storage=storage, sampler=sampler)
        for study in (plain, windowed):
            fill(study, 40)
        for _ in range(5):  # the same points, trial after trial
            a, b = plain.ask(X), windowed.ask(X)
            assert a.params == b.params
            plain.tell(a, (a.params["x"] - 2.0) ** 2)
            windowed.tell(b, (b.params["x"] - 2.0) ** 2)
    finally:
        storage.engine.dispose()


def test_the_samplers_read_of_the_window_rides_out_a_lost_connection(postgres_url: str, study_name: str) -> None:
    """A worker's trial samples through the windowed TPE, whose read of the study goes below the storage's public
    calls. Every connection of the worker's pool is cut just before it samples (``pg_terminate_backend``, what a
    server restart does to them): the read is retried like the trial's other calls and the trial gets its
    parameter. (It failed the trial before: Optuna's fallback query then met ``PendingRollbackError``.)"""
    import os

    import sqlalchemy

    from hpo.worker.lease import open_trial

    storage = open_storage(postgres_url, heartbeat_interval=30, max_retry=2)
    admin = sqlalchemy.create_engine(postgres_url, poolclass=sqlalchemy.pool.NullPool)
    try:
        sampler = trial_cache.windowed(optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
        study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler)
        fill(study, 20)
        [slot], _ = take_slots(study, study_name, None, storage, WorkerOptions(heartbeat_interval=30))
        trial = open_trial(study, slot, retry_for=30, url=postgres_url)
        with admin.connect() as conn:
            cut = conn.execute(
                sqlalchemy.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :app"
                ),
                {"app": f"hpo:{os.getpid()}"},
            ).scalar_one()
        assert cut >= 1  # the pool's idle connections, the one the sampler reads through among them
        x = trial.suggest_float("x", -10.0, 10.0)
        assert -10.0 <= x <= 10.0
        assert study._storage.get_trial(slot).params == {"x": x}  # stored, on a fresh connection
    finally:
        storage.engine.dispose()
        admin.dispose()


def test_window_of_a_large_study_is_bounded_and_keeps_the_best(postgres_url: str, study_name: str) -> None:
    storage = open_storage(postgres_url)
    try:
        sampler = trial_cache.WindowedSampler(optuna.samplers.TPESampler(seed=0), recent=30, best=10)
        study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler)
        fill(study, 200)
        trial = study.ask(X)  # the sampler's view is read here
        view = sampler._view(study, study._storage.get_trial(trial._trial_id))
        seen = view.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        every = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best10 = sorted(every, key=lambda t: (t.value, -t.number))[:10]
        assert {t.number for t in best10} <= {t.number for t in seen}
        assert {t.number for t in every[-30:]} <= {t.number for t in seen}
        assert len(seen) <= 40
        fill(study, 50, start=200)  # read incrementally: the newest are in view, the window stays bounded
        trial = study.ask(X)
        view = sampler._view(study, study._storage.get_trial(trial._trial_id))
        seen = view.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        newest = max(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        assert max(t.number for t in seen) == newest and len(seen) <= 40
    finally:
        storage.engine.dispose()


@pytest.mark.parametrize("budget", [None, 1000])
def test_incremental_budget_count_equals_the_whole_study_count(
    storage_url: str, study_name: str, budget: int | None
) -> None:
    storage = open_storage(storage_url, heartbeat_interval=30, max_retry=2)
    try:
        study = optuna.create_study(study_name=study_name, storage=storage)
        opts = WorkerOptions(heartbeat_interval=30)

        def check() -> None:
            with storage.engine.connect() as conn:
                got = trial_cache.budget_counts(study, storage, conn, budget)
            assert got == budget_counts(storage, study._study_id)

        fill(study, 5)
        check()
        numbers = []
        for _ in range(6):
            [slot], _ = take_slots(study, study_name, budget, storage, opts)
            numbers.append(study._storage.get_trial(slot).number)
            check()
        assert numbers == list(range(5, 11))  # numbered from the counter's floor, as Optuna numbers them
        running = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
        study.tell(running[0].number, 1.0)
        study.tell(running[1].number, state=TrialState.PRUNED)
        check()
        failed = study._storage.get_trial(running[2]._trial_id)
        study._storage.set_trial_state_values(failed._trial_id, TrialState.FAIL)
        check()
        retry_callback(2)(study, study._storage.get_trial(failed._trial_id))  # a waiting copy gives the slot back
        check()
        study.enqueue_trial({"x": 0.5})
        check()
        [slot], _ = take_slots(study, study_name, budget, storage, opts)  # pops the copy first
        assert study._storage.get_trial(slot).system_attrs.get("failed_trial") == failed.number
        check()
        fill(study, 3)
        check()
    finally:
        storage.engine.dispose()


def test_a_worker_reads_the_study_once_and_never_reads_its_own_trials_back(
    postgres_url: str, study_name: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single-trial worker's TPE window is read whole once, then incrementally, whatever wrapper each trial's study
    has (each trial once re-read the whole study: 2.2x plain Optuna's time); and the worker's own trials are served
    from memory when they are built and told (two reads of six statements each, a quarter of a trivial trial)."""
    from optuna.storages import RDBStorage

    from hpo.spec import load_spec
    from hpo.worker import run_worker

    from .conftest import write_study

    whole_reads: list[int] = []
    trial_reads: list[int] = []
    get_trials, get_trial = RDBStorage._get_trials, RDBStorage.get_trial

    def counting_get_trials(self, study_id, states, included_trial_ids, trial_id_greater_than):  # noqa: ANN001
        if trial_id_greater_than < 0:
            whole_reads.append(study_id)
        return get_trials(self, study_id, states, included_trial_ids, trial_id_greater_than)

    def counting_get_trial(self, trial_id):  # noqa: ANN001
        trial_reads.append(trial_id)
        return get_trial(self, trial_id)

    monkeypatch.setattr(RDBStorage, "_get_trials", counting_get_trials)
    monkeypatch.setattr(RDBStorage, "get_trial", counting_get_trial)
    path = write_study(
        tmp_path / "s.yaml",
        study_name,
        objective={"kind": "tests.fast_objectives:quadratic"},
        budget={"n_trials": 15},
    )
    result = run_worker(load_spec(path), postgres_url, WorkerOptions(threads=1))
    assert result.complete == 15
    assert len(whole_reads) <= 2, f"the whole study was read {len(whole_reads)} times for 15 trials"
    assert trial_reads == [], f"the worker read its own trials back: {trial_reads}"
    stored = optuna.load_study(study_name=study_name, storage=postgres_url).get_trials()
    assert sorted(t.number for t in stored if t.state == TrialState.COMPLETE) == list(range(15))
    assert all(
        t.user_attrs["worker"] and len(t.intermediate_values) == 3 for t in stored
    )  # reports and attributes kept


def test_coordination_scale_benchmark_quick() -> None:
    """``benchmarks/coordination_scale.py --quick`` still runs (tiny sizes: this measures nothing)."""
    url = _server_url("postgres")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "coordination_scale.py"), "--quick", "--json", "--url", url],
        capture_output=True,
        text=True,
        timeout=ceiling(600),
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(figures["ms_per_trial"]) == {"optuna", "hpo"} and figures["sizes"] == [200, 400]
    for size in ("200", "400"):  # JSON keys
        assert figures["statements_per_trial"]["hpo"][size] < figures["statements_per_trial"]["optuna"][size]
