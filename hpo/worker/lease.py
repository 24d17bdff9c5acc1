"""A trial's lease on the shared database: the only code that decides a trial's fate.

Budget. A study of budget B ends with exactly B *counted* trials: complete, pruned, and failed ones that were not
re-queued. A worker counts and takes its next slots while holding the study's budget lock
(:func:`hpo.storage.budget_lock`), so two workers can never both take the last slot. A trial re-queued after a
crash or a stop gives its slot to its copy.

Crashes. With heartbeats on (the default), a running trial records a heartbeat every ``heartbeat_interval`` seconds
(at most every half grace period); one silent for the study's grace period (:func:`study_grace`) is failed by the
next worker that asks (:func:`reap`) and re-queued with its parameters up to ``max_retry`` times, in one conditional
transaction (:func:`fail_and_requeue`): a trial is failed once and re-queued at most once per failure. A worker that
finds the budget taken while trials are still running waits for them, reaping stale ones, so no trial stays RUNNING.

Exactly once. :func:`tell` says whether it stored the outcome; a result whose trial was reaped meanwhile is stored on
the re-queued copy if no worker took it yet (:func:`take_over`).

Databases. Errors talking to the database are retried with backoff for ``db_retry_for`` seconds, a running trial's
own calls included (:class:`RetryingStorage`); a finished trial's result is retried until stored, so a database
restart loses no result.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from hpo import trial_cache
from hpo.errors import HpoError
from hpo.objectives import Interrupted
from hpo.storage import (
    budget_counts,
    budget_lock,
    denied_reason,
    describe_error,
    mask,
    quiet_optuna,
    rdb_backend,
    record_heartbeat,
    set_trial_attrs,
    unbeaten_trial_ids,
)
from hpo.worker.options import WorkerOptions

log = logging.getLogger(__name__)
T = TypeVar("T")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# --------------------------------------------------------------------------- budget


def budget_used(study: optuna.Study) -> tuple[int, int]:
    """(counted trials, running trials): counted = complete + pruned + running + failed-and-not-re-queued.

    One SQL aggregate (:func:`hpo.storage.budget_counts`); :func:`hpo.storage.count_budget` is the same rule over
    trials read.
    """
    counted, running, _ = budget_counts(study._storage, study._study_id)
    return counted, running


def is_db_error(exc: BaseException) -> bool:
    """Whether an exception is the database's, worth retrying: SQLAlchemy's own, or Optuna's wrapper of a lost
    connection (``StorageInternalError`` with an operational error in its chain, as a server restart gives: Optuna
    may first try another query in the broken session, whose ``PendingRollbackError`` then stands in between)."""
    if isinstance(exc, SQLAlchemyError):
        return True
    if isinstance(exc, optuna.exceptions.StorageInternalError):
        link: BaseException | None = exc.__cause__
        for _ in range(8):  # the chain of causes and contexts, bounded
            if link is None:
                return False
            if isinstance(link, (OperationalError, InterfaceError)) or (
                isinstance(link, DBAPIError) and link.connection_invalidated
            ):
                return True
            link = link.__cause__ or link.__context__
    return False


def with_db_retry(
    what: str,
    fn: Callable[[], T],
    retry_for: float,
    url: str,
    stop: threading.Event | None = None,
    reraise: bool = False,
) -> T:
    """``fn()``, retried with backoff (0.5 s doubling to 8 s) while it fails with a database error, for ``retry_for``
    seconds; then :class:`~hpo.errors.HpoError` (or, with ``reraise``, the database's error itself). Once ``stop`` is
    set, a failure raises :class:`hpo.objectives.Interrupted` instead of waiting."""
    deadline = time.monotonic() + retry_for
    delay = 0.5
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_db_error(exc) or denied_reason(exc) is not None:  # a refusal to this role is final
                raise
            if isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ is not None:
                exc = exc.__cause__
            note_db_error()
            if stop is not None and stop.is_set():
                raise Interrupted(f"stopped while the database was unavailable ({what})") from None
            if time.monotonic() + delay > deadline:
                if reraise:
                    raise
                raise HpoError(
                    f"database {mask(url)} unavailable while trying to {what}: {describe_error(exc, url)}"
                ) from None
            log.warning(
                "database error while trying to %s (%s); retrying in %.1f s", what, describe_error(exc, url), delay
            )
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
            delay = min(delay * 2, 8.0)


_last_reap: dict[str, float] = {}  # study name -> when this process may next look for stale trials
_last_db_error = [-math.inf]  # when this process last saw a database error (time.monotonic())


def note_db_error() -> None:
    """Remember that this process just saw the database fail: it reaps no trial for a grace period after (the
    other workers' heartbeats failed too, and need a beat to show they are alive)."""
    _last_db_error[0] = time.monotonic()


def worker_name() -> str:
    """This worker as trials record it (``worker``, ``reaped_by``): host:pid."""
    return f"{os.uname().nodename}:{os.getpid()}"


GRACE_ATTR = "hpo:grace"
#: Grace period of a study created without one (2 x the default heartbeat interval of 10 s).
DEFAULT_GRACE_S = 20.0
#: System attribute of a re-queued copy: the trial id of the failed trial it re-runs (one copy per failure).
COPY_OF_ATTR = "hpo:copy_of"
#: User attributes a re-queued copy does not inherit: they describe the failed run, not the trial.
NOT_INHERITED = ("reason", "error", "reaped_by", "requeued_from")


def study_grace(study: optuna.Study, fallback: float | None = None) -> float:
    """The study's grace period (seconds without a heartbeat before a running trial is stale): stored with the study
    (``hpo create``, the first worker, ``hpo grace``), so every worker and ``hpo reap`` agree; ``fallback`` (else
    :data:`DEFAULT_GRACE_S`) for a study stored before hpo kept one."""
    stored = study.user_attrs.get(GRACE_ATTR)
    if stored is not None:
        return float(stored)
    return float(fallback) if fallback is not None else DEFAULT_GRACE_S


def take_slots(
    study: optuna.Study,
    name: str,
    budget: int | None,
    storage: optuna.storages.RDBStorage,
    opts: WorkerOptions,
    want: int = 1,
    stop: threading.Event | None = None,
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
    with budget_lock(storage, name, stop, opts.lock_timeout, opts.lock_idle_timeout) as lock:
        counted, running, waiting = trial_cache.budget_counts(study, storage, lock, budget)  # incremental
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
                created.append(trial_cache.create_running_trial(study, conn))
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


def reap(study: optuna.Study, grace: float | None = None) -> list[int]:
    """Fail the study's stale running trials (``reason: reaped``, ``reaped_by``: this worker) and re-queue each once
    (:func:`fail_and_requeue`). Stale: no heartbeat for the study's grace period (:func:`study_grace`), or none at all
    and started that long ago (:func:`hpo.storage.unbeaten_trial_ids`). Nothing is reaped while this process came
    back from a database error less than a grace period ago, nor while the database server has been up for less
    than one (after a restart every worker's heartbeats failed alike: they get a grace period to beat again).
    Returns the ids of the trials this call failed (other workers may reap at the same time; each trial is failed,
    and re-queued, once)."""
    backend = rdb_backend(study._storage)
    interval = backend.get_heartbeat_interval() if hasattr(backend, "get_heartbeat_interval") else None
    if interval is None:
        return []
    fallback = backend.grace_period if backend.grace_period is not None else 2 * interval
    grace = grace if grace is not None else study_grace(study, fallback)
    if time.monotonic() - _last_db_error[0] < grace:
        return []
    stale = stale_trial_ids(backend, study._study_id, grace)
    stale |= set(unbeaten_trial_ids(backend, study._study_id, grace))
    callback = backend.get_heartbeat_stale_trial_callback()
    max_retry = getattr(callback, "_max_retry", None)
    failed = []
    for trial_id in sorted(stale):
        frozen, done = fail_and_requeue(
            study, trial_id, {"reason": "reaped", "reaped_by": worker_name()}, callback is not None, max_retry
        )
        if done and frozen is not None:
            log.warning(
                "trial %d: no heartbeat for %.0f s; reaped (failed, %s)",
                frozen.number,
                grace,
                "re-queued"
                if callback is not None and requeues(frozen, max_retry)
                else "not re-queued: retries used up",
            )
            failed.append(trial_id)
    return failed


def stale_trial_ids(backend: optuna.storages.RDBStorage, study_id: int, grace: float) -> set[int]:
    """Running trials whose last heartbeat is older than ``grace`` seconds by the database's clock; none while the
    server has been up for less than ``grace`` seconds."""
    from optuna.storages._rdb import models

    t, h = models.TrialModel.__table__, models.TrialHeartbeatModel.__table__
    stmt = (
        sqlalchemy.select(t.c.trial_id, h.c.heartbeat)
        .select_from(t.join(h, h.c.trial_id == t.c.trial_id))
        .where(t.c.study_id == study_id, t.c.state == TrialState.RUNNING)
    )
    with backend.engine.connect() as conn:
        now = conn.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar_one().replace(tzinfo=None)
        uptime = server_uptime(conn)
        if uptime is not None and uptime < grace:
            return set()
        cutoff = now - datetime.timedelta(seconds=grace)
        return {int(r[0]) for r in conn.execute(stmt) if r[1] is not None and r[1] < cutoff}


def server_uptime(conn: sqlalchemy.Connection) -> float | None:
    """Seconds since the database server started (PostgreSQL, MySQL/MariaDB), or None (SQLite, or not readable)."""
    backend = conn.dialect.name
    sql = {
        "postgresql": "SELECT EXTRACT(EPOCH FROM (now() - pg_postmaster_start_time()))",
        "mysql": "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'UPTIME'",
    }.get(backend)
    if sql is None:
        return None
    try:
        with conn.begin_nested() if conn.in_transaction() else contextlib.nullcontext():
            got = conn.execute(sqlalchemy.text(sql)).scalar()
    except DBAPIError:
        return None
    return float(got) if got is not None else None


def requeues(frozen: optuna.trial.FrozenTrial, max_retry: int | None) -> bool:
    """Whether failing ``frozen`` (as it was before the failure) queues a copy: fewer than ``max_retry`` retries so
    far (the rule of :func:`fail_and_requeue`)."""
    return max_retry is None or len(frozen.system_attrs.get("retry_history", [])) + 1 <= max_retry


def fail_and_requeue(
    study: optuna.Study, trial_id: int, attrs: dict[str, Any], requeue: bool = True, max_retry: int | None = 2
) -> tuple[optuna.trial.FrozenTrial | None, bool]:
    """Fail a running trial, record ``attrs`` on it, and (``requeue``) queue a copy of it, in one transaction that
    runs only if the trial is still RUNNING: whatever workers, reapers and retries after a lost connection do, a
    trial is failed once and re-queued at most once per failure. Returns (the failed trial as stored, whether this
    call failed it).

    The copy: the trial's parameters and user attributes (not its outcome's: :data:`NOT_INHERITED`), not its
    intermediate values (its curve is its own run's), ``requeued_from`` = the failed trial's number, Optuna's
    ``failed_trial`` / ``retry_history`` system attributes (so ``RetryFailedTrialCallback.retried_trial_number``
    and the budget count read it as Optuna's own copy), and :data:`COPY_OF_ATTR`. No copy once the trial was
    re-queued ``max_retry`` times.
    """
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    backend = rdb_backend(study._storage)
    with _create_scoped_session(backend.scoped_session) as session:
        if requeue:  # the study's row first, as Optuna's trial creation locks it: numbers stay unique
            models.StudyModel.find_or_raise_by_id(study._study_id, session, for_update=True)
        row = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
        if row.state != TrialState.RUNNING:
            return None, False
        for key, value in attrs.items():
            backend._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)
        session.flush()
        session.refresh(row)
        frozen = backend._build_frozen_trial_from_trial_model(row)
        row.state = TrialState.FAIL
        row.datetime_complete = datetime.datetime.now()
        frozen.state, frozen.datetime_complete = TrialState.FAIL, row.datetime_complete
        system = {k: v for k, v in frozen.system_attrs.items() if not k.startswith("completed_rung")}
        history = [*system.get("retry_history", []), frozen.number]
        if requeue and (max_retry is None or len(history) <= max_retry):
            system.update(
                {
                    "failed_trial": system.get("failed_trial", frozen.number),
                    "retry_history": history,
                    COPY_OF_ATTR: trial_id,
                }
            )
            user = {k: v for k, v in frozen.user_attrs.items() if k not in NOT_INHERITED}
            user["requeued_from"] = frozen.number
            template = optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=frozen.params,
                distributions=frozen.distributions,
                user_attrs=user,
                system_attrs=system,
            )
            backend._get_prepared_new_trial(study._study_id, template, session)
    return frozen, True


def take_over(
    study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | Sequence[float] | None
) -> tuple[optuna.trial.FrozenTrial, bool]:
    """Store a finished run whose trial was reaped meanwhile on the trial's re-queued copy, if no worker took that
    copy yet (it is then complete or pruned with this run's parameters, attributes, curve and value): the work is
    kept and the budget stays exact. Else the run is dropped. (stored trial, whether this call stored the run)"""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    real = getattr(study, "_study", study)
    backend = rdb_backend(real._storage)
    cached = getattr(trial, "_cached_frozen_trial", None)
    mine = cached if cached is not None else real._storage.get_trial(trial._trial_id)
    if state == TrialState.PRUNED and value is None and mine.intermediate_values:
        value = mine.intermediate_values[max(mine.intermediate_values)]
    a, t = models.TrialSystemAttributeModel, models.TrialModel
    with _create_scoped_session(backend.scoped_session) as session:
        copy_row = (
            session.query(t)
            .join(a, a.trial_id == t.trial_id)
            .filter(t.study_id == real._study_id, a.key == COPY_OF_ATTR, a.value_json == json.dumps(trial._trial_id))
            .with_for_update()
            .one_or_none()
        )
        if copy_row is not None and copy_row.state == TrialState.WAITING:
            copy_row.state = TrialState.RUNNING  # Optuna writes only to running trials
            for key, v in mine.user_attrs.items():
                backend._set_trial_attr_without_commit(
                    session, models.TrialUserAttributeModel, copy_row.trial_id, key, v
                )
            backend._set_trial_attr_without_commit(
                session, models.TrialUserAttributeModel, copy_row.trial_id, "requeued_from", mine.number
            )
            for step, v in mine.intermediate_values.items():
                backend._set_trial_intermediate_value_without_commit(session, copy_row.trial_id, step, v)
            values = value if isinstance(value, list | tuple) else [] if value is None else [value]
            for objective, v in enumerate(values):  # one per objective
                backend._set_trial_value_without_commit(session, copy_row, objective, v)
            copy_row.datetime_start = mine.datetime_start
            copy_row.datetime_complete = datetime.datetime.now()
            copy_row.state = state
            copy_id, copy_number = copy_row.trial_id, copy_row.number
        else:
            copy_id = None
    if copy_id is None:
        log.warning(
            "trial %d was finished elsewhere (reaped) and its copy is taken or absent; dropping this run's result",
            mine.number,
        )
        return real._storage.get_trial(trial._trial_id), False
    log.warning(
        "trial %d was reaped while it ran; its result is stored on its re-queued copy, trial %d",
        mine.number,
        copy_number,
    )
    return real._storage.get_trial(copy_id), True


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
        with _live_lock:
            _live.add(self)
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
                note_db_error()
                log.warning("heartbeats of %d trial(s) not recorded: %s", len(ids), describe_error(exc, self.url))

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join()
        with _live_lock:
            _live.discard(self)


_live: set[Heartbeats] = set()  # this process's heartbeat threads: every trial it holds is in one
_live_lock = threading.Lock()


def abandon_live(study: optuna.Study) -> list[int]:
    """Fail (``reason: interrupted``) and re-queue every trial this process holds, one attempt each, for a worker
    about to exit without finishing them (the stop timeout); where the database does not answer, the grace period
    reaps them later. Returns the ids failed."""
    with _live_lock:
        ids = sorted({i for beats in _live for i in beats.ids})
    backend = rdb_backend(study._storage)
    max_retry = getattr(backend.get_heartbeat_stale_trial_callback(), "_max_retry", 2)
    failed = []
    for trial_id in ids:
        try:
            frozen, done = fail_and_requeue(study, trial_id, {"reason": "interrupted"}, True, max_retry)
            if done and frozen is not None:
                log.warning(
                    "trial %d: failed (reason=interrupted), %s",
                    frozen.number,
                    "re-queued" if requeues(frozen, max_retry) else "not re-queued: retries used up",
                )
                failed.append(trial_id)
        except Exception as exc:
            reason = " ".join(str(exc).split())[:200]
            log.warning("trial id %d not re-queued (%s); the grace period reaps it", trial_id, reason)
            break
    return failed


class RetryingStorage:
    """A study's storage whose public calls are retried on database errors for ``retry_for`` seconds (what a trial's
    reports, attributes and the sampler's and pruner's reads go through), so an in-flight trial rides out a server
    restart or a short outage; stops retrying (:class:`hpo.objectives.Interrupted`) once ``stop`` is set. A trial
    finished elsewhere still fails at once (``UpdateFinishedTrialError`` is no database error)."""

    def __init__(
        self, inner: optuna.storages.BaseStorage, retry_for: float, url: str, stop: threading.Event | None = None
    ) -> None:
        self._inner, self._retry_for, self._url, self._stop = inner, retry_for, url, stop

    def retried(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` under this storage's retry policy: for reads made below the storage's public calls (the
        sampler's window of trials, :mod:`hpo.trial_cache`)."""
        return with_db_retry(what, fn, self._retry_for, self._url, self._stop, True)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return with_db_retry(name, lambda: attr(*args, **kwargs), self._retry_for, self._url, self._stop, True)

        return call


class OwnTrials:
    """The study's storage, with ``get_trial`` of the worker's own trials answered from memory (``own``: trial id ->
    the trial as its ``Trial`` holds it; Optuna updates that copy on every suggestion, report and user attribute).
    Optuna reads a trial back when it builds a ``Trial`` and again when it is told: two reads of six statements each
    per trial, a quarter of a trivial trial's time. Both loops, single-trial and population, read through it.
    The database stays the judge: telling a trial that another worker reaped meanwhile fails on its state, and the
    worker then reads what is stored (:func:`hpo.worker.tell_finished`)."""

    def __init__(self, storage: optuna.storages.BaseStorage, own: dict[int, optuna.trial.FrozenTrial]) -> None:
        self._inner, self._own = storage, own

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get_trial(self, trial_id: int) -> optuna.trial.FrozenTrial:
        own = self._own.get(trial_id)
        return own if own is not None else self._inner.get_trial(trial_id)


def open_trial(
    study: optuna.Study, trial_id: int, retry_for: float, url: str = "", stop: threading.Event | None = None
) -> optuna.Trial:
    """The ``optuna.Trial`` of a slot :func:`take_slots` gave this worker, on a view of the study whose storage
    retries the trial's calls (reports, attributes, the sampler's and pruner's reads) for ``retry_for`` seconds, so it
    rides out a database blip (:class:`RetryingStorage`), and answers reads of the trial itself from memory
    (:class:`OwnTrials`). ``trial.study._study`` is the study itself, for what must be read from the database
    (:func:`tell`). Tell it with ``tell(trial.study, trial, ...)``."""
    own: dict[int, optuna.trial.FrozenTrial] = {}
    created = created_trial(study, trial_id)  # a new trial, as Optuna's cache holds it; None: read it
    if created is not None:
        own[trial_id] = created
    view = copy.copy(study)
    view._storage = OwnTrials(RetryingStorage(study._storage, retry_for, url, stop), own)  # type: ignore[assignment]
    view._study = study  # type: ignore[attr-defined]
    with quiet_optuna():
        trial = optuna.Trial(view, trial_id)
    own[trial_id] = trial._cached_frozen_trial
    return trial


def agree_on_grace(study: optuna.Study, opts: WorkerOptions) -> WorkerOptions:
    """This worker's options with the study's grace period (:func:`study_grace`), and a heartbeat interval of at most
    half of it (a worker that beat less often would look dead to the others between two beats)."""
    hb = opts.heartbeat_interval
    own = opts.grace_period if opts.grace_period is not None else (2 * hb if hb is not None else None)
    grace = study_grace(study, own)
    if GRACE_ATTR in study.user_attrs and opts.grace_period is not None and float(opts.grace_period) != grace:
        log.warning(
            "study %s: its grace period is %g s (change it with: hpo grace %s SECONDS); --grace %g not used",
            study.study_name,
            grace,
            study.study_name,
            opts.grace_period,
        )
    if hb is not None and hb > grace / 2:
        log.warning(
            "heartbeat every %d s is too rare for the study's grace period of %g s: every %d s",
            hb,
            grace,
            max(1, int(grace // 2)),
        )
        hb = max(1, int(grace // 2))
    return dataclasses.replace(opts, heartbeat_interval=hb, grace_period=grace)  # type: ignore[arg-type]


def tell(
    study: optuna.Study,
    trial: optuna.Trial,
    state: TrialState,
    value: float | Sequence[float] | None,
    opts: WorkerOptions,
    url: str,
    attrs: dict[str, Any] | None = None,
    requeue: bool = False,
) -> tuple[optuna.trial.FrozenTrial, bool]:
    """Store a trial's outcome exactly once, retrying until the database takes it: (stored trial, whether this call
    stored it). A complete or pruned trial that was reaped meanwhile goes to its re-queued copy where no worker took
    it (:func:`take_over`); a failed one is failed, with ``attrs``, and re-queued (``requeue``) only if it is still
    running (:func:`fail_and_requeue`). Whether it stored is what the database says, never assumed.

    ``study`` may be population mode's view of the study, which reads the worker's own trials from memory."""

    real = getattr(study, "_study", study)

    def store() -> tuple[optuna.trial.FrozenTrial, bool]:
        if state == TrialState.FAIL:
            frozen, done = fail_and_requeue(real, trial._trial_id, attrs or {}, requeue, opts.max_retry)
            return (frozen if frozen is not None else real._storage.get_trial(trial._trial_id)), done
        if attrs:
            set_trial_attrs(trial, attrs)  # and in the trial as the worker holds it: what tell returns
        with quiet_optuna():
            try:
                return tell_finished(study, trial, state, value)
            except RuntimeError as exc:  # GridSampler calls study.stop() once its grid is used up; the trial is stored
                if "Study.stop" not in str(exc):
                    raise
                return real._storage.get_trial(trial._trial_id), True

    return with_db_retry("store a trial's result", store, max(opts.db_retry_for, 300.0), url)


def tell_finished(
    study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | Sequence[float] | None
) -> tuple[optuna.trial.FrozenTrial, bool]:
    """``study.tell(trial, value, state)`` for a complete or pruned trial, without its closing re-read of the trial
    (six statements): the stored trial is the one the worker holds, finished, as in ``Study.optimize`` (a pruned
    trial's value is its last reported one, as Optuna stores it). A trial finished elsewhere meanwhile (reaped, or
    stored by an earlier attempt whose answer was lost): (stored trial, whether this call finished it)."""
    from optuna.study._tell import _tell_with_warning

    real = getattr(study, "_study", study)
    try:
        stored, values, _ = _tell_with_warning(
            study, trial, value if state == TrialState.COMPLETE else None, state, False, suppress_warning=True
        )
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as exc:  # finished meanwhile: reaped, or ours
        if isinstance(exc, ValueError) and "Cannot tell a" not in str(exc):
            raise
        current = real._storage.get_trial(trial._trial_id)
        if current.state == state and current.user_attrs.get("reason") != "reaped":
            return current, True  # an earlier attempt of ours stored it and lost the answer
        return take_over(study, trial, state, value)
    cached = getattr(trial, "_cached_frozen_trial", None)
    if cached is None:
        return real._storage.get_trial(trial._trial_id), True
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
