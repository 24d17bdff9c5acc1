"""A sampler's cost per trial that does not grow with the study: TPE on a bounded window of the study's trials.

Optuna's TPE reads every trial of the study for each trial it samples: the storage's trial cache filters and sorts
all of them, and TPE converts each one to numbers again (``_split_trials``, ``_get_internal_repr``), so its cost per
trial grows linearly: measured here (``benchmarks/coordination_scale.py``), 70 % of a trial's coordination time at
20,000 trials. :class:`WindowedSampler` gives the sampler a view of the study that holds

* the ``best`` complete trials (TPE's "good" group is at most 25 trials, so with ``best >= 25`` it is the same group
  as over the whole study),
* the ``recent`` most recently finished trials (TPE already weighs older trials less), and
* the running and waiting ones,

read incrementally by :class:`TrialWindow`: each refresh asks the database only for trials finished since the last
one (and those still unfinished), as Optuna's own cache does, but keeps only the window, so neither memory nor the
sampler's work grows with the study. A study smaller than ``recent`` is seen whole: sampling is unchanged for it.

Hooked in by :func:`hpo.samplers.make_sampler` for TPE (single objective). Each worker's :class:`optuna.Study` has
its own window (keyed by its database backend: each trial may see the study through a wrapper of its own), shared by
the threads that use that study.
"""

from __future__ import annotations

import copy
import functools
import heapq
import threading
import weakref
from collections import deque
from collections.abc import Callable, Container, Sequence
from typing import Any

import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

#: Finished trials the sampler sees at most besides the best ones (TPE's default weights fade older trials out).
RECENT = 1000
#: Best complete trials always in view (TPE's "good" group is at most 25).
BEST = 100


class TrialWindow:
    """One client's incremental view of one study: best complete trials, recent finished ones, unfinished ones."""

    def __init__(self, backend: Any, study_id: int, direction: StudyDirection, recent: int, best: int) -> None:
        self.backend, self.study_id = backend, study_id
        self.sign = 1.0 if direction == StudyDirection.MINIMIZE else -1.0
        self.best_n = best
        self.recent: deque[FrozenTrial] = deque(maxlen=recent)
        self.best: list[tuple[float, int, FrozenTrial]] = []  # a heap of (-sign * value, number): worst on top
        self.unfinished: dict[int, FrozenTrial] = {}
        self.last_finished_id = -1
        self.lock = threading.Lock()
        self.refreshed_for: int | None = None

    def refresh(
        self, trial_number: int | None = None, retried: Callable[[str, Callable[[], Any]], Any] | None = None
    ) -> None:
        """Read what changed since the last refresh: trials finished since, and the unfinished ones (once per
        ``trial_number`` when given: a trial's sampler calls share one read). ``retried(what, read)``: the trial's
        retry policy for database errors (a worker's trial rides out a restart while it samples, too)."""
        with self.lock:
            if trial_number is not None and trial_number == self.refreshed_for:
                return

            def read() -> list[FrozenTrial]:
                return self.backend._get_trials(
                    self.study_id,
                    states=None,
                    included_trial_ids=set(self.unfinished),
                    trial_id_greater_than=self.last_finished_id,
                )

            trials = retried("read the study's trials", read) if retried is not None else read()
            for t in sorted(trials, key=lambda t: t._trial_id):
                if not t.state.is_finished():
                    self.unfinished[t._trial_id] = t
                    continue
                self.unfinished.pop(t._trial_id, None)
                self.last_finished_id = max(self.last_finished_id, t._trial_id)
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                    self.recent.append(t)
                if t.state == TrialState.COMPLETE and t.value is not None:
                    item = (-self.sign * t.value, -t.number, t)
                    if len(self.best) < self.best_n:
                        heapq.heappush(self.best, item)
                    elif item > self.best[0]:
                        heapq.heapreplace(self.best, item)
            self.refreshed_for = trial_number

    def trials(self, states: Container[TrialState] | None) -> list[FrozenTrial]:
        with self.lock:
            chosen = {t.number: t for t in self.recent}
            chosen.update((t.number, t) for _, _, t in self.best)
            chosen.update((t.number, t) for t in self.unfinished.values())
        return [chosen[n] for n in sorted(chosen) if states is None or chosen[n].state in states]


