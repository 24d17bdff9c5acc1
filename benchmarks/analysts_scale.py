"""The analysts' commands on a big study: ``hpo studies/best/trials/check/importance/report`` against Optuna's own.

Usage: python benchmarks/analysts_scale.py postgresql+psycopg://postgres@127.0.0.1:5432/test [n_trials]
       [--before DIR]  (DIR: a checkout of an earlier hpo, e.g. ``git archive <commit> hpo | tar -x -C DIR``; its
       commands run in the same session, on the same study, as a "before" column)

Creates a scratch database next to the given one (SQLite: a file in a temporary folder), creates a study with
Optuna and fills it by SQL (``executemany`` into Optuna's tables: 100,000 trials in seconds, where
``Study.add_trials`` takes minutes), times each CLI command as a subprocess with its peak RSS (``wait4``), and the
same answers through plain Optuna (``study.trials_dataframe()``, ``get_param_importances``, ``study.best_trial``)
in a subprocess too, prints a table with the ratio, and drops the scratch database. ``hpo check`` reads a study
file with two predictions about the study's parameters. The dashboard rows time optuna-dashboard's own API (the study
list, one study's page) served by ``hpo dashboard`` and by optuna-dashboard's ``run_server`` on the same study.
CPU seconds (user + system of the command's process, from ``wait4``) are the figure that the machine's load moves
least; every process is capped at ``ANALYSTS_MEMORY_GB`` (default 6) of address space.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import sqlalchemy as sa
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)
from optuna.storages._rdb import models
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

DISTRIBUTIONS = {
    "lr": FloatDistribution(1e-4, 1.0, log=True),
    "layers": IntDistribution(1, 8),
    "optimizer": CategoricalDistribution(["sgd", "adam", "=cmd|' /C calc'!A0"]),
}


def build_study(url: str, name: str, n: int, mixed: bool = False, seed: int = 0, chunk: int = 20_000) -> optuna.Study:
    """A study of ``n`` trials with the three parameters of :data:`DISTRIBUTIONS`, written by SQL.

    ``mixed``: states COMPLETE, PRUNED, FAIL and RUNNING (values and completion times only where Optuna would
    have them; a few trials without some parameter) and user attributes of every kind (a formula-like reason)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    study.set_user_attr("metric", "accuracy")
    engine = sa.create_engine(url)
    sid = study._study_id
    rnd = random.Random(seed)
    t0 = datetime(2026, 1, 1)
    dist_json = {k: distribution_to_json(d) for k, d in DISTRIBUTIONS.items()}
    tt, pt = models.TrialModel.__table__, models.TrialParamModel.__table__
    vt, ut = models.TrialValueModel.__table__, models.TrialUserAttributeModel.__table__
    for lo in range(0, n, chunk):
        numbers = range(lo, min(n, lo + chunk))
        trials, params, values, attrs = [], [], [], []
        plan = []
        for i in numbers:
            state = TrialState.COMPLETE
            if mixed:
                state = rnd.choices(
                    [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING], [6, 2, 1, 1]
                )[0]
            start = t0 + timedelta(seconds=i * 7, microseconds=rnd.randrange(0, 1_000_000, 1000) if i % 3 else 0)
            done = start + timedelta(seconds=rnd.uniform(1, 100)) if state != TrialState.RUNNING else None
            trials.append(
                {"number": i, "study_id": sid, "state": state.name, "datetime_start": start, "datetime_complete": done}
            )
            plan.append((i, state))
        with engine.begin() as conn:
            conn.execute(tt.insert(), trials)
            ids = dict(
                conn.execute(
                    sa.select(tt.c.number, tt.c.trial_id).where(
                        tt.c.study_id == sid, tt.c.number >= numbers.start, tt.c.number < numbers.stop
                    )
                ).all()
            )
            for i, state in plan:
                tid = ids[i]
                lr = 10 ** rnd.uniform(-4, 0)
                layers = rnd.randint(1, 8)
                opt = rnd.randrange(3)
                for k, v in (("lr", lr), ("layers", float(layers)), ("optimizer", float(opt))):
                    if mixed and k == "layers" and i % 17 == 5:
                        continue
                    params.append(
                        {"trial_id": tid, "param_name": k, "param_value": v, "distribution_json": dist_json[k]}
                    )
                if state == TrialState.COMPLETE or (mixed and state == TrialState.PRUNED and i % 2):
                    acc = 1 - abs(lr - 0.01) * 2 - layers * 0.01 + rnd.gauss(0, 0.05) + (0.1 if opt == 1 else 0)
                    values.append(
                        {"trial_id": tid, "objective": 0, "value": acc, "value_type": "FINITE"}
                        if not (mixed and i % 101 == 7)
                        else {"trial_id": tid, "objective": 0, "value": None, "value_type": "INF_NEG"}
                    )
                attrs.append({"trial_id": tid, "key": "seed", "value_json": json.dumps(1_000_000 + i)})
                attrs.append({"trial_id": tid, "key": "worker", "value_json": json.dumps(f"node{i % 4}:{i % 3}")})
                if state != TrialState.RUNNING:
                    attrs.append({"trial_id": tid, "key": "epochs_reached", "value_json": json.dumps(layers * 3)})
                if mixed and state == TrialState.PRUNED:
                    attrs.append({"trial_id": tid, "key": "reason", "value_json": json.dumps("=HYPERLINK(1) pruned")})
            for table, rows in ((pt, params), (vt, values), (ut, attrs)):
                if rows:
                    conn.execute(table.insert(), rows)
    engine.dispose()
    return study


