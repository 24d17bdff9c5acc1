"""Objectives written as an Optuna user writes them (``kind: plain_objectives:NAME``), for tests/test_users.py.

The tests put this folder on ``PYTHONPATH``; no hpo import here, as in a user's own module.
"""

from __future__ import annotations

from typing import Any


def loss(trial: Any) -> float:
    """A plain Optuna objective: suggests its own parameter, returns a loss (smaller is better)."""
    x = trial.suggest_float("x", -3.0, 3.0)
    return (x - 1.0) ** 2


def with_context(trial: Any, ctx: Any) -> float:
    """An objective that asks for hpo's context: returns its option ``offset`` plus the space's ``x``."""
    return float(ctx.options["offset"]) + float(ctx.params["x"])


def nine(trial: Any) -> float:
    """Nine parameters with long names, as a real study has; some only in some trials (``dropout_rate``)."""
    lr = trial.suggest_float("learning_rate", 1e-4, 1.0, log=True)
    trial.suggest_int("batch_size", 16, 1024, log=True)
    trial.suggest_float("weight_decay", 0.0, 0.1)
    trial.suggest_float("momentum", 0.0, 0.99)
    optimizer = trial.suggest_categorical("optimizer", ["sgd", "adam", "rmsprop"])
    trial.suggest_int("hidden_units", 4, 256)
    trial.suggest_categorical("activation", ["relu", "tanh"])
    trial.suggest_int("epochs", 1, 50)
    if optimizer == "adam":
        trial.suggest_float("dropout_rate", 0.0, 0.5)
    return lr
