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