def _scratch(url: str) -> tuple[str, sa.Engine | None, str]:
    """A fresh database next to ``url``: (its URL, the admin engine to drop it with, its name)."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        folder = tempfile.mkdtemp(prefix="hpo-analysts-")
        return f"sqlite:///{folder}/bench.db", None, folder
    db = f"hpo_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(u, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {db}"))
    return u.set(database=db).render_as_string(hide_password=False), admin, db


def _cap_memory() -> None:
    cap = int(float(os.environ.get("ANALYSTS_MEMORY_GB", "6")) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def timed(
    cmd: list[str], env: dict[str, str] | None = None, limit: float = 600, cwd: str | None = None
) -> tuple[float, float, int, str, float]:
    """Run ``cmd``: (seconds, its peak RSS in MB, bytes written on stdout, how it ended: "" when it finished,
    "killed" past ``limit`` seconds, "failed" otherwise (e.g. over the memory cap), CPU seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=cwd, preexec_fn=_cap_memory
    )
    killer = threading.Timer(limit, proc.kill)
    killer.start()
    out_bytes = 0
    assert proc.stdout is not None
    while chunk := proc.stdout.read(1 << 16):
        out_bytes += len(chunk)
    _, status, usage = os.wait4(proc.pid, 0)
    killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    ended = "" if proc.returncode == 0 else ("killed" if proc.returncode == -9 else "failed")
    return seconds, usage.ru_maxrss / 1024, out_bytes, ended, usage.ru_utime + usage.ru_stime


CHECK_FILE = """name: {name}
direction: maximize
metric: val_accuracy
objective:
  kind: training
  data: {{source: spirals, n_train: 400, n_val: 100, seed: 0}}
  model: {{kind: mlp, layers: [10], activation: relu}}
  loss: mse
space:
  lr: {{type: float, low: 0.0001, high: 1.0, log: true}}
  layers: {{type: int, low: 1, high: 8}}
predictions:
  - {{param: lr, claim: interior_optimum}}
  - {{param: layers, claim: decreasing}}
"""


