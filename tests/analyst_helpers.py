"""Synthetic studies for the analysts' tests, built with optuna.create_trial (no training)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

DISTS = {
    "lr": FloatDistribution(1e-3, 10, log=True),
    "batch_size": IntDistribution(16, 1024, log=True),
    "epochs": IntDistribution(1, 50),
    "optimizer": CategoricalDistribution(["sgd", "adam", "rmsprop"]),
}


def mixed_study(url: str, name: str, n: int = 40, seed: int = 0) -> optuna.Study:
    """A study with COMPLETE / PRUNED / FAIL trials, 4 params, learning curves and hpo's trial attributes."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    study.set_user_attr("metric", "val_accuracy")
    study.set_user_attr("sampler", {"name": "tpe", "seed": 0, "kwargs": {}})
    study.set_user_attr("pruner", {"name": "median", "kwargs": {}})
    study.set_user_attr("budget", {"n_trials": n, "timeout": None})
    rnd = random.Random(seed)
    trials = []
    for i in range(n):
        state = [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL][i % 4]
        lr = 10 ** rnd.uniform(-3, 1)
        params = {
            "lr": lr,
            "batch_size": int(2 ** rnd.uniform(4, 10)),
            "epochs": rnd.randint(1, 50),
            "optimizer": rnd.choice(["sgd", "adam", "rmsprop"]),
        }
        value = 1 - (math.log10(lr) + 1) ** 2 / 9 + rnd.gauss(0, 0.02) if state == TrialState.COMPLETE else None
        steps = 5 if state == TrialState.COMPLETE else 2
        trials.append(
            create_trial(
                state=state,
                value=value,
                params=params,
                distributions=DISTS,
                intermediate_values={s: 0.5 + 0.05 * s + rnd.gauss(0, 0.01) for s in range(steps)},
                user_attrs={
                    "seed": 1000 + i,
                    "device": "cpu",
                    "epochs_reached": steps,
                    "reason": "pruned" if state == TrialState.PRUNED else None,
                },
            )
        )
    study.add_trials(trials)
    return study


def synthetic(
    f: Callable[[float, random.Random], float], n: int, seed: int = 0, direction: str = "maximize"
) -> optuna.Study:
    """An in-memory study over lr (log 1e-3..10) whose value is f(log10(lr), rng)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rnd = random.Random(seed)
    study = optuna.create_study(direction=direction)
    xs = [10 ** rnd.uniform(-3, 1) for _ in range(n)]
    study.add_trials(
        [create_trial(value=f(math.log10(x), rnd), params={"lr": x}, distributions={"lr": DISTS["lr"]}) for x in xs]
    )
    return study
