"""Predictions written in a study file, checked against the study's COMPLETE trials.

Each prediction (:class:`hpo.spec.Prediction`) names a parameter and a claim about how the *result* moves with it
(the metric oriented so that higher is better: a minimised metric is negated). The evidence, computed on the
parameter's own scale (log10 where its range is log):

* Spearman rank correlation ``rho`` between the parameter and the result, with a 95 % bootstrap interval;
* a quadratic fit of the result on the parameter rescaled to [0, 1] over its range: the curvature ``c`` and, where
  ``c < 0``, the location of the fitted optimum, each with a bootstrap interval; "rises then falls" means the
  least-squares slopes left and right of that optimum have intervals above and below 0;
* the change of slope between the lower and the upper half of the range (for diminishing returns).

=====================  ================================================  ==========================================
claim                  supported when                                    refuted when
=====================  ================================================  ==========================================
increasing             rho interval above 0                              rho interval below +0.2
decreasing             rho interval below 0                              rho interval above -0.2
no_effect              rho interval inside (-0.2, 0.2), c interval       rho or c interval excludes 0
                       contains 0
diminishing_returns    a trend (rho excludes 0) whose slope shrinks      no trend, slope grows towards the better
                       towards the better end (slope change > 0)         end, or an interior optimum
interior_optimum       c < 0, optimum interval in the middle 60 %,       a trend with no turn, or the optimum
                       rises then falls                                  interval in an outer 20 %
optimum_near_edge      a trend with no turn, or the optimum interval     an interior optimum (as above)
                       in an outer 20 % (or beyond the range)
=====================  ================================================  ==========================================

Anything in between is ``not enough evidence``, and so is every claim resting on fewer than :data:`MIN_TRIALS`
trials. A categorical parameter supports only ``no_effect`` (Kruskal-Wallis test across its choices).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from scipy import stats

from hpo.spec import Prediction

#: below this many COMPLETE trials carrying the parameter, every verdict is "not enough evidence".
MIN_TRIALS = 12
#: |rho| below this counts as no practical effect.
SMALL_RHO = 0.2
#: the outer fraction of the range at each end that counts as "near an edge".
EDGE = 0.2
N_BOOT = 1000
SUPPORTED, REFUTED, UNKNOWN = "supported", "refuted", "not enough evidence"


@dataclass
class Verdict:
    """The outcome of checking one prediction."""

    param: str
    claim: str
    verdict: str
    n_trials: int
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return asdict(self)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _quadratic(u: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise least-squares parabola ``y = a + b u + c u^2``: (c, vertex) per row of ``u`` and ``y`` (B x n)."""
    sk = [np.sum(u**k, axis=1) for k in range(5)]
    tk = [np.sum(y * u**k, axis=1) for k in range(3)]
    m = np.stack([np.stack([sk[i + j] for j in range(3)], axis=-1) for i in range(3)], axis=-2)
    rhs = np.stack(tk, axis=-1)
    ok = np.abs(np.linalg.det(m)) > 1e-12
    coef = np.full((len(u), 3), np.nan)
    coef[ok] = np.linalg.solve(m[ok], rhs[ok][..., None])[..., 0]
    c, b = coef[:, 2], coef[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = np.where(c != 0, -b / (2 * c), np.nan)
    return c, vertex


def _slopes(u: np.ndarray, y: np.ndarray, split: float) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise least-squares slopes of y on u left and right of ``split`` (NaN with fewer than 4 points)."""
    out = []
    for mask in (u < split, u >= split):
        n = mask.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            mu = np.sum(u * mask, axis=1) / n
            my = np.sum(y * mask, axis=1) / n
            cov = np.sum((u - mu[:, None]) * (y - my[:, None]) * mask, axis=1)
            var = np.sum((u - mu[:, None]) ** 2 * mask, axis=1)
            out.append(np.where((n >= 4) & (var > 0), cov / var, np.nan))
    return out[0], out[1]


def _spearman(u: np.ndarray, y: np.ndarray) -> np.ndarray:
    ru, ry = stats.rankdata(u, axis=1), stats.rankdata(y, axis=1)
    ru -= ru.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sum(ru * ry, axis=1) / np.sqrt(np.sum(ru**2, axis=1) * np.sum(ry**2, axis=1))


def _ci(a: np.ndarray) -> tuple[float, float]:
    a = a[np.isfinite(a)]
    if len(a) < N_BOOT // 2:
        return (math.nan, math.nan)
    lo, hi = np.percentile(a, [2.5, 97.5])
    return float(lo), float(hi)


def _evidence(u: np.ndarray, y: np.ndarray, seed: int) -> dict[str, Any]:
    """Point estimates and bootstrap intervals; ``u`` is the parameter rescaled to [0, 1] over its range."""
    rng = np.random.default_rng(seed)
    idx = np.concatenate([np.arange(len(u))[None, :], rng.integers(0, len(u), size=(N_BOOT, len(u)))])
    ub, yb = u[idx], y[idx]
    rho = _spearman(ub, yb)
    c, vertex = _quadratic(ub, yb)
    s_low, s_high = _slopes(ub, yb, float(np.median(u)))
    vertex0 = float(vertex[0]) if c[0] < 0 else None
    ev: dict[str, Any] = {
        "rho": float(np.nan_to_num(rho[0])),
        "rho_ci": _ci(rho[1:]),
        "curvature": float(c[0]),
        "curvature_ci": _ci(c[1:]),
        "optimum_u": vertex0,
        "optimum_u_ci": _ci(vertex[1:][c[1:] < 0]) if (c[1:] < 0).sum() >= N_BOOT // 2 else None,
        "slope_change_ci": _ci(s_low[1:] - s_high[1:]),
        "turn": None,
    }
    if vertex0 is not None and 0 < vertex0 < 1:
        left, right = _slopes(ub, yb, vertex0)
        ev["turn"] = {"split_u": vertex0, "slope_left_ci": _ci(left[1:]), "slope_right_ci": _ci(right[1:])}
    return ev


def _numeric(dist: Any) -> bool:
    return isinstance(dist, FloatDistribution | IntDistribution)


def _judge(claim: str, ev: dict[str, Any]) -> tuple[str, str]:
    rlo, rhi = ev["rho_ci"]
    clo, chi = ev["curvature_ci"]
    dlo, dhi = ev["slope_change_ci"]
    oci = ev["optimum_u_ci"]
    turn = ev["turn"]
    rho_txt = f"rho {_fmt(ev['rho'])} [{_fmt(rlo)}, {_fmt(rhi)}]"
    trend = rlo > 0 or rhi < 0
    flat = -SMALL_RHO < rlo and rhi < SMALL_RHO
    # an interior optimum: a concave fit whose vertex lies in the middle of the range, and the result rises
    # before it and falls after it (both slopes' intervals exclude 0)
    turns = turn is not None and turn["slope_left_ci"][0] > 0 and turn["slope_right_ci"][1] < 0
    interior = chi < 0 and oci is not None and EDGE <= oci[0] and oci[1] <= 1 - EDGE and turns
    at_edge = oci is not None and (oci[1] <= EDGE or oci[0] >= 1 - EDGE)
    where = f"optimum at {_fmt(oci[0])}..{_fmt(oci[1])} of the range" if oci is not None else ""
    if claim in ("increasing", "decreasing"):
        up = claim == "increasing"
        if (rlo > 0) if up else (rhi < 0):
            return SUPPORTED, f"{rho_txt}: the result {'rises' if up else 'falls'} with the parameter"
        if (rhi < SMALL_RHO) if up else (rlo > -SMALL_RHO):
            return REFUTED, f"{rho_txt}: no {'rise' if up else 'fall'} of practical size"
        return UNKNOWN, f"{rho_txt}: the interval is too wide to tell"
    if claim == "no_effect":
        if trend or interior or clo > 0 or chi < 0:
            return REFUTED, f"{rho_txt}, curvature [{_fmt(clo)}, {_fmt(chi)}]: the parameter matters"
        if flat:
            return SUPPORTED, f"{rho_txt}, curvature interval contains 0: no effect of practical size"
        return UNKNOWN, f"{rho_txt}: the interval is too wide to tell"
    if claim == "diminishing_returns":
        change = f"slope change (low half - high half) [{_fmt(dlo)}, {_fmt(dhi)}]"
        if interior:
            return REFUTED, f"the result rises then falls ({where}): it turns rather than levels off"
        if flat:
            return REFUTED, f"{rho_txt}: no trend to diminish"
        if trend and dhi < 0:
            return REFUTED, f"{rho_txt}, {change}: returns grow towards the better end"
        if trend and dlo > 0:
            return SUPPORTED, f"{rho_txt}, {change}: gains flatten out towards the better end"
        return UNKNOWN, f"{rho_txt}, {change}: not conclusive"
    if claim == "interior_optimum":
        if interior:
            return SUPPORTED, f"concave fit, the result rises then falls, {where}"
        if at_edge or (trend and not turns):
            return REFUTED, f"{rho_txt}; the best results lie at an edge of the range"
        return UNKNOWN, f"{rho_txt}, curvature [{_fmt(clo)}, {_fmt(chi)}]: not conclusive"
    if claim == "optimum_near_edge":
        if interior:
            return REFUTED, f"concave fit, the result rises then falls, {where} (the middle)"
        if at_edge or (trend and not turns):
            return SUPPORTED, f"{rho_txt}; the best results lie at an edge of the range"
        return UNKNOWN, f"{rho_txt}, curvature [{_fmt(clo)}, {_fmt(chi)}]: not conclusive"
    raise ValueError(f"unknown claim {claim!r}")  # pragma: no cover - spec validates claims


def _to_param_scale(u: float, low: float, high: float, log: bool) -> float:
    u = min(max(u, -5.0), 6.0)  # far beyond the range either way; keeps 10**x finite
    if log:
        return float(10 ** (math.log10(low) + u * (math.log10(high) - math.log10(low))))
    return float(low + u * (high - low))


def check_prediction(study: optuna.Study, prediction: Prediction, seed: int = 0) -> Verdict:
    """Check one prediction against a study's COMPLETE trials."""
    name, claim = prediction.param, prediction.claim
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if name in t.params and t.value is not None and math.isfinite(t.value)
    ]
    n = len(trials)
    base = {"param": name, "claim": claim, "n_trials": n, "note": prediction.note}
    if n < MIN_TRIALS:
        return Verdict(verdict=UNKNOWN, reason=f"{n} complete trials with {name}; at least {MIN_TRIALS} needed", **base)
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    y = np.array([sign * t.value for t in trials], dtype=float)
    dist = trials[-1].distributions[name]
    if isinstance(dist, CategoricalDistribution) or not _numeric(dist):
        groups: dict[str, list[float]] = {}
        for t, v in zip(trials, y, strict=True):
            groups.setdefault(repr(t.params[name]), []).append(v)
        if claim != "no_effect" or len(groups) < 2:
            return Verdict(verdict=UNKNOWN, reason=f"claim {claim!r} needs a numeric parameter", **base)
        p = float(stats.kruskal(*groups.values()).pvalue)
        verdict = REFUTED if p < 0.05 else SUPPORTED
        return Verdict(
            verdict=verdict,
            reason=f"Kruskal-Wallis across {len(groups)} choices: p = {_fmt(p)}",
            evidence={"kruskal_p": p},
            **base,
        )
    low, high, log = float(dist.low), float(dist.high), bool(dist.log)
    x = np.array([float(t.params[name]) for t in trials])
    if high == low or np.ptp(x) == 0:
        return Verdict(verdict=UNKNOWN, reason=f"{name} does not vary across the trials", **base)
    if log:
        u = (np.log10(x) - math.log10(low)) / (math.log10(high) - math.log10(low))
    else:
        u = (x - low) / (high - low)
    if np.ptp(y) == 0:
        ev = {"rho": 0.0, "rho_ci": (0.0, 0.0), "curvature": 0.0, "curvature_ci": (0.0, 0.0)}
        ev |= {"optimum_u": None, "optimum_u_ci": None, "slope_change_ci": (0.0, 0.0), "turn": None}
    else:
        ev = _evidence(u, y, seed)
    verdict, reason = _judge(claim, ev)
    ev["scale"] = "log10" if log else "linear"
    if ev["optimum_u"] is not None:
        ev["optimum"] = _to_param_scale(ev["optimum_u"], low, high, log)
    if ev["optimum_u_ci"] is not None:
        lo_u, hi_u = ev["optimum_u_ci"]
        ev["optimum_ci"] = (_to_param_scale(lo_u, low, high, log), _to_param_scale(hi_u, low, high, log))
        if 0 <= lo_u and hi_u <= 1:
            reason += f" (fitted optimum {name} in {_fmt(ev['optimum_ci'][0])}..{_fmt(ev['optimum_ci'][1])})"
    return Verdict(verdict=verdict, reason=reason, evidence=ev, **base)


def check(study: optuna.Study, predictions: list[Prediction], seed: int = 0) -> list[Verdict]:
    """Check every prediction; see the module docstring for the rules."""
    return [check_prediction(study, p, seed=seed) for p in predictions]
