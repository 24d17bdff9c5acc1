"""Objectives: one module per kind, a registry by name, and ``module:function`` for users' own.

An objective is ``fn(trial, context) -> float``; a user's own may be a plain Optuna objective ``fn(trial) -> float``
(:func:`wants_context` reads which from its signature, once), a function or a callable instance (not a class). It reports intermediate values to the trial so pruners can stop it,
raises :class:`optuna.TrialPruned` when told to (or when its run diverges, with ``reason`` in the trial's user
attributes), and calls ``context.check_stop()`` often enough that a worker asked to stop is not kept waiting.
"""

from __future__ import annotations

import inspect
import re
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
    from hpo.user_code import import_callable

    module_name, _, func_name = kind.partition(":")
    fn = import_callable(kind, "objective.kind")
    if inspect.isclass(fn):  # called with the trial, a class would build an instance, not return a value
        raise SpecError(
            f"objective.kind: {kind} is a class; name a function, or an instance of it "
            f"(e.g. objective = {func_name}(...) in {module_name}) as Optuna's study.optimize takes one"
        )
    _check_callable(fn, kind)
    from hpo.checks import check_not_shadowed

    check_not_shadowed()  # the user's module may have put a folder named hpo first on the path
    return adapt(fn)


_CONTEXT_NAMES = ("ctx", "context")
_CONTEXT_ANNOTATION = re.compile(r"\bContext\b")


def context_parameter(fn: Callable[..., Any]) -> inspect.Parameter | None:
    """The parameter through which a user's objective takes hpo's :class:`Context`, read from its signature; None for
    a plain Optuna objective ``def f(trial)``.

    The context goes to a parameter named ``ctx``/``context`` or annotated ``Context``, else to a second positional
    parameter without a default (``def f(trial, c)``). A second parameter with a default (``def f(trial,
    data=None)``) is the user's own, as Optuna leaves it: it keeps its default.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a callable without a signature: call it the Optuna way
        return None
    params = list(sig.parameters.values())
    for p in params[1:]:
        annotation = p.annotation if isinstance(p.annotation, str) else repr(p.annotation)
        if p.name in _CONTEXT_NAMES or _CONTEXT_ANNOTATION.search(annotation):
            return p
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 and positional[1].default is inspect.Parameter.empty:
        return positional[1]
    return None


def wants_context(fn: Callable[..., Any]) -> bool:
    """Whether a user's objective takes the context besides the trial (see :func:`context_parameter`)."""
    return context_parameter(fn) is not None


def _check_callable(fn: Callable[..., Any], kind: str) -> None:
    """Refuse, at load, an objective that cannot be called as hpo will call it (e.g. ``def f()``), so that the file
    is refused in one line instead of every trial failing."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    p = context_parameter(fn)
    positional = p is not None and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    try:
        if p is None:
            sig.bind(None)
        elif positional:
            sig.bind(None, None)
        else:
            sig.bind(None, **{p.name: None})
    except TypeError as exc:
        how = "f(trial)" if p is None else ("f(trial, ctx)" if positional else f"f(trial, {p.name}=ctx)")
        raise SpecError(f"objective.kind: {kind} cannot be called as {how}: {exc}") from None


def uses_context(objective: Objective) -> bool:
    """Whether hpo's :class:`Context` reaches this objective (hpo's own do; a user's when its signature asks): only
    then are the context's ``seed``, ``device`` and ``threads`` stored with its trials."""
    return bool(getattr(objective, "uses_context", True))


def adapt(fn: Callable[..., float]) -> Objective:
    """A user's objective as hpo calls it, ``objective(trial, ctx)``; decided once, from its signature.

    ``def f(trial)`` is called ``f(trial)`` (so is ``def f(trial, data=None)``); ``def f(trial, ctx)`` as it is;
    ``def f(trial, *, context)`` with ``context=ctx``.
    """
    p = context_parameter(fn)
    positional = p is not None and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    name = p.name if p is not None and not positional else None

    def objective(trial: optuna.trial.BaseTrial, ctx: Context) -> float:
        if positional:
            return fn(trial, ctx)
        return fn(trial, **{name: ctx}) if name is not None else fn(trial)

    objective.__wrapped__ = fn  # type: ignore[attr-defined]
    objective.__name__ = getattr(fn, "__name__", type(fn).__name__)
    objective.uses_context = p is not None  # type: ignore[attr-defined]
    return objective


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


__all__ = [
    "Context",
    "Interrupted",
    "Objective",
    "REGISTRY",
    "resolve",
    "resolve_device",
    "adapt",
    "context_parameter",
    "trial_seed",
    "uses_context",
    "wants_context",
]
