"""Optuna pruners by name, with keyword arguments passed through.

``patient`` wraps another pruner: ``{name: patient, kwargs: {patience: 3, wrapped: {name: median}}}``.
"""

from __future__ import annotations

from typing import Any

import optuna

from hpo.errors import SpecError
from hpo.spec import PrunerSpec

_CLASSES: dict[str, str] = {
    "none": "NopPruner",
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "wilcoxon": "WilcoxonPruner",
    "threshold": "ThresholdPruner",
    "patient": "PatientPruner",
}

_DEFAULTS: dict[str, dict[str, Any]] = {
    "percentile": {"percentile": 25.0},
    "patient": {"patience": 2},
}


def make_pruner(spec: PrunerSpec) -> optuna.pruners.BasePruner:
    """Build a pruner from its spec."""
    cls = getattr(optuna.pruners, _CLASSES[spec.name])
    kwargs: dict[str, Any] = {**_DEFAULTS.get(spec.name, {}), **spec.kwargs}
    if spec.name == "patient":
        wrapped = kwargs.pop("wrapped", {"name": "median"})
        try:
            kwargs["wrapped_pruner"] = make_pruner(PrunerSpec.model_validate(wrapped))
        except Exception as exc:  # pydantic error or nested SpecError
            raise SpecError(f"pruner.kwargs.wrapped: {str(exc).splitlines()[0]}") from None
    if spec.name == "threshold" and not ({"lower", "upper"} & kwargs.keys()):
        raise SpecError("pruner.kwargs: the threshold pruner needs lower and/or upper")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"pruner.kwargs: {exc}") from None