class _WindowStudy:
    """The study as the sampler sees it: its trials are the window's; everything else is the study's."""

    def __init__(self, study: optuna.Study, window: TrialWindow) -> None:
        self._hpo_study, self._hpo_window = study, window

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hpo_study, name)

    def _get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        trials = self._hpo_window.trials(states)
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self._get_trials(True)


_windows: weakref.WeakKeyDictionary[Any, dict[int, TrialWindow]] = weakref.WeakKeyDictionary()
_windows_lock = threading.Lock()


class WindowedSampler(optuna.samplers.BaseSampler):
    """``base`` sampling over a bounded window of the study's trials (see the module's docstring)."""

    def __init__(self, base: optuna.samplers.BaseSampler, recent: int = RECENT, best: int = BEST) -> None:
        self.base, self.recent, self.best = base, recent, best

    def __getattr__(self, name: str) -> Any:  # the base sampler's own attributes (its rng, seed, settings)
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def _view(self, study: optuna.Study, trial: FrozenTrial | None) -> Any:
        storage = getattr(study, "_storage", None)
        backend = getattr(storage, "_backend", None)
        if backend is None or not hasattr(backend, "_get_trials") or study._is_multi_objective():
            return study  # an in-memory study, or several objectives: the whole study
        with _windows_lock:  # keyed by the database backend: a trial may see the study through a wrapper of its own
            per_study = _windows.setdefault(backend, {})
            window = per_study.get(study._study_id)
            if window is None:
                window = TrialWindow(backend, study._study_id, study.direction, self.recent, self.best)
                per_study[study._study_id] = window
        window.refresh(trial.number if trial is not None else None, getattr(storage, "retried", None))
        return _WindowStudy(study, window)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.base.infer_relative_search_space(self._view(study, trial), trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.base.sample_relative(self._view(study, trial), trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.base.sample_independent(self._view(study, trial), trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


def windowed(sampler: optuna.samplers.BaseSampler) -> optuna.samplers.BaseSampler:
    """TPE on a bounded window of the study (:class:`WindowedSampler`); other samplers as they are."""
    if isinstance(sampler, optuna.samplers.TPESampler):
        return WindowedSampler(sampler)
    return sampler


# --------------------------------------------------------------------------- the budget count, incrementally

#: Within this many trials of the budget, the count is made over the whole study again (the exact rule, in SQL).
EXACT_NEAR_END = 64


@functools.cache
def _rows_statement() -> Any:
    """The study's trials above a floor id, or among the given unfinished ones: (id, state, is a re-queued copy)."""
    from optuna.storages._rdb import models

    t, a = models.TrialModel.__table__, models.TrialSystemAttributeModel.__table__
    is_copy = sqlalchemy.exists().where(a.c.trial_id == t.c.trial_id, a.c.key == "failed_trial")
    return sqlalchemy.select(t.c.trial_id, t.c.state, is_copy).where(
        t.c.study_id == sqlalchemy.bindparam("study_id"),
        sqlalchemy.or_(
            t.c.trial_id > sqlalchemy.bindparam("floor"),
            t.c.trial_id.in_(sqlalchemy.bindparam("pending", expanding=True)),
        ),
    )


@functools.cache
def _insert_statements() -> tuple[Any, Any]:
    """:func:`hpo.storage.create_running_trial`'s statements (the study's row locked for update, then the insert),
    the insert numbering the trial by the trials above the floor plus the known count below it, instead of counting
    every trial of the study."""
    from optuna.storages._rdb import models

    t, st = models.TrialModel.__table__, models.StudyModel.__table__
    study_id = sqlalchemy.bindparam("study_id", type_=t.c.study_id.type)
    lock = sqlalchemy.select(st.c.study_id).where(st.c.study_id == study_id).with_for_update()
    start = sqlalchemy.bindparam("start", type_=t.c.datetime_start.type)
    above = (
        sqlalchemy.select(sqlalchemy.func.count(t.c.trial_id))
        .where(t.c.study_id == study_id, t.c.trial_id > sqlalchemy.bindparam("floor"))
        .scalar_subquery()
    )
    number = sqlalchemy.bindparam("below", type_=t.c.number.type) + above
    running = sqlalchemy.literal(TrialState.RUNNING, t.c.state.type)
    row = sqlalchemy.select(number, study_id, running, start)
    insert = sqlalchemy.insert(t).from_select(["number", "study_id", "state", "datetime_start"], row)
    return lock, insert.returning(t.c.trial_id, t.c.number)


_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.FAIL)


class BudgetCounter:
    """One client's running sum of :func:`hpo.storage.budget_counts` over a study.

    Trials are created under the study's row lock (Optuna's ``create_new_trial``, hpo's ``create_running_trial``),
    so their ids commit in order, and a finished trial never changes: the sum over the trials up to a floor id, all
    of them finished, stays true. Each count reads only the trials above the floor and the unfinished ones below it
    (a few dozen rows, whatever the study's size), then raises the floor.
    """

    def __init__(self) -> None:
        self.floor = -1
        self.below_counted = 0  # the budget rule's sum over finished trials with id <= floor
        self.below_total = 0  # every trial with id <= floor
        self.pending: set[int] = set()  # unfinished trials with id <= floor
        self.lock = threading.Lock()

    def counts(self, conn: sqlalchemy.Connection, study_id: int) -> tuple[int, int, int]:
        """(counted, running, waiting), as :func:`hpo.storage.budget_counts` gives them."""
        with self.lock:
            params = {"study_id": study_id, "floor": self.floor, "pending": sorted(self.pending)}
            rows = conn.execute(_rows_statement(), params).all()
            counted, running, waiting = self.below_counted, 0, 0
            new_floor, new_total = self.floor, self.below_total
            settled: list[tuple[int, int]] = []
            for trial_id, state, is_copy in rows:
                state = state if isinstance(state, TrialState) else TrialState[str(state)]
                value = int(state in _COUNTED) - int(bool(is_copy))
                counted += value
                running += state == TrialState.RUNNING
                waiting += state == TrialState.WAITING
                if trial_id > self.floor:
                    new_total += 1
                    new_floor = max(new_floor, trial_id)
                settled.append((trial_id, value if state.is_finished() else None))  # type: ignore[arg-type]
            for trial_id, value in settled:
                if value is None:
                    self.pending.add(trial_id)
                else:
                    self.pending.discard(trial_id)
                    self.below_counted += value
            self.floor, self.below_total = new_floor, new_total
            return counted, running, waiting


_counters: weakref.WeakKeyDictionary[Any, dict[int, BudgetCounter]] = weakref.WeakKeyDictionary()


def _counter(study: optuna.Study) -> BudgetCounter:
    with _windows_lock:
        per_study = _counters.setdefault(study._storage, {})
        return per_study.setdefault(study._study_id, BudgetCounter())


def budget_counts(
    study: optuna.Study, storage: Any, conn: sqlalchemy.Connection | None, budget: int | None
) -> tuple[int, int, int]:
    """:func:`hpo.storage.budget_counts` for the budget lock's holder, incrementally (:class:`BudgetCounter`); over
    the whole study again within :data:`EXACT_NEAR_END` trials of the budget or when it seems met."""
    from hpo.storage import budget_counts as whole_study

    counter = _counter(study)
    if conn is None:
        with storage.engine.connect() as own:
            got = counter.counts(own, study._study_id)
    else:
        got = counter.counts(conn, study._study_id)
    if budget is not None and budget - got[0] <= EXACT_NEAR_END:
        return whole_study(storage, study._study_id, conn)
    return got


def create_running_trial(study: optuna.Study, conn: sqlalchemy.Connection) -> tuple[int, int, Any]:
    """:func:`hpo.storage.create_running_trial`, numbering the new trial from the budget counter's floor on
    PostgreSQL and SQLite (MySQL, without ``RETURNING``: the storage's own)."""
    import datetime

    from hpo.storage import create_running_trial as whole_study

    counter = _counter(study)
    if conn.dialect.name == "mysql":
        return whole_study(study._study_id, conn)
    lock, insert = _insert_statements()
    params: dict[str, Any] = {"study_id": study._study_id, "start": datetime.datetime.now()}
    conn.execute(lock, params)  # the study's row, for update: no other trial is numbered until the commit
    with counter.lock:
        params.update(floor=counter.floor, below=counter.below_total)
    trial_id, number = conn.execute(insert, params).one()
    return int(trial_id), int(number), params["start"]


__all__ = [
    "BEST",
    "EXACT_NEAR_END",
    "RECENT",
    "BudgetCounter",
    "TrialWindow",
    "WindowedSampler",
    "budget_counts",
    "create_running_trial",
    "windowed",
]
