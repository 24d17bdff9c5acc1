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
