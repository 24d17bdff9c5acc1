"""The single-trial pull loop: one trial at a time, any objective, until the study's budget is met.

Signals. The first SIGTERM/SIGINT stops the running trial at its next step; it is failed and re-queued, and the
worker exits 0. A second signal exits at once (status 130); heartbeats then reap the trial. A plain Optuna objective
(one that takes no hpo Context, so never calls ``check_stop()``) is interrupted where it runs: the signal raises in
it, as Ctrl-C raises KeyboardInterrupt, and its trial is failed and re-queued at once.

Callbacks. A study file's ``callbacks:`` are called ``cb(study, frozen_trial)`` after each trial this worker ran
is stored, as Optuna's ``study.optimize(callbacks=...)`` calls them (not after a trial interrupted or re-queued: it
runs again). ``trial.study.stop()`` in an objective or ``study.stop()`` in a callback stops this worker after the
trial is stored, as it stops the ``optimize`` loop it is called in; other workers go on (a callback that reads the
study, e.g. early stopping, stops each of them after its own next trial).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import reprlib
import signal
import sys
import threading
import time
from typing import Any, ClassVar

import optuna
from optuna.trial import TrialState

from hpo import space as search_space
from hpo.errors import STOPPED_EXIT, HpoError
from hpo.objectives import Context, Interrupted, resolve, resolve_device, trial_seed, uses_context
from hpo.samplers import make_sampler
from hpo.spec import StudySpec
from hpo.storage import describe_error, open_storage, set_trial_attrs
from hpo.threads import budget as thread_budget
from hpo.trust import check_stored
from hpo.worker.lease import (
    Heartbeats,
    abandon_live,
    agree_on_grace,
    is_db_error,
    open_trial,
    take_slots,
    tell,
    with_db_retry,
    worker_name,
)
from hpo.worker.options import WorkerOptions, WorkerResult
from hpo.worker.study import create, load

log = logging.getLogger(__name__)


class _Signals:
    """First signal: interrupt the current trial at its next step (it is failed and re-queued), then stop; if the
    worker is still running ``stop_timeout`` seconds later (an objective that never calls ``check_stop()``, a
    database that stays away, a lock that does not come), its live trials are failed and re-queued where the database
    answers (:func:`hpo.worker.lease.abandon_live`) and it exits with :data:`STOPPED_EXIT`. Second signal: exit at once (status 130)."""

    def __init__(self, stop: threading.Event, stop_timeout: float = 30.0, study: optuna.Study | None = None) -> None:
        self.stop, self.stop_timeout, self.study = stop, stop_timeout, study
        self.previous: dict[int, Any] = {}
        self.done = threading.Event()
        #: set while a plain objective runs in the main thread: the signal then raises :class:`StopNow` in it
        self.interruptible = False

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            os._exit(130)
        log.warning(
            "received %s: interrupting the running trial at its next step (it is failed and re-queued), then stopping;"
            " exiting in at most %.0f s",
            signal.Signals(signum).name,
            self.stop_timeout,
        )
        self.stop.set()
        threading.Thread(target=self._watchdog, name="stop-timeout", daemon=True).start()
        if self.interruptible:  # a plain objective never calls check_stop(): stop it where it is
            self.interruptible = False
            raise StopNow()

    def _watchdog(self) -> None:
        if self.done.wait(self.stop_timeout):
            return
        log.warning(
            "still running %.0f s after the signal: failing and re-queueing its trials, exiting", self.stop_timeout
        )
        if self.study is not None:
            abandon_live(self.study)
        logging.shutdown()
        os._exit(STOPPED_EXIT)

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class StopNow(BaseException):
    """Raised by the signal handler inside a plain objective (a BaseException, as KeyboardInterrupt is, so that the
    objective's own ``except Exception`` does not swallow it); its trial is failed and re-queued."""


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
        retry_for=opts.db_retry_for,
    )
    if isinstance(study_or_spec, StudySpec):
        with_db_retry(
            "create the study",
            lambda: create(study_or_spec, storage_url, storage, grace=_own_grace(opts)),
            opts.db_retry_for,
            storage_url,
        )
        name = study_or_spec.name
    else:
        name = study_or_spec
    # by name: the stored file is the database's word, so it may name no code or path this worker did not allow
    check = None
    if not isinstance(study_or_spec, StudySpec):
        check = functools.partial(check_stored, name=name, objectives=opts.objectives)
    study, spec = with_db_retry("load the study", lambda: load(name, storage, check), opts.db_retry_for, storage_url)
    if isinstance(study_or_spec, StudySpec):
        spec = study_or_spec
    else:
        from hpo.preflight import preflight

        preflight(spec, f"stored study {name!r}")  # e.g. a data folder missing on this machine: before any trial
    opts = agree_on_grace(study, opts)
    if spec.sampler.callables():  # the file's (or the checked stored file's) functions: load() imports none
        study.sampler = make_sampler(spec)
    if spec.sampler.seed is not None and opts.seed_offset:
        # each trial is drawn from (seed, trial number) already (hpo.samplers.seed_per_trial): an offset is a
        # different stream on purpose
        seeded = spec.model_copy(
            update={"sampler": spec.sampler.model_copy(update={"seed": spec.sampler.seed + opts.seed_offset})}
        )
        study.sampler = make_sampler(seeded)
    objective = resolve(spec.objective.kind)
    callbacks = user_callbacks(spec.callbacks)
    device = resolve_device(opts.device if opts.device != "cpu" else getattr(spec.objective, "device", "cpu"))
    threads = thread_budget(opts.threads or getattr(spec.objective, "threads", None))
    _set_threads(threads)
    budget = opts.n_trials if opts.n_trials is not None else spec.budget.n_trials
    timeout = opts.timeout if opts.timeout is not None else spec.budget.timeout
    started = time.monotonic()
    result = WorkerResult()
    failures = 0

    # checkpoints no trial resumes from: swept at the start, after a failure, at the end
    sweep = _checkpoint_sweeper(study, spec)
    if sweep is not None:
        sweep()
    signals = _Signals(stop, opts.stop_timeout, study)
    interrupt = signals if opts.handle_signals and threading.current_thread() is threading.main_thread() else None
    study._thread_local.in_optimize_loop = True  # as in study.optimize: trial.study.stop() may be called
    with signals if opts.handle_signals else contextlib.nullcontext(), _leaving_loop(study):
        size = _population_size(spec, opts.population)
        if size > 1:  # population mode (issue 8) runs to the budget; the loop below then finds it met
            from hpo.worker.population import run_population

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
            trial = with_db_retry(
                "ask for a trial",
                lambda: _next_trial(study, name, budget, storage, opts, stop, storage_url),
                opts.db_retry_for,
                storage_url,
            )
            if trial is None:
                result.reason = result.reason or "budget met"
                break
            frozen, outcome = _run_one(
                study, trial, spec, objective, device, threads, stop, opts, storage_url, interrupt
            )
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
                if sweep is not None:
                    sweep()
                if outcome == "interrupted":
                    result.interrupted = True
                    if opts.on_trial is not None:  # its line too: failed, reason=interrupted, re-queued
                        opts.on_trial(frozen)
                    break
                if outcome in ("requeued", "dropped"):  # a database error or a reap, not the objective's fault
                    continue
                # a value Optuna refuses (NaN, None) fails the trial, never the study, as in Optuna
                failures += outcome != "bad value"
                if failures >= opts.max_consecutive_failures:
                    raise HpoError(
                        f"{failures} trials failed in a row; last error: {frozen.user_attrs.get('error', 'unknown')}"
                    )
            if opts.on_trial is not None:
                opts.on_trial(frozen)
            if outcome in ("done", "bad value"):  # stored for good: Optuna's callbacks see it
                _call_back(callbacks, study, frozen)
            if study._stop_flag or getattr(trial.study, "_stop_flag", False):  # trial.study is this worker's view
                result.reason = "stopped by study.stop()"
                break
    if stop.is_set():
        result.interrupted = True
        result.reason = "stopped by signal"
    elif sweep is not None:
        sweep()
    return result


