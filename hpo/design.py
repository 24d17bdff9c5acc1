"""Designed experiments: the trials a study file's ``design:`` section enqueues (see :class:`hpo.spec.DesignSpec`).

A lesson's questions ("what does batch size do?") are answered best as the lesson asks them: change one
hyperparameter at a time around a baseline, and run every point with several seeds so that the noise shows. A
space-filling sample of the ranges adds what one-at-a-time sweeps cannot see: interactions (lr x batch size).

Every trial carries user attributes saying where it comes from: ``design`` (``sweep`` or ``sample``) and, for sweep
points, ``sweeps`` (the parameters whose sweep the point belongs to: the baseline belongs to all of them).
:mod:`hpo.hypotheses` checks a prediction about a parameter on that parameter's sweep when the study has one.

Example:
    >>> from hpo.spec import DesignSpec
    >>> d = DesignSpec(baseline={"lr": 0.01, "epochs": 10}, sweeps={"lr": [0.001, 0.01, 0.1]}, seeds=2)
    >>> [(p["lr"], a["sweeps"]) for p, a in design_trials(d, {})][:3]
    [(0.01, ['lr']), (0.001, ['lr']), (0.1, ['lr'])]
"""

from __future__ import annotations

import math
from typing import Any

from hpo.spec import DesignSpec, FloatParam, IntParam, point_key

SWEEP, SAMPLE = "sweep", "sample"


def _key(params: dict[str, Any]) -> str:
    return point_key(params)


def sweep_points(design: DesignSpec) -> list[tuple[dict[str, Any], list[str]]]:
    """Distinct one-factor-at-a-time points (the baseline first), each with the sweeps it belongs to."""
    points: dict[str, tuple[dict[str, Any], list[str]]] = {}
    base = dict(design.baseline)
    points[_key(base)] = (base, [])
    for name, values in design.sweeps.items():
        for v in values:
            p = {**base, name: v}
            points.setdefault(_key(p), (p, []))[1].append(name)
    return [(p, sorted(set(s), key=list(design.sweeps).index)) for p, s in points.values()]


def sample_points(design: DesignSpec, space: dict[str, Any]) -> list[dict[str, Any]]:
    """``design.sample.n`` scrambled-Sobol points over the sampled ranges (log ranges on log scale)."""
    if design.sample is None:
        return []
    names = design.sample.params
    from scipy.stats import qmc  # scipy.stats takes ~1 s to import: only a study with a design pays it

    sobol = qmc.Sobol(d=len(names), scramble=True, seed=design.sample.seed)
    u = sobol.random(design.sample.n)
    out = []
    for row in u:
        p = dict(design.baseline)
        for name, x in zip(names, row, strict=True):
            entry = space[name]
            assert isinstance(entry, IntParam | FloatParam)
            lo, hi = float(entry.low), float(entry.high)
            if entry.log:
                v = 10 ** (math.log10(lo) + x * (math.log10(hi) - math.log10(lo)))
            else:
                v = lo + x * (hi - lo)
            p[name] = min(max(round(v), int(lo)), int(hi)) if isinstance(entry, IntParam) else float(v)
        out.append(p)
    return out


def design_trials(design: DesignSpec, space: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every trial of the design as (parameters, user attributes), seed round by seed round, then the sample.

    Round by round, so that a run stopped early has every point at least once.
    """
    points = sweep_points(design)
    out: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for r in range(design.seeds):
        for params, sweeps in points:
            out.append((params, {"enqueued": True, "design": SWEEP, "sweeps": sweeps, "repeat": r}))
    for params in sample_points(design, space):
        out.append((params, {"enqueued": True, "design": SAMPLE}))
    return out


def design_identity(params: dict[str, Any], attrs: dict[str, Any]) -> str:
    """Which trial of a design a trial is, from its parameters and user attributes: the point, and the seed round of
    a sweep point. A study whose creation stopped midway is completed by queueing the identities it lacks."""
    where = attrs.get("design"), attrs.get("repeat")
    return f"{where!r}:{point_key(params)}"


__all__ = ["SAMPLE", "SWEEP", "design_identity", "design_trials", "sample_points", "sweep_points"]
