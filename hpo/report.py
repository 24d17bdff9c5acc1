"""The HTML report: how each hyperparameter influences the result, in one self-contained file.

plotly.js is inlined once, so the file works offline. Sections: a plain-words summary, the predictions' verdicts
(:mod:`hpo.hypotheses`), optimization history, parameter importances, each parameter's marginal effect (slice with
a rolling-median trend, log axes for log ranges), the lr x batch_size contour, the metric per optimizer, learning
curves coloured by outcome, and the best trials. A study with no COMPLETE trial gets an honest report saying so.

Example:
    >>> from hpo.report import write_report
    >>> write_report("sqlite:///hpo.db", "spirals-optimizer", "reports/")  # doctest: +SKIP
    PosixPath('reports/spirals-optimizer.html')
"""

from __future__ import annotations

import html
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from plotly.offline import get_plotlyjs

from hpo import query
from hpo.errors import HpoError, SpecError
from hpo.hypotheses import MIN_TRIALS, Verdict, check
from hpo.render import visible
from hpo.spec import Prediction, StudySpec, parse_spec

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
    """Verdicts on the predictions of ``spec`` (or of the study file stored with the study).

    Raises:
        StudyError: no such study.
        SpecError: a prediction about a parameter not in the study's space.
    """
    study = query.load_study(storage_url, study_name)
    preds = _predictions(study, spec)
    return check(study, preds)


# --------------------------------------------------------------------------- figures


def _distributions(trials: list[optuna.trial.FrozenTrial]) -> dict[str, Any]:
    dists: dict[str, Any] = {}
    for t in trials:
        for k, d in t.distributions.items():
            dists.setdefault(k, d)
    return dists


def _is_log(d: Any) -> bool:
    return isinstance(d, FloatDistribution | IntDistribution) and bool(d.log)


def _fig_html(fig: go.Figure, div_id: str) -> str:
    fig.update_layout(template="plotly_white", height=420, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False})


