"""Bounds a study file and a command may not pass (issue 21 items 9-11, issue 23 item 1).

Inputs that hung or exhausted a machine (an alias bomb, a billion seeds, a grid of 10^24 points, ten thousand
parameters, a 26 MB file) are each refused in one ``error:`` line naming the field, within 1 s and 200 MB; a grace
period that lets workers reap each other's live trials is refused; a study whose creation stopped midway (Ctrl-C) is
completed with its whole design by the next run, never by sampled trials; a resumed file whose space gained a fixed
parameter is refused before anything is written; a user attribute of any JSON shape never breaks ``hpo studies`` or
``hpo trials``.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from hpo.cli import app
from hpo.design import design_identity, design_trials
from hpo.limits import MAX_FILE_BYTES, MIN_GRACE_S
from hpo.space import encode_params
from hpo.spec import parse_spec

from .conftest import ROOT, hpo_cli
from .timing import ceiling

ENV = {"PYTHONPATH": str(ROOT)}


def doc(name: str, **overrides: Any) -> dict[str, Any]:
    """A study of a fast user objective (``tests.fast_objectives:quadratic``) with a small design."""
    base: dict[str, Any] = {
        "name": name,
        "direction": "maximize",
        "objective": {"kind": "tests.fast_objectives:quadratic", "steps": 1},
        "space": {"lr": {"type": "float", "low": 0.001, "high": 1.0, "log": True}},
        "design": {"baseline": {"lr": 0.01}, "sweeps": {"lr": [0.001, 0.1, 1.0]}, "seeds": 2},
        "sampler": {"name": "random", "seed": 0},
        "budget": {"n_trials": 8},
    }
    base.update(overrides)
    return base


def write(path: Path, data: dict[str, Any] | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------- exhaustion inputs


ALIAS_BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
)

#: What a measured child prints: the first line of the error, seconds spent in load_spec, its peak RSS (KiB).
MEASURE = """
import sys, time
from hpo.errors import SpecError
from hpo.spec import load_spec
start = time.monotonic()
try:
    load_spec(sys.argv[1])
    print("accepted")
except SpecError as exc:
    print(str(exc).splitlines()[0])
print(time.monotonic() - start)
# VmHWM: this image's own peak (ru_maxrss carries the forking parent's peak across exec: a pytest worker's)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def _grid(n_params: int, n_choices: int) -> dict[str, Any]:
    return {f"p{i}": {"choices": list(range(n_choices))} for i in range(n_params)}


