"""A trial's lease on the shared database: the only code that decides a trial's fate.

Budget. A study of budget B ends with exactly B *counted* trials: complete, pruned, and failed ones that were not
re-queued. A worker counts and takes its next slots while holding the study's budget lock
(:func:`hpo.storage.budget_lock`), so two workers can never both take the last slot. A trial re-queued after a
crash or a stop gives its slot to its copy.

Crashes. With heartbeats on (the default), a running trial records a heartbeat every ``heartbeat_interval`` seconds;
one silent for ``grace_period`` seconds is failed by the next worker that asks, and Optuna's retry callback
re-queues its parameters (keeping its intermediate values) up to ``max_retry`` times. A worker that finds the budget
taken while trials are still running waits for them, reaping stale ones, so no trial stays RUNNING.

Databases. Errors talking to the database are retried with backoff for ``db_retry_for`` seconds; a finished trial's
result is retried until stored, so a database restart loses no result.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import optuna
from optuna.trial import TrialState
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from hpo.errors import HpoError
from hpo.storage import (
    budget_counts,
    budget_lock,
    create_running_trial,
    describe_error,
    mask,
    quiet_optuna,
    rdb_backend,
    record_heartbeat,
    unbeaten_trial_ids,
)
from hpo.worker.options import WorkerOptions

log = logging.getLogger(__name__)
T = TypeVar("T")

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# --------------------------------------------------------------------------- budget


def budget_used(study: optuna.Study) -> tuple[int, int]:
    """(counted trials, running trials): counted = complete + pruned + running + failed-and-not-re-queued.

    One SQL aggregate (:func:`hpo.storage.budget_counts`); :func:`count_budget` is the same rule over trials read.
    """
    counted, running, _ = budget_counts(study._storage, study._study_id)
    return counted, running


def requeued_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of the failed trials that Optuna's retry callback re-queued (a copy lists them in ``retry_history``)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def count_budget(trials: list[optuna.trial.FrozenTrial]) -> tuple[int, int]:
    """(counted, running) of a list of trials, by the rule :func:`budget_used` counts in SQL."""
    requeued = requeued_numbers(trials)
    counted = running = 0
    for t in trials:
        if t.state == TrialState.RUNNING:
            running += 1
        if t.state in COUNTED or (t.state == TrialState.FAIL and t.number not in requeued):
            counted += 1
    return counted, running


def is_db_error(exc: BaseException) -> bool:
    """Whether an exception is the database's, worth retrying: SQLAlchemy's own, or Optuna's wrapper of a lost
    connection (``StorageInternalError`` caused by an operational error, as a server restart gives)."""
    if isinstance(exc, SQLAlchemyError):
        return True
    if isinstance(exc, optuna.exceptions.StorageInternalError):
        cause = exc.__cause__
        return isinstance(cause, (OperationalError, InterfaceError)) or bool(
            isinstance(cause, DBAPIError) and cause.connection_invalidated
        )
    return False


def with_db_retry(what: str, fn: Callable[[], T], retry_for: float, url: str) -> T:
    deadline = time.monotonic() + retry_for
    delay = 0.5
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_db_error(exc):
                raise
            if isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ is not None:
                exc = exc.__cause__
            if time.monotonic() + delay > deadline:
                raise HpoError(
                    f"database {mask(url)} unavailable while trying to {what}: {describe_error(exc, url)}"
                ) from None
            log.warning(
                "database error while trying to %s (%s); retrying in %.1f s", what, describe_error(exc, url), delay
            )
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


_last_reap: dict[str, float] = {}  # study name -> when this process may next look for stale trials


def take_slots(
    study: optuna.Study,
    name: str,
    budget: int | None,
    storage: optuna.storages.RDBStorage,
    opts: WorkerOptions,
    want: int = 1,
) -> tuple[list[int], int]:
    """Take up to ``want`` trial slots inside the budget lock: (their trial ids, trials running now).

    Stale trials are reaped first, outside the lock and at most once per heartbeat interval (a trial changes state
    once; reaping before every ask, inside the lock, serialised three queries per trial). Inside the lock: one
    count, waiting trials popped from Optuna's queue, new RUNNING trials created and their first heartbeats
    written in the lock's own transaction (:func:`hpo.storage.create_running_trial`), so the lock is held for a
    handful of statements and one commit. Build each trial with ``optuna.Trial(study, trial_id)`` after this
    returns: the sampler then draws outside the lock.
    """
    if opts.heartbeat_interval is not None and time.monotonic() >= _last_reap.get(name, 0.0):
        reap(study)
        _last_reap[name] = time.monotonic() + opts.heartbeat_interval
    with budget_lock(storage, name) as lock:
        counted, running, waiting = budget_counts(storage, study._study_id, lock)
        n = max(0, want if budget is None else min(want, budget - counted))
        study._thread_local.cached_all_trials = None  # as Study.ask: sync with the storage once a trial
        ids: list[int] = []
        while len(ids) < min(n, waiting):  # re-queued and enqueued trials first (Optuna's queue), then new ones
            popped = study._pop_waiting_trial_id()
            if popped is None:
                break
            ids.append(popped)
        if len(ids) == n and not (ids and opts.heartbeat_interval is not None):
            return ids, running
        # New trials and their first heartbeats in the lock's transaction (SQLite: one of its own, under the lock
        # file): from the commit on, a worker that dies is reaped.
        created = []
        with contextlib.nullcontext(lock) if lock is not None else storage.engine.begin() as conn:
            while len(ids) + len(created) < n:
                created.append(create_running_trial(study._study_id, conn))
            ids += [trial_id for trial_id, _, _ in created]
            if ids and opts.heartbeat_interval is not None:
                record_heartbeat(storage, ids, conn)
        _cache_created(study, created)
        return ids, running


def _cache_created(study: optuna.Study, created: list[tuple[int, int, datetime.datetime]]) -> None:
    """Tell Optuna's trial cache about trials created by :func:`hpo.storage.create_running_trial`, as its own
    ``create_new_trial`` does (the cache maps trial ids to studies for every later call on those trials)."""
    cache = study._storage
    if not created or not hasattr(cache, "_add_trials_to_cache"):
        return
    from optuna.storages._cached_storage import _StudyInfo

    trials = [
        optuna.trial.FrozenTrial(
            number=number,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=start,
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={},
            intermediate_values={},
            trial_id=trial_id,
        )
        for trial_id, number, start in created
    ]
    with cache._lock:
        cache._studies.setdefault(study._study_id, _StudyInfo())
        cache._add_trials_to_cache(study._study_id, trials)


def reap(study: optuna.Study) -> list[int]:
    """Fail the study's stale running trials and re-queue them through the storage's retry callback, as Optuna's
    ``fail_stale_trials`` does for trials whose heartbeat is older than the grace period; here also for running
    trials that never beat (:func:`hpo.storage.unbeaten_trial_ids`). Returns the ids of the trials this call failed
    (another worker may reap the same trials at the same time; each is failed, and re-queued, once)."""
    backend = rdb_backend(study._storage)
    interval = backend.get_heartbeat_interval() if hasattr(backend, "get_heartbeat_interval") else None
    if interval is None:
        return []
    grace = backend.grace_period if backend.grace_period is not None else 2 * interval
    stale = set(backend._get_stale_trial_ids(study._study_id))
    stale |= set(unbeaten_trial_ids(backend, study._study_id, grace))
    failed = []
    for trial_id in sorted(stale):
        try:
            if study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed.append(trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    callback = backend.get_heartbeat_stale_trial_callback()
    with quiet_optuna():
        for trial_id in failed if callback is not None else ():
            callback(study, copy.deepcopy(study._storage.get_trial(trial_id)))
    return failed


class Heartbeats:
    """One thread recording a heartbeat for every trial it holds (one in single-trial mode, every running member in
    population mode) every ``interval`` seconds, surviving database errors.

    Optuna's own heartbeat thread dies at the first database error, after which the trial looks stale to every other
    worker; this one logs the error and tries again at the next beat.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, interval: int | None, url: str) -> None:
        self.storage, self.interval, self.url = storage, interval, url
        self.ids: set[int] = set()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, trial_id: int) -> None:
        """Beat for ``trial_id`` from the next interval on (its first beat was recorded with its slot)."""
        with self.lock:
            self.ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self.lock:
            self.ids.discard(trial_id)

    def __enter__(self) -> Heartbeats:
        if self.interval is not None:
            self.thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
            self.thread.start()
        return self

    def _beat(self) -> None:
        assert self.interval is not None
        while not self.done.wait(self.interval):
            with self.lock:
                ids = sorted(self.ids)
            try:
                record_heartbeat(self.storage, ids)
            except Exception as exc:
                if not is_db_error(exc):
                    raise
                log.warning("heartbeats of %d trial(s) not recorded: %s", len(ids), describe_error(exc, self.url))

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join()


