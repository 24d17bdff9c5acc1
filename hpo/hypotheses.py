"""Predictions written in a study file, checked against the study's COMPLETE trials, with verdicts a learner reads.

Each prediction (:class:`hpo.spec.Prediction`) names a parameter, a claim about how the *result* moves with it (the
metric oriented so that higher is better: a minimised metric is negated) and, where the claim needs one, its
direction (``better: lower | higher``: which end of the range the claim says is better).

Which trials. Where the study is a designed experiment (:mod:`hpo.design`) with a one-factor-at-a-time sweep of the
parameter, only that sweep's trials count (the other hyperparameters held at the baseline: the controlled
comparison the lesson makes by hand). Otherwise every COMPLETE trial that has the parameter counts.

Groups. The trials are grouped by the parameter's value where it takes few values (a sweep: one group per point, one
trial per seed), else into 6 equal-width bins of its range (log10 scale for a log range). Every interval below is a
95 % bootstrap interval, resampling trials within each group.

* ``rho``: Spearman rank correlation between the parameter and the result;
* the *peak*: the group with the best mean, and where it lies. The range is split into thirds (low, middle, high,
  on the parameter's own scale); the peak's interval is the set of groups that are best in 95 % of the resamples;
* the *drop* from the peak to the lowest and to the highest group (in the metric's units): "rises then falls"
  means both drops' intervals lie above 0;
* the change of slope between the lower and the upper half of the range (for diminishing returns);
* *flat*: ``rho``'s interval inside (-0.2, 0.2) and a Kruskal-Wallis test across the groups finds no difference.

=====================  ================================================  ==========================================
claim                  supported when                                    refuted when
=====================  ================================================  ==========================================
increasing             rho interval above 0                              rho interval below +0.2
decreasing             rho interval below 0                              rho interval above -0.2
no_effect              flat                                              rho interval excludes 0, or the groups
                                                                         differ (Kruskal-Wallis p < 0.05)
diminishing_returns    a trend towards the ``better`` end (either end    flat; a trend away from it; the peak
                       if not given) whose slope shrinks towards it      away from that end, falling to it; or
                       (slope change interval above 0)                   returns that grow (interval below 0)
interior_optimum       peak in the middle third, rises then falls        peak in an outer third, a trend with no
                                                                         significant fall, or flat
optimum_near_edge      peak in the ``better`` outer third (either if     flat; the peak outside that third,
                       not given), or a trend towards that edge with no  falling to its edge; a trend towards the
                       significant fall at the edge                      other edge
=====================  ================================================  ==========================================

Anything in between is ``not enough evidence`` (the verdict then says what to run), and so is every claim resting
on fewer than :data:`MIN_TRIALS` trials or 3 groups. A categorical parameter supports only ``no_effect``
(Kruskal-Wallis test across its choices). Each verdict carries one plain sentence with the size of the effect in the
metric's units (``reason``), the id of the report's plot that shows it (``plot``) and, when the evidence is short,
what to run (``next_step``).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState
from scipy import stats

from hpo.spec import Prediction

#: below this many COMPLETE trials carrying the parameter, every verdict is "not enough evidence".
MIN_TRIALS = 12
#: |rho| below this counts as no practical effect.
SMALL_RHO = 0.2
#: the outer fraction of the range at each end that counts as "near an edge" (thirds: low, middle, high).
EDGE = 1 / 3
#: a parameter with at most this many distinct values is grouped by value, else binned into :data:`N_BINS`.
MAX_GROUPS = 12
N_BINS = 6
N_BOOT = 1000
SUPPORTED, REFUTED, UNKNOWN = "supported", "refuted", "not enough evidence"
_EPS = 1e-9
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Verdict:
    """The outcome of checking one prediction.

    ``reason`` is one plain sentence with the effect in the metric's units; ``plot`` the id of the report's plot
    that shows it; ``next_step`` what to run when the evidence is short (else None)."""

    param: str
    claim: str
    verdict: str
    n_trials: int
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
    better: str | None = None
    plot: str | None = None
    next_step: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return asdict(self)


def claim_words(claim: str, param: str, better: str | None = None) -> str:
    """A claim in plain words, as a learner would say it (``optimum_near_edge``, lower: "the best batch_size is at
    the low end of its range")."""
    end = {"lower": "low", "higher": "high"}.get(better or "")
    if claim == "increasing":
        return f"the result rises as {param} grows"
    if claim == "decreasing":
        return f"the result falls as {param} grows"
    if claim == "no_effect":
        return f"{param} makes no difference"
    if claim == "diminishing_returns":
        if better:
            return f"{'lowering' if better == 'lower' else 'raising'} {param} helps less and less"
        return f"moving {param} towards one end of its range helps less and less"
    if claim == "interior_optimum":
        return f"the best {param} lies inside its range, away from both ends"
    if claim == "optimum_near_edge":
        return (
            f"the best {param} is at the {end} end of its range"
            if end
            else f"the best {param} is at one end of its range"
        )
    return claim.replace("_", " ")


def plot_id(param: str) -> str:
    """The HTML id of the report's plot of ``param``'s effect (:mod:`hpo.report`)."""
    return f"plot-effect-{_SAFE.sub('_', param)}"


def _fmt(v: float) -> str:
    """3 significant figures, never in exponent notation for numbers a learner types (16 to 10000)."""
    text = f"{v:.3g}"
    return f"{v:.0f}" if "e+" in text else text


def _delta(v: float) -> str:
    """A difference's size, 2 significant figures, whole numbers written out (1200, not 1.2e+03)."""
    text = f"{abs(v):.2g}"
    return f"{float(text):.0f}" if "e+" in text else text


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
        return np.nan_to_num(np.sum(ru * ry, axis=1) / np.sqrt(np.sum(ru**2, axis=1) * np.sum(ry**2, axis=1)))


def _ci(a: np.ndarray) -> tuple[float, float]:
    a = a[np.isfinite(a)]
    if len(a) < N_BOOT // 2:
        return (math.nan, math.nan)
    lo, hi = np.percentile(a, [2.5, 97.5])
    return float(lo), float(hi)


def _groups(u: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Index arrays of the groups (by value, or 6 equal-width bins of [0, 1]) and each group's position."""
    values = np.unique(np.round(u, 9))
    if len(values) <= MAX_GROUPS:
        idx = [np.flatnonzero(np.isclose(u, v, atol=1e-9)) for v in values]
        return idx, values
    b = np.clip(np.floor(u * N_BINS).astype(int), 0, N_BINS - 1)
    idx = [np.flatnonzero(b == k) for k in range(N_BINS)]
    keep = [k for k in range(N_BINS) if len(idx[k]) >= 2]
    return [idx[k] for k in keep], np.array([float(np.median(u[idx[k]])) for k in keep])


def _zone(u: float) -> str:
    return "low" if u <= EDGE + _EPS else ("high" if u >= 1 - EDGE - _EPS else "middle")


def _evidence(u: np.ndarray, y: np.ndarray, seed: int) -> dict[str, Any]:
    """Point estimates and stratified bootstrap intervals; ``u`` is the parameter rescaled to [0, 1]."""
    rng = np.random.default_rng(seed)
    groups, pos = _groups(u)
    k = len(groups)
    parts = [g[rng.integers(0, len(g), size=(N_BOOT, len(g)))] for g in groups]
    idx = np.concatenate([np.concatenate(groups)[None, :], np.concatenate(parts, axis=1)])
    ub, yb = u[idx], y[idx]
    sizes = [len(g) for g in groups]
    bounds = np.cumsum([0, *sizes])
    means = np.stack([yb[:, bounds[j] : bounds[j + 1]].mean(axis=1) for j in range(k)], axis=1)  # (1+B, k)
    rho = _spearman(ub, yb)
    c, vertex = _quadratic(ub, yb)
    s_low, s_high = _slopes(ub, yb, float(np.median(u)))
    peak = int(np.argmax(means[0]))
    counts = np.bincount(np.argmax(means[1:], axis=1), minlength=k) / N_BOOT
    order = np.argsort(-counts)
    kept = order[: int(np.searchsorted(np.cumsum(counts[order]), 0.95 - _EPS)) + 1]
    flat_p = float(stats.kruskal(*[y[g] for g in groups]).pvalue) if k >= 2 and np.ptp(y) > 0 else 1.0
    ev: dict[str, Any] = {
        "rho": float(rho[0]),
        "rho_ci": _ci(rho[1:]),
        "groups": [
            {
                "u": float(p),
                "n": int(len(g)),
                "mean": float(means[0, j]),
                "sd": float(np.std(y[g], ddof=1)) if len(g) > 1 else 0.0,
            }
            for j, (p, g) in enumerate(zip(pos, groups, strict=True))
        ],
        "peak": peak,
        "peak_u_range": (float(pos[kept].min()), float(pos[kept].max())),
        "peak_zones": sorted({_zone(float(pos[j])) for j in kept}),
        "drop_low_ci": _ci(means[1:, peak] - means[1:, 0]),
        "drop_high_ci": _ci(means[1:, peak] - means[1:, -1]),
        "slope_change_ci": _ci(s_low[1:] - s_high[1:]),
        "kruskal_p": flat_p,
        "curvature": float(c[0]),
        "optimum_u": float(vertex[0]) if c[0] < 0 else None,
        "optimum_u_ci": _ci(vertex[1:][c[1:] < 0]) if (c[1:] < 0).sum() >= N_BOOT // 2 else None,
    }
    return ev


def _numeric(dist: Any) -> bool:
    return isinstance(dist, FloatDistribution | IntDistribution)


class _Words:
    """Sentences about one parameter's groups, in the metric's own units and direction."""

    def __init__(self, name: str, metric: str, sign: float, ev: dict[str, Any], at: Any) -> None:
        self.name, self.metric, self.sign, self.ev, self.at = name, metric, sign, ev, at

    def x(self, j: int) -> str:
        return _fmt(self.at(self.ev["groups"][j]["u"]))

    def m(self, j: int) -> float:
        return self.sign * self.ev["groups"][j]["mean"]

    def change(self, a: int, b: int) -> str:
        """'val_accuracy rises by 0.05 from lr 0.001 (0.52) to 0.1 (0.57)'."""
        d = self.m(b) - self.m(a)
        verb = "rises" if d > 0 else "falls" if d < 0 else "stays"
        by = f" by {_delta(d)}" if d != 0 else ""
        return (
            f"{self.metric} {verb}{by} from {self.name} {self.x(a)} ({_fmt(self.m(a))}) to {self.x(b)} "
            f"({_fmt(self.m(b))})"
        )

    def peak(self) -> str:
        p = self.ev["peak"]
        return f"{self.metric} is best at {self.name} {self.x(p)} ({_fmt(self.m(p))}, in the {_zone(self.ev['groups'][p]['u'])} third of the range)"

    def flat(self) -> str:
        g = self.ev["groups"]
        ms = [self.m(j) for j in range(len(g))]
        return (
            f"{self.metric} barely changes with {self.name}: group means stay within {_fmt(min(ms))} to "
            f"{_fmt(max(ms))} from {self.x(0)} to {self.x(len(g) - 1)}"
        )


def _judge(claim: str, better: str | None, ev: dict[str, Any], w: _Words) -> tuple[str, str]:
    """(verdict, sentence) for one claim; see the module docstring for the rules."""
    rlo, rhi = ev["rho_ci"]
    dlo, dhi = ev["slope_change_ci"]
    g = ev["groups"]
    last, p = len(g) - 1, ev["peak"]
    zones = set(ev["peak_zones"])
    falls_low = ev["drop_low_ci"][0] > 0  # the result falls significantly from the peak to the lowest group
    falls_high = ev["drop_high_ci"][0] > 0
    up, down = rlo > 0, rhi < 0
    flat = -SMALL_RHO < rlo and rhi < SMALL_RHO and ev["kruskal_p"] >= 0.05
    rises_then_falls = falls_low and falls_high and zones == {"middle"}
    whole = w.change(0, last)
    if claim in ("increasing", "decreasing"):
        inc = claim == "increasing"
        if up if inc else down:
            return SUPPORTED, whole
        if (rhi < SMALL_RHO) if inc else (rlo > -SMALL_RHO):
            tail = f"; {w.peak()}" if 0 < p < last else ""
            return REFUTED, f"no {'rise' if inc else 'fall'} of practical size: {whole}{tail}"
        return UNKNOWN, f"{whole}, but the seeds disagree too much to call it a trend"
    if claim == "no_effect":
        if up or down or ev["kruskal_p"] < 0.05:
            return REFUTED, f"{w.peak()}; {whole}"
        if flat:
            return SUPPORTED, w.flat()
        return UNKNOWN, f"{whole}, within the noise, but a small effect cannot be ruled out"
    ends = [better] if better else ["lower", "higher"]
    if claim == "diminishing_returns":
        if flat:
            return REFUTED, f"no trend to diminish: {w.flat()}"
        for end in ends:
            near, far = (0, last) if end == "lower" else (last, 0)
            toward = down if end == "lower" else up
            zone = "low" if end == "lower" else "high"
            falls = falls_low if end == "lower" else falls_high
            verb = "lowering" if end == "lower" else "raising"
            if better and zone not in zones and falls:
                return REFUTED, f"{verb} {w.name} stops helping at {w.x(p)}: {w.change(p, near)}"
            if better and (up if end == "lower" else down):
                return REFUTED, f"{verb} {w.name} makes it worse: {w.change(far, near)}"
            if toward and not falls and dlo > 0:
                mid = int(np.argmin([abs(x["u"] - 0.5) for x in g]))
                return SUPPORTED, (
                    f"{w.change(far, mid)}, then changes by only {_delta(w.m(near) - w.m(mid))} more from {w.name} "
                    f"{w.x(mid)} to {w.x(near)}: the gains flatten out"
                )
            if toward and not falls and dhi < 0:
                return REFUTED, f"{whole}, and the gains grow rather than flatten towards {w.name} {w.x(near)}"
        if rises_then_falls:
            return REFUTED, f"it turns rather than levels off: {w.peak()}, worse towards both edges"
        return UNKNOWN, f"{whole}; whether the gains flatten out is within the noise"
    if claim == "interior_optimum":
        if rises_then_falls:
            return (
                SUPPORTED,
                f"{w.peak()}; it is worse by {_delta(w.m(p) - w.m(0))} towards {w.name} {w.x(0)} and by {_delta(w.m(p) - w.m(last))} towards {w.x(last)}",
            )
        if flat:
            return REFUTED, f"no optimum: {w.flat()}"
        if "middle" not in zones or ((up or down) and not (falls_low and falls_high)):
            return REFUTED, f"{w.peak()}; {whole}"
        return UNKNOWN, f"{w.peak()}, but where the peak lies is within the noise"
    if claim == "optimum_near_edge":
        if flat:
            return REFUTED, f"no optimum: {w.flat()}"
        for end in ends:
            zone = "low" if end == "lower" else "high"
            edge_j = 0 if end == "lower" else last
            toward = down if end == "lower" else up
            falls = falls_low if end == "lower" else falls_high
            if zones == {zone} or (toward and not falls):
                return SUPPORTED, f"{w.peak()}; {w.change(edge_j, last - edge_j)}"
        if rises_then_falls:
            return REFUTED, f"the optimum is in the middle: {w.peak()}, worse towards both edges"
        if better:
            zone = "low" if better == "lower" else "high"
            other = down if better == "higher" else up
            falls = falls_low if better == "lower" else falls_high
            if (zone not in zones and falls) or other:
                edge_j = 0 if better == "lower" else last
                return REFUTED, f"{w.peak()}, not near the {better} edge: {w.change(p, edge_j)}"
        return UNKNOWN, f"{w.peak()}, but where the peak lies is within the noise"
    raise ValueError(f"unknown claim {claim!r}")  # pragma: no cover - spec validates claims


def _to_param_scale(u: float, low: float, high: float, log: bool) -> float:
    u = min(max(u, -5.0), 6.0)  # far beyond the range either way; keeps 10**x finite
    if log:
        return float(10 ** (math.log10(low) + u * (math.log10(high) - math.log10(low))))
    return float(low + u * (high - low))


def _trials(study: optuna.Study, name: str) -> tuple[list[FrozenTrial], bool]:
    """The trials that count for ``name``: its design sweep where there is one, else every COMPLETE trial."""
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if name in t.params and t.value is not None and math.isfinite(t.value)
    ]
    swept = [t for t in trials if name in (t.user_attrs.get("sweeps") or ())]
    return (swept, True) if swept else (trials, False)


def _next_step(name: str, swept: bool, n: int) -> str:
    if swept:
        return (
            f"run more seeds per point: raise design.seeds in the study file (now {n} trials on the {name} sweep), "
            "then hpo run with a new study name and hpo check it"
        )
    return (
        f"measure {name} on its own: add a design with a sweep of {name} (several seeds per point, no pruner), or "
        f"raise budget.n_trials; then hpo run and hpo check again"
    )


def check_prediction(study: optuna.Study, prediction: Prediction, seed: int = 0) -> Verdict:
    """Check one prediction against a study's COMPLETE trials (its design sweep of the parameter, if any)."""
    name, claim = prediction.param, prediction.claim
    trials, swept = _trials(study, name)
    n = len(trials)
    metric = str(study.user_attrs.get("metric") or "the result")
    base = {
        "param": name,
        "claim": claim,
        "n_trials": n,
        "note": prediction.note,
        "better": prediction.better,
        "plot": plot_id(name),
    }
    source = f"the {name} sweep of the design" if swept else "every complete trial"
    if not swept and getattr(study, "sampled", False):  # query.TrialsView of a big study
        source = f"{study.used:,} of {study.total:,} complete trials, drawn uniformly at random (seed {study.seed})"
    if n < MIN_TRIALS:
        return Verdict(
            verdict=UNKNOWN,
            reason=f"{n} complete trials with {name}; at least {MIN_TRIALS} are needed.",
            evidence={"source": source},
            next_step=_next_step(name, swept, n),
            **base,
        )
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    sign = 1.0 if maximize else -1.0
    y = np.array([sign * t.value for t in trials], dtype=float)  # type: ignore[operator]
    dist = trials[-1].distributions[name]
    if isinstance(dist, CategoricalDistribution) or not _numeric(dist):
        groups: dict[str, list[float]] = {}
        for t, v in zip(trials, y, strict=True):
            groups.setdefault(str(t.params[name]), []).append(sign * v)
        if claim != "no_effect" or len(groups) < 2:
            return Verdict(verdict=UNKNOWN, reason=f"claim {claim!r} needs a numeric parameter", **base)
        p = float(stats.kruskal(*groups.values()).pvalue)
        means = {k: float(np.mean(v)) for k, v in groups.items()}
        hi, lo = max(means, key=means.__getitem__), min(means, key=means.__getitem__)
        spread = f"mean {metric} from {_fmt(means[lo])} ({lo}) to {_fmt(means[hi])} ({hi})"
        verdict = REFUTED if p < 0.05 else SUPPORTED
        says = "the choices differ" if p < 0.05 else "no difference beyond the noise"
        return Verdict(
            verdict=verdict,
            reason=f"{says}: {spread} (Kruskal-Wallis p = {_fmt(p)})",
            evidence={"kruskal_p": p, "means": means},
            **base,
        )
    low, high, log = float(dist.low), float(dist.high), bool(dist.log)
    x = np.array([float(t.params[name]) for t in trials])
    if high == low or np.ptp(x) == 0:
        return Verdict(
            verdict=UNKNOWN,
            reason=f"{name} does not vary across the trials",
            next_step=_next_step(name, False, n),
            **base,
        )
    if log:
        u = (np.log10(x) - math.log10(low)) / (math.log10(high) - math.log10(low))
    else:
        u = (x - low) / (high - low)
    if len(_groups(u)[0]) < 3:
        return Verdict(
            verdict=UNKNOWN,
            reason=f"{name} takes fewer than 3 values (with 2 trials or more each)",
            next_step=_next_step(name, swept, n),
            **base,
        )
    ev = _evidence(u, y, seed)

    def at(v: float) -> float:
        return _to_param_scale(v, low, high, log)

    verdict, reason = _judge(claim, prediction.better, ev, _Words(name, metric, sign, ev, at))
    reason += "."
    ev["scale"] = "log10" if log else "linear"
    ev["source"] = source
    for grp in ev["groups"]:
        grp["value"] = at(grp["u"])
        grp["mean"] *= sign
    ev["peak_range"] = (at(ev["peak_u_range"][0]), at(ev["peak_u_range"][1]))
    if ev["optimum_u"] is not None:
        ev["optimum"] = at(ev["optimum_u"])
    if ev["optimum_u_ci"] is not None:
        ev["optimum_ci"] = (at(ev["optimum_u_ci"][0]), at(ev["optimum_u_ci"][1]))
    next_step = _next_step(name, swept, n) if verdict == UNKNOWN else None
    return Verdict(verdict=verdict, reason=reason, evidence=ev, next_step=next_step, **base)


def check(study: optuna.Study, predictions: list[Prediction], seed: int = 0) -> list[Verdict]:
    """Check every prediction; see the module docstring for the rules."""
    return [check_prediction(study, p, seed=seed) for p in predictions]


def predictions_of(user_attrs: dict[str, Any], study_name: str, spec: Any = None) -> list[Prediction]:
    """The predictions of ``spec`` (a :class:`hpo.spec.StudySpec`), else of the study file stored with the study
    (its ``hpo:spec`` user attribute; none where it does not parse)."""
    from hpo.errors import SpecError
    from hpo.spec import parse_spec

    if spec is not None:
        return list(spec.predictions)
    stored = user_attrs.get("hpo:spec")  # where hpo.worker.study stores the study file (its SPEC_ATTR)
    if stored is None:
        return []
    try:
        return list(parse_spec(stored, f"stored study {study_name!r}").predictions)
    except SpecError:
        return []


def check_study(storage_url: str, study_name: str, spec: Any = None, seed: int = 0) -> list[Verdict]:
    """Verdicts on the predictions of ``spec`` (or of the study file stored with the study), read by SQL: only the
    predicted parameters of the COMPLETE trials, and beyond :data:`hpo.query.SAMPLE_SIZE` of them a uniform random
    sample (seed 0; every trial of a design sweep kept) that each verdict's ``evidence["source"]`` states
    (:func:`hpo.query.complete_trials`): time and memory bounded whatever the study's size.

    Raises:
        StudyError: no such study.
    """
    from hpo import query

    preds = predictions_of(query.study_user_attrs(storage_url, study_name), study_name, spec)
    if not preds:
        return []
    view = query.complete_trials(storage_url, study_name, sorted({p.param for p in preds}), seed=seed)
    return check(view, preds, seed=seed)  # type: ignore[arg-type]
