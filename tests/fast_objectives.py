"""Users' own objectives (``kind: tests.fast_objectives:NAME``), used by tests that need many cheap trials."""

from __future__ import annotations

import math
import time

import optuna

from hpo.objectives import Context


def quadratic(trial: optuna.trial.BaseTrial, ctx: Context) -> float:
    """A smooth bowl over lr (log) with a few reported steps; optional sleep via options.sleep."""
    lr = float(ctx.params.get("lr", 0.01))
    value = -((math.log10(lr) + 2.0) ** 2)
    for step in range(int(ctx.options.get("steps", 3))):
        ctx.check_stop()
        time.sleep(float(ctx.options.get("sleep", 0.0)))
        trial.report(value - 1.0 / (step + 1), step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return value


def accuracy_and_cost(trial: optuna.trial.BaseTrial, ctx: Context) -> tuple[float, float]:
    """Two objectives (``metrics: [score, cost]``): a score that rises with ``x`` and a cost that rises with it too,
    so every trial but the dominated ones sits on the front; ``options.length: 3`` returns a wrong-length tuple."""
    x = float(ctx.params.get("x", 0.5))
    score, cost = 1.0 - (1.0 - x) ** 2, x + 0.1 * float(ctx.params.get("waste", 0.0))
    if "length" in ctx.options:
        return tuple([score, cost, 0.0][: int(ctx.options["length"])])  # type: ignore[return-value]
    return score, cost
