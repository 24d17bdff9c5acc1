"""The pull loop: create a study once, then any number of workers pull trials until its global budget is met.

Budget. A study of budget B ends with exactly B *counted* trials: complete, pruned, and failed ones that were not
re-queued. A worker counts and asks for its next trial while holding the study's budget lock
(:func:`hpo.storage.budget_lock`), so two workers can never both take the last slot. A trial re-queued after a
crash or a stop gives its slot to its copy.

Crashes. With heartbeats on (the default), a running trial records a heartbeat every ``heartbeat_interval`` seconds;
one silent for ``grace_period`` seconds is failed by the next worker that asks, and Optuna's retry callback
re-queues its parameters (keeping its intermediate values) up to ``max_retry`` times. A worker that finds the budget
taken while trials are still running waits for them, reaping stale ones, so no trial stays RUNNING.

Signals. The first SIGTERM/SIGINT stops the running trial at its next step; it is failed and re-queued, and the
worker exits 0. A second signal exits at once (status 130); heartbeats then reap the trial.

Databases. Errors talking to the database between trials are retried with backoff for ``db_retry_for`` seconds;
a finished trial's result is retried until stored, so a database restart loses no result.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import optuna
from optuna.trial import TrialState
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

import hpo
from hpo import space as search_space
from hpo.errors import HpoError, StudyError
from hpo.objectives import Context, Interrupted, resolve, resolve_device, trial_seed
from hpo.pruners import make_pruner
from hpo.samplers import make_sampler
from hpo.spec import StudySpec, parse_spec
from hpo.storage import (
    budget_counts,
    budget_lock,
    create_running_trial,
    describe_error,
    mask,
    open_storage,
    quiet_optuna,
    rdb_backend,
    record_heartbeat,
    retry_callback,
    set_trial_user_attrs,
    unbeaten_trial_ids,
)
from hpo.threads import budget as thread_budget

log = logging.getLogger(__name__)
T = TypeVar("T")

SPEC_ATTR = "hpo:spec"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class WorkerOptions:
    """How one worker runs. Defaults suit one worker on this machine."""

    heartbeat_interval: int | None = 10
    grace_period: int | None = None  # None: Optuna's default, 2 x heartbeat_interval
    max_retry: int = 2
    threads: int | None = None
    device: str = "cpu"
    n_trials: int | None = None  # override the study's budget
    timeout: float | None = None
    db_retry_for: float = 120.0
    max_consecutive_failures: int = 5
    handle_signals: bool = True
    #: Added to a seeded sampler's seed so that workers sharing a study draw different points.
    #: ``None``: this process's id (for independent ``hpo worker`` processes); 0 keeps the file's seed exactly.
    seed_offset: int | None = 0
    on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None
    #: Trials trained at once, stacked (``hpo.objectives.population``); None: the study file's, else 1; or "auto".
    population: int | str | None = None


@dataclass
class WorkerResult:
    ran: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    interrupted: bool = False
    reason: str = ""
    trials: list[int] = field(default_factory=list)


def default_threads(local_workers: int = 1) -> int:
    """Torch threads per worker so that ``local_workers`` workers do not oversubscribe this machine's cores (the rule:
    :func:`hpo.threads.default_threads`)."""
    from hpo.threads import default_threads as rule

    return rule(local_workers)


# --------------------------------------------------------------------------- creating and loading


def create(
    spec: StudySpec, storage_url: str, storage: optuna.storages.BaseStorage | None = None, **storage_kwargs: Any
) -> optuna.Study:
    """Create the study once (idempotent); store the study file with it; enqueue its baseline trials once.

    Safe when many workers start at once with the same file: the file is stored and its trials enqueued under the
    study's budget lock, by the first worker only.

    Raises:
        StudyError: the study exists and its stored search space or direction differs from the file's.
    """
    storage = storage if storage is not None else open_storage(storage_url, **storage_kwargs)
    with quiet_optuna():
        study = optuna.create_study(
            study_name=spec.name,
            storage=storage,
            direction=spec.direction,
            sampler=make_sampler(spec),
            pruner=make_pruner(spec.pruner),
            load_if_exists=True,
        )
    with budget_lock(storage, spec.name):
        _store_spec(spec, study)
    return study


def _store_spec(spec: StudySpec, study: optuna.Study) -> None:
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        study.set_user_attr(SPEC_ATTR, spec.model_dump(mode="json"))
        study.set_user_attr("sampler", spec.sampler.model_dump(mode="json"))
        study.set_user_attr("pruner", spec.pruner.model_dump(mode="json"))
        study.set_user_attr("budget", spec.budget.model_dump(mode="json"))
        study.set_user_attr("metric", spec.metric)
        study.set_user_attr("hpo_version", hpo.__version__)
        for params in spec.enqueue:
            study.enqueue_trial(search_space.encode_params(params), user_attrs={"enqueued": True}, skip_if_exists=True)
    else:
        check_agrees(spec, parse_spec(stored, f"stored study {spec.name!r}"), study)


def check_agrees(spec: StudySpec, stored: StudySpec, study: optuna.Study) -> None:
    """A study file must describe the stored study: same direction, metric and search space."""
    if study.direction.name.lower() != spec.direction:
        raise StudyError(
            f"study {spec.name!r} is stored with direction {study.direction.name.lower()}, the file says {spec.direction}"
        )
    if stored.metric != spec.metric:
        raise StudyError(
            f"study {spec.name!r}: the file's metric {spec.metric!r} differs from the stored {stored.metric!r}"
        )
    mine, theirs = search_space.distributions(spec.space), search_space.distributions(stored.space)
    for name in sorted(set(mine) | set(theirs)):
        if mine.get(name) != theirs.get(name):
            raise StudyError(
                f"study {spec.name!r}: the file's space.{name} differs from the stored study's "
                f"(file: {mine.get(name)}, stored: {theirs.get(name)}); use a new study name"
            )


def load(study_name: str, storage: optuna.storages.BaseStorage) -> tuple[optuna.Study, StudySpec]:
    """Load a study created by hpo, with the study file stored in it."""
    try:
        summary = optuna.study.load_study(
            study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler()
        )
    except KeyError:
        raise StudyError(f"no study named {study_name!r} in this storage") from None
    stored = summary.user_attrs.get(SPEC_ATTR)
    if stored is None:
        raise StudyError(
            f"study {study_name!r} was not created by hpo (no stored study file); run it with a study file"
        )
    spec = parse_spec(stored, f"stored study {study_name!r}")
    study = optuna.load_study(
        study_name=study_name, storage=storage, sampler=make_sampler(spec), pruner=make_pruner(spec.pruner)
    )
    return study, spec


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


# --------------------------------------------------------------------------- the loop


class _Signals:
    """First signal: stop after (interrupting) the current trial. Second: exit at once."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            os._exit(130)
        log.warning("received %s: finishing the current trial, then stopping", signal.Signals(signum).name)
        self.stop.set()

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _db_errors(exc: BaseException) -> bool:
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


