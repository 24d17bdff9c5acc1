"""The HTML report: the learner's questions answered, in one self-contained file (plotly.js inlined, works offline).

Sections, in the order a learner asks: a plain-words summary and the predictions' verdicts; then one section per
hyperparameter, "what does it do?", with the verdicts about it and its plot (mean and spread over seeds per point
where the study is a designed experiment, every trial as a dot, a chance line for accuracy, n per point, log axes
for log ranges); the interaction of learning rate and batch size; the optimizers (one plot, n and pruned counts);
grokking, where the study is one (training and validation accuracy over steps per trial, sorted by weight decay,
the step it generalised marked); learning curves summarised (median and middle half per outcome); which
hyperparameters matter most (seeded fANOVA, the same numbers as ``hpo importance``); the best trials as a readable
table; a short glossary. A study with no COMPLETE trial gets an honest report saying so.

:func:`figures` returns the same figures as plotly objects, by key (``effect-<param>``, ``interaction``,
``optimizer``, ``grokking-curves``, ``grokking-steps``, ``curves``, ``importances``, ``history``, and ``pareto`` for
a study with several objectives); the HTML id of each plot is ``plot-<key>``.

A study with several objectives (``metrics:``) gets its Pareto front first (Optuna's Pareto-front plot; titled
"Accuracy against compute" where one metric is an accuracy and another a cost, else by the metrics' names); its best-trials table is the front; the other figures show its first metric, and the importances
are computed for each metric.

Example:
    >>> from hpo.report import write_report
    >>> write_report("sqlite:///hpo.db", "lesson", "reports/")  # doctest: +SKIP
    PosixPath('reports/lesson.html')
"""

from __future__ import annotations

import copy
import html
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from plotly.offline import get_plotlyjs

from hpo import hypotheses, query
from hpo.errors import HpoError, SpecError
from hpo.hypotheses import Verdict, check, claim_words
from hpo.progress import metric_names
from hpo.render import visible
from hpo.spec import Prediction, StudySpec, parse_spec
from hpo.storage import is_feasible

SPEC_ATTR = "hpo:spec"  # where hpo.worker.create stores the study file
STATE_COLOURS = {"COMPLETE": "#1f77b4", "PRUNED": "#ff7f0e", "FAIL": "#d62728", "RUNNING": "#7f7f7f"}
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, suffix: str = ".html") -> str:
    """A file name made from a study name that cannot leave its folder (no separators, no leading dots)."""
    stem = _SAFE.sub("_", name).strip("._-")[:120] or "study"
    return stem + suffix


def output_path(study_name: str, output: str | Path | None) -> Path:
    """Where the report goes: ``output`` if it names a file, else ``<folder>/<safe name>.html``.

    Raises:
        HpoError: the resolved file would lie outside the chosen folder.
    """
    out = Path(output) if output is not None else Path(".")
    if out.is_dir() or str(output).endswith(("/", "\\")):
        folder = out
        target = folder / safe_filename(study_name)
        if target.resolve().parent != folder.resolve():
            raise HpoError(f"report file for study {study_name!r} would leave {folder}")  # pragma: no cover
        return target
    return out


def _predictions(study: optuna.Study, spec: StudySpec | None) -> list[Prediction]:
    if spec is not None:
        return list(spec.predictions)
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        return []
    try:
        return list(parse_spec(stored, f"stored study {study.study_name!r}").predictions)
    except SpecError:
        return []


def check_study(storage_url: str, study_name: str, spec: StudySpec | None = None) -> list[Verdict]:
    """Verdicts on the predictions of ``spec`` (or of the study file stored with the study):
    :func:`hpo.hypotheses.check_study` (by SQL; a big study's verdicts from a uniform sample, stated).

    Raises:
        StudyError: no such study.
        SpecError: a prediction about a parameter not in the study's space.
    """
    return hypotheses.check_study(storage_url, study_name, spec)


# --------------------------------------------------------------------------- what the figures need

#: chance level of a validation accuracy, by data source (binary spirals; 10 classes for the digit sets)
CHANCE = {"spirals": 0.5, "digits": 0.1, "mnist1d": 0.1, "idx": 0.1}
#: words a learner reads, for parameter names and units
LABELS = {
    "lr": "learning rate",
    "batch_size": "batch size",
    "weight_decay": "weight decay",
    "train_fraction": "training fraction",
    "n_layers": "hidden layers",
    "sgd_momentum": "SGD with momentum",
}
GREY, BLUE, ORANGE, RED = "#9aa5b1", "#1f77b4", "#ff7f0e", "#d62728"


def _label(name: str) -> str:
    return visible(LABELS.get(name, name.replace("_", " ")))  # names are data: control characters shown


def _sig(v: Any) -> str:
    """Numbers to 3 significant figures, no exponent for numbers a learner types; anything else as text."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        text = f"{v:.3g}"
        return f"{v:.0f}" if "e+" in text else text
    return str(v)


def _val(v: Any) -> str:
    """A parameter's value as a learner reads it: choices by their label (SGD with momentum), numbers by _sig."""
    return _label(v) if isinstance(v, str) else _sig(v)


def _configs(ctx: _Study) -> list[tuple[dict[str, Any], list[Any]]]:
    """Complete trials grouped by their parameters (a configuration and its seeds), best mean first."""
    groups: dict[tuple[tuple[str, str], ...], list[Any]] = {}
    for t in ctx.complete:
        groups.setdefault(tuple(sorted((k, repr(v)) for k, v in t.params.items())), []).append(t)
    ranked = sorted(groups.values(), key=lambda g: float(np.mean([t.value for t in g])), reverse=ctx.maximize)
    return [(g[0].params, g) for g in ranked]


def _mean_sd(trials: list[Any]) -> str:
    values = [t.value for t in trials]
    sd = f" ± {_sig(float(np.std(values, ddof=1)))}" if len(values) > 1 else ""
    return f"{_sig(float(np.mean(values)))}{sd}"


class _Study:
    """One read of a study: its trials, stored study file, metric, chance level and the design's sweeps."""

    def __init__(self, study: optuna.Study, spec: StudySpec | None) -> None:
        self.study = study
        self.spec = spec if spec is not None else _stored_spec(study)
        self.metrics = metric_names(study)
        self.multi = len(self.metrics) > 1
        # Several objectives: every figure but the Pareto front shows the first metric (trials seen with it alone).
        self.trials = [_first_metric(t) for t in study.get_trials(deepcopy=False)]
        self.front = query.front(study) if self.multi else []
        self.complete_all = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        self.metric = self.metrics[0] if self.multi else str(study.user_attrs.get("metric") or self.metrics[0])
        self.maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
        self.complete = [t for t in self.trials if t.state == TrialState.COMPLETE and t.value is not None]
        self.dists = _distributions(self.complete)
        obj = self.spec.objective if self.spec else None
        source = getattr(getattr(obj, "data", None), "source", None)
        self.chance = CHANCE.get(str(source)) if self.metric in ("val_accuracy", "test_accuracy") else None
        self.grokking = getattr(obj, "kind", None) == "grokking" or any("curve" in t.user_attrs for t in self.trials)
        self.censor = (obj.steps + obj.eval_every) if getattr(obj, "kind", None) == "grokking" else None  # type: ignore[union-attr]

    def about(self, name: str, states: tuple[TrialState, ...] = (TrialState.COMPLETE,)) -> tuple[list[Any], bool]:
        """Trials with ``name``: its design sweep where there is one, else every trial (in ``states``)."""
        have = [t for t in self.trials if t.state in states and name in t.params]
        swept = [t for t in have if name in (t.user_attrs.get("sweeps") or ())]
        if any(t.state == TrialState.COMPLETE for t in swept):
            return swept, True
        return have, False

    def baseline(self, name: str) -> str:
        design = getattr(self.spec, "design", None)
        if design is None:
            return ""
        others = [f"{_label(k)} {_sig(v)}" for k, v in design.baseline.items() if k != name]
        seeds = f"{design.seeds} seeds per point"
        return f"{seeds}; others at the baseline: " + ", ".join(others) if others else seeds


