"""Search-space entries -> ``trial.suggest_*``.

Choices that are lists (``layers: {choices: [[10], [64, 64]]}``) are stored as JSON strings, because Optuna's
categorical values must be scalars, and decoded again when the trial's parameters are read.
"""

from __future__ import annotations

import json
from typing import Any

import optuna

from hpo.spec import ChoiceParam, FixedParam, FloatParam, IntParam, StudySpec


def encode(choice: Any) -> Any:
    """The value Optuna stores for a choice: lists become JSON strings (categoricals must be scalars)."""
    return json.dumps(choice) if isinstance(choice, list) else choice


def encode_params(params: dict[str, Any]) -> dict[str, Any]:
    """Fixed parameters (``enqueue:``, ``hpo enqueue``) as Optuna stores them."""
    return {k: encode(v) for k, v in params.items()}


def decode(value: Any) -> Any:
    """Turn a stored categorical back into the value the study file wrote."""
    if isinstance(value, str) and value.startswith("["):
        return json.loads(value)
    return value


def _active(param: Any, chosen: dict[str, Any]) -> bool:
    when = getattr(param, "when", None)
    if not when:
        return True
    return all(decode(chosen.get(name)) in [decode(encode(v)) for v in allowed] for name, allowed in when.items())


def suggest(trial: optuna.Trial, space: dict[str, Any]) -> dict[str, Any]:
    """Draw one value per active entry of ``space``; conditional entries (``when``) follow their condition.

    Entries are visited in file order, so a condition may only refer to an entry written above it.
    """
    chosen: dict[str, Any] = {}
    for name, p in space.items():
        if not _active(p, chosen):
            continue
        if isinstance(p, IntParam):
            chosen[name] = trial.suggest_int(name, p.low, p.high, step=p.step, log=p.log)
        elif isinstance(p, FloatParam):
            chosen[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
        elif isinstance(p, ChoiceParam):
            chosen[name] = trial.suggest_categorical(name, [encode(c) for c in p.choices])
        elif isinstance(p, FixedParam):
            chosen[name] = p.value
            trial.set_user_attr(f"fixed.{name}", p.value)
        else:
            chosen[name] = p
    return {k: decode(v) for k, v in chosen.items()}


def distributions(space: dict[str, Any]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distributions of the searched (not fixed) entries, to compare a study with its file."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, p in space.items():
        if isinstance(p, IntParam):
            out[name] = optuna.distributions.IntDistribution(p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, FloatParam):
            out[name] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, ChoiceParam):
            out[name] = optuna.distributions.CategoricalDistribution([encode(c) for c in p.choices])
    return out


def grid(spec: StudySpec) -> dict[str, list[Any]]:
    """The grid for Optuna's GridSampler: choices as they are, ranges from their ``grid:`` list."""
    from hpo.errors import SpecError

    out: dict[str, list[Any]] = {}
    for name, p in spec.space.items():
        if isinstance(p, ChoiceParam):
            out[name] = [encode(c) for c in p.choices]
        elif isinstance(p, (IntParam, FloatParam)):
            if not p.grid:
                raise SpecError(f"space.{name}.grid: the grid sampler needs a list of values for each range")
            out[name] = list(p.grid)
    return out
