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


def test_coordination_scale_benchmark_quick() -> None:
    """``benchmarks/coordination_scale.py --quick`` still runs (tiny sizes: this measures nothing)."""
    url = _server_url("postgres")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "coordination_scale.py"), "--quick", "--json", "--url", url],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(figures["ms_per_trial"]) == {"optuna", "hpo"} and figures["sizes"] == [200, 400]
    for size in ("200", "400"):  # JSON keys
        assert figures["statements_per_trial"]["hpo"][size] < figures["statements_per_trial"]["optuna"][size]
