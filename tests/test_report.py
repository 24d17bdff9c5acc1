"""The HTML report: every section on a real-shaped study; honest on empty / failed studies; safe file names."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from hpo.report import safe_filename, write_report

from .analyst_helpers import DISTS, mixed_study
from .conftest import hpo_cli


def test_report_has_every_plot(sqlite_url: str, tmp_path: Path) -> None:
    mixed_study(sqlite_url, "rep", n=40)
    path = write_report(sqlite_url, "rep", tmp_path / "r.html")
    page = path.read_text()
    ids = set(re.findall(r'id="(plot-[^"]+)"', page))
    assert {"plot-history", "plot-importances", "plot-interaction", "plot-optimizer", "plot-curves"} <= ids
    assert {"plot-effect-lr", "plot-effect-batch_size", "plot-effect-epochs"} <= ids
    assert "learning rate matters most" in page
    assert '"type":"log"' in page.replace(" ", "")  # lr's plot has a log axis
    from plotly.offline import get_plotlyjs

    assert get_plotlyjs() in page  # plotly.js inlined: works offline
    assert "Best trials" in page and "Glossary" in page
    table = page[page.index("id='best-trials'") :].split("</table>")[0]
    assert "params_" not in table and "None" not in table and "duration (s)" in table and "learning rate" in table
    for cell in re.findall(r"<td class='num'>([^<]*)</td>", table):  # numbers to 3 significant figures
        digits = cell.replace(".", "").replace("-", "").lstrip("0")
        assert len(digits) <= 3 or "." not in cell, cell


def test_figures_are_plotly_objects_with_data(sqlite_url: str) -> None:
    from hpo.report import figures

    study = mixed_study(sqlite_url, "figs", n=40)
    figs = figures(study)
    assert {"effect-lr", "effect-batch_size", "effect-epochs", "optimizer", "interaction", "curves"} <= set(figs)
    for key, fig in figs.items():
        assert any(len(getattr(t, "x", None) or getattr(t, "y", None) or []) for t in fig.data), key
    effect = figs["effect-lr"]
    assert effect.layout.xaxis.type == "log"
    means = next(t for t in effect.data if t.name.startswith("mean"))
    assert sum(int(n[2:]) for n in means.text) == 20  # n per group adds up to the 20 complete trials
    optim = figs["optimizer"]
    assert all("pruned" in t.x[0] for t in optim.data if t.type == "box" and len(t.x))
    curves = figs["curves"]
    outcomes = Counter(t.name.split(":")[0] for t in curves.data)  # a median and a band per outcome, not 40 lines
    assert outcomes == {"complete": 2, "pruned": 2, "fail": 2}
    # honest legends: how many trials each median stands on, at its first and last epoch
    medians = [t for t in curves.data if "median" in t.name]
    assert all(re.search(r"median \(\d+ trials at epoch \d+, \d+ at \d+\)", t.name) for t in medians), medians
    # readable log axes: labels at 1, 2, 5 x 10^k, each a whole number (not plotly's minor "2 3 4" digits)
    for axis in (figs["interaction"].layout.xaxis, figs["interaction"].layout.yaxis):
        assert axis.type == "log" and axis.tickvals, axis
        for value, label in zip(axis.tickvals, axis.ticktext, strict=True):
            assert float(label) == pytest.approx(value) and f"{value:.0e}"[0] in "125", (value, label)


def test_empty_study_gives_honest_report(sqlite_url: str, tmp_path: Path) -> None:
    optuna.create_study(study_name="empty", storage=sqlite_url)
    res = hpo_cli("report", "empty", "--storage", sqlite_url, "-o", str(tmp_path / "e.html"))
    assert res.returncode == 0, res.stderr
    page = (tmp_path / "e.html").read_text()
    assert "No trial has finished yet" in page and 'id="plot-' not in page


def test_only_failed_trials(sqlite_url: str, tmp_path: Path) -> None:
    s = optuna.create_study(study_name="failed", storage=sqlite_url)
    s.add_trials(
        [
            create_trial(
                state=TrialState.FAIL,
                params={"lr": 0.01},
                distributions={"lr": DISTS["lr"]},
                user_attrs={"error": "RuntimeError: boom"},
            )
            for _ in range(3)
        ]
    )
    res = hpo_cli("report", "failed", "--storage", sqlite_url, "-o", str(tmp_path / "f.html"))
    assert res.returncode == 0, res.stderr
    page = (tmp_path / "f.html").read_text()
    assert "No trial completed" in page and "3 fail" in page and "RuntimeError: boom" in page
    res = hpo_cli("best", "failed", "--storage", sqlite_url)
    assert res.returncode == 0 and "no completed trial" in res.stdout


def test_unwritable_output_exit_2(sqlite_url: str, tmp_path: Path) -> None:
    mixed_study(sqlite_url, "w", n=8)
    res = hpo_cli("report", "w", "--storage", sqlite_url, "-o", str(tmp_path / "missing-dir" / "r.html"))
    assert res.returncode == 2
    assert res.stderr.startswith("error: cannot write the report to") and res.stderr.count("\n") == 1


def test_unknown_study_exit_2(sqlite_url: str, tmp_path: Path) -> None:
    mixed_study(sqlite_url, "w", n=4)
    res = hpo_cli("report", "nope", "--storage", sqlite_url, "-o", str(tmp_path / "r.html"))
    assert res.returncode == 2 and "no study named 'nope'" in res.stderr


def test_hostile_study_name_stays_in_folder(sqlite_url: str, tmp_path: Path) -> None:
    hostile = "../../etc/x"
    mixed_study(sqlite_url, hostile, n=4)
    folder = tmp_path / "reports"
    folder.mkdir()
    path = write_report(sqlite_url, hostile, folder)
    assert path.parent.resolve() == folder.resolve() and path.is_file()
    assert list(folder.iterdir()) == [path]
    for name in ("..", "/", "a/../../b", "..\\..\\c", ""):
        assert "/" not in safe_filename(name) and not safe_filename(name).startswith(".")


def test_seeded_best_is_a_configurations_mean_not_a_lucky_seed(sqlite_url: str, tmp_path: Path) -> None:
    """With seeds, the summary names the best configuration by its mean over seeds (with its spread) and the single
    best trial only as such; the optimizers get a sentence saying which does best on average and whether the data
    tell it from the next; a table ranks configurations by their means."""
    from optuna.distributions import CategoricalDistribution

    dists = {"lr": DISTS["lr"], "optimizer": CategoricalDistribution(["adam", "sgd_momentum"])}
    study = optuna.create_study(study_name="seeded", storage=sqlite_url, direction="maximize")
    lucky = [0.95, 0.50, 0.52, 0.51]  # adam: one lucky seed, a poor mean
    steady = [0.80, 0.79, 0.81, 0.80]  # SGD with momentum: the best mean
    for opt, values in (("adam", lucky), ("sgd_momentum", steady)):
        for v in values:
            study.add_trial(create_trial(value=v, params={"lr": 0.01, "optimizer": opt}, distributions=dists))
    html_text = write_report(sqlite_url, "seeded", tmp_path / "r.html").read_text()
    text = re.sub(r"<[^>]+>", " ", html_text)
    assert "Best configuration by its mean over 4 seeds: value 0.8 ± 0.00816" in text, text[:2000]
    assert "optimizer SGD with momentum" in text
    assert "The single best trial, #0 at 0.95, is one seed of learning rate 0.01, optimizer adam" in text
    assert "whose 4 seeds average 0.62 ± 0.22" in text
    # the lucky seed makes adam's spread (0.22) larger than the lead (0.18): the sentence says the data cannot tell
    assert "SGD with momentum does best; but its lead over adam (0.18) is within the spread over seeds (0.22)" in text
    assert "id='best-configurations-table'" in html_text and "sgd_momentum" not in text.split("Glossary")[0]
