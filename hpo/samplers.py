"""Optuna samplers by name, with keyword arguments passed through and the seed honoured.

A seeded sampler draws each trial from a random state derived from the seed and the trial's number (reseeded as the
trial starts), not from one stream per process: a resumed study goes on instead of drawing its first points again,
two workers draw what one would (given the same completion order), and no two trials share a stream.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import optuna

from hpo.errors import SpecError
from hpo.spec import StudySpec
from hpo.trial_cache import windowed

_CLASSES: dict[str, str] = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "grid": "GridSampler",
    "cmaes": "CmaEsSampler",
    "qmc": "QMCSampler",
    "gp": "GPSampler",
    "nsga2": "NSGAIISampler",
    "nsgaii": "NSGAIISampler",
    "nsga3": "NSGAIIISampler",
}


def make_sampler(spec: StudySpec, callables: bool = True) -> optuna.samplers.BaseSampler:
    """Build the study file's sampler.

    ``callables``: import the sampler's ``module:function`` keyword arguments (``constraints_func: mod:fn``); False
    where the file is the database's word and unchecked (:func:`hpo.worker.load`: ``hpo enqueue``, ``hpo reap``): the
    sampler is built without them, and a worker adds them once :mod:`hpo.trust` allowed them.

    Example:
        ``sampler: {name: tpe, seed: 0, kwargs: {multivariate: true, constant_liar: true}}``

    ``auto`` (the default: no ``sampler:``) is hpo's own strategy, :class:`hpo.auto_sampler.AutoSampler`: GP while
    trials are expensive enough to pay for it, multivariate TPE otherwise.
    """
    s = spec.sampler
    if s.name == "auto":
        from hpo.auto_sampler import AutoSampler

        cls: Any = AutoSampler
    else:
        cls = getattr(optuna.samplers, _CLASSES[s.name])
    kwargs: dict[str, Any] = dict(s.kwargs)
    for key in spec.sampler.callables():  # user code: imported only where the caller trusts the file
        kwargs.pop(key)
    if callables:
        kwargs.update(sampler_callables(spec))
    if s.seed is not None:
        kwargs["seed"] = s.seed
    if s.name == "grid":
        from hpo.space import grid

        kwargs.setdefault("search_space", grid(spec))
    try:
        sampler = cls(**kwargs)
        if s.seed is not None:
            seed_per_trial(sampler, s.seed)
        return windowed(sampler)  # TPE on a bounded window of the study: its cost per trial stays flat
    except TypeError as exc:
        raise SpecError(f"sampler.kwargs: {exc}") from None
    except ValueError as exc:
        raise SpecError(f"sampler.kwargs: {exc}") from None
    except Exception as exc:  # whatever else Optuna's constructor raises on a value it cannot take: one line
        raise SpecError(f"sampler.kwargs: {type(exc).__name__}: {exc}") from None


def _random_states(obj: Any, depth: int = 0) -> list[Any]:
    """The sampler's random states (its own and its helpers': a fallback sampler, a child-generation strategy), in a
    fixed order."""
    from optuna.samplers._lazy_random_state import LazyRandomState

    found: list[Any] = []
    for _key, value in sorted(vars(obj).items()):
        if isinstance(value, LazyRandomState):
            found.append(value)
        elif depth < 3 and type(value).__module__.startswith("optuna.samplers") and hasattr(value, "__dict__"):
            found.extend(_random_states(value, depth + 1))
    return found


def seed_per_trial(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Reseed ``sampler``'s random states from ``(seed, trial number)`` as each trial starts (see the module's
    docstring). A sampler with no random state of Optuna's kind (QMC's sequence is indexed already) is left as is."""
    states = _random_states(sampler)
    if not states:
        return
    before = sampler.before_trial

    def before_trial(self: optuna.samplers.BaseSampler, study: optuna.Study, trial: Any) -> None:
        words = np.random.SeedSequence([seed, trial.number]).generate_state(len(states))
        for state, word in zip(states, words, strict=True):
            state._rng = np.random.RandomState(int(word))
        before(study, trial)

    sampler.before_trial = types.MethodType(before_trial, sampler)  # type: ignore[method-assign]


def sampler_callables(spec: StudySpec) -> dict[str, Any]:
    """The sampler's ``module:function`` keyword arguments (:data:`hpo.spec.CALLABLE_KWARGS`), imported and checked
    to take one argument (``constraints_func(trial)``, ``gamma(n)``, ``weights(n)``).

    Raises:
        SpecError: one line naming the field (``sampler.kwargs.constraints_func: ...``).
    """
    from hpo.user_code import check_call, import_callable

    found: dict[str, Any] = {}
    for key, ref in spec.sampler.callables().items():
        field = f"sampler.kwargs.{key}"
        fn = import_callable(ref, field)
        check_call(fn, ref, field, f"{key}({'trial' if key == 'constraints_func' else 'n'})", None)
        found[key] = fn
    return found