def _first_metric(t: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    """A trial of several objectives as one of its first metric alone (``t.value`` works); others as they are."""
    if t.values is None or len(t.values) == 1:
        return t
    first = copy.copy(t)
    first.values = [t.values[0]]
    return first


def _stored_spec(study: optuna.Study) -> StudySpec | None:
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        return None
    try:
        return parse_spec(stored, f"stored study {study.study_name!r}")
    except SpecError:
        return None


def _distributions(trials: list[optuna.trial.FrozenTrial]) -> dict[str, Any]:
    dists: dict[str, Any] = {}
    for t in trials:
        for k, d in t.distributions.items():
            dists.setdefault(k, d)
    return dists


def _is_log(d: Any) -> bool:
    return isinstance(d, FloatDistribution | IntDistribution) and bool(d.log)


def _chance_trace(fig: go.Figure, x0: float, x1: float, level: float) -> None:
    fig.add_trace(
        go.Scatter(
            x=[x0, x1],
            y=[level, level],
            mode="lines",
            name=f"chance ({_sig(level)})",
            line={"color": RED, "dash": "dot", "width": 1.5},
            hoverinfo="name",
        )
    )


# --------------------------------------------------------------------------- the figures


def _groups(x: list[float], log: bool) -> list[tuple[float, list[int]]]:
    """(position, indices) per group: by value where few values, else 6 equal-width bins (log scale if log)."""
    values = sorted(set(x))
    if len(values) <= 12:
        return [(v, [i for i, xi in enumerate(x) if xi == v]) for v in values]
    t = [math.log10(v) for v in x] if log else list(x)
    lo, hi = min(t), max(t)
    bins: dict[int, list[int]] = {}
    for i, ti in enumerate(t):
        bins.setdefault(min(int((ti - lo) / (hi - lo) * 6), 5), []).append(i)
    out = []
    for _, idx in sorted(bins.items()):
        pos = float(pd.Series([t[i] for i in idx]).median())
        out.append((10**pos if log else pos, idx))
    return out


def _effect(ctx: _Study, name: str, dist: Any) -> go.Figure:
    """The metric against one numeric parameter: every trial a dot, mean +- sd per point (or bin), n per point."""
    trials, swept = ctx.about(name)
    trials = [t for t in trials if t.state == TrialState.COMPLETE]
    metric, log = ctx.metric, _is_log(dist)
    fig = go.Figure()
    censored = [t for t in trials if ctx.censor is not None and t.value is not None and t.value >= ctx.censor]
    kept = [t for t in trials if t not in censored]
    x = [float(t.params[name]) for t in kept]
    y = [float(t.value) for t in kept]  # type: ignore[arg-type]
    seeds = "trial (one seed)" if swept else "trial"
    fig.add_trace(
        go.Scatter(
            x=x,
            y=y,
            mode="markers",
            name=seeds,
            marker={"color": GREY, "size": 6, "opacity": 0.7},
            text=[f"trial #{t.number}, seed {t.user_attrs.get('seed')}" for t in kept],
            hovertemplate="%{x}: %{y}<br>%{text}<extra></extra>",
        )
    )
    if censored:
        fig.add_trace(
            go.Scatter(
                x=[float(t.params[name]) for t in censored],
                y=[ctx.censor] * len(censored),
                mode="markers",
                name=f"did not generalise within {ctx.censor - (ctx.spec.objective.eval_every if ctx.spec else 0)} steps",  # type: ignore[union-attr,operator]
                marker={"color": RED, "symbol": "x-open", "size": 8},
            )
        )
    if kept and ctx.censor is None:
        groups = _groups(x, log)
        mx = [g for g, _ in groups]
        means = [float(pd.Series([y[i] for i in idx]).mean()) for _, idx in groups]
        sds = [float(pd.Series([y[i] for i in idx]).std(ddof=1)) if len(idx) > 1 else 0.0 for _, idx in groups]
        ns = [len(idx) for _, idx in groups]
        fig.add_trace(
            go.Scatter(
                x=mx,
                y=means,
                mode="lines+markers+text",
                name="mean ± sd" + (" over seeds" if swept else " per bin"),
                line={"color": BLUE, "width": 2},
                marker={"size": 8},
                error_y={"type": "data", "array": sds, "visible": True, "color": BLUE, "thickness": 1.5},
                text=[f"n={n}" for n in ns],
                textposition="top center",
                textfont={"size": 10, "color": "#555"},
            )
        )
    if ctx.chance is not None and x:
        _chance_trace(fig, min(x), max(x), ctx.chance)
    how = f"sweep of {_label(name)}, {ctx.baseline(name)}" if swept else f"all {len(trials)} complete trials"
    fig.update_layout(
        title={"text": f"{metric} against {_label(name)}<br><sup>{html.escape(how)}</sup>"},
        xaxis_title=_label(name) + (" (log scale)" if log else ""),
        yaxis_title=metric,
        legend={"orientation": "h", "y": -0.22},
    )
    if log:
        _log_axis(fig, "xaxis", [float(t.params[name]) for t in trials])
    _ticks_at(fig, sorted({float(t.params[name]) for t in trials}))
    return fig


def _log_axis(fig: go.Figure, axis: str, values: list[float]) -> None:
    """A log axis labelled at 1, 2, 5 x 10^k inside the data's range, each label a whole number as a learner writes
    it ("20", "0.005"): plotly's own labels on a short log range read "10 2 3 4" (minor digits that look like
    values)."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    fig.update_layout({axis: {"type": "log"}})
    if not positive:
        return
    lo, hi = min(positive), max(positive)
    ticks = [
        m * 10.0**k
        for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
        for m in (1, 2, 5)
        if lo / 1.5 <= m * 10.0**k <= hi * 1.5
    ]
    if len(ticks) > 9:  # a wide range: decades only
        ticks = [t for t in ticks if f"{t:.0e}".startswith("1")]
    fig.update_layout({axis: {"tickvals": ticks, "ticktext": [_sig(float(f"{t:.1g}")) for t in ticks]}})


def _censored(ctx: _Study, t: Any) -> bool:
    """A grokking trial that never generalised: its steps are a lower bound, not a value to average."""
    return ctx.censor is not None and t.value is not None and t.value >= ctx.censor


def _ticks_at(fig: go.Figure, values: list[float]) -> None:
    """Ticks exactly at a sweep's points (few values), labelled as the study file writes them."""
    if 1 < len(values) <= 12:
        fig.update_xaxes(tickvals=values, ticktext=[_sig(v) for v in values])


def _categorical(ctx: _Study, name: str) -> go.Figure:
    """One box per choice, every trial a dot; n and pruned counts under each choice."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    trials, swept = ctx.about(name, states)
    fig = go.Figure()
    choices: dict[str, list[Any]] = {}
    for t in trials:
        choices.setdefault(str(t.params[name]), []).append(t)
    never: list[tuple[str, float]] = []  # grokking: censored values are lower bounds, drawn apart, not in the box
    for choice, group in sorted(choices.items()):
        done = [t.value for t in group if t.state == TrialState.COMPLETE and not _censored(ctx, t)]
        pruned = sum(t.state == TrialState.PRUNED for t in group)
        label = f"{_label(choice)}<br>n={len(done)}, pruned {pruned}"
        never += [(label, t.value) for t in group if t.state == TrialState.COMPLETE and _censored(ctx, t)]
        fig.add_trace(
            go.Box(
                x=[label] * len(done),
                y=done,
                name=_label(choice),
                boxpoints="all",
                jitter=0.3,
                pointpos=0,
                marker={"color": BLUE, "size": 5},
                line={"color": BLUE},
                fillcolor="rgba(31,119,180,0.15)",
            )
        )
    if never:
        fig.add_trace(
            go.Scatter(
                x=[lab for lab, _ in never],
                y=[v for _, v in never],
                mode="markers",
                name="did not generalise (censored)",
                marker={"color": RED, "symbol": "x-open", "size": 9},
            )
        )
        fig.update_layout(showlegend=True)
    if ctx.chance is not None and choices:
        labels = [
            f"{_label(c)}<br>n={sum(t.state == TrialState.COMPLETE for t in g)}, pruned "
            f"{sum(t.state == TrialState.PRUNED for t in g)}"
            for c, g in sorted(choices.items())
        ]
        _chance_trace(fig, labels[0], labels[-1], ctx.chance)  # type: ignore[arg-type]
    how = f"sweep of {_label(name)}, {ctx.baseline(name)}" if swept else f"all {len(trials)} trials"
    fig.update_layout(
        title={"text": f"{ctx.metric} per {_label(name)}<br><sup>{html.escape(how)}</sup>"},
        yaxis_title=ctx.metric,
        showlegend=bool(never),
    )
    return fig


def _interaction(ctx: _Study, a: str, b: str) -> go.Figure | None:
    """``a`` x ``b``, colour the metric; trials at the same point (seeds) drawn as one dot, their mean, sized by n.

    In a designed experiment: the sweeps of ``a`` and ``b`` and the space-filling sample (not the other sweeps,
    which change a third hyperparameter at the baseline's point)."""
    both = [t for t in ctx.complete if a in t.params and b in t.params]
    if getattr(ctx.spec, "design", None) is not None:
        both = [
            t for t in both if t.user_attrs.get("design") == "sample" or {a, b} & set(t.user_attrs.get("sweeps") or ())
        ]
    if len({t.params[a] for t in both}) < 3 or len({t.params[b] for t in both}) < 3:
        return None
    points: dict[tuple[Any, Any], list[float]] = {}
    for t in both:
        points.setdefault((t.params[a], t.params[b]), []).append(float(t.value))  # type: ignore[arg-type]
    xs, ys = [k[0] for k in points], [k[1] for k in points]
    means = [sum(v) / len(v) for v in points.values()]
    ns = [len(v) for v in points.values()]
    fig = go.Figure(
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers",
            marker={
                "color": means,
                "colorscale": "Viridis",
                "reversescale": not ctx.maximize,
                "size": [9 + 2 * min(n, 8) for n in ns],
                "line": {"width": 0.5, "color": "#333"},
                "colorbar": {"title": {"text": ctx.metric}},
            },
            text=[f"{ctx.metric} {_sig(m)} (mean of {n})" for m, n in zip(means, ns, strict=True)],
            hovertemplate="%{x}, %{y}: %{text}<extra></extra>",
            name="point",
        )
    )
    fig.update_layout(
        title={
            "text": f"{_label(a)} x {_label(b)}: colour is {ctx.metric}<br><sup>{len(both)} complete trials at "
            f"{len(points)} points; a bigger dot is the mean over more seeds</sup>"
        },
        xaxis_title=_label(a),
        yaxis_title=_label(b),
        showlegend=False,
    )
    if _is_log(ctx.dists.get(a)):
        _log_axis(fig, "xaxis", [float(t.params[a]) for t in both])
    if _is_log(ctx.dists.get(b)):
        _log_axis(fig, "yaxis", [float(t.params[b]) for t in both])
    return fig


def _curves(ctx: _Study) -> go.Figure | None:
    """Median and middle half of the intermediate values per step, one band per outcome."""
    rows = [
        {"state": t.state.name.lower(), "number": t.number, "step": s, "value": v}
        for t in ctx.trials
        for s, v in t.intermediate_values.items()
        if v is not None and math.isfinite(v)
    ]
    if not rows:
        return None
    df = pd.DataFrame(rows)
    fig = go.Figure()
    colours = {"complete": BLUE, "pruned": ORANGE, "fail": RED}
    for state, grp in df.groupby("state", sort=True):
        q = grp.groupby("step")["value"].quantile([0.25, 0.5, 0.75]).unstack()
        c = colours.get(str(state), "#9467bd")
        steps = list(q.index)
        fig.add_trace(
            go.Scatter(
                x=steps + steps[::-1],
                y=list(q[0.75]) + list(q[0.25])[::-1],
                fill="toself",
                fillcolor=c,
                opacity=0.2,
                line={"width": 0},
                name=f"{state}: middle half",
                hoverinfo="skip",
            )
        )
        n = grp.groupby("step")["number"].nunique()
        first, last = steps[0], steps[-1]
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=list(q[0.5]),
                mode="lines+markers",
                line={"color": c, "width": 2},
                text=[f"n={n[s]}" for s in steps],
                hovertemplate="epoch %{x}: median %{y:.3g}, %{text} trials<extra></extra>",
                name=f"{state}: median ({n[first]} trials at epoch {first}, {n[last]} at {last})",
            )
        )
    if ctx.chance is not None:
        _chance_trace(fig, float(df["step"].min()), float(df["step"].max()), ctx.chance)
    fig.update_layout(
        title={"text": f"Learning curves: {ctx.metric} after each epoch, by outcome"},
        xaxis_title="epoch",
        yaxis_title=ctx.metric,
        legend={"orientation": "h", "y": -0.22},
    )
    return fig


