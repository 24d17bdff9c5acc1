"""Population mode's pull loop: one worker trains up to K trials at once, stacked
(:class:`hpo.objectives.population.PopulationTrainer`), each trial on its own lease (:mod:`hpo.worker.lease`).

Members' trials are asked for inside the budget lock, so the population stays full and the global budget stays
exact; one heartbeat thread records heartbeats for every running member's trial.

Database blips. As in single-trial mode, members' database calls (suggestions, attributes, reports, the sampler's
and pruner's reads) are retried for ``--db-retry-for`` seconds (:class:`hpo.worker.lease.RetryingStorage`,
:func:`hpo.worker.lease.with_db_retry`) and tells until stored (:func:`hpo.worker.lease.tell`), so a server
restart fails no member. A member whose trial was reaped meanwhile is dropped, or its result stored on the
trial's re-queued copy, with one log line; the others carry on.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import time
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from hpo import space as search_space
from hpo import threads as hpo_threads
from hpo.errors import HpoError
from hpo.objectives import trial_seed
from hpo.objectives.population import ROW_BUDGET, Event, PopulationTrainer, largest_model
from hpo.spec import StudySpec, TrainingObjective
from hpo.storage import describe_error, mask, quiet_optuna, set_trial_attrs, store_intermediate_values
from hpo.worker.lease import (
    Heartbeats,
    OwnTrials,
    RetryingStorage,
    created_trial,
    is_db_error,
    take_slots,
    tell,
    with_db_retry,
    worker_name,
)
from hpo.worker.options import WorkerOptions, WorkerResult

log = logging.getLogger(__name__)


class _StudyView:
    """The study as this population sees it: the trials read from the database at most once per ``ttl`` seconds,
    overlaid with this worker's own trials as they are now (parameters as sampled, values as reported, outcome as
    told), which are thus never stale.

    Optuna's sampler and pruner read every trial of the study for each trial asked (twice, with TPE), each parameter
    suggested and each ``should_prune``, and every such read re-reads all running trials with all their intermediate
    values. With K members those reads, not the training, dominated a population worker's time. Members' trials
    are built with this view as their study (``optuna.Trial(view, trial_id)``), so TPE reads through it too; other
    workers' trials may be up to ``ttl`` seconds old, as they always are; everything else is the study's.

    Its reads and its storage's calls are retried on database errors for ``retry_for`` seconds, as a single-trial
    worker's trial's are (:class:`hpo.worker.lease.RetryingStorage`).
    """

    def __init__(self, study: optuna.Study, ttl: float = 1.0, retry_for: float = 0.0, url: str = "") -> None:
        self._study, self._ttl = study, ttl
        self._retry_for, self._url = retry_for, url
        self._read_at = -math.inf
        self._stored: list[optuna.trial.FrozenTrial] = []
        self._stored_ids: set[int] = set()
        self._own: dict[int, optuna.trial.FrozenTrial] = {}  # trial id -> the trial as this worker holds it
        self._retrying = RetryingStorage(study._storage, retry_for, url)
        self._storage = OwnTrials(self._retrying, self._own)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def track(self, trial: optuna.Trial) -> None:
        """A member's trial: from now on read as its ``Trial`` holds it (Optuna updates that copy on every
        suggestion and report)."""
        self._own[trial._trial_id] = trial._cached_frozen_trial

    def created(self, trial_id: int) -> None:
        """A trial this worker just created: ``optuna.Trial(view, trial_id)`` then starts from Optuna's cached copy
        instead of reading it back."""
        frozen = created_trial(self._study, trial_id)
        if frozen is not None:
            self._own[trial_id] = frozen

    def finished(self, frozen: optuna.trial.FrozenTrial) -> None:
        """A member's trial as stored when it finished: pruners compare with it at once, and TPE counts it."""
        self._own[frozen._trial_id] = frozen

    def _get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None, use_cache: bool = False
    ) -> list[optuna.trial.FrozenTrial]:
        if time.monotonic() - self._read_at > self._ttl:
            self._stored = with_db_retry(
                "read the study's trials",
                lambda: self._study._get_trials(deepcopy=False),
                self._retry_for,
                self._url,
                reraise=True,
            )
            self._stored_ids = {t._trial_id for t in self._stored}
            self._read_at = time.monotonic()
        own = self._own
        merged = [own.get(t._trial_id, t) for t in self._stored]
        created = [t for i, t in own.items() if i not in self._stored_ids]  # since the read
        merged += sorted(created, key=lambda t: t.number)
        trials = [t for t in merged if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[optuna.trial.FrozenTrial]:
        return self._get_trials(deepcopy, states)

    @property
    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self._get_trials()

    def should_prune(self, trial: optuna.Trial) -> bool:
        """``trial.should_prune()``, the other trials read through the view."""
        # Successive halving and Hyperband keep their rungs in the trial's system attributes: read those fresh.
        rungs = isinstance(self._study.pruner, optuna.pruners.SuccessiveHalvingPruner | optuna.pruners.HyperbandPruner)
        frozen = trial._cached_frozen_trial
        if rungs:
            frozen = copy.copy(self._retrying.get_trial(trial._trial_id))
            frozen.intermediate_values = trial._cached_frozen_trial.intermediate_values  # reports may be unstored
        return self._study.pruner.prune(self, frozen)  # type: ignore[arg-type]


class _Reports:
    """Members' reports (``Trial.report``), stored in batches: at most ``every`` seconds apart, and before a
    member's trial is finished or re-queued (so it is told, and copied, with all its values). ``Trial.report`` costs
    a transaction of four statements per report; K members report K times an epoch. Pruning never waits for the
    database: it reads the values from the member's ``Trial`` (:meth:`_StudyView.should_prune`). A store is retried
    on database errors for ``retry_for`` seconds."""

    def __init__(
        self, storage: optuna.storages.BaseStorage, every: float = 1.0, retry_for: float = 0.0, url: str = ""
    ) -> None:
        self.storage, self.every = storage, every
        self.retry_for, self.url = retry_for, url
        self.pending: list[tuple[int, int, float]] = []
        self.stored_at = time.monotonic()

    def add(self, trial: optuna.Trial, value: float, step: int) -> None:
        value = float(value)
        trial._cached_frozen_trial.intermediate_values[step] = value  # as Trial.report keeps its copy
        self.pending.append((trial._trial_id, step, value))
        if time.monotonic() - self.stored_at >= self.every:
            self.store()

    def store(self) -> None:
        if self.pending:
            pending = self.pending
            with_db_retry(
                "store reports",
                lambda: store_intermediate_values(self.storage, pending),
                self.retry_for,
                self.url,
                reraise=True,
            )
            self.pending = []
        self.stored_at = time.monotonic()


@dataclass
class _Live:
    trial: optuna.Trial
    started: float
    curve: list[float] = field(default_factory=list)


def run_population(
    study: optuna.Study,
    spec: StudySpec,
    size: int,
    *,
    storage: optuna.storages.RDBStorage,
    url: str,
    opts: WorkerOptions,
    stop: threading.Event,
    result: WorkerResult,
    budget: int | None,
    timeout: float | None,
    started: float,
    device: str,
    threads: int,
) -> None:
    """Train the study's trials ``size`` at a time until the budget is met, the timeout passes or ``stop`` is set.

    Counts into ``result`` as :func:`hpo.worker.run_worker` does. Trials still running when ``stop`` is set are
    failed and re-queued with their parameters, as the single-trial loop does with its one trial.
    """
    obj = spec.objective
    assert isinstance(obj, TrainingObjective)
    metric = spec.metric
    trainer = PopulationTrainer(obj, device)
    threads = hpo_threads.for_step(largest_model(spec) * size, ROW_BUDGET, threads)  # hpo.threads: a tick's work
    live: dict[int, _Live] = {}
    view = _StudyView(study, retry_for=opts.db_retry_for, url=url)
    reports = _Reports(study._storage, retry_for=opts.db_retry_for, url=url)
    me = worker_name()
    asking = True

    def set_attrs(trial: optuna.Trial, values: dict[str, Any]) -> None:
        """A member's user attributes, retried for ``--db-retry-for`` (one transaction; setting them twice, after
        a lost answer, stores the same rows)."""
        with_db_retry("store a trial's attributes", lambda: set_trial_attrs(trial, values), opts.db_retry_for, url)

    def finish(number: int, state: TrialState, value: float | None = None) -> None:
        with_db_retry("store reports", reports.store, max(opts.db_retry_for, 300.0), url)
        item = live.pop(number)
        beats.discard(item.trial._trial_id)
        trainer.remove(number)
        frozen, _ = tell(view, item.trial, state, value, opts, url)  # type: ignore[arg-type]
        view.finished(frozen)
        result.ran += 1
        result.trials.append(frozen.number)
        if frozen.state == TrialState.COMPLETE:
            result.complete += 1
        elif frozen.state == TrialState.PRUNED:
            result.pruned += 1
        else:
            result.failed += 1
        if opts.on_trial is not None:
            opts.on_trial(frozen)

    def start(trial: optuna.Trial) -> None:
        live[trial.number] = _Live(trial, time.perf_counter())
        view.track(trial)
        beats.add(trial._trial_id)
        # A re-queued copy carries its original's attributes; the trial as asked for holds them (no extra read).
        cached = getattr(trial, "_cached_frozen_trial", None)
        inherited = cached.user_attrs if cached is not None else trial.user_attrs
        try:
            params = search_space.suggest(trial, spec.space)
            seed = int(inherited.get("seed", trial_seed(spec, trial.number)))
            values = {"seed": seed, "device": device, "threads": threads, "worker": me, "population": size}
            if inherited.get("reason") is not None:  # the copy's outcome is its own
                values["reason"] = None
            set_attrs(trial, values)
            trainer.add(trial.number, params, seed)
        except optuna.exceptions.UpdateFinishedTrialError:  # reaped before it started: its copy runs elsewhere
            log.warning("trial %d was finished elsewhere (reaped) before it started; dropping it", trial.number)
            _drop(live, beats, trainer, trial.number, result)
        except HpoError:  # the database stayed away for --db-retry-for
            raise
        except Exception as exc:  # the trial's own mistake (bad parameters): recorded, the others carry on
            if is_db_error(exc):
                raise
            log.exception("trial %d failed", trial.number)
            set_attrs(trial, {"reason": "error", "error": f"{type(exc).__name__}: {exc}"[:500]})
            finish(trial.number, TrialState.FAIL)

    def refill() -> bool:
        """Ask for trials to fill the free slots; False once none can be had (budget met, grid done, timeout)."""
        want = size - len(live)
        if want <= 0:
            return True
        if timeout is not None and time.monotonic() - started >= timeout:
            result.reason = "timeout"
            return False
        if isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study):
            result.reason = "grid exhausted"
            return False
        trials = with_db_retry(
            "ask for trials", lambda: _ask(view, spec.name, budget, storage, opts, want), opts.db_retry_for, url
        )
        for t in trials:
            start(t)
        return len(trials) == want

    def on_event(ev: Event) -> None:
        number = int(ev.key)  # type: ignore[call-overload]
        item, r = live[number], ev.result
        trial = item.trial
        for what, v in (("training", r.train_loss), ("validation", r.val_loss)):
            if not math.isfinite(v):
                log.info("trial %d diverged: %s loss became %s in epoch %d", number, what, v, r.epoch)
                set_attrs(
                    trial,
                    {
                        "reason": "diverged",
                        "diverged_epoch": r.epoch,
                        "epochs_reached": r.epoch - 1,
                        "train_loss": item.curve,
                    },
                )
                finish(number, TrialState.PRUNED)
                return
        item.curve.append(round(r.train_loss, 6))
        value = r.metric(metric)
        reports.add(trial, value, r.epoch)
        if view.should_prune(trial):
            set_attrs(trial, {"epochs_reached": r.epoch, "train_loss": item.curve, "reason": "pruned"})
            finish(number, TrialState.PRUNED)
            return
        if ev.final:
            values: dict[str, Any] = {
                "epochs_reached": r.epoch,
                "train_loss": item.curve,
                "val_loss": round(r.val_loss, 6),
                "val_accuracy": round(r.val_accuracy, 6),
                "train_seconds": round(time.perf_counter() - item.started, 3),
            }
            if obj.evaluate_test:
                values["test_accuracy"] = trainer.test_accuracy(number)
            set_attrs(trial, values)
            finish(number, TrialState.COMPLETE, value)

    with Heartbeats(storage, opts.heartbeat_interval, url) as beats, hpo_threads.use(threads) as threads:
        try:
            while True:
                if asking and not stop.is_set() and len(live) < size:
                    asking = refill()
                if not live or stop.is_set():
                    break
                for ev in trainer.step():
                    try:
                        on_event(ev)
                    except optuna.exceptions.UpdateFinishedTrialError:  # reaped while it ran: its copy runs elsewhere
                        number = int(ev.key)  # type: ignore[call-overload]
                        log.warning("trial %d was finished elsewhere (reaped) while it ran; dropping it", number)
                        if number in live:
                            _drop(live, beats, trainer, number, result)
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the database may be what failed
                reports.store()
            for number in list(live):  # a bug or a database lost for good: these trials run again elsewhere
                _requeue(study, live[number].trial, "error", opts, url)
                _drop(live, beats, trainer, number, result)
            if isinstance(exc, Exception) and is_db_error(exc):  # retried for --db-retry-for: one line, no traceback
                cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
                raise HpoError(f"database {mask(url)} unavailable: {describe_error(cause or exc, url)}") from None
            raise
        if stop.is_set():
            with_db_retry("store reports", reports.store, max(opts.db_retry_for, 300.0), url)
            for number in list(live):
                _requeue(study, live[number].trial, "interrupted", opts, url)
                _drop(live, beats, trainer, number, result)
            result.interrupted = True


