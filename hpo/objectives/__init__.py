"""Objectives: one module per kind, a registry by name, and ``module:function`` for users' own.

An objective is ``fn(trial, context) -> float``. It reports intermediate values to the trial so pruners can stop it,
raises :class:`optuna.TrialPruned` when told to (or when its run diverges, with ``reason`` in the trial's user
attributes), and calls ``context.check_stop()`` often enough that a worker asked to stop is not kept waiting.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna

from hpo.errors import HpoError, SpecError
from hpo.spec import CustomObjective, StudySpec


class Interrupted(Exception):
    """Raised inside an objective when its worker was asked to stop; the worker re-queues the trial."""


@dataclass
class Context:
    """What an objective gets besides the trial: the study file, the trial's parameters and seed, where to run."""

    spec: StudySpec
    params: dict[str, Any]
    seed: int
    threads: int | None = None
    device: str = "cpu"
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def options(self) -> dict[str, Any]:
        """Extra keys of a custom objective's section of the study file."""
        obj = self.spec.objective
        return dict(obj.model_extra or {}) if isinstance(obj, CustomObjective) else {}

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted("worker asked to stop")


Objective = Callable[[optuna.trial.BaseTrial, Context], float]


def _training() -> Objective:
    from hpo.objectives.training import objective

    return objective


def _grokking() -> Objective:
    from hpo.objectives.grokking import objective

    return objective


REGISTRY: dict[str, Callable[[], Objective]] = {"training": _training, "grokking": _grokking}


def resolve(kind: str) -> Objective:
    """The objective for a ``kind``: a registered name or ``package.module:function``."""
    if kind in REGISTRY:
        return REGISTRY[kind]()
    module_name, _, func_name = kind.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of the user's module
        raise SpecError(f"objective.kind: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise SpecError(f"objective.kind: {module_name!r} has no function {func_name!r}")
    return fn


def trial_seed(spec: StudySpec, trial_number: int) -> int:
    """Each trial's seed: the study's base seed and the trial number, stored with the trial."""
    return (spec.objective.seed * 1_000_003 + trial_number) % (2**31 - 1)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else is checked and kept.

    ``cpu`` is kept without importing torch (a second of start-up for workers whose objective does not use it)."""
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HpoError(f"device {device!r}: no CUDA device is available here")
    if device != "cpu" and not device.startswith("cuda"):
        raise HpoError(f"device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


__all__ = ["Context", "Interrupted", "Objective", "REGISTRY", "resolve", "resolve_device", "trial_seed"]