def _grokking_trials(ctx: _Study) -> list[Any]:
    with_curve = [
        t for t in ctx.trials if isinstance(t.user_attrs.get("curve"), dict) and t.user_attrs["curve"].get("step")
    ]
    with_curve.sort(key=lambda t: (t.params.get("weight_decay", 0), t.params.get("lr", 0), t.number))
    if len(with_curve) > 12:  # evenly across the weight decays
        step = (len(with_curve) - 1) / 11
        with_curve = [with_curve[round(i * step)] for i in range(12)]
    return with_curve


def _grokking_curves(ctx: _Study) -> go.Figure | None:
    """Training and validation accuracy over steps, one panel per trial, sorted by weight decay."""
    from plotly.subplots import make_subplots

    trials = _grokking_trials(ctx)
    if not trials:
        return None
    cols = min(4, len(trials))
    rows = math.ceil(len(trials) / cols)
    titles = []
    for t in trials:
        g = t.user_attrs.get("steps_to_generalise") if t.user_attrs.get("generalised") else None
        wd = t.params.get("weight_decay")
        head = f"wd {_sig(wd)}" if wd is not None else f"trial #{t.number}"
        titles.append(f"{head}: " + (f"generalised at {g}" if g is not None else "did not generalise"))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_yaxes=True, vertical_spacing=0.12)
    first_generalised = next((u for u in trials if u.user_attrs.get("generalised")), None)  # its marker's legend
    for i, t in enumerate(trials):
        r, c = i // cols + 1, i % cols + 1
        curve = t.user_attrs["curve"]
        first = i == 0
        first_gen = t is first_generalised
        fig.add_trace(
            go.Scatter(
                x=curve["step"],
                y=curve["train_accuracy"],
                mode="lines",
                name="training accuracy",
                line={"color": ORANGE, "dash": "dash"},
                showlegend=first,
                legendgroup="train",
            ),
            row=r,
            col=c,
        )
        fig.add_trace(
            go.Scatter(
                x=curve["step"],
                y=curve["val_accuracy"],
                mode="lines",
                name="validation accuracy",
                line={"color": BLUE},
                showlegend=first,
                legendgroup="val",
            ),
            row=r,
            col=c,
        )
        if t.user_attrs.get("generalised"):
            g = t.user_attrs.get("steps_to_generalise")
            fig.add_trace(
                go.Scatter(
                    x=[g, g],
                    y=[0, 1],
                    mode="lines",
                    name="step it generalised",
                    line={"color": "#2a7a2a", "dash": "dot"},
                    showlegend=first_gen,
                    legendgroup="gen",
                ),
                row=r,
                col=c,
            )
    fig.update_yaxes(range=[0, 1.05])
    last = max(max(t.user_attrs["curve"]["step"]) for t in trials)
    marks = [t.user_attrs.get("steps_to_generalise") or 0 for t in trials if t.user_attrs.get("generalised")]
    marks += [t.user_attrs.get("memorised_step") or 0 for t in trials]
    # side by side on the same steps; up to twice the last jump where every trial generalised (a jump at step 200
    # of a 2000-step run would sit in the first tenth of the axis), else every step
    every = all(t.user_attrs.get("generalised") for t in trials)
    shown = min(last, max(2 * max(marks), 1)) if every and marks else last
    fig.update_xaxes(range=[0, shown])
    for c in range(1, cols + 1):
        fig.update_xaxes(title_text="step", row=rows, col=c)
    for r in range(1, rows + 1):
        fig.update_yaxes(title_text="accuracy", row=r, col=1)
    upto = f" (steps 0 to {shown} of {last})" if shown < last else ""
    fig.update_layout(
        title={
            "text": "Grokking: training and validation accuracy over steps, one panel per trial, by weight decay" + upto
        },
        height=260 * rows + 120,
        legend={"orientation": "h", "y": -0.08},
    )
    for ann in fig.layout.annotations:
        ann.font.size = 11
    return fig


