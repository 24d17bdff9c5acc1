"""hpo's default search strategy (``sampler: {name: auto}``, or no ``sampler:`` at all): Gaussian-process BO while
trials are expensive enough to pay for it, multivariate TPE otherwise and after it.

* **Startup** (the first ``n_startup_trials`` complete trials): random points, one shared seeded stream, whichever
  model follows.
* **GP** (Optuna's :class:`~optuna.samplers.GPSampler`, log-EI; q-log-EI over the trials in flight) for the trials
  numbered below ``gp_until``: the fewest trials to a target on the benchmarks (``benchmarks/README.md``), but its own
  time grows with the trials it has seen (0.2-0.6 s a trial on one core up to 100 trials).
* **TPE** (multivariate, grouped, constant liar: trials in flight are seen) from ``gp_until`` on, on a bounded window
  of the study (its latest :data:`RECENT` finished trials, its :data:`BEST` best, those in flight; read incrementally
  from a database by :mod:`hpo.trial_cache`): its cost per trial stops growing past ~250 trials.

``gp_until`` is decided by the study's trial cost, once, when the model first has ``n_startup_trials`` complete
trials to learn from: the median duration of the complete trials; if 5 % of it (:data:`BUDGET_FRACTION`) covers the
GP's time (``gp_min_trial_s``, default :data:`GP_MIN_TRIAL_S`: trials of 10 s and more), the GP runs up to
``max_gp_trials`` (default :data:`MAX_GP_TRIALS`), else TPE from there on. While the GP runs, a draw that takes more
than 5 % of the median trial ends the GP phase at the next trial. ``gp_trials: N`` in the kwargs fixes ``gp_until``
instead (``0``: TPE only). The decision is stored on the study (system attribute :data:`DECISION_ATTR`, and the
user attribute ``strategy`` in words, which ``hpo studies`` and the report show), so every worker and every resumed
run goes on with the same strategy.

Deterministic with a seed: the draws of trial N depend only on the seed, N, the history and the stored decision
(:func:`hpo.samplers.seed_per_trial` reseeds every random state; the GP's kernel-parameter cache, a process-local
warm start, is dropped before each trial so a resumed run fits what one straight through fits).
"""

from __future__ import annotations

import heapq
import statistics
import threading
import time
import warnings
from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpo.trial_cache import WindowedSampler, _WindowStudy

#: The study's system attribute holding the decision: ``{"gp_until": N, "median_trial_s": s, "decided_at": n}``.
DECISION_ATTR = "hpo:auto"
#: The user attribute naming the strategy in words (``hpo studies``, the report).
STRATEGY_ATTR = "strategy"
#: The sampler's own time, as a fraction of the median trial duration, it may take.
BUDGET_FRACTION = 0.05
#: The shortest median trial (seconds) for which the GP runs: 5 % of it (0.5 s) covers a GP draw up to ~100 trials.
GP_MIN_TRIAL_S = 10.0
#: The most trials drawn by the GP; TPE after.
MAX_GP_TRIALS = 100
#: TPE's view of a study: its latest finished trials and its best complete ones (and those in flight). TPE's cost
#: grows with the trials it sees (about 0.2 ms a trial seen, on one core); its "good" group is the best 25 at most.
RECENT, BEST = 200, 50


class _ListWindow:
    """A study held in memory seen as :class:`hpo.trial_cache.TrialWindow` sees a database's: the ``recent`` last
    finished trials, the ``best`` best complete ones, the unfinished ones (chosen once per trial)."""

    def __init__(self, study: optuna.Study, recent: int, best: int) -> None:
        every = study._get_trials(deepcopy=False, states=None, use_cache=False)
        finished = [t for t in every if t.state == TrialState.COMPLETE or t.state == TrialState.PRUNED]
        sign = 1.0 if study.direction == StudyDirection.MINIMIZE else -1.0
        scored = [(sign * t._values[0], t.number, t) for t in finished if t.state == TrialState.COMPLETE and t._values]
        chosen = {t.number: t for t in finished[-recent:]}
        chosen.update((t.number, t) for _, _, t in heapq.nsmallest(best, scored))
        chosen.update((t.number, t) for t in every if not t.state.is_finished())
        self.chosen = [chosen[n] for n in sorted(chosen)]

    def trials(self, states: Container[TrialState] | None) -> list[FrozenTrial]:
        return [t for t in self.chosen if states is None or t.state in states]


class _BoundedTPE(WindowedSampler):
    """TPE on a bounded window of the study, in a database (:mod:`hpo.trial_cache`) or in memory."""

    _memo: tuple[int, int, _ListWindow] | None = None

    def _view(self, study: optuna.Study, trial: FrozenTrial | None) -> Any:
        view = super()._view(study, trial)
        if view is not study or study._is_multi_objective():
            return view
        memo = self._memo
        if trial is None or memo is None or memo[:2] != (id(study), trial.number):
            memo = (id(study), trial.number if trial is not None else -1, _ListWindow(study, self.recent, self.best))
            self._memo = memo
        return _WindowStudy(study, memo[2])  # type: ignore[arg-type]


def describe(gp_until: int, n_startup: int) -> str:
    """The strategy in words, as ``hpo studies`` shows it."""
    if gp_until <= n_startup:
        return f"random for {n_startup} trials, then multivariate TPE"
    return f"random for {n_startup} trials, GP to trial {gp_until}, then multivariate TPE"