def dashboard_times(
    cmd: list[str], port: int, paths: list[str], limit: float, env: dict[str, str] | None = None, cwd: str | None = None
) -> list[tuple[float, int] | None]:
    """Start a dashboard server, GET each path once (seconds, bytes; None: no answer within ``limit``), stop it."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd, preexec_fn=_cap_memory
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/api/meta", timeout=10).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    return [None] * len(paths)
                time.sleep(0.5)
        out: list[tuple[float, int] | None] = []
        for path in paths:
            t = time.perf_counter()
            try:
                body = urllib.request.urlopen(base + path, timeout=limit).read()
                out.append((time.perf_counter() - t, len(body)))
            except OSError:
                out.append(None)
        return out
    finally:
        proc.kill()
        proc.wait()


OPTUNA_SNIPPETS = {
    "best": "s.best_trial",
    "trials_head": "s.trials_dataframe().head(20)",
    "csv": "s.trials_dataframe().to_csv(sys.stdout)",
    "importance": "optuna.importance.get_param_importances(s)",
    "studies": "optuna.get_all_study_summaries(url)",
    "report": "optuna.visualization.plot_optimization_history(s).write_html(...)",
}
OPTUNA_CODE = {
    "best": "print(s.best_trial.number)",
    "trials_head": "print(s.trials_dataframe().head(20).shape)",
    "csv": "import sys; s.trials_dataframe().to_csv(sys.stdout)",
    "importance": "print(optuna.importance.get_param_importances(s))",
    "studies": "print(len(optuna.get_all_study_summaries(storage=url)))",
    "report": "import tempfile; optuna.visualization.plot_optimization_history(s).write_html(tempfile.mktemp())",
}


def _optuna(url: str, name: str, what: str) -> list[str]:
    code = (
        "import optuna; optuna.logging.set_verbosity(optuna.logging.WARNING); "
        f"url={url!r}; s=optuna.load_study(study_name={name!r}, storage=url); " + OPTUNA_CODE[what]
    )
    return [sys.executable, "-c", code]


def _cell(seconds: float, mb: float, ended: str, limit: float, cpu: float | None = None) -> str:
    if ended == "killed":
        return f"killed at {limit:.0f} | | {mb:.0f}"
    if ended == "failed":
        return f"failed ({mb:.0f} MB: over the memory cap?) | | {mb:.0f}"
    return f"{seconds:.2f} | {cpu:.2f} | {mb:.0f}" if cpu is not None else f"{seconds:.1f} | | {mb:.0f}"


def main(url: str, n: int, before: str | None = None) -> None:
    scratch, admin, db = _scratch(url)
    name = "analysts-scale"
    try:
        t = time.perf_counter()
        build_study(scratch, name, n)
        print(f"built {n} trials by SQL in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        if admin is not None:  # fresh planner statistics, as autovacuum would gather them on a live database
            analyze = sa.create_engine(scratch, isolation_level="AUTOCOMMIT")
            with analyze.connect() as conn:
                conn.execute(sa.text("ANALYZE"))
            analyze.dispose()
        hpo = [sys.executable, "-m", "hpo"]
        env = {**os.environ, "HPO_STORAGE": scratch}
        folder = Path(tempfile.mkdtemp(prefix="hpo-report-"))
        check_file = folder / "check.yaml"
        check_file.write_text(CHECK_FILE.format(name=name))
        rows = [
            ("hpo studies", hpo + ["studies"], "studies"),
            ("hpo best", hpo + ["best", name], "best"),
            ("hpo trials -n 20", hpo + ["trials", name, "-n", "20"], "trials_head"),
            ("hpo check (2 predictions)", hpo + ["check", str(check_file)], None),
            ("hpo trials -f csv", hpo + ["trials", name, "-f", "csv"], "csv"),
            ("hpo trials -f json", hpo + ["trials", name, "-f", "json"], None),
            ("hpo importance", hpo + ["importance", name], "importance"),
            ("hpo report", hpo + ["report", name, "-o", str(folder / "r.html")], "report"),
        ]
        skip_optuna = os.environ.get("ANALYSTS_SKIP_OPTUNA", "").split(",")
        print(f"{n} trials, {make_url(url).get_backend_name()}", flush=True)
        was = "| before s | before CPU s | before peak MB " if before else ""
        print(f"| command {was}| hpo s | hpo CPU s | hpo peak MB | Optuna's own | Optuna s | Optuna peak MB | ratio |")
        print("|---" * (8 + (3 if before else 0)) + "|")
        limit = float(os.environ.get("ANALYSTS_LIMIT_S", "300"))
        for label, cmd, theirs in rows:
            then = ""
            if before:
                bs, bmb, _, bend, bcpu = timed(cmd, env, limit, cwd=before)
                then = f"| {_cell(bs, bmb, bend, limit, bcpu)} "
            s, mb, size, ended, cpu = timed(cmd, env, limit)
            extra = f" ({size / 2**20:.1f} MB out)" if "-f" in cmd else ""
            if theirs and theirs not in skip_optuna:
                os_, omb, _, oend, _ = timed(_optuna(scratch, name, theirs), limit=limit)
                ratio = f"{os_ / s:.1f}x" if not oend else f"> {limit / s:.0f}x"
                other = f"| `{OPTUNA_SNIPPETS[theirs]}` | {_cell(os_, omb, oend, limit).split(' | ')[0]} | {omb:.0f} | {ratio} |"
            else:
                other = "| - | | | |"
            print(f"| `{label}`{extra} {then}| {_cell(s, mb, ended, limit, cpu)} {other}", flush=True)
        if "dashboard" not in skip_optuna:
            _dashboards(scratch, env, limit, before)
    finally:
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            admin.dispose()


def _dashboards(scratch: str, env: dict[str, str], limit: float, before: str | None) -> None:
    """optuna-dashboard's API on the study: served by ``hpo dashboard`` (and the earlier hpo) and by itself."""
    paths = ["/api/studies", "/api/studies/1"]
    port = 18000 + os.getpid() % 1000
    ours = [sys.executable, "-m", "hpo", "dashboard", "--port", str(port)]
    bare = [
        sys.executable,
        "-c",
        f"import optuna_dashboard; optuna_dashboard.run_server({scratch!r}, host='127.0.0.1', port={port})",
    ]
    runs = [("hpo dashboard", ours, None)]
    if before:
        runs.insert(0, ("hpo dashboard (before)", ours, before))
    runs.append(("optuna_dashboard.run_server", bare, None))
    print("\n| dashboard | " + " | ".join(f"GET {p} s (MB)" for p in paths) + " |")
    print("|---" * (1 + len(paths)) + "|")
    for label, cmd, cwd in runs:
        got = dashboard_times(cmd, port, paths, limit, env, cwd)
        cells = [f"{x[0]:.2f} ({x[1] / 2**20:.1f})" if x else f"no answer in {limit:.0f}" for x in got]
        print(f"| `{label}` | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    earlier = None
    if "--before" in args:
        i = args.index("--before")
        earlier = str(Path(args[i + 1]).resolve())
        del args[i : i + 2]
    main(args[0], int(args[1]) if len(args) > 1 else 100_000, earlier)
