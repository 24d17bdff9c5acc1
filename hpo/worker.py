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

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

import hpo
from hpo import space as search_space
from hpo.errors import HpoError, StudyError
from hpo.objectives import Context, Interrupted, resolve, resolve_device, trial_seed
from hpo.pruners import make_pruner
from hpo.samplers import make_sampler
from hpo.spec import StudySpec, parse_spec
from hpo.storage import budget_lock, describe_error, mask, open_storage, quiet_optuna, retry_callback

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
    """Torch threads per worker so that ``local_workers`` workers do not oversubscribe this machine's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_workers))


# --------------------------------------------------------------------------- creating and loading


def create(spec: StudySpec, storage_url: str, **storage_kwargs: Any) -> optuna.Study:
    """Create the study once (idempotent); store the study file with it; enqueue its baseline trials once.

    Raises:
        StudyError: the study exists and its stored search space or direction differs from the file's.
    """
    storage = open_storage(storage_url, **storage_kwargs)
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        direction=spec.direction,
        sampler=make_sampler(spec),
        pruner=make_pruner(spec.pruner),
        load_if_exists=True,
    )
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        study.set_user_attr(SPEC_ATTR, spec.model_dump(mode="json"))
        study.set_user_attr("sampler", spec.sampler.model_dump(mode="json"))
        study.set_user_attr("pruner", spec.pruner.model_dump(mode="json"))
        study.set_user_attr("budget", spec.budget.model_dump(mode="json"))
        study.set_user_attr("metric", spec.metric)
        study.set_user_attr("hpo_version", hpo.__version__)
        for params in spec.enqueue:
            study.enqueue_trial(params, user_attrs={"enqueued": True}, skip_if_exists=True)
    else:
        check_agrees(spec, parse_spec(stored, f"stored study {spec.name!r}"), study)
    return study


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
    """(counted trials, running trials): counted = complete + pruned + running + failed-and-not-re-queued."""
    trials = study.get_trials(deepcopy=False)
    requeued = {t.system_attrs.get("failed_trial") for t in trials}
    counted = running = 0
    for t in trials:
        if t.state == TrialState.RUNNING:
            running += 1
        if t.state in COUNTED or (t.state == TrialState.FAIL and t._trial_id not in requeued):
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


def _with_db_retry(what: str, fn: Callable[[], T], retry_for: float, url: str) -> T:
    deadline = time.monotonic() + retry_for
    delay = 0.5
    while True:
        try:
            return fn()
        except (DBAPIError, SQLAlchemyError) as exc:
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
        create(study_or_spec, storage_url)
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
    threads = opts.threads or getattr(spec.objective, "threads", None) or default_threads()
    _set_threads(threads)
    budget = opts.n_trials if opts.n_trials is not None else spec.budget.n_trials
    timeout = opts.timeout if opts.timeout is not None else spec.budget.timeout
    started = time.monotonic()
    result = WorkerResult()
    failures = 0

    with _Signals(stop) if opts.handle_signals else _nullcontext():
        while not stop.is_set():
            if timeout is not None and time.monotonic() - started >= timeout:
                result.reason = "timeout"
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
            frozen, interrupted = _run_one(study, trial, spec, objective, device, threads, stop, opts, storage_url)
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
                if interrupted:
                    result.interrupted = True
                    break
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


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _next_trial(
    study: optuna.Study,
    name: str,
    budget: int | None,
    storage: optuna.storages.RDBStorage,
    opts: WorkerOptions,
    stop: threading.Event,
) -> optuna.Trial | None:
    """Ask for a trial inside the budget lock, or return None when the budget is taken and nothing runs."""
    while not stop.is_set():
        with budget_lock(storage, name), quiet_optuna():
            if opts.heartbeat_interval is not None:
                optuna.storages.fail_stale_trials(study)
            if budget is None:
                return study.ask()
            counted, running = budget_used(study)
            if counted < budget:
                return study.ask()
        if running == 0 or opts.heartbeat_interval is None:
            return None
        # The budget is taken, but trials still run: wait for them, reaping any whose worker died.
        stop.wait(max(1.0, opts.heartbeat_interval / 2))
    return None


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
) -> tuple[optuna.trial.FrozenTrial, bool]:
    state = TrialState.FAIL
    value: float | None = None
    interrupted = False
    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            if trial.user_attrs.get("reason") is not None:  # a re-queued copy: its outcome is its own
                trial.set_user_attr("reason", None)
            params = search_space.suggest(trial, spec.space)
            seed = int(trial.user_attrs.get("seed", trial_seed(spec, trial.number)))
            trial.set_user_attr("seed", seed)
            trial.set_user_attr("device", device)
            trial.set_user_attr("threads", threads)
            trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
            ctx = Context(spec=spec, params=params, seed=seed, threads=threads, device=device, stop=stop)
            value = float(objective(trial, ctx))
            if math.isnan(value):
                trial.set_user_attr("reason", "objective returned NaN")
                raise optuna.TrialPruned("objective returned NaN")
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except Interrupted:
            interrupted = True
            trial.set_user_attr("reason", "interrupted")
        except HpoError:
            _tell(study, trial, TrialState.FAIL, None, opts, url)
            raise
        except Exception as exc:  # the objective's own failure: recorded, the worker carries on
            log.exception("trial %d failed", trial.number)
            trial.set_user_attr("reason", "error")
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
    frozen = _tell(study, trial, state, value, opts, url)
    if interrupted:
        _with_db_retry(
            "re-queue the interrupted trial",
            lambda: retry_callback(None)(study, frozen),
            opts.db_retry_for,
            url,
        )
    return frozen, interrupted


def _tell(
    study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None, opts: WorkerOptions, url: str
) -> optuna.trial.FrozenTrial:
    def tell() -> optuna.trial.FrozenTrial:
        current = study._storage.get_trial(trial._trial_id)
        if current.state.is_finished():  # an earlier attempt did reach the database
            return current
        with quiet_optuna():
            if state == TrialState.COMPLETE:
                return study.tell(trial, value, skip_if_finished=True)
            return study.tell(trial, state=state, skip_if_finished=True)

    return _with_db_retry("store a trial's result", tell, max(opts.db_retry_for, 300.0), url)


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