class AutoSampler(optuna.samplers.BaseSampler):
    """GP while trials are expensive, multivariate TPE otherwise (see the module's docstring)."""

    def __init__(
        self,
        *,
        seed: int | None = None,
        n_startup_trials: int = 10,
        gp_trials: int | None = None,
        gp_min_trial_s: float = GP_MIN_TRIAL_S,
        max_gp_trials: int = MAX_GP_TRIALS,
    ) -> None:
        if gp_trials is not None and gp_trials < 0:
            raise ValueError(f"gp_trials {gp_trials}: give 0 or more")
        if n_startup_trials < 1:
            raise ValueError(f"n_startup_trials {n_startup_trials}: give 1 or more")
        self.n_startup = n_startup_trials
        self.gp_trials, self.gp_min_trial_s, self.max_gp_trials = gp_trials, gp_min_trial_s, max_gp_trials
        self._random = optuna.samplers.RandomSampler(seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._gp = optuna.samplers.GPSampler(
                seed=seed, n_startup_trials=n_startup_trials, independent_sampler=self._random,
                warn_independent_sampling=False,
            )  # fmt: skip
            self._tpe = optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=n_startup_trials, multivariate=True, group=True, constant_liar=True
            )  # fmt: skip
        self._tpe._random_sampler = self._random  # the same startup points whichever model follows
        self._tpe_windowed = _BoundedTPE(self._tpe, recent=RECENT, best=BEST)
        self._decision: dict[str, Any] | None = None
        self._phase: dict[int, str] = {}  # trial number -> "gp" or "tpe"
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the decision

    def decision(self, study: optuna.Study) -> dict[str, Any] | None:
        """The stored (or fixed) decision; ``None`` while the startup trials run."""
        if self._decision is None:
            stored = study._storage.get_study_system_attrs(study._study_id).get(DECISION_ATTR)
            if stored is not None:
                self._decision = dict(stored)
        return self._decision

    def _decide(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any] | None:
        with self._lock:
            got = self.decision(study)
            if self.gp_trials is not None and (got is None or got.get("gp_until") != self.gp_trials):
                self._store(study, {"gp_until": self.gp_trials, "median_trial_s": None, "decided_at": None}, True)
                return self._decision
            if got is not None:
                return got
            done = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,), use_cache=False)
            if len(done) < self.n_startup:
                return None
            durations = [t.duration.total_seconds() for t in done if t.duration is not None]
            median = statistics.median(durations) if durations else 0.0
            gp = median >= self.gp_min_trial_s
            gp_until = trial.number + self.max_gp_trials if gp else 0
            self._store(study, {"gp_until": gp_until, "median_trial_s": round(median, 3), "decided_at": trial.number})
            return self._decision

    def _store(self, study: optuna.Study, decision: dict[str, Any], replace: bool = False) -> None:
        """Store the decision; a decision another worker stored first stands unless ``replace``."""
        storage = study._storage
        stored = storage.get_study_system_attrs(study._study_id).get(DECISION_ATTR)
        if stored is None or replace:
            storage.set_study_system_attr(study._study_id, DECISION_ATTR, decision)
            try:
                text = describe(int(decision["gp_until"]), self.n_startup)
                storage.set_study_user_attr(study._study_id, STRATEGY_ATTR, text)
            except Exception:  # noqa: BLE001 - naming the strategy never stops a trial
                pass
            stored = decision
        self._decision = dict(stored)

    def phase(self, study: optuna.Study, trial: FrozenTrial) -> str:
        """``"gp"`` or ``"tpe"`` for this trial (both draw the same random points while the startup trials run)."""
        decided = self._decide(study, trial)
        if decided is None:
            return "gp"  # startup: the shared random sampler draws, through either model
        return "gp" if trial.number < int(decided["gp_until"]) else "tpe"

    def _sampler(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        return self._gp if self._phase.get(trial.number) == "gp" else self._tpe_windowed

    # ------------------------------------------------------------------ Optuna's sampler interface

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._gp._gprs_cache_list = None  # a process-local warm start: dropped, so a resumed run fits the same
        self._gp._constraints_gprs_cache_list = None
        self._phase[trial.number] = self.phase(study, trial)
        self._sampler(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if trial.number not in self._phase:  # a trial asked without before_trial (Optuna always calls it)
            self._phase[trial.number] = self.phase(study, trial)
        return self._sampler(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        sampler = self._sampler(trial)
        if sampler is not self._gp or not search_space:
            return sampler.sample_relative(study, trial, search_space)
        start = time.perf_counter()
        params = sampler.sample_relative(study, trial, search_space)
        took = time.perf_counter() - start
        decided = self._decision
        if (
            params
            and self.gp_trials is None
            and decided is not None
            and decided.get("median_trial_s") is not None
            and took > BUDGET_FRACTION * float(decided["median_trial_s"])
            and int(decided["gp_until"]) > trial.number + 1
        ):  # the GP outgrew its share of a trial: TPE from the next trial on
            with self._lock:
                self._store(study, {**decided, "gp_until": trial.number + 1, "switched": True}, True)
        return params

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._sampler(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._sampler(trial).after_trial(study, trial, state, values)
        self._phase.pop(trial.number, None)

    def reseed_rng(self) -> None:
        self._gp.reseed_rng()
        self._tpe.reseed_rng()


__all__ = ["BUDGET_FRACTION", "DECISION_ATTR", "GP_MIN_TRIAL_S", "MAX_GP_TRIALS", "STRATEGY_ATTR", "AutoSampler"]