def _grokking_steps(ctx: _Study, name: str) -> go.Figure | None:
    """When each trial memorised (training accuracy 0.99) and generalised, against ``name``: the delay between."""
    trials = [t for t in ctx.trials if name in t.params and t.user_attrs.get("memorised_step") is not None]
    if len(trials) < 2:
        return None
    fig = go.Figure()
    x = [t.params[name] for t in trials]
    fig.add_trace(
        go.Scatter(
            x=x,
            y=[t.user_attrs["memorised_step"] for t in trials],
            mode="markers",
            name="memorised (training accuracy 0.99)",
            marker={"color": ORANGE, "size": 8},
        )
    )
    gen = [t for t in trials if t.user_attrs.get("generalised")]
    fig.add_trace(
        go.Scatter(
            x=[t.params[name] for t in gen],
            y=[t.user_attrs["steps_to_generalise"] for t in gen],
            mode="markers",
            name="generalised (validation accuracy threshold)",
            marker={"color": BLUE, "size": 9},
        )
    )
    never = [t for t in trials if not t.user_attrs.get("generalised")]
    if never:
        top = max(t.user_attrs.get("steps_reached") or 0 for t in never)
        fig.add_trace(
            go.Scatter(
                x=[t.params[name] for t in never],
                y=[top] * len(never),
                mode="markers",
                name=f"not generalised by step {top}",
                marker={"color": RED, "symbol": "x-open", "size": 9},
            )
        )
    fig.update_layout(
        title={"text": f"Memorised, then generalised: the delay against {_label(name)}"},
        xaxis_title=_label(name),
        yaxis_title="step",
        legend={"orientation": "h", "y": -0.22},
    )
    if _is_log(ctx.dists.get(name)):
        _log_axis(fig, "xaxis", [float(v) for v in x])
    _ticks_at(fig, sorted({float(v) for v in x}))
    return fig


def _importances(imps: dict[str, float]) -> go.Figure:
    fig = go.Figure(
        go.Bar(
            x=list(imps.values())[::-1],
            y=[_label(k) for k in imps][::-1],
            orientation="h",
            marker={"color": BLUE},
            text=[_sig(v) for v in list(imps.values())[::-1]],
            textposition="auto",
        )
    )
    fig.update_layout(
        title={"text": "Which hyperparameters matter most (fANOVA importance, seed 0)"},
        xaxis_title="share of the result's variance explained",
        showlegend=False,
    )
    return fig


def _importances_per_metric(per_metric: dict[str, dict[str, float]]) -> go.Figure:
    """Several objectives: one bar per hyperparameter and metric (fANOVA on each metric, seed 0)."""
    first = next(iter(per_metric.values()))
    names = list(first)[::-1] + sorted({k for imps in per_metric.values() for k in imps} - set(first))
    fig = go.Figure()
    for metric, imps in per_metric.items():
        fig.add_trace(
            go.Bar(
                x=[imps.get(k, 0.0) for k in names],
                y=[_label(k) for k in names],
                orientation="h",
                name=visible(metric),
                text=[_sig(imps.get(k)) for k in names],
                textposition="auto",
            )
        )
    fig.update_layout(
        title={"text": "Which hyperparameters matter most, for each metric (fANOVA importance, seed 0)"},
        xaxis_title="share of the metric's variance explained",
        barmode="group",
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


class _FrontView:
    """What ``plot_pareto_front`` reads of a study (its directions and complete trials), with each trial's user
    attributes cut to the few worth a hover (not the per-epoch curve)."""

    SHOWN = ("seed", "epochs_reached", "optimizer_steps", "samples_seen", "train_seconds")

    def __init__(self, study: optuna.Study) -> None:
        self.directions = study.directions
        self._trials = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            light = copy.copy(t)
            light.user_attrs = {k: t.user_attrs[k] for k in self.SHOWN if k in t.user_attrs}
            self._trials.append(light)

    def get_trials(self, deepcopy: bool = False, states: Any = None) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self._trials if states is None or t.state in states]


