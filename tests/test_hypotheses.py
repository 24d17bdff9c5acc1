"""Prediction checks on synthetic studies whose truth is known (optuna.create_trial; no training)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest

from hpo.hypotheses import MIN_TRIALS, REFUTED, SUPPORTED, UNKNOWN, check
from hpo.spec import Prediction

from .analyst_helpers import synthetic
from .conftest import hpo_cli, write_study

CLAIMS = ("increasing", "decreasing", "no_effect", "diminishing_returns", "interior_optimum", "optimum_near_edge")


def verdicts(study, claims=CLAIMS) -> dict[str, str]:  # noqa: ANN001
    return {v.claim: v.verdict for v in check(study, [Prediction(param="lr", claim=c) for c in claims])}


def test_monotone_metric() -> None:
    v = verdicts(synthetic(lambda lx, r: lx + r.gauss(0, 0.3), n=80))
    assert v["increasing"] == SUPPORTED
    assert v["decreasing"] == REFUTED
    assert v["no_effect"] == REFUTED
    assert v["interior_optimum"] == REFUTED
    assert v["optimum_near_edge"] == SUPPORTED


def test_minimised_metric_is_oriented() -> None:
    # a loss falling with lr: the result improves with lr
    v = verdicts(synthetic(lambda lx, r: -lx + r.gauss(0, 0.3), n=80, direction="minimize"), ("increasing",))
    assert v["increasing"] == SUPPORTED


def test_diminishing_returns() -> None:
    v = verdicts(synthetic(lambda lx, r: -(2.718 ** (-2 * (lx + 3))) + r.gauss(0, 0.05), n=80))
    assert v["diminishing_returns"] == SUPPORTED
    assert v["interior_optimum"] == REFUTED


def test_u_shaped_loss_has_interior_optimum() -> None:
    study = synthetic(lambda lx, r: (lx + 1) ** 2 + r.gauss(0, 0.3), n=80, direction="minimize")
    checked = {v.claim: v for v in check(study, [Prediction(param="lr", claim=c) for c in CLAIMS])}
    assert checked["interior_optimum"].verdict == SUPPORTED
    assert checked["optimum_near_edge"].verdict == REFUTED
    assert checked["diminishing_returns"].verdict == REFUTED
    assert checked["no_effect"].verdict == REFUTED
    lo, hi = checked["interior_optimum"].evidence["optimum_ci"]
    assert lo < 0.1 < hi and hi / lo < 3  # the truth: lr = 10**-1, found on the log scale
    assert checked["interior_optimum"].n_trials == 80


def test_pure_noise() -> None:
    v = verdicts(synthetic(lambda lx, r: r.gauss(0, 1), n=300, seed=3))
    assert v["no_effect"] == SUPPORTED
    assert v["increasing"] == REFUTED and v["decreasing"] == REFUTED
    assert v["interior_optimum"] != SUPPORTED and v["diminishing_returns"] != SUPPORTED


S, R = SUPPORTED, REFUTED
#: claim (better) -> expected verdict, per known shape of the result over u = the lr range rescaled to [0, 1]
SHAPES: dict[str, tuple[Callable[[float], float], dict[str, str]]] = {
    # name: (result(u), {claim[:better]: verdict})
    "increasing": (
        lambda u: 1 - math.exp(-3 * u),
        {
            "increasing": S,
            "decreasing": R,
            "no_effect": R,
            "diminishing_returns": S,
            "diminishing_returns:lower": R,
            "diminishing_returns:higher": S,
            "interior_optimum": R,
            "optimum_near_edge": S,
            "optimum_near_edge:lower": R,
            "optimum_near_edge:higher": S,
        },
    ),
    "decreasing": (
        lambda u: 1 - math.exp(-3 * (1 - u)),
        {
            "increasing": R,
            "decreasing": S,
            "no_effect": R,
            "diminishing_returns": S,
            "diminishing_returns:lower": S,
            "diminishing_returns:higher": R,
            "interior_optimum": R,
            "optimum_near_edge": S,
            "optimum_near_edge:lower": S,
            "optimum_near_edge:higher": R,
        },
    ),
    "increasing, returns growing": (
        lambda u: math.exp(3 * u) / 20,
        {
            "increasing": S,
            "decreasing": R,
            "diminishing_returns": R,
            "diminishing_returns:lower": R,
            "diminishing_returns:higher": R,
            "interior_optimum": R,
            "optimum_near_edge:higher": S,
        },
    ),
    "optimum at the low edge": (
        lambda u: -((u - 0.05) ** 2),
        {
            "increasing": R,
            "decreasing": S,
            "no_effect": R,
            "diminishing_returns:lower": S,
            "diminishing_returns:higher": R,
            "interior_optimum": R,
            "optimum_near_edge": S,
            "optimum_near_edge:lower": S,
            "optimum_near_edge:higher": R,
        },
    ),
    "optimum at the high edge": (
        lambda u: -((u - 0.95) ** 2),
        {
            "increasing": S,
            "decreasing": R,
            "no_effect": R,
            "diminishing_returns:lower": R,
            "diminishing_returns:higher": S,
            "interior_optimum": R,
            "optimum_near_edge": S,
            "optimum_near_edge:lower": R,
            "optimum_near_edge:higher": S,
        },
    ),
    "interior optimum": (
        lambda u: -((u - 0.5) ** 2),
        {
            "increasing": R,
            "decreasing": R,
            "no_effect": R,
            "diminishing_returns": R,
            "diminishing_returns:lower": R,
            "diminishing_returns:higher": R,
            "interior_optimum": S,
            "optimum_near_edge": R,
            "optimum_near_edge:lower": R,
            "optimum_near_edge:higher": R,
        },
    ),
    "flat": (
        lambda u: 0.0,
        {
            "increasing": R,
            "decreasing": R,
            "no_effect": S,
            "diminishing_returns": R,
            "diminishing_returns:lower": R,
            "diminishing_returns:higher": R,
            "interior_optimum": R,
            "optimum_near_edge": R,
            "optimum_near_edge:lower": R,
            "optimum_near_edge:higher": R,
        },
    ),
}


def _prediction(key: str) -> Prediction:
    claim, _, better = key.partition(":")
    return Prediction(param="lr", claim=claim, better=better or None)  # type: ignore[arg-type]


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_known_shapes_give_the_right_verdicts(shape: str, direction: str) -> None:
    """Every claim, in both directions, on results of known shape (a minimised metric is the same shape negated)."""
    f, expected = SHAPES[shape]
    sign = 1 if direction == "maximize" else -1
    study = synthetic(lambda lx, r: sign * (f((lx + 3) / 4) + r.gauss(0, 0.03)), n=240, seed=1, direction=direction)
    got = {k: v for k, v in zip(expected, check(study, [_prediction(k) for k in expected]), strict=True)}
    wrong = {k: (v.verdict, v.reason) for k, v in got.items() if v.verdict != expected[k]}
    assert not wrong, wrong
    for v in got.values():  # one plain sentence, numbers in the metric's units, the plot that shows it
        assert v.reason.endswith(".") and "\n" not in v.reason and "rho" not in v.reason
        assert v.plot == "plot-effect-lr" and v.next_step is None


def test_verdict_sentence_gives_the_effect_in_metric_units() -> None:
    # accuracy 0.5 at lr 0.001 rising linearly in log10(lr) to 0.9 at lr 10: "rises by 0.3x from lr 0.00x to ..."
    study = synthetic(lambda lx, r: 0.5 + 0.1 * (lx + 3) + r.gauss(0, 0.01), n=120)
    study.set_user_attr("metric", "val_accuracy")
    v = check(study, [Prediction(param="lr", claim="increasing")])[0]
    assert v.verdict == SUPPORTED
    m = re.fullmatch(
        r"val_accuracy rises by ([0-9.]+) from lr ([0-9.]+) \(([0-9.]+)\) to ([0-9.]+) \(([0-9.]+)\)\.", v.reason
    )
    assert m, v.reason
    rise, x0, m0, x1, m1 = map(float, m.groups())
    assert abs((m1 - m0) - rise) < 0.01 and abs(m0 - (0.5 + 0.1 * (math.log10(x0) + 3))) < 0.03
    assert x0 < 0.005 and x1 > 4 and 0.25 < rise < 0.4  # group means of the lowest and highest sixth


def test_short_evidence_says_what_to_run() -> None:
    study = synthetic(lambda lx, r: 0.02 * lx + r.gauss(0, 0.3), n=20, seed=2)
    v = check(study, [Prediction(param="lr", claim="increasing")])[0]
    assert v.verdict == UNKNOWN
    assert v.next_step and "design" in v.next_step and "hpo run" in v.next_step


def test_too_few_trials_is_not_enough_evidence() -> None:
    study = synthetic(lambda lx, r: lx, n=MIN_TRIALS - 1)  # a perfect trend, but too few trials
    out = check(study, [Prediction(param="lr", claim="increasing")])[0]
    assert out.verdict == UNKNOWN and out.n_trials == MIN_TRIALS - 1
    assert f"at least {MIN_TRIALS}" in out.reason
    assert verdicts(synthetic(lambda lx, r: lx, n=MIN_TRIALS), ("increasing",))["increasing"] == SUPPORTED


def test_prediction_about_unknown_param_exit_2(tmp_path) -> None:  # noqa: ANN001
    path = write_study(tmp_path / "s.yaml", "p", predictions=[{"param": "momentum", "claim": "increasing"}])
    res = hpo_cli("check", str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}")
    assert res.returncode == 2
    assert "predictions: parameter 'momentum' is not in the space" in res.stderr
    assert res.stderr.count("\n") == 1


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_check_cli_prints_verdicts(tmp_path, fmt: str) -> None:  # noqa: ANN001
    import json

    import optuna
    from analyst_helpers import DISTS
    from optuna.trial import create_trial

    url = f"sqlite:///{tmp_path / 'h.db'}"
    study = optuna.create_study(study_name="h", storage=url, direction="maximize")
    study.add_trials(
        [
            create_trial(value=float(i), params={"lr": 10 ** (-3 + i / 10)}, distributions={"lr": DISTS["lr"]})
            for i in range(30)
        ]
    )
    path = write_study(tmp_path / "h.yaml", "h", predictions=[{"param": "lr", "claim": "increasing"}])
    res = hpo_cli("check", str(path), "--storage", url, "-f", fmt)
    assert res.returncode == 0, res.stderr
    if fmt == "json":
        out = json.loads(res.stdout)[0]
        assert out["verdict"] == "supported" and out["n_trials"] == 30 and out["evidence"]["rho"] == 1.0
    else:
        assert "supported" in res.stdout


def test_check_reads_at_80_columns_in_plain_words(tmp_path) -> None:  # noqa: ANN001
    """One block per prediction (claim in plain words, then verdict and evidence as a sentence), every line within
    the 80 columns the terminal has, and no internal claim names in the prose."""
    import optuna
    from analyst_helpers import DISTS
    from optuna.trial import create_trial

    url = f"sqlite:///{tmp_path / 'h.db'}"
    study = optuna.create_study(study_name="h", storage=url, direction="maximize")
    study.add_trials(
        [
            create_trial(value=float(i), params={"lr": 10 ** (-3 + i / 10)}, distributions={"lr": DISTS["lr"]})
            for i in range(30)
        ]
    )
    predictions = [
        {"param": "lr", "claim": "increasing", "note": "a larger learning rate always helps, whatever the batch size"},
        {"param": "lr", "claim": "optimum_near_edge", "better": "lower"},
        {"param": "lr", "claim": "diminishing_returns", "better": "higher"},
    ]
    path = write_study(tmp_path / "h.yaml", "h", predictions=predictions)
    res = hpo_cli("check", str(path), "--storage", url, env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, res.stdout
    for internal in ("optimum_near_edge", "diminishing_returns", "is better)"):
        assert internal not in res.stdout, res.stdout
    assert "the best lr is at the low end of its range" in res.stdout
    assert "raising lr helps less and less" in res.stdout
    blocks = [b for b in res.stdout.split("\n\n")[1:] if b.strip()]
    assert len(blocks) == 3 and all(b.splitlines()[0].startswith("lr: ") for b in blocks), res.stdout
    assert sum(len(b.splitlines()) for b in blocks) <= 15, res.stdout  # 36 lines for 3 verdicts in the old table