@contextlib.contextmanager
def _leaving_loop(study: optuna.Study) -> Any:
    try:
        yield
    finally:
        study._thread_local.in_optimize_loop = False


def user_callbacks(refs: list[str]) -> list[tuple[str, Any]]:
    """The study file's ``callbacks:`` (``module:function``), imported (a worker started by name was checked by
    :func:`hpo.trust.check_stored` before it got here)."""
    from hpo.user_code import callbacks

    return callbacks(refs)


def _call_back(callbacks: list[tuple[str, Any]], study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
    """Call each callback as Optuna does, ``cb(study, frozen_trial)``. One that raises stops this worker, as it ends
    Optuna's ``optimize``, in one line naming it (the trial itself is stored already)."""
    for ref, cb in callbacks:
        try:
            cb(study, frozen)
        except Exception as exc:
            raise HpoError(
                f"callback {ref} raised {type(exc).__name__}: {exc} after trial {frozen.number}; stopping this worker"
            ) from None


def _checkpoint_sweeper(study: optuna.Study, spec: StudySpec) -> Any:
    cfg = getattr(spec.objective, "checkpoint", None)
    if cfg is None:  # no torch import for objectives without checkpoints
        return None
    from hpo.objectives.checkpoints import sweeper

    return sweeper(study, cfg)


def _own_grace(opts: WorkerOptions) -> float | None:
    """The grace period this worker's options give a study it creates (``--grace``, else 2 x ``--heartbeat``)."""
    if opts.grace_period is not None:
        return float(opts.grace_period)
    return 2.0 * opts.heartbeat_interval if opts.heartbeat_interval is not None else None


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


def _next_trial(
    study: optuna.Study,
    name: str,
    budget: int | None,
    storage: optuna.storages.RDBStorage,
    opts: WorkerOptions,
    stop: threading.Event,
    url: str = "",
) -> optuna.Trial | None:
    """The next trial within the budget, or None when the budget is taken and nothing runs."""
    while not stop.is_set():
        ids, running = take_slots(study, name, budget, storage, opts, stop=stop)
        if ids:
            return open_trial(study, ids[0], opts.db_retry_for, url, stop)
        if running == 0 or opts.heartbeat_interval is None:
            return None
        # The budget is taken, but trials still run: wait for them, reaping any whose worker died.
        stop.wait(min(1.0, opts.heartbeat_interval / 2))
    return None


class SpaceTrial(optuna.Trial):
    """The trial a user's objective gets when the study file has a ``space:``: hpo draws those entries before the
    objective runs, so an objective's own ``trial.suggest_*`` of the same name gets the space's value, as Optuna
    answers a second suggest of one name. Where the objective asks another range, that is said once per worker and
    name (a warning naming both), never silently."""

    said: ClassVar[set[str]] = set()

    def _suggest(self, name: str, distribution: optuna.distributions.BaseDistribution) -> Any:
        have = self._cached_frozen_trial.distributions.get(name)
        value = super()._suggest(name, distribution)
        if have is not None and have != distribution and name not in SpaceTrial.said:
            SpaceTrial.said.add(name)
            log.warning(
                "parameter %r: the objective asks %s, the study file's space.%s says %s; the space decides "
                "(trial %d: %s=%r); widen space.%s or leave it out to let the objective's own range decide",
                name, distribution, name, have, self.number, name, value, name,
            )  # fmt: skip
        return value


class BadValue(Exception):
    """An objective's return value that Optuna would not store (NaN, None, a string): the trial fails, as in Optuna,
    with Optuna's wording as its ``error``; the worker carries on (a value, not a crash of the objective)."""


def _values(result: Any, spec: StudySpec) -> list[float]:
    """An objective's result as one value per metric of the study file (a number, or a tuple / list of them).

    Raises:
        BadValue: a value Optuna refuses (its wording: "The value nan is not acceptable", "The value None could not
            be cast to float"); ``inf`` and numpy scalars are numbers, as in Optuna.
        ValueError: not as many values as the file names metrics (the trial fails with this error).
    """
    names = spec.metric_names
    values = list(result) if isinstance(result, list | tuple) else [result]
    problems: list[str] = []
    numbers: list[float] = []
    for v in values:
        try:
            if isinstance(v, str | bytes):  # float("1.5") would pass; Optuna refuses (or crashes on) a string
                raise TypeError
            number = float(v)
        except (TypeError, ValueError):
            problems.append(f"The value {v!r} could not be cast to float")
            continue
        if math.isnan(number):
            problems.append(f"The value {v} is not acceptable")
        numbers.append(number)
    if problems:
        raise BadValue("; ".join(problems))
    if len(numbers) != len(names):
        raise ValueError(
            f"the objective returned {len(values)} value(s); the study file names {len(names)} metric(s) "
            f"({', '.join(names)})"
        )
    return numbers


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
    interrupt: _Signals | None = None,
) -> tuple[optuna.trial.FrozenTrial, str]:
    """Run one trial and store its outcome: ``"done"``, ``"bad value"`` (failed on a value Optuna refuses),
    ``"interrupted"``, ``"requeued"`` (database error) or ``"dropped"`` (the trial was finished elsewhere, reaped,
    while it ran: nothing of it is stored by this worker).

    An interrupted trial, or one whose database calls failed mid-run, is failed and re-queued with its parameters.
    """
    state = TrialState.FAIL
    value: list[float] | None = None
    result: Any = None
    outcome = "done"
    reason: str | None = None
    error: str | None = None
    with Heartbeats(study._storage, opts.heartbeat_interval, url) as beats:
        beats.add(trial._trial_id)
        try:
            # A re-queued copy carries its original's attributes; the trial as asked for holds them (no extra read).
            cached = getattr(trial, "_cached_frozen_trial", None)
            inherited = cached.user_attrs if cached is not None else trial.user_attrs
            params = search_space.suggest(trial, spec.space)
            seed = int(inherited.get("seed", trial_seed(spec, trial.number)))
            attrs: dict[str, Any] = {"worker": worker_name()}
            if uses_context(objective):  # what the context gave it; a plain objective's own attributes are its own
                attrs.update(seed=seed, device=device, threads=threads)
            if inherited.get("reason") is not None:  # the copy's outcome is its own
                attrs["reason"] = None
            set_trial_attrs(trial, attrs, replace=bool(inherited.keys() & attrs.keys()))
            ctx = Context(spec=spec, params=params, seed=seed, threads=threads, device=device, stop=stop)
            trial.study._thread_local.in_optimize_loop = True  # its own view's (a copy has its own): stop() works
            if ":" in spec.objective.kind and spec.space:  # the space decides a name a user's objective also
                trial.__class__ = SpaceTrial  # suggests: said, not silent
            plain = interrupt is not None and not uses_context(objective)
            if plain:
                if stop.is_set():
                    raise StopNow()
                interrupt.interruptible = True  # type: ignore[union-attr]
            try:
                result = objective(trial, ctx)
            finally:
                if interrupt is not None:
                    interrupt.interruptible = False
            value = _values(result, spec)
            state = TrialState.COMPLETE
        except BadValue as exc:  # Optuna's answer: FAIL, one warning line, and the study goes on
            log.warning("trial %d failed with value %s: %s", trial.number, reprlib.repr(result), exc)
            outcome, reason, error = "bad value", "error", str(exc)
        except optuna.TrialPruned as exc:
            state = TrialState.PRUNED
            # the message kept where hpo keeps a pruned trial's why, unless the objective wrote its own
            if getattr(trial, "_cached_frozen_trial", trial).user_attrs.get("reason") is None:
                reason = str(exc) or "pruned"
        except (Interrupted, StopNow):
            outcome, reason = "interrupted", "interrupted"
        except optuna.exceptions.UpdateFinishedTrialError:  # reaped while it ran: its copy runs (or ran) elsewhere
            frozen = with_db_retry(
                "read a trial", lambda: study._storage.get_trial(trial._trial_id), opts.db_retry_for, url
            )
            log.warning(
                "trial %d was finished elsewhere (%s by %s) while it ran; dropping it and carrying on",
                trial.number,
                frozen.user_attrs.get("reason", frozen.state.name.lower()),
                frozen.user_attrs.get("reaped_by", "another process"),
            )
            return frozen, "dropped"
        except HpoError:
            tell(study, trial, TrialState.FAIL, None, opts, url)
            raise
        except Exception as exc:
            if is_db_error(exc):  # the database went away mid-trial: run the trial again later
                error = describe_error(exc.__cause__ or exc, url)
                log.warning("database error during trial %d (%s); re-queueing it", trial.number, error)
                outcome, reason = "requeued", "database error"
            else:  # the objective's own failure: recorded, the worker carries on
                log.exception("trial %d failed", trial.number)
                reason, error = "error", f"{type(exc).__name__}: {exc}"[:500]
    attrs = {k: v for k, v in (("reason", reason), ("error", error)) if v is not None}
    value = value if state == TrialState.COMPLETE else None
    requeue = outcome not in ("done", "bad value")
    frozen, _ = tell(trial.study, trial, state, value, opts, url, attrs, requeue=requeue)
    return frozen, outcome