def _pareto(ctx: _Study) -> go.Figure:
    """Optuna's Pareto-front plot, metric names on the axes, the front highlighted, parameters in the hover (the
    first two metrics where there are more than three)."""
    names = [visible(m) for m in ctx.metrics]
    targets = None
    if len(names) > 3:
        names, targets = names[:2], (lambda t: t.values[:2])
    fig = optuna.visualization.plot_pareto_front(_FrontView(ctx.study), target_names=names, targets=targets)  # type: ignore[arg-type]
    for trace in fig.data:  # Optuna colours by trial number, which leaves early trials white: one colour each
        on_front = "Best Trial" in str(trace.hovertemplate)
        trace.update(
            name=f"Pareto front ({len(trace.x)} trials)" if on_front else "other trials",
            showlegend=True,
            marker={"color": RED if on_front else GREY, "size": 10 if on_front else 7, "colorscale": None,
                    "showscale": False, "line": {"color": "white", "width": 0.5}},
        )  # fmt: skip
    if len(names) == 2 and len(ctx.front) > 1:  # the front's trace drawn as a line too, from one end to the other
        for trace in fig.data:
            if "Best Trial" in str(trace.hovertemplate):
                order = sorted(range(len(trace.x)), key=lambda i: (trace.x[i], trace.y[i]))
                per_point = {k: trace[k] for k in ("x", "y", "text", "customdata", "hovertext")
                             if trace[k] is not None and len(trace[k]) == len(order)}  # fmt: skip
                trace.update({k: [v[i] for i in order] for k, v in per_point.items()})
                trace.update(mode="lines+markers", line={"color": RED, "width": 1.5, "dash": "dot"})
    if len(names) == 2:  # a compute metric spans decades (ms to s): log axes where the values allow
        for i, axis in enumerate(("xaxis", "yaxis")):
            values = [t.values[i] for t in ctx.complete_all]
            if values and min(values) > 0 and max(values) / min(values) > 100:
                _log_axis(fig, axis, values)
    against = " against ".join(f"{m} ({d.name.lower()})" for m, d in zip(names, ctx.study.directions, strict=False))
    fig.update_layout(
        title={
            "text": f"The Pareto front: {html.escape(against)}<br><sup>{len(ctx.front)} trials on the front "
            "(none of the others is better in every metric); hover a point for its parameters</sup>"
        }
    )
    return fig


def _figures(ctx: _Study) -> dict[str, go.Figure]:
    figs: dict[str, go.Figure] = {}
    if not ctx.complete and not ctx.grokking:
        return figs
    if ctx.multi:
        figs["pareto"] = _pareto(ctx)
    imps = query.importances("", ctx.study) if ctx.complete else {}  # several objectives: the first metric's
    order = [k for k in imps if k in ctx.dists] + sorted(k for k in ctx.dists if k not in imps)
    for name in order:
        dist = ctx.dists[name]
        if name == "optimizer":
            continue
        values = {t.params[name] for t in ctx.complete if name in t.params}
        if len(values) < 2:
            continue
        if isinstance(dist, CategoricalDistribution):
            figs[f"effect-{_SAFE.sub('_', name)}"] = _categorical(ctx, name)
        else:
            figs[f"effect-{_SAFE.sub('_', name)}"] = _effect(ctx, name, dist)
    inter = _interaction(ctx, "lr", "batch_size") if "lr" in ctx.dists and "batch_size" in ctx.dists else None
    if inter is not None:
        figs["interaction"] = inter
    if "optimizer" in ctx.dists:
        figs["optimizer"] = _categorical(ctx, "optimizer")
    if ctx.grokking:
        curves = _grokking_curves(ctx)
        if curves is not None:
            figs["grokking-curves"] = curves
        name = "weight_decay" if "weight_decay" in ctx.dists else next(iter(order), None)
        steps = _grokking_steps(ctx, name) if name else None
        if steps is not None:
            figs["grokking-steps"] = steps
    else:
        curves = _curves(ctx)
        if curves is not None:
            figs["curves"] = curves
    if len(imps) > 1 and ctx.multi:  # one bar per metric
        per_metric = {m: query.importances("", ctx.study, objective=i) for i, m in enumerate(ctx.metrics)}
        figs["importances"] = _importances_per_metric({m: v for m, v in per_metric.items() if v})
    elif len(imps) > 1:  # one hyperparameter explains everything by definition
        figs["importances"] = _importances(imps)
    sampled = getattr(ctx.study, "sample", None) is not None  # a sample's best-so-far would be a fiction
    if ctx.complete and getattr(ctx.spec, "design", None) is None and not sampled:
        first = (lambda t: t.values[0]) if ctx.multi else None
        figs["history"] = optuna.visualization.plot_optimization_history(
            ctx.study, target=first, target_name=ctx.metric
        )
    for fig in figs.values():
        fig.update_layout(template="plotly_white", margin={"l": 60, "r": 30, "t": 80, "b": 60})
        if fig.layout.height is None:
            fig.update_layout(height=460)
    return figs


def _html_fallback_in_notebooks() -> None:
    """In a Jupyter kernel, plotly shows figures only as its own mime type, which a viewer without plotly's renderer
    (nbviewer, GitHub, an exported notebook) draws as nothing: add the HTML renderer (plotly.js embedded once), unless
    the user chose a renderer."""
    import sys

    import plotly.io as pio

    if "ipykernel" in sys.modules and pio.renderers.default == "plotly_mimetype":
        pio.renderers.default = "plotly_mimetype+notebook"


def figures(study: optuna.Study, spec: StudySpec | None = None) -> dict[str, go.Figure]:
    """The report's figures as plotly objects, by key (the HTML report shows each as ``plot-<key>``).

    Keys: ``effect-<param>`` per hyperparameter that varies, ``interaction`` (lr x batch size), ``optimizer``,
    ``grokking-curves`` and ``grokking-steps`` (grokking studies), ``curves`` (learning curves summarised),
    ``importances``, ``history`` (searches, not designed experiments). A study without complete trials gives {}.

    Example:
        >>> import optuna, hpo.report
        >>> study = optuna.load_study(study_name="lesson", storage="sqlite:///hpo.db")  # doctest: +SKIP
        >>> hpo.report.figures(study)["effect-lr"].show()  # doctest: +SKIP
    """
    _html_fallback_in_notebooks()
    return _figures(_Study(study, spec))