def tell(
    study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None, opts: WorkerOptions, url: str
) -> tuple[optuna.trial.FrozenTrial, bool]:
    """Store the outcome, retrying until the database takes it; (stored trial, whether this call finished it).

    ``study`` may be population mode's view of the study, which reads the worker's own trials from memory."""

    real = getattr(study, "_study", study)
    attempts = [0]

    def tell() -> tuple[optuna.trial.FrozenTrial, bool]:
        attempts[0] += 1
        # After a failed attempt (which may have reached the database), or for a trial that failed (which a worker
        # may have reaped meanwhile), look first; a plain success or prune needs no extra read.
        if attempts[0] > 1 or state == TrialState.FAIL:
            current = real._storage.get_trial(trial._trial_id)
            if current.state.is_finished():
                return current, False
        with quiet_optuna():
            try:
                if state != TrialState.FAIL and attempts[0] == 1:
                    return tell_finished(study, trial, state, value)
                return real.tell(trial, value if state == TrialState.COMPLETE else None, state, True), True
            except RuntimeError as exc:  # GridSampler calls study.stop() once its grid is used up; the trial is stored
                if "Study.stop" not in str(exc):
                    raise
                return real._storage.get_trial(trial._trial_id), True

    return with_db_retry("store a trial's result", tell, max(opts.db_retry_for, 300.0), url)