def _drop(live: dict[int, _Live], beats: Any, trainer: PopulationTrainer, number: int, result: Any) -> None:
    item = live.pop(number)
    beats.discard(item.trial._trial_id)
    trainer.remove(number)
    result.ran += 1
    result.failed += 1
    result.trials.append(number)


def _requeue(study: optuna.Study, trial: optuna.Trial, reason: str, opts: Any, url: str) -> None:
    """Fail a running member's trial with ``reason`` and queue its parameters again, once (as the single loop
    does; nothing happens to a trial that was finished elsewhere meanwhile)."""
    tell(study, trial, TrialState.FAIL, None, opts, url, {"reason": reason}, requeue=True)


def _ask(
    view: _StudyView, name: str, budget: int | None, storage: optuna.storages.RDBStorage, opts: Any, want: int
) -> list[optuna.Trial]:
    """Up to ``want`` new trials; their slots are taken inside the budget lock, so the global budget is never
    exceeded, and the sampler draws outside it (:func:`hpo.worker.take_slots`), reading the study through ``view``."""
    ids, _ = take_slots(view._study, name, budget, storage, opts, want)
    for trial_id in ids:
        view.created(trial_id)
    with quiet_optuna():
        return [optuna.Trial(view, trial_id) for trial_id in ids]  # type: ignore[arg-type]