# --------------------------------------------------------------------------- the page


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd} .meta{color:#666}
table{border-collapse:collapse;margin:1em 0;font-size:.92em} td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums} .supported{color:#2a7a2a;font-weight:bold}
.refuted{color:#b22;font-weight:bold} .unknown{color:#886;font-weight:bold} .plot{margin:1em 0 2em}
.summary{background:#f4f7fb;padding:.8em 1.2em;border-radius:6px} .empty{background:#fff4e5;padding:1em}
.verdict{background:#fafafa;border-left:4px solid #ccc;padding:.5em 1em;margin:.6em 0} .verdict.v-supported{border-color:#2a7a2a}
.verdict.v-refuted{border-color:#b22} .verdict.v-unknown{border-color:#cc9} dt{font-weight:bold} dd{margin:0 0 .6em 1.5em}
"""

_GLOSSARY = [
    (
        "baseline",
        "the lesson's settings (for the spirals: SGD, batch size 16, learning rate 0.01, 10 epochs); a sweep "
        "changes one hyperparameter away from it and keeps the others there.",
    ),
    (
        "seed",
        "the random start of one training run (initial weights, order of the mini-batches). Several seeds per "
        "point show how much of a difference is noise: the error bars are one standard deviation over seeds.",
    ),
    ("chance", "the accuracy of guessing: 0.5 for two balanced classes. A model at the chance line learned nothing."),
    (
        "supported / refuted",
        "the data agree / disagree with the prediction by more than the spread over seeds; 'not enough "
        "evidence' means run more seeds or trials.",
    ),
    (
        "importance",
        "how much of the spread of results one hyperparameter explains (fANOVA, seeded; the same numbers "
        "as `hpo importance`). It says how much a hyperparameter matters, not in which direction.",
    ),
    (
        "pruned",
        "a trial stopped early because it looked worse than the others at the same epoch; pruned trials have "
        "no final result and are not counted in the means.",
    ),
    (
        "censored",
        "a grokking trial that never reached the accuracy threshold: its 'steps to generalise' is only a "
        "lower bound, so it is drawn apart (x), not averaged.",
    ),
    (
        "grokking",
        "validation accuracy jumping long after training accuracy reached 100%: the network first "
        "memorises, then generalises.",
    ),
]


#: below this many complete trials the importances carry a caveat (fANOVA fits a forest to the trials)
FEW_FOR_IMPORTANCE = 30


def _glossary(ctx: _Study, verdicts: list[Verdict], figs: dict[str, go.Figure]) -> list[tuple[str, str]]:
    """The glossary's terms this report uses, in this study's words (its chance level, its baseline)."""
    terms = dict(_GLOSSARY)
    design = getattr(ctx.spec, "design", None)
    source = getattr(getattr(getattr(ctx.spec, "objective", None), "data", None), "source", None)
    used = {"seed"} if _seeded(ctx) else set()
    if design is not None:
        used.add("baseline")
        base = ", ".join(f"{_label(k)} {_val(v)}" for k, v in design.baseline.items())
        terms["baseline"] = (
            f"the study's reference settings ({base}); a sweep changes one hyperparameter away from it and keeps "
            "the others there."
        )
    if ctx.grokking:
        p = getattr(getattr(ctx.spec.objective, "data", None), "p", None) if ctx.spec else None
        used |= {"grokking", "censored", "chance"}
        terms["chance"] = (
            f"the accuracy of guessing: 1/p, {_sig(1 / p)} for p = {p} answers. A curve at chance learned nothing."
            if p
            else "the accuracy of guessing, 1/p for p possible answers."
        )
    elif ctx.chance is not None:
        used.add("chance")
        kind = "two balanced classes" if source == "spirals" else f"{round(1 / ctx.chance)} balanced classes"
        terms["chance"] = (
            f"the accuracy of guessing: {_sig(ctx.chance)} for {kind}. A model at the chance line learned nothing."
        )
    if verdicts:
        used.add("supported / refuted")
    if "importances" in figs:
        used.add("importance")
    if any(t.state == TrialState.PRUNED for t in ctx.trials):
        used.add("pruned")
    return [(k, v) for k, v in terms.items() if k in used]


def _verdict_html(v: Verdict) -> str:
    cls = {"supported": "supported", "refuted": "refuted"}.get(v.verdict, "unknown")
    words = claim_words(v.claim, _label(v.param), v.better)
    said = f"“{html.escape(v.note)}” ({html.escape(words)})" if v.note else html.escape(words)
    nxt = f"<br><small>To settle it: {html.escape(v.next_step)}.</small>" if v.next_step else ""
    return (
        f"<p class='verdict v-{cls}'>Prediction on <b>{html.escape(_label(v.param))}</b>: {said}"
        f" <span class='{cls}'>{html.escape(v.verdict)}</span>"
        f" ({v.n_trials} trials): <span class='sentence'>{html.escape(v.reason)}</span>"
        f" <a href='#{html.escape(v.plot or '')}'>See the plot.</a>{nxt}</p>"
    )


def _front_summary(ctx: _Study) -> list[str]:
    """Several objectives: the front in words, from its two ends (best first metric, best second)."""
    dirs = [d.name.lower() for d in ctx.study.directions]
    what = ", ".join(f"{m} ({d})" for m, d in zip(ctx.metrics, dirs, strict=True))
    lines = [
        f"{len(ctx.front)} of {len(ctx.complete)} complete trials form the Pareto front of {what}: for each of them "
        "no other trial is better in every metric."
    ]
    for i in range(min(2, len(ctx.metrics))):
        sign = -1.0 if dirs[i] == "maximize" else 1.0
        end = min(ctx.front, key=lambda t: (sign * t.values[i], t.number))
        values = ", ".join(f"{m} {_sig(v)}" for m, v in zip(ctx.metrics, end.values, strict=True))
        params = ", ".join(f"{_label(k)} {_sig(v)}" for k, v in sorted(end.params.items()))
        lines.append(f"Best {ctx.metrics[i]} on the front: trial #{end.number} ({values}) with {params}.")
    lines.append(
        f"The sections on each hyperparameter, the learning rate x batch size plot and the search history show "
        f"{ctx.metric}, the first metric; the importances are computed for each metric."
    )
    return lines


def _summary(ctx: _Study, imps_top: str | None, verdicts: list[Verdict]) -> list[str]:
    if ctx.multi:
        return _front_summary(ctx) + ([imps_top] if imps_top else [])
    best = sorted(ctx.complete, key=lambda t: t.value, reverse=ctx.maximize)[0]  # type: ignore[arg-type,return-value]
    params = ", ".join(f"{_label(k)} {_val(v)}" for k, v in sorted(best.params.items()))
    chance = f" (chance is {_sig(ctx.chance)})" if ctx.chance is not None else ""
    seeded = [(c, g) for c, g in _configs(ctx) if len(g) > 1]
    if seeded:  # seeds: the best is a configuration's mean over its seeds, not a lucky seed
        config, seeds = seeded[0]
        said = ", ".join(f"{_label(k)} {_val(v)}" for k, v in sorted(config.items()))
        own = next(g for c, g in _configs(ctx) if best in g)
        lines = [
            f"Best configuration by its mean over {len(seeds)} seeds: {ctx.metric} {_mean_sd(seeds)}{chance}, "
            f"with {said}.",
            f"The single best trial, #{best.number} at {_sig(best.value)}, is one seed of {params}, whose "
            f"{len(own)} seeds average {_mean_sd(own)}.",
        ]
    else:
        lines = [f"Best {ctx.metric}: {_sig(best.value)}{chance}, trial #{best.number} with {params}."]
    if verdicts:
        counts = pd.Series([v.verdict for v in verdicts]).value_counts()
        lines.append(
            "Predictions: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + "; each is explained next to its plot."
        )
    if imps_top:
        lines.append(imps_top)
    return lines


def _choices_sentence(ctx: _Study, name: str) -> str:
    """A categorical parameter's answer in one sentence: the choices by their mean (with spread and n), and whether
    the lead of the best over the next is larger than the spread over seeds (else the data cannot tell them apart)."""
    trials, swept = ctx.about(name)
    groups: dict[str, list[Any]] = {}
    for t in trials:
        if t.value is not None:
            groups.setdefault(str(t.params[name]), []).append(t)
    if len(groups) < 2:
        return ""
    ranked = sorted(groups.items(), key=lambda kv: float(np.mean([t.value for t in kv[1]])), reverse=ctx.maximize)
    means = [float(np.mean([t.value for t in g])) for _, g in ranked]
    first, second = ranked[0][1], ranked[1][1]
    spread = max(float(np.std([t.value for t in g], ddof=1)) if len(g) > 1 else 0.0 for g in (first, second))
    gap = abs(means[0] - means[1])
    where = "in its sweep (the other hyperparameters at the baseline)" if swept else f"over all {len(trials)} trials"
    verdict = (
        f"its lead over {_val(ranked[1][0])} ({_sig(gap)}) is larger than the spread over seeds ({_sig(spread)})"
        if gap > spread
        else f"but its lead over {_val(ranked[1][0])} ({_sig(gap)}) is within the spread over seeds "
        f"({_sig(spread)}): these data do not tell them apart"
    )
    order = "; ".join(f"{_val(c)} {_mean_sd(g)} (n={len(g)})" for c, g in ranked)
    text = f"On average {where}, {_val(ranked[0][0])} does best; {verdict}. Means: {order}."
    return f"<p class='verdict sentence'>{html.escape(visible(text))}</p>"


def _config_table(ctx: _Study) -> str:
    """With seeds: the ten best configurations by their mean over seeds."""
    configs = [(c, g) for c, g in _configs(ctx) if len(g) > 1][:10]
    if not configs:
        return ""
    names = sorted({k for c, _ in configs for k in c})
    head = [f"{ctx.metric} (mean ± sd)", "seeds", *[_label(k) for k in names], "trials"]
    rows = []
    for c, g in configs:
        never = sum(_censored(ctx, t) for t in g)
        # grokking: a seed that never generalised has no value, only a lower bound; its group's mean is one too
        mean = _mean_sd(g) if not never else "never" if never == len(g) else f"≥ {_mean_sd(g)} ({never} never)"
        cells = [mean, str(len(g)), *[_val(c.get(k)) for k in names], " ".join(f"#{t.number}" for t in g)]
        rows.append("<tr>" + "".join(f"<td class='num'>{html.escape(x)}</td>" for x in cells) + "</tr>")
    return (
        "<h2 id='best-configurations'>Best configurations (mean over seeds)</h2><table id='best-configurations-table'><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )


def _seeded(ctx: _Study) -> bool:
    """Whether the study's trials carry hpo's training seed (a user's own objective's trials need not)."""
    return any("seed" in t.user_attrs for t in ctx.complete)


def _best_table(ctx: _Study) -> str:
    """The ten best trials; several objectives: every trial of the Pareto front, by the first metric."""
    top = ctx.front or sorted(filter(is_feasible, ctx.complete), key=lambda t: t.value, reverse=ctx.maximize)[:10]  # type: ignore[arg-type,return-value]
    names = sorted({k for t in top for k in t.params})
    metrics = ctx.metrics if ctx.multi else [ctx.metric]
    shared = any((t.user_attrs.get("population") or 1) > 1 for t in top)
    seeded = _seeded(ctx)  # a user's own objective may have no seed of hpo's: no empty column
    # population mode trains a trial with others at once: its duration is the group's wall time, not its own
    head = [
        "trial",
        *metrics,
        *[_label(k) for k in names],
        *(["seed"] if seeded else []),
        "wall time, shared by its population (s)" if shared else "duration (s)",
    ]
    rows = []
    for t in top:
        steps = ctx.censor - ctx.spec.objective.eval_every if ctx.censor and ctx.spec else None  # type: ignore[union-attr]
        shown = [f"never (> {steps})" if _censored(ctx, t) else _sig(v) for v in t.values]
        cells = [str(t.number), *shown, *[_val(t.params.get(k)) for k in names]]
        if seeded:
            cells.append(_sig(t.user_attrs.get("seed")))
        cells.append(_sig(t.duration.total_seconds()) if t.duration is not None else "")
        rows.append("<tr>" + "".join(f"<td class='num'>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return (
        "<table id='best-trials'><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )


#: Words that make a metric a kind of accuracy, or a kind of cost (the training objective's metrics).
_ACCURACY_WORDS = ("accuracy", "acc", "f1", "auc")
_COST_WORDS = ("seconds", "time", "compute", "steps", "samples", "flops", "params", "latency", "memory")


def _pareto_intro(ctx: _Study) -> str:
    """The Pareto section's title and prose, in the study's own terms: accuracy against compute only where one metric
    is an accuracy and another a cost; otherwise the metrics' names."""
    lower = [m.lower() for m in ctx.metrics]
    accuracy = any(any(w in m for w in _ACCURACY_WORDS) for m in lower)
    cost = any(any(w in m for w in _COST_WORDS) for m in lower)
    names = " and ".join(html.escape(visible(m)) for m in ctx.metrics[:3]) + (" ..." if len(ctx.metrics) > 3 else "")
    title = "Accuracy against compute: the Pareto front" if accuracy and cost else f"The Pareto front of {names}"
    bend = (
        " Where the front bends is where more compute stops buying accuracy."
        if accuracy and cost
        else " Where the front bends, a little more of one metric starts to cost a lot of another."
    )
    return (
        f"<h2 id='pareto'>{title}</h2><p>Each dot is a complete trial; the highlighted ones form the front: to do "
        f"better in one metric than a trial on it, a trial has to do worse in another.{bend}</p>"
    )


def _plot(figs: dict[str, go.Figure], key: str) -> str:
    fig = figs.get(key)
    if fig is None:
        return ""
    body = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{key}", config={"displaylogo": False})
    return f"<div class='plot'>{body}</div>"


def build_report(study: optuna.Study, spec: StudySpec | None = None) -> str:
    """The report on a loaded study, as one HTML string (plotly.js inlined)."""
    ctx = _Study(study, spec)
    trials = ctx.trials
    counts = pd.Series([t.state.name for t in trials]).value_counts().to_dict() if trials else {}
    sample = getattr(study, "sample", None)  # query.SampledStudy: counts from SQL, the figures from the sample
    if sample is not None:
        counts = {s: n for s, n in sample.counts.items() if n}
    count_txt = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no trials"
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = html.escape(visible(study.study_name))  # control characters shown, as everywhere (hpo.render)
    desc = getattr(ctx.spec, "description", None)
    head = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>hpo report: {title}</title>"
        f"<style>{_CSS}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
        f"<h1>Study {title}</h1>"
        + (f"<p>{html.escape(visible(desc))}</p>" if desc else "")
        + f"<p class='meta'>direction {', '.join(d.name.lower() for d in study.directions)}, metric "
        f"{html.escape(visible(', '.join(ctx.metrics) if ctx.multi else ctx.metric))};"
        f" {sum(counts.values())} trials: {html.escape(count_txt)}. Generated {now}.</p>"
        + (
            f"<p class='meta' id='strategy'>Search: {html.escape(visible(str(study.user_attrs['strategy'])))} "
            "(the auto sampler's choice, stored on the study).</p>"
            if isinstance(study.user_attrs.get("strategy"), str)
            else ""
        )
        + (
            f"<p class='meta' id='sample'>{html.escape(sample.describe()[:1].upper() + sample.describe()[1:])}; no optimisation history "
            "(a sample has no order). <code>hpo trials -f csv</code> exports every trial.</p>"
            if sample
            else ""
        )
    )
    if not ctx.complete:
        why = "No trial has finished yet" if not trials else "No trial completed"
        errors = sorted({str(t.user_attrs.get("error")) for t in trials if t.user_attrs.get("error")})[:5]
        err_html = "".join(f"<li>{html.escape(visible(e))}</li>" for e in errors)
        body = (
            f"<div class='empty' id='empty-report'><p><b>{why}</b> ({html.escape(count_txt)}), so there is nothing "
            f"to plot and no prediction can be checked.</p>"
            + (f"<p>Errors reported by failed trials:</p><ul>{err_html}</ul>" if err_html else "")
            + "</div>"
        )
        return head + body + "</body></html>"

    verdicts = check(study, _predictions(study, ctx.spec))
    figs = _figures(ctx)
    imps = query.importances("", study)  # several objectives: the first metric's
    imps_top = None
    if len(imps) > 1:
        ranked = list(imps.items())
        imps_top = (
            f"{_label(ranked[0][0])} matters most{f' to {ctx.metric}' if ctx.multi else ''} "
            f"(importance {_sig(ranked[0][1])})"
            + ("; then " + ", ".join(f"{_label(k)} ({_sig(v)})" for k, v in ranked[1:4]) if len(ranked) > 1 else "")
            + "."
        )
    out: list[str] = [head]
    out.append(
        "<div class='summary'><h2>Summary</h2>"
        + "".join(f"<p>{html.escape(visible(s))}</p>" for s in _summary(ctx, imps_top, verdicts))
    )
    if verdicts:
        out.append("".join(_verdict_html(v) for v in verdicts))
    out.append("</div>")
    if "pareto" in figs:
        out.append(_pareto_intro(ctx))
        out.append(_plot(figs, "pareto"))
    by_param: dict[str, list[Verdict]] = {}
    for v in verdicts:
        by_param.setdefault(v.param, []).append(v)
    effects = [k for k in figs if k.startswith("effect-")]
    if effects:
        out.append("<h2 id='hyperparameters'>What does each hyperparameter do?</h2>")
        if ctx.multi:
            out.append(f"<p>These plots show {html.escape(visible(ctx.metric))}, the study's first metric.</p>")
    for key in effects:
        name = next((n for n in ctx.dists if f"effect-{_SAFE.sub('_', n)}" == key), key[7:])
        out.append(f"<h3>{html.escape(_label(name))}</h3>")
        out += [_verdict_html(v) for v in by_param.get(name, [])]
        out.append(_plot(figs, key))
    if "interaction" in figs:
        out.append(
            "<h2 id='interactions'>Interactions: learning rate and batch size together</h2>"
            "<p>Does the best learning rate depend on the batch size? Each dot is one trial.</p>"
        )
        out.append(_plot(figs, "interaction"))
    if "optimizer" in figs:
        out.append("<h2 id='optimizers'>Optimizers</h2>")
        out += [_verdict_html(v) for v in by_param.get("optimizer", [])]
        out.append(_choices_sentence(ctx, "optimizer"))
        out.append(_plot(figs, "optimizer"))
    if "grokking-curves" in figs or "grokking-steps" in figs:
        out.append(
            "<h2 id='grokking'>Grokking: memorising first, generalising later</h2><p>Training accuracy "
            "(dashed) reaches 100% early; validation accuracy (solid) jumps much later, if at all. The dotted "
            "line marks the step it generalised. Panels are sorted by weight decay.</p>"
        )
        out.append(_plot(figs, "grokking-curves") + _plot(figs, "grokking-steps"))
    if "curves" in figs:
        out.append("<h2 id='curves'>Learning curves</h2>")
        out.append(_plot(figs, "curves"))
    if "importances" in figs:
        out.append("<h2 id='importance'>Which hyperparameters matter most?</h2>")
        if len(ctx.complete) < FEW_FOR_IMPORTANCE:
            out.append(
                f"<p class='caveat'>Only {len(ctx.complete)} complete trials: importances fitted on so few are "
                "rough (another seed of the same study can reorder them); read them as a hint, not a ranking.</p>"
            )
        out.append(_plot(figs, "importances"))
    if "history" in figs:
        out.append("<h2 id='search'>The search</h2>" + _plot(figs, "history"))
    if not ctx.multi:
        out.append(_config_table(ctx))
    best_title = "Best trials: the Pareto front" if ctx.multi else "Best trials"
    out.append(f"<h2 id='best'>{best_title}</h2>" + _best_table(ctx))
    out.append(
        "<h2 id='glossary'>Glossary</h2><dl>"
        + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in _glossary(ctx, verdicts, figs))
        + "</dl>"
    )
    out.append("</body></html>")
    return "".join(out)


def write_report(
    storage_url: str, study_name: str, output: str | Path | None = None, spec: StudySpec | None = None
) -> Path:
    """Write the report on a stored study; returns the file written.

    Args:
        storage_url: a SQLAlchemy URL (opened read-only).
        study_name: the study.
        output: a file path, or a folder (``<folder>/<safe study name>.html``); default the current folder.
        spec: the study file, whose predictions win over the stored ones.

    Raises:
        StudyError: no such study.
        HpoError: the file cannot be written.
    """
    path = output_path(study_name, output)
    study = query.sampled_study(storage_url, study_name)  # over query.SAMPLE_SIZE trials: a sample, stated
    page = build_report(study, spec)
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise HpoError(f"cannot write the report to {path}: {exc.strerror or exc}") from None
    return path


__all__ = ["build_report", "check_study", "figures", "output_path", "safe_filename", "write_report"]