def _with_db_retry(what: str, fn: Callable[[], T], retry_for: float, url: str) -> T:
    deadline = time.monotonic() + retry_for
    delay = 0.5
    while True:
        try:
            return fn()
        except Exception as exc:
            if not _db_errors(exc):
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


def run_worker(
    study_or_spec: str | StudySpec,
    storage_url: str,
    options: WorkerOptions | None = None,
    stop: threading.Event | None = None,
) -> WorkerResult:
    """Pull trials of one study until its budget is met, the timeout passes, or a signal arrives.

    Args:
        study_or_spec: a study name (its file is read from the storage) or a parsed study file (created if new).
        storage_url: SQLAlchemy URL of the shared storage.
        options: see :class:`WorkerOptions`.
        stop: set it to stop the worker as a signal would.
    """
    opts = options or WorkerOptions()
    stop = stop or threading.Event()
    storage = open_storage(
        storage_url,
        heartbeat_interval=opts.heartbeat_interval,
        grace_period=opts.grace_period,
        max_retry=opts.max_retry,
        retry_for=min(opts.db_retry_for, 30.0),
    )
    if isinstance(study_or_spec, StudySpec):
        _with_db_retry(
            "create the study", lambda: create(study_or_spec, storage_url, storage), opts.db_retry_for, storage_url
        )
        name = study_or_spec.name
    else:
        name = study_or_spec
    study, spec = _with_db_retry("load the study", lambda: load(name, storage), opts.db_retry_for, storage_url)
    if isinstance(study_or_spec, StudySpec):
        spec = study_or_spec
    if spec.sampler.seed is not None:
        offset = os.getpid() if opts.seed_offset is None else opts.seed_offset
        if offset:
            seeded = spec.model_copy(
                update={"sampler": spec.sampler.model_copy(update={"seed": spec.sampler.seed + offset})}
            )
            study.sampler = make_sampler(seeded)
    objective = resolve(spec.objective.kind)
    device = resolve_device(opts.device if opts.device != "cpu" else getattr(spec.objective, "device", "cpu"))
    threads = thread_budget(opts.threads or getattr(spec.objective, "threads", None))
    _set_threads(threads)
    budget = opts.n_trials if opts.n_trials is not None else spec.budget.n_trials
    timeout = opts.timeout if opts.timeout is not None else spec.budget.timeout
    started = time.monotonic()
    result = WorkerResult()
    failures = 0

    with _Signals(stop) if opts.handle_signals else contextlib.nullcontext():
        size = _population_size(spec, opts.population)
        if size > 1:  # population mode (issue 8) runs to the budget; the loop below then finds it met
            from hpo.objectives.population import run_population

            run_population(
                study, spec, size, storage=storage, url=storage_url, opts=opts, stop=stop, result=result,
                budget=budget, timeout=timeout, started=started, device=device, threads=threads,
            )  # fmt: skip
        while not stop.is_set():
            if timeout is not None and time.monotonic() - started >= timeout:
                result.reason = "timeout"
                break
            if isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study):
                result.reason = "grid exhausted"
                break
            trial = _with_db_retry(
                "ask for a trial",
                lambda: _next_trial(study, name, budget, storage, opts, stop),
                opts.db_retry_for,
                storage_url,
            )
            if trial is None:
                result.reason = result.reason or "budget met"
                break
            frozen, outcome = _run_one(study, trial, spec, objective, device, threads, stop, opts, storage_url)
            result.ran += 1
            result.trials.append(frozen.number)
            if frozen.state == TrialState.COMPLETE:
                result.complete += 1
                failures = 0
            elif frozen.state == TrialState.PRUNED:
                result.pruned += 1
                failures = 0
            else:
                result.failed += 1
                if outcome == "interrupted":
                    result.interrupted = True
                    break
                if outcome == "requeued":  # a database error, not the objective's fault
                    continue
                failures += 1
                if failures >= opts.max_consecutive_failures:
                    raise HpoError(
                        f"{failures} trials failed in a row; last error: {frozen.user_attrs.get('error', 'unknown')}"
                    )
            if opts.on_trial is not None:
                opts.on_trial(frozen)
    if stop.is_set():
        result.interrupted = True
        result.reason = "stopped by signal"
    return result


