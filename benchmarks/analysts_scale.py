"""The analysts' commands on a big study: ``hpo studies/best/trials/check/importance/report`` against Optuna's own.

Usage: python benchmarks/analysts_scale.py postgresql+psycopg://postgres@127.0.0.1:5432/test [n_trials]

Creates a scratch database next to the given one (SQLite: a file in a temporary folder), creates a study with
Optuna and fills it by SQL (``executemany`` into Optuna's tables: 100,000 trials in seconds, where
``Study.add_trials`` takes minutes), times each CLI command as a subprocess with its peak RSS (``wait4``), and the
same answers through plain Optuna (``study.trials_dataframe()``, ``get_param_importances``, ``study.best_trial``)
in a subprocess too, prints a table with the ratio, and drops the scratch database.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
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


def timed(cmd: list[str], env: dict[str, str] | None = None, limit: float = 600) -> tuple[float, float, int, bool]:
    """Run ``cmd``: (seconds, its peak RSS in MB, bytes written on stdout, finished within ``limit`` seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
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
    if proc.returncode not in (0, -9):
        raise RuntimeError(f"{cmd[:4]}... exited {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024, out_bytes, proc.returncode == 0


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


def main(url: str, n: int) -> None:
    scratch, admin, db = _scratch(url)
    name = "analysts-scale"
    try:
        t = time.perf_counter()
        build_study(scratch, name, n)
        print(f"built {n} trials by SQL in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        hpo = [sys.executable, "-m", "hpo"]
        env = {**os.environ, "HPO_STORAGE": scratch}
        folder = Path(tempfile.mkdtemp(prefix="hpo-report-"))
        rows = [
            ("hpo studies", hpo + ["studies"], "studies"),
            ("hpo best", hpo + ["best", name], "best"),
            ("hpo trials -n 20", hpo + ["trials", name, "-n", "20"], "trials_head"),
            ("hpo check", hpo + ["check", name], None),
            ("hpo trials -f csv", hpo + ["trials", name, "-f", "csv"], "csv"),
            ("hpo trials -f json", hpo + ["trials", name, "-f", "json"], None),
            ("hpo importance", hpo + ["importance", name], "importance"),
            ("hpo report", hpo + ["report", name, "-o", str(folder / "r.html")], "report"),
        ]
        skip_optuna = os.environ.get("ANALYSTS_SKIP_OPTUNA", "").split(",")
        print(f"{n} trials, {make_url(url).get_backend_name()}", flush=True)
        print("| command | hpo s | hpo peak MB | Optuna's own | Optuna s | Optuna peak MB | ratio |")
        print("|---|---|---|---|---|---|---|")
        limit = float(os.environ.get("ANALYSTS_LIMIT_S", "300"))
        for label, cmd, theirs in rows:
            s, mb, size, _ = timed(cmd, env, limit)
            extra = f" ({size / 2**20:.1f} MB out)" if "-f" in cmd else ""
            if theirs and theirs not in skip_optuna:
                os_, omb, _, done = timed(_optuna(scratch, name, theirs), limit=limit)
                took = f"{os_:.1f}" if done else f"killed at {limit:.0f}"
                ratio = f"{os_ / s:.1f}x" if done else f"> {limit / s:.0f}x"
                other = f"| `{OPTUNA_SNIPPETS[theirs]}` | {took} | {omb:.0f} | {ratio} |"
            else:
                other = "| - | | | |"
            print(f"| `{label}`{extra} | {s:.2f} | {mb:.0f} {other}", flush=True)
    finally:
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            admin.dispose()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100_000)
