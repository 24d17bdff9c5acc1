"""Prediction checks on synthetic studies whose truth is known (optuna.create_trial; no training)."""

from __future__ import annotations

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
