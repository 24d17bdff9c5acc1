"""Optuna samplers by name, with keyword arguments passed through and the seed honoured."""

from __future__ import annotations

from typing import Any

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


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """Build the study file's sampler.

    Example:
        ``sampler: {name: tpe, seed: 0, kwargs: {multivariate: true, constant_liar: true}}``
    """
    s = spec.sampler
    cls = getattr(optuna.samplers, _CLASSES[s.name])
    kwargs: dict[str, Any] = dict(s.kwargs)
    if s.seed is not None:
        kwargs["seed"] = s.seed
    if s.name == "grid":
        from hpo.space import grid

        kwargs.setdefault("search_space", grid(spec))
    try:
        return windowed(cls(**kwargs))  # TPE on a bounded window of the study: its cost per trial stays flat
    except TypeError as exc:
        raise SpecError(f"sampler.kwargs: {exc}") from None
    except ValueError as exc:
        raise SpecError(f"sampler.kwargs: {exc}") from None