def exhausting(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Each input as reported, with the words its refusal names."""
    flow = ", ".join(f"p{i}: 1" for i in range(10_000))  # 10,000 fixed parameters in 99 KB
    many = yaml.safe_dump(doc("s", design=None, space=None)).replace("space: null", f"space: {{{flow}}}")
    seeds = doc("s", design={"baseline": {"lr": 0.01}, "seeds": 10**9})
    sample = doc("s", design={"baseline": {"lr": 0.01}, "sample": {"n": 10**12, "params": ["lr"]}})
    float_seeds = write(tmp / "float-seeds.yaml", yaml.safe_dump(seeds).replace("1000000000", "1.0e+9"))
    huge = tmp / "huge.yaml"
    write(huge, doc("s"))
    with huge.open("a") as fh:
        fh.write("description: " + "x" * (26 * 2**20) + "\n")
    return {
        "alias bomb": (write(tmp / "bomb.yaml", ALIAS_BOMB), "aliases are expanded"),
        "recursive alias": (write(tmp / "loop.yaml", "a: &a [1, *a]\n"), "contains it"),
        "design.seeds 1e9": (write(tmp / "seeds.yaml", seeds), "design.seeds"),
        "design.seeds 1.0e9 (a float)": (float_seeds, "design.seeds"),
        "design.sample.n 1e12": (write(tmp / "sample.yaml", sample), "design.sample.n"),
        "grid of 10^24": (
            write(tmp / "grid.yaml", doc("s", space=_grid(24, 10), design=None, sampler={"name": "grid"})),
            "grid",
        ),  # fmt: skip
        "population.size 1e7": (write(tmp / "pop.yaml", doc("s", population={"size": 10**7})), "population.size"),
        "26 MB file": (huge, f"{MAX_FILE_BYTES // 1024} KiB"),
        "10,000 parameters": (write(tmp / "params.yaml", many), "space"),
    }


def test_each_exhausting_input_is_refused_in_a_second_and_200_mb(tmp_path: Path) -> None:
    """Measured in a fresh interpreter (time in the file's reading and checking; peak RSS of the whole process), then
    through ``hpo check``: exit 2, one ``error:`` line naming the field, no traceback."""
    for what, (path, names) in exhausting(tmp_path).items():
        res = subprocess.run(
            [sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=ceiling(60), cwd=ROOT
        )
        assert res.returncode == 0, (what, res.stderr[-2000:])
        message, seconds, rss_kib = res.stdout.splitlines()
        assert names in message and message != "accepted", (what, message)
        assert float(seconds) <= ceiling(1.0), (what, seconds)
        assert int(rss_kib) <= 200 * 1024, (what, rss_kib)
        check = CliRunner().invoke(app, ["check", str(path)])
        lines = check.stderr.strip().splitlines()
        assert check.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (what, check.stderr)
        assert names in lines[0] and "Traceback" not in check.stderr + check.stdout, (what, check.stderr)
        print(f"{what}: refused in {float(seconds):.3f} s, peak RSS {int(rss_kib) / 1024:.0f} MiB")


def test_limits_leave_the_shipped_studies_alone() -> None:
    """Every study file in studies/ still reads (none is near a bound)."""
    from hpo.spec import load_spec

    for path in sorted((ROOT / "studies").glob("*.yaml")):
        load_spec(path)


# --------------------------------------------------------------------------- grace period


def test_tiny_grace_is_refused_everywhere(tmp_path: Path, sqlite_url: str, study_name: str) -> None:
    """``hpo grace STUDY 0.001`` let workers reap each other's live trials: refused, as are a grace under two
    heartbeats (``hpo run``, ``hpo grace``) and one under the floor (``hpo create``); nothing is written."""
    path = write(tmp_path / "s.yaml", doc(study_name))
    for args in (
        ["create", str(path), "--grace", "1"],
        ["run", str(path), "--grace", "15"],  # the default heartbeat is 10 s
        ["run", str(path), "--grace", "3", "--heartbeat", "2"],
    ):
        res = hpo_cli(*args, "--storage", sqlite_url, env=ENV)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: grace period"), res.stderr
    assert not Path(sqlite_url.removeprefix("sqlite:///")).exists() or not optuna.get_all_study_names(sqlite_url)
    assert hpo_cli("create", str(path), "--storage", sqlite_url, "--grace", "30", env=ENV).returncode == 0
    for seconds, flags in (("0.001", []), ("5", []), ("1", ["--heartbeat", "1"])):
        res = hpo_cli("grace", study_name, seconds, *flags, "--storage", sqlite_url, env=ENV)
        assert res.returncode == 2 and res.stderr.startswith("error: grace period"), res.stderr
    assert optuna.load_study(study_name=study_name, storage=sqlite_url).user_attrs["hpo:grace"] == 30.0
    ok = hpo_cli("grace", study_name, str(MIN_GRACE_S), "--heartbeat", "1", "--storage", sqlite_url, env=ENV)
    assert ok.returncode == 0, ok.stderr


# --------------------------------------------------------------------------- creation is all-or-nothing


def _design_of(url: str, name: str) -> tuple[list[str], bool, int]:
    """The study's design trials by identity (sorted), whether its file is stored, and its trials without a design."""
    study = optuna.load_study(study_name=name, storage=url)
    ids, other = [], 0
    for t in study.get_trials(deepcopy=False):
        if "design" in t.user_attrs:
            ids.append(design_identity(t.system_attrs.get("fixed_params") or t.params, t.user_attrs))
        else:
            other += 1
    return sorted(ids), "hpo:spec" in study.user_attrs, other


def _whole_design(data: dict[str, Any]) -> list[str]:
    spec = parse_spec(data)
    assert spec.design is not None
    return sorted(design_identity(encode_params(p), a) for p, a in design_trials(spec.design, spec.space))


def test_half_created_study_is_completed_on_resume(tmp_path: Path, sqlite_url: str, study_name: str) -> None:
    """A creation stopped midway (the study row and 3 of its design's trials, no stored file) is completed by the
    next ``hpo create``: only the missing design trials are queued, then the file is stored."""
    data = doc(study_name, design={**doc("")["design"], "sample": {"n": 4, "params": ["lr"]}}, budget={"n_trials": 12})
    path = write(tmp_path / "s.yaml", data)
    spec = parse_spec(data)
    assert spec.design is not None
    study = optuna.create_study(study_name=study_name, storage=sqlite_url, direction="maximize")
    for params, attrs in design_trials(spec.design, spec.space)[:3]:
        study.enqueue_trial(encode_params(params), user_attrs=attrs)
    res = hpo_cli("create", str(path), "--storage", sqlite_url, env=ENV)
    assert res.returncode == 0, res.stderr
    ids, stored, other = _design_of(sqlite_url, study_name)
    assert ids == _whole_design(data) and stored and other == 0
    again = hpo_cli("create", str(path), "--storage", sqlite_url, env=ENV)  # idempotent
    assert again.returncode == 0 and _design_of(sqlite_url, study_name)[0] == ids


def test_study_stored_by_an_older_hpo_without_its_design_warns(
    tmp_path: Path, sqlite_url: str, study_name: str
) -> None:
    """Older layout: ``hpo:spec`` stored first, the design never queued. One warning line says so."""
    from hpo.spec import stored_form

    data = doc(study_name)
    path = write(tmp_path / "s.yaml", data)
    study = optuna.create_study(study_name=study_name, storage=sqlite_url, direction="maximize")
    study.set_user_attr("hpo:spec", stored_form(parse_spec(data)))
    res = hpo_cli("create", str(path), "--storage", sqlite_url, env=ENV)
    assert res.returncode == 0, res.stderr
    warned = [line for line in res.stderr.splitlines() if "of its design's 8 trials" in line]
    assert len(warned) == 1 and "holds 0 of" in warned[0], res.stderr


def _sqlite_count(db: Path, sql: str) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1) as conn:
            return int(conn.execute(sql).fetchone()[0])
    except sqlite3.Error:
        return 0


@pytest.mark.slow(seconds=15)
@pytest.mark.parametrize("moment", ["study row", "some trials queued", "file stored"])
def test_ctrl_c_during_creation_exits_130_and_rerun_has_the_whole_design(
    moment: str, tmp_path: Path, study_name: str
) -> None:
    """SIGINT just after the study row exists, while its design is being queued, and just after its file is stored:
    ``hpo run`` exits 130 with one line (or, once its worker runs trials, stops them), never runs on to its budget;
    the next run finds a half-made study and queues the rest of the design (none replaced by sampled trials).

    Before: a SIGINT landing in a garbage collector's callback was printed as "Exception ignored" and the run went
    on through all its trials, exit 0."""
    db = tmp_path / "hpo.db"
    url = f"sqlite:///{db}"
    data = doc(study_name, design={"baseline": {"lr": 0.01}, "sweeps": {"lr": [0.001, 0.1, 1.0]}, "seeds": 150})
    data["budget"] = {"n_trials": 600}
    path = write(tmp_path / "s.yaml", data)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpo", "run", str(path), "--storage", url],
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sql = {
        "study row": "SELECT COUNT(*) FROM studies",
        "some trials queued": "SELECT COUNT(*) FROM trials",
        "file stored": "SELECT COUNT(*) FROM study_user_attributes WHERE key = 'hpo:spec'",
    }[moment]
    deadline = time.monotonic() + ceiling(60)
    while _sqlite_count(db, sql) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=ceiling(30))
    finally:
        proc.kill()
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    ids, stored, _ = _design_of(url, study_name)
    if moment == "file stored":
        done = optuna.load_study(study_name=study_name, storage=url).get_trials(states=(TrialState.COMPLETE,))
        assert proc.returncode == 130 or "stopped before the budget was met" in out, (proc.returncode, err[-3000:])
        assert stored and len(done) < 600
    else:
        assert proc.returncode == 130 and "interrupted: " in err, (proc.returncode, err[-3000:])
        assert not stored and len(ids) < 600, "the interrupt came after the creation; the test did not test it"
    res = hpo_cli("create", str(path), "--storage", url, env=ENV)
    assert res.returncode == 0, res.stderr
    ids, stored, other = _design_of(url, study_name)
    assert stored and other == 0 and ids == _whole_design(data)


