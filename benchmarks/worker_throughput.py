"""Trials per second and SQL statements per trial: 8 ``hpo`` workers vs 8 plain Optuna workers, one PostgreSQL.

Both sides run a trivial objective (one float parameter, no training) with default TPE, as separate processes on
one study each, in a fresh database each, in the same run; ``--rounds`` (2) runs each side that many times, the
order alternating (Optuna, hpo, hpo, Optuna), and sums them. Statements are counted in every process with
SQLAlchemy's ``before_cursor_execute`` event and summed.

    python benchmarks/worker_throughput.py --url postgresql+psycopg://postgres@127.0.0.1:5432/test
    python benchmarks/worker_throughput.py --quick        # a few trials: checks the script still works

The URL names any database the user may connect to; the script creates its own databases beside it and drops them.
It defaults to ``$HPO_BENCH_URL``, then ``$HPO_TEST_POSTGRES_URL``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent


def objective(trial, ctx=None) -> float:  # noqa: ANN001 - both an hpo objective and a plain Optuna one
    x = ctx.params["x"] if ctx is not None else trial.suggest_float("x", -10.0, 10.0)
    return (x - 2.0) ** 2


# --------------------------------------------------------------------------- one worker process


def _count_statements() -> list[int]:
    import sqlalchemy
    from sqlalchemy.engine import Engine

    count = [0]

    def before(*_args: object) -> None:
        count[0] += 1

    sqlalchemy.event.listen(Engine, "before_cursor_execute", before)
    return count


def child(side: str, url: str, study: str, n_trials: int, study_file: str) -> None:
    """One worker: pull trials, then print a JSON line with its statement count."""
    count = _count_statements()
    if side == "optuna":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        optuna.load_study(study_name=study, storage=url).optimize(objective, n_trials=n_trials)
    else:
        sys.path.insert(0, str(HERE))
        from hpo.spec import load_spec
        from hpo.worker import WorkerOptions, run_worker

        run_worker(load_spec(study_file), url, WorkerOptions(threads=1, seed_offset=None))
    print(json.dumps({"statements": count[0]}), flush=True)


# --------------------------------------------------------------------------- the comparison


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    import sqlalchemy
    from sqlalchemy.engine import make_url

    url = make_url(admin_url)
    name = f"hpo_bench_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def run_side(side: str, admin_url: str, trials: int, workers: int, tmp: Path) -> dict[str, float]:
    import optuna

    from hpo.storage import open_storage

    study = f"bench-{side}"
    study_file = tmp / f"{side}.yaml"
    study_file.write_text(
        json.dumps(
            {
                "name": study,
                "direction": "minimize",
                "metric": "value",
                "objective": {"kind": "worker_throughput:objective"},
                "space": {"x": {"type": "float", "low": -10.0, "high": 10.0}},
                "sampler": {"name": "tpe"},
                "pruner": {"name": "none"},
                "budget": {"n_trials": trials},
            }
        )
    )
    with fresh_database(admin_url) as url:
        if side == "optuna":
            optuna.create_study(study_name=study, storage=url, direction="minimize")
        else:
            from hpo.spec import load_spec
            from hpo.worker import create

            sys.path.insert(0, str(HERE))
            storage = open_storage(url)
            create(load_spec(study_file), url, storage)
            storage.engine.dispose()
        per_worker = [trials // workers + (i < trials % workers) for i in range(workers)]
        cmd = [
            sys.executable,
            __file__,
            "--child",
            side,
            "--url",
            url,
            "--study",
            study,
            "--study-file",
            str(study_file),
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        start = time.perf_counter()
        procs = [
            subprocess.Popen([*cmd, "--n", str(n)], stdout=subprocess.PIPE, text=True, env=env) for n in per_worker
        ]
        outs = [p.communicate()[0] for p in procs]
        elapsed = time.perf_counter() - start
        if any(p.returncode for p in procs):
            raise SystemExit(f"{side}: a worker failed")
        statements = sum(json.loads(o.strip().splitlines()[-1])["statements"] for o in outs)
        storage = open_storage(url)
        done = len(
            [t for t in optuna.load_study(study_name=study, storage=storage).get_trials() if t.state.is_finished()]
        )
        storage.engine.dispose()
    return {
        "trials": done,
        "seconds": elapsed,
        "trials_per_s": done / elapsed,
        "statements_per_trial": statements / done,
    }


def _combine(runs: list[dict[str, float]]) -> dict[str, float]:
    trials = sum(r["trials"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    statements = sum(r["statements_per_trial"] * r["trials"] for r in runs)
    return {
        "trials": trials,
        "seconds": seconds,
        "trials_per_s": trials / seconds,
        "statements_per_trial": statements / trials,
        "seconds_each": [round(r["seconds"], 1) for r in runs],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("HPO_BENCH_URL") or os.environ.get("HPO_TEST_POSTGRES_URL"))
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="runs per side, in alternating order (default 2)")
    ap.add_argument("--quick", action="store_true", help="16 trials on 2 workers: checks the script, measures nothing")
    ap.add_argument("--child", choices=["optuna", "hpo"], help=argparse.SUPPRESS)
    ap.add_argument("--study", help=argparse.SUPPRESS)
    ap.add_argument("--study-file", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.url, args.study, args.n, args.study_file)
        return 0
    if not args.url:
        ap.error("give --url (a PostgreSQL URL) or set HPO_BENCH_URL")
    if args.quick:
        args.trials, args.workers = 16, 2
    if args.quick:
        args.rounds = 1
    # Rounds alternate the order (Optuna first, then hpo first, ...): a machine that drifts (caches, clocks, other
    # work) then weighs on both sides alike. Seconds and statements are summed over the rounds.
    runs: dict[str, list[dict[str, float]]] = {"optuna": [], "hpo": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side in ("optuna", "hpo") if r % 2 == 0 else ("hpo", "optuna"):
                runs[side].append(run_side(side, args.url, args.trials, args.workers, Path(tmp)))
                print(f"  round {r + 1} {side:6s}: {runs[side][-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    results = {side: _combine(rs) for side, rs in runs.items()}
    o, h = results["optuna"], results["hpo"]
    print(
        f"{args.workers} workers, {args.trials} trials x {args.rounds} round(s), trivial objective, default TPE, PostgreSQL"
    )
    print(f"{'':24}{'plain Optuna':>14}{'hpo':>14}{'hpo / Optuna':>14}")
    print(f"{'finished trials':24}{o['trials']:>14}{h['trials']:>14}")
    print(f"{'wall seconds':24}{o['seconds']:>14.1f}{h['seconds']:>14.1f}{h['seconds'] / o['seconds']:>14.2f}")
    print(
        f"{'trials / s':24}{o['trials_per_s']:>14.2f}{h['trials_per_s']:>14.2f}{h['trials_per_s'] / o['trials_per_s']:>14.2f}"
    )
    print(
        f"{'SQL statements / trial':24}{o['statements_per_trial']:>14.1f}{h['statements_per_trial']:>14.1f}"
        f"{h['statements_per_trial'] / o['statements_per_trial']:>14.2f}"
    )
    print(json.dumps({"workers": args.workers, **{f"{k}_{s}": v for s, r in results.items() for k, v in r.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