def _population_size(spec: StudySpec, requested: int | str | None) -> int:
    if requested is None and spec.population is None and spec.objective.kind != "training":
        return 1  # not even importing torch for users' own objectives
    from hpo.objectives.population import population_size

    return population_size(spec, requested)


def _set_threads(threads: int) -> None:
    """Torch's intra-op threads, where the objective uses torch (it imported torch when it was resolved)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


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


def _next_trial(
    study: optuna.Study,
    name: str,
    budget: int | None,
    storage: optuna.storages.RDBStorage,
    opts: WorkerOptions,
    stop: threading.Event,
) -> optuna.Trial | None:
    """The next trial within the budget, or None when the budget is taken and nothing runs."""
    while not stop.is_set():
        ids, running = take_slots(study, name, budget, storage, opts)
        if ids:
            with quiet_optuna():
                return optuna.Trial(study, ids[0])
        if running == 0 or opts.heartbeat_interval is None:
            return None
        # The budget is taken, but trials still run: wait for them, reaping any whose worker died.
        stop.wait(min(1.0, opts.heartbeat_interval / 2))
    return None


class _Heartbeats:
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

    def __enter__(self) -> _Heartbeats:
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
                if not _db_errors(exc):
                    raise
                log.warning("heartbeats of %d trial(s) not recorded: %s", len(ids), describe_error(exc, self.url))

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join()


def _run_one(
    study: optuna.Study,
    trial: optuna.Trial,
    spec: StudySpec,
    objective: Any,
    device: str,
    threads: int,
    stop: threading.Event,
    opts: WorkerOptions,
    url: str,
) -> tuple[optuna.trial.FrozenTrial, str]:
    """Run one trial and store its outcome: ``"done"``, ``"interrupted"`` or ``"requeued"`` (database error).

    An interrupted trial, or one whose database calls failed mid-run, is failed and re-queued with its parameters.
    """
    state = TrialState.FAIL
    value: float | None = None
    outcome = "done"
    reason: str | None = None
    error: str | None = None
    with _Heartbeats(study._storage, opts.heartbeat_interval, url) as beats:
        beats.add(trial._trial_id)
        try:
            # A re-queued copy carries its original's attributes; the trial as asked for holds them (no extra read).
            cached = getattr(trial, "_cached_frozen_trial", None)
            inherited = cached.user_attrs if cached is not None else trial.user_attrs
            params = search_space.suggest(trial, spec.space)
            seed = int(inherited.get("seed", trial_seed(spec, trial.number)))
            attrs: dict[str, Any] = {
                "seed": seed,
                "device": device,
                "threads": threads,
                "worker": f"{os.uname().nodename}:{os.getpid()}",
            }
            if inherited.get("reason") is not None:  # the copy's outcome is its own
                attrs["reason"] = None
            set_trial_user_attrs(study._storage, trial._trial_id, attrs, replace=bool(inherited.keys() & attrs.keys()))
            if cached is not None:
                cached.user_attrs.update(attrs)
            ctx = Context(spec=spec, params=params, seed=seed, threads=threads, device=device, stop=stop)
            value = float(objective(trial, ctx))
            if math.isnan(value):
                reason = "objective returned NaN"
                state = TrialState.PRUNED
            else:
                state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except Interrupted:
            outcome, reason = "interrupted", "interrupted"
        except HpoError:
            _tell(study, trial, TrialState.FAIL, None, opts, url)
            raise
        except Exception as exc:
            if _db_errors(exc):  # the database went away mid-trial: run the trial again later
                error = describe_error(exc.__cause__ or exc, url)
                log.warning("database error during trial %d (%s); re-queueing it", trial.number, error)
                outcome, reason = "requeued", "database error"
            else:  # the objective's own failure: recorded, the worker carries on
                log.exception("trial %d failed", trial.number)
                reason, error = "error", f"{type(exc).__name__}: {exc}"[:500]
    if reason is not None or error is not None:

        def record() -> None:
            if reason is not None:
                trial.set_user_attr("reason", reason)
            if error is not None:
                trial.set_user_attr("error", error)

        _with_db_retry("record a trial's outcome", record, max(opts.db_retry_for, 300.0), url)
    frozen, told = _tell(study, trial, state, value if state == TrialState.COMPLETE else None, opts, url)
    if outcome != "done" and told:  # not when another worker already reaped (and re-queued) it
        _with_db_retry(
            "re-queue the trial",
            lambda: retry_callback(None)(study, frozen),
            max(opts.db_retry_for, 300.0),
            url,
        )
    return frozen, outcome


def _tell(
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
                    return _tell_finished(study, trial, state, value)
                return real.tell(trial, value if state == TrialState.COMPLETE else None, state, True), True
            except RuntimeError as exc:  # GridSampler calls study.stop() once its grid is used up; the trial is stored
                if "Study.stop" not in str(exc):
                    raise
                return real._storage.get_trial(trial._trial_id), True

    return _with_db_retry("store a trial's result", tell, max(opts.db_retry_for, 300.0), url)


def _tell_finished(
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


def replay(spec: StudySpec, frozen: optuna.trial.FrozenTrial) -> float:
    """Run a stored trial again with its parameters and seed, outside the study (nothing is stored).

    On the CPU the result equals the stored value exactly.
    """
    params = search_space.suggest(optuna.trial.FixedTrial(frozen.params, frozen.number), spec.space)
    seed = int(frozen.user_attrs.get("seed", trial_seed(spec, frozen.number)))
    ctx = Context(
        spec=spec, params=params, seed=seed, threads=None, device=resolve_device(frozen.user_attrs.get("device", "cpu"))
    )
    return float(resolve(spec.objective.kind)(optuna.trial.FixedTrial(frozen.params, frozen.number), ctx))
