"""Objectives an Optuna user writes from Optuna's documented APIs (``kind: optuna_like:NAME``), for
tests/test_optuna_semantics.py: each is run through ``hpo run`` and through plain ``study.optimize`` side by side.

No hpo import here, as in a user's own module; the tests put this folder on ``PYTHONPATH``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna

#: what :func:`odd_values` does, by trial number: one row of the return-value table per trial.
CASES = ("nan", "none", "inf", "string", "numpy", "pruned", "number", "-inf")


def odd_values(trial: optuna.Trial) -> Any:
    """Returns the value its trial number picks from :data:`CASES` (trial 8 is trial 0 again, and so on)."""
    x = trial.suggest_float("x", 0.0, 1.0)
    case = CASES[trial.number % len(CASES)]
    if case == "pruned":
        raise optuna.TrialPruned("too slow: pruned by the objective itself")
    return {
        "nan": float("nan"),
        "none": None,
        "inf": float("inf"),
        "-inf": float("-inf"),
        "string": "abc",
        "numpy": np.float32(x),
        "number": x,
    }[case]


def constrained(trial: optuna.Trial) -> float:
    """Maximise x on [0, 10] under the constraint x <= 3 (Optuna's ``trial.set_constraint``): the best trial by value
    breaks the constraint; the best feasible one is the answer."""
    x = trial.suggest_float("x", 0.0, 10.0)
    trial.set_constraint("x_at_most_3", x - 3.0)
    return x


def with_data(trial: optuna.Trial, data: Any = None) -> float:
    """A second parameter with a default is the user's own (``functools.partial(with_data, data=...)`` in Optuna's
    FAQ): called as Optuna calls it, it keeps its default."""
    if data is not None:
        raise TypeError(f"data should keep its default, got {type(data).__name__}")
    return trial.suggest_float("x", -1.0, 1.0) ** 2


def own_seed(trial: optuna.Trial) -> float:
    """Keeps its own ``seed`` user attribute, as a user's objective may."""
    trial.set_user_attr("seed", "mine")
    return trial.suggest_float("x", 0.0, 1.0)


class Objective:
    """Optuna's callable-class pattern (``study.optimize(Objective(low, high))``)."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def __call__(self, trial: optuna.Trial) -> float:
        return trial.suggest_float("x", self.low, self.high)


#: the instance to name as ``kind: optuna_like:instance``.
instance = Objective(2.0, 3.0)