def tell_finished(
    study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None
) -> tuple[optuna.trial.FrozenTrial, bool]:
    """``study.tell(trial, value, state)`` for a complete or pruned trial, without its closing re-read of the trial
    (six statements): the stored trial is the one the worker holds, finished, as in ``Study.optimize`` (a pruned
    trial's value is its last reported one, as Optuna stores it). (stored trial, whether this call finished it)"""
    from optuna.study._tell import _tell_with_warning

    real = getattr(study, "_study", study)
    try:
        stored, values, _ = _tell_with_warning(
            study, trial, value if state == TrialState.COMPLETE else None, state, True, suppress_warning=True
        )
    except optuna.exceptions.UpdateFinishedTrialError:  # read from memory as running, but reaped meanwhile
        return real._storage.get_trial(trial._trial_id), False
    cached = getattr(trial, "_cached_frozen_trial", None)
    if cached is None or stored != state:  # already finished elsewhere (reaped): what is stored
        return real._storage.get_trial(trial._trial_id), stored == state
    frozen = copy.copy(cached)
    frozen.state, frozen.values = state, values
    frozen.datetime_complete = datetime.datetime.now()
    return frozen, True


def created_trial(study: optuna.Study, trial_id: int) -> optuna.trial.FrozenTrial | None:
    """A copy of a trial :func:`take_slots` just gave this worker, as Optuna's trial cache holds it (no read), or
    None where the cache does not hold it as running (a trial popped from the queue: read it)."""
    cache = study._storage
    where = getattr(cache, "_trial_id_to_study_id_and_number", {}).get(trial_id)
    if where is None:
        return None
    with cache._lock:
        frozen = cache._studies[where[0]].trials[where[1]]
        return copy.deepcopy(frozen) if frozen.state == TrialState.RUNNING else None