def _slice(df: pd.DataFrame, name: str, dist: Any, metric: str) -> go.Figure:
    col = f"params_{name}"
    d = df[[col, "value", "number"]].dropna()
    fig = go.Figure()
    if isinstance(dist, CategoricalDistribution):
        for choice, grp in d.groupby(col, sort=False):
            fig.add_trace(go.Box(y=grp["value"], name=str(choice), boxpoints="all", jitter=0.4))
        fig.update_layout(title=f"{metric} by {name}", xaxis_title=name, yaxis_title=metric, showlegend=False)
        return fig
    d = d.sort_values(col)
    fig.add_trace(
        go.Scatter(
            x=d[col],
            y=d["value"],
            mode="markers",
            name="trials",
            marker={"color": d["number"], "colorscale": "Blues", "showscale": True, "colorbar": {"title": "trial"}},
            text=[f"#{n}" for n in d["number"]],
        )
    )
    if len(d) >= 5:
        window = max(3, len(d) // 6)
        trend = d["value"].rolling(window, center=True, min_periods=max(2, window // 2)).median()
        fig.add_trace(go.Scatter(x=d[col], y=trend, mode="lines", name=f"rolling median ({window})"))
    fig.update_layout(title=f"{metric} vs {name}", xaxis_title=name, yaxis_title=metric)
    if _is_log(dist):
        fig.update_xaxes(type="log")
    return fig


def _curves(cdf: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for state, grp in cdf.groupby("state", sort=False):
        xs: list[Any] = []
        ys: list[Any] = []
        for _, t in grp.groupby("number"):
            xs += [*t["step"].tolist(), None]
            ys += [*t["value"].tolist(), None]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines+markers",
                name=f"{state.lower()} ({grp['number'].nunique()})",
                line={"color": STATE_COLOURS.get(str(state), "#9467bd"), "width": 1},
                marker={"size": 3},
                opacity=0.6,
                connectgaps=False,
            )
        )
    fig.update_layout(title="Learning curves (intermediate values) by outcome", xaxis_title="step", yaxis_title="value")
    return fig


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _summary(
    study: optuna.Study,
    df: pd.DataFrame,
    importances: dict[str, float],
    dists: dict[str, Any],
    metric: str,
    verdicts: list[Verdict],
) -> list[str]:
    complete = df[df["state"] == "COMPLETE"].dropna(subset=["value"])
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    best = complete.sort_values("value", ascending=not maximize)
    lines = []
    if importances:
        ranked = list(importances.items())
        top, share = ranked[0]
        text = f"{top} matters most (importance {share:.2f})"
        if len(ranked) > 1:
            text += "; then " + ", ".join(f"{k} ({v:.2f})" for k, v in ranked[1:4])
        lines.append(text + ".")
    n_top = max(3, math.ceil(0.1 * len(best)))
    head = best.head(n_top)
    for name in list(importances)[:3] or [c[7:] for c in df.columns if c.startswith("params_")][:3]:
        col = f"params_{name}"
        if col not in head or head[col].dropna().empty:
            continue
        dist = dists.get(name)
        if isinstance(dist, FloatDistribution | IntDistribution):
            lo, hi = head[col].min(), head[col].max()
            lines.append(f"Best region for {name}: {_fmt(lo)} to {_fmt(hi)} (the best {len(head)} trials).")
        else:
            counts = head[col].astype(str).value_counts()
            lines.append(f"Among the best {len(head)} trials, {name} is most often {counts.index[0]}.")
    b = best.iloc[0]
    params = ", ".join(f"{c[7:]}={_fmt(b[c])}" for c in best.columns if c.startswith("params_") and pd.notna(b[c]))
    lines.append(f"Best {metric} {_fmt(float(b['value']))} at trial #{int(b['number'])} ({params}).")
    for v in verdicts:
        lines.append(f"Prediction '{v.param} {v.claim}': {v.verdict} ({v.n_trials} trials).")
    return lines


# --------------------------------------------------------------------------- the page


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{margin-bottom:.2em} .meta{color:#666} table{border-collapse:collapse;margin:1em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left} .supported{color:#2a7a2a;font-weight:bold}
.refuted{color:#b22;font-weight:bold} .unknown{color:#886;font-weight:bold} .plot{margin:1.5em 0}
.summary{background:#f4f7fb;padding:.8em 1.2em;border-radius:6px} .empty{background:#fff4e5;padding:1em}
"""


def _verdict_table(verdicts: list[Verdict]) -> str:
    if not verdicts:
        return "<p>No predictions in the study file.</p>"
    rows = []
    for v in verdicts:
        cls = {"supported": "supported", "refuted": "refuted"}.get(v.verdict, "unknown")
        note = f"<br><small>{html.escape(v.note)}</small>" if v.note else ""
        rows.append(
            f"<tr><td>{html.escape(v.param)}</td><td>{html.escape(v.claim)}{note}</td>"
            f"<td class='{cls}'>{html.escape(v.verdict)}</td><td>{v.n_trials}</td><td>{html.escape(v.reason)}</td></tr>"
        )
    return (
        "<table><tr><th>parameter</th><th>claim</th><th>verdict</th><th>trials</th><th>evidence</th></tr>"
        + "".join(rows)
        + f"</table><p class='meta'>Verdicts need at least {MIN_TRIALS} complete trials; intervals are 95% bootstrap"
        " intervals (see hpo.hypotheses).</p>"
    )


def build_report(study: optuna.Study, spec: StudySpec | None = None) -> str:
    """The report on a loaded study, as one HTML string (plotly.js inlined)."""
    trials = study.get_trials(deepcopy=False)
    df = query._frame(trials)
    metric = str(study.user_attrs.get("metric") or (spec.metric if spec else "value"))
    counts = df["state"].value_counts().to_dict() if not df.empty else {}
    count_txt = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no trials"
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = html.escape(visible(study.study_name))  # control characters shown, as everywhere (hpo.render)
    head = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>hpo report: {title}</title>"
        f"<style>{_CSS}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
        f"<h1>Study {title}</h1><p class='meta'>direction {study.direction.name.lower()}, metric {html.escape(metric)};"
        f" {len(trials)} trials: {html.escape(count_txt)}. Generated {now}.</p>"
    )
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    preds = _predictions(study, spec)
    if not complete:
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

    dists = _distributions(complete)
    verdicts = check(study, preds)
    imps = query.importances("", study)
    sections: list[str] = []
    summary = _summary(study, df, imps, dists, metric, verdicts)
    sections.append(
        "<div class='summary'><h2>Summary</h2>" + "".join(f"<p>{html.escape(visible(s))}</p>" for s in summary)
    )
    sections.append("</div><h2>Predictions</h2>" + _verdict_table(verdicts))

    plots: list[tuple[str, go.Figure]] = []
    plots.append(("history", optuna.visualization.plot_optimization_history(study, target_name=metric)))
    if imps:
        fig = go.Figure(go.Bar(x=list(imps.values())[::-1], y=list(imps)[::-1], orientation="h"))
        fig.update_layout(title="Parameter importances (fANOVA)", xaxis_title="importance")
        plots.append(("importances", fig))
    cdf = df[df["state"] == "COMPLETE"]
    for name, dist in sorted(dists.items()):
        if cdf[f"params_{name}"].nunique(dropna=True) > 1:
            plots.append((f"slice-{_SAFE.sub('_', name)}", _slice(cdf, name, dist, metric)))
    both = [t for t in complete if "lr" in t.params and "batch_size" in t.params]
    if len(both) >= 2 and len({t.params["lr"] for t in both}) > 1 and len({t.params["batch_size"] for t in both}) > 1:
        plots.append(("contour-lr-batch_size", optuna.visualization.plot_contour(study, params=["lr", "batch_size"])))
    if "params_optimizer" in cdf and cdf["params_optimizer"].notna().any():
        fig = go.Figure()
        for opt, grp in cdf.dropna(subset=["params_optimizer"]).groupby("params_optimizer"):
            fig.add_trace(go.Violin(y=grp["value"], name=str(opt), box_visible=True, points="all"))
        fig.update_layout(title=f"{metric} per optimizer", yaxis_title=metric, showlegend=False)
        plots.append(("optimizer", fig))
    curves = query.curves("", study)
    if not curves.empty:
        plots.append(("curves", _curves(curves)))
    sections.append("<h2>Plots</h2>")
    sections += [f"<div class='plot'>{_fig_html(fig, f'plot-{key}')}</div>" for key, fig in plots]
    top = query._frame(
        sorted(complete, key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")[:10]  # type: ignore[arg-type]
    )
    top = top.drop(columns=[c for c in ("datetime_start", "datetime_complete", "state") if c in top])
    top = top.rename(columns=visible).map(lambda v: visible(v) if isinstance(v, str) else v)  # names are data
    sections.append("<h2>Best trials</h2>" + top.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}"))
    return head + "".join(sections) + "</body></html>"


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
    study = query.load_study(storage_url, study_name)
    page = build_report(study, spec)
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise HpoError(f"cannot write the report to {path}: {exc.strerror or exc}") from None
    return path


__all__ = ["build_report", "check_study", "output_path", "safe_filename", "write_report"]