# --------------------------------------------------------------------------- resumes and stored attributes


@pytest.mark.parametrize(
    "change",
    [
        {"momentum": 0.9},  # a fixed parameter added
        {"momentum": {"value": 0.9}},
    ],
)
def test_resume_with_a_space_that_gained_a_fixed_parameter_is_refused(
    change: dict[str, Any], tmp_path: Path, sqlite_url: str, study_name: str
) -> None:
    data = doc(study_name, design=None)
    assert hpo_cli("create", str(write(tmp_path / "a.yaml", data)), "--storage", sqlite_url, env=ENV).returncode == 0
    before = optuna.load_study(study_name=study_name, storage=sqlite_url)
    attrs, n = dict(before.user_attrs), len(before.trials)
    for other in ({**data, "space": {**data["space"], **change}}, {**data, "space": {}}):
        res = hpo_cli("create", str(write(tmp_path / "b.yaml", other)), "--storage", sqlite_url, env=ENV)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and "space" in lines[0], res.stderr
        assert ("adds momentum" in lines[0]) if other["space"] else ("drops lr" in lines[0]), lines[0]
    after = optuna.load_study(study_name=study_name, storage=sqlite_url)
    assert after.user_attrs == attrs and len(after.trials) == n


def test_malformed_user_attributes_never_break_listing(tmp_path: Path, sqlite_url: str, study_name: str) -> None:
    """A user objective can store any JSON in a trial's attributes: ``hpo studies``/``hpo trials`` still list."""
    path = write(tmp_path / "s.yaml", doc(study_name, design=None, budget={"n_trials": 2}))
    assert hpo_cli("run", str(path), "--storage", sqlite_url, env=ENV).returncode == 0
    study = optuna.load_study(study_name=study_name, storage=sqlite_url)
    tid = study.trials[0]._trial_id
    hostile = {
        "seed": "x",
        "epochs_reached": {"a": [1, 2]},
        "reason": "y" * 200_000,
        "device": [None, {"1": 2}],
        "worker": 1e308,
        "checkpoint_bytes": "lots",
    }
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as conn:  # a finished trial: written as a worker would
        conn.execute("DELETE FROM trial_user_attributes WHERE trial_id = ?", (tid,))
        conn.executemany(
            "INSERT INTO trial_user_attributes (trial_id, key, value_json) VALUES (?, ?, ?)",
            [(tid, key, json.dumps(value)) for key, value in hostile.items()],
        )
    study.set_user_attr("metric", {"not": "a name"})
    study.set_user_attr("budget", "x" * 100_000)
    for args in (["studies"], ["trials", study_name], ["trials", study_name, "-f", "csv"], ["best", study_name]):
        res = hpo_cli(*args, "--storage", sqlite_url, env={**ENV, "COLUMNS": "200"})
        assert res.returncode == 0 and "Traceback" not in res.stderr, (args, res.stderr[-3000:])
        assert len(res.stdout) < 50_000, (args, len(res.stdout))
    js = hpo_cli("trials", study_name, "-f", "json", "--storage", sqlite_url, env=ENV)
    assert js.returncode == 0 and json.loads(js.stdout)
