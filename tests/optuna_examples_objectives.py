"""The shapes of Optuna's documented examples, written from Optuna's public APIs (``kind:
optuna_examples_objectives:NAME``), for tests/test_optuna_examples.py. Each is tiny: a few steps of arithmetic in place
of a model, so a test runs in seconds.

No hpo import here, as in a user's own module; the tests put this folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

# --------------------------------------------------------------------------- pruning: report / should_prune


def basic_pruning(trial: optuna.Trial) -> float:
    """Optuna's pruning tutorial: report an intermediate value each step, ask the pruner, raise TrialPruned.
    The "training" is a loss that decays towards (x - 2)^2."""
    x = trial.suggest_float("x", -10.0, 10.0)
    loss = 0.0
    for step in range(8):
        loss = (x - 2.0) ** 2 + 10.0 / (step + 1)
        trial.report(loss, step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return loss


# --------------------------------------------------------------------------- pruning: an integration's callback


class PruningCallback:
    """The shape of optuna-integration's LightGBM/XGBoost pruning callbacks: the training library calls it after each
    boosting round with its evaluation results; it reports to the trial and raises TrialPruned with a message."""

    def __init__(self, trial: optuna.Trial, observation_key: str) -> None:
        self.trial, self.key = trial, observation_key

    def __call__(self, env: dict[str, Any]) -> None:
        score, step = env["evaluation"][self.key], env["iteration"]
        self.trial.report(score, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"Trial was pruned at iteration {step}.")


def _train(params: dict[str, Any], rounds: int, callbacks: list[Callable[[dict[str, Any]], None]]) -> float:
    """A stand-in for ``lgb.train`` / ``xgb.train``: rounds of a validation error that falls with the learning rate."""
    error = 1.0
    for i in range(rounds):
        error *= 1.0 - params["eta"] / (1 + params["max_depth"])
        for cb in callbacks:
            cb({"iteration": i, "evaluation": {"validation-error": error}})
    return error


def boosting(trial: optuna.Trial) -> float:
    params = {
        "eta": trial.suggest_float("eta", 0.001, 0.9, log=True),
        "max_depth": trial.suggest_int("max_depth", 1, 9),
    }
    return _train(params, 6, [PruningCallback(trial, "validation-error")])


# --------------------------------------------------------------------------- several objectives, no metric names


def quadratic_pair(trial: optuna.Trial) -> tuple[float, float]:
    """Optuna's multi-objective tutorial shape: two objectives of two parameters, ``directions`` only."""
    x = trial.suggest_float("x", 0.0, 5.0)
    y = trial.suggest_float("y", 0.0, 3.0)
    return 4 * x**2 + 4 * y**2, (x - 5) ** 2 + (y - 5) ** 2


# --------------------------------------------------------------------------- enqueue_trial: the objective's own names


def own_names(trial: optuna.Trial) -> float:
    """Suggests its own parameters (no ``space:`` needed); ``enqueue_trial({"x": ..., "kind": ...})`` fixes them."""
    x = trial.suggest_float("x", -10.0, 10.0)
    kind = trial.suggest_categorical("kind", ["a", "b"])
    return x**2 + (1.0 if kind == "a" else 0.0)


# --------------------------------------------------------------------------- a sampler's constraints_func


def x_at_most_3(trial: optuna.trial.FrozenTrial) -> list[float]:
    """``constraints_func`` of Optuna's samplers: feasible when every value is <= 0."""
    return [trial.params["x"] - 3.0]


def maximise_x(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0.0, 10.0)


# --------------------------------------------------------------------------- callbacks and study.stop()


def record(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A logging callback: stores what it was given (the frozen trial's number, state and value) on the study."""
    study.set_user_attr(f"seen.{trial.number}", [trial.state.name, trial.value])


def stop_after_four(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """An early-stopping callback: stop once four trials have completed."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 4:
        study.stop()


def stops_at_two(trial: optuna.Trial) -> float:
    """Optuna's ``Study.stop`` example: the objective stops the study from inside trial 2 (which still completes)."""
    if trial.number == 2:
        trial.study.stop()
    return trial.suggest_float("x", 0.0, 10.0)


# --------------------------------------------------------------------------- a long objective that never checks in


def sleeps_a_minute(trial: optuna.Trial) -> float:
    """A plain objective that runs 60 s and never calls hpo's ``check_stop()``."""
    x = trial.suggest_float("x", 0.0, 1.0)
    time.sleep(60)
    return x
