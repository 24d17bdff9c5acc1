"""Coordination cost per trial as a study grows: hpo vs plain Optuna, 32 simulated workers, one PostgreSQL.

Both sides run a trivial objective (one float, no training) with the default sampler (TPE) on a study of their own in
a fresh database, in the same run. Each study is filled to N trials (1,000, 5,000, 20,000) by bulk insertion of
complete trials (a random ``x``, its value), then a window of trials is timed at that size.

Workers: 32 **simulated clients** in one process, taking turns (2 cores cannot hold 32 worker processes, nor the
database 32 x 3 connections beside other users): each client is what a worker process holds, its own ``Study`` with
its own Optuna trial cache, over one shared engine. Between two turns of a client, the 31 others have finished a
trial each, as with 32 workers. A warm-up round (one trial per client, untimed) brings every cache up to date after
each fill, as long-running workers' caches are. Then ``--window`` rounds (one trial per client each) are timed per
side, the sides alternating round by round (Optuna, hpo, hpo, Optuna, ...) so that the machine's load drifts over
both alike. Per trial:

* plain Optuna: ``study.ask()``, ``suggest_float``, ``study.tell(trial, value)``;
* hpo: what a worker does (``hpo.worker.lease``): a slot under the study's budget lock (``take_slots``: budget
  count, new RUNNING trial and its heartbeat in one transaction), the trial on the lease's view of the study
  (``open_trial``: its own reads answered from memory), its parameters through ``hpo.space.suggest``, its four user
  attributes in one statement, ``tell_finished``.

Statements are counted with SQLAlchemy's ``before_cursor_execute`` event on the shared engine.

    python benchmarks/coordination_scale.py --url postgresql+psycopg://postgres@127.0.0.1:5432/test
    python benchmarks/coordination_scale.py --quick     # sizes 200, 400: checks the script still works
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from worker_throughput import fresh_database  # noqa: E402  (a throw-away database, as the worker benchmark makes)


def objective(x: float) -> float:
    return (x - 2.0) ** 2


def fill(engine: Any, study_id: int, start: int, stop: int, rng: random.Random) -> None:
    """Insert complete trials numbered ``start`` .. ``stop - 1`` (one float ``x`` each) in bulk."""
    import sqlalchemy
    from optuna.distributions import FloatDistribution, distribution_to_json
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    t = models.TrialModel.__table__
    p = models.TrialParamModel.__table__
    v = models.TrialValueModel.__table__
    dist = distribution_to_json(FloatDistribution(-10.0, 10.0))
    now = datetime.datetime.now()
    xs = [rng.uniform(-10.0, 10.0) for _ in range(start, stop)]
    with engine.begin() as conn:
        ids = conn.execute(
            sqlalchemy.insert(t).returning(t.c.trial_id, sort_by_parameter_order=True),
            [
                {"number": n, "study_id": study_id, "state": TrialState.COMPLETE, "datetime_start": now,
                 "datetime_complete": now}
                for n in range(start, stop)
            ],
        ).scalars().all()  # fmt: skip
        conn.execute(
            sqlalchemy.insert(p),
            [
                {"trial_id": i, "param_name": "x", "param_value": x, "distribution_json": dist}
                for i, x in zip(ids, xs, strict=True)
            ],
        )
        conn.execute(
            sqlalchemy.insert(v),
            [
                {"trial_id": i, "objective": 0, "value": objective(x), "value_type": models.TrialValueModel.TrialValueType.FINITE}
                for i, x in zip(ids, xs, strict=True)
            ],
        )  # fmt: skip


class Side:
    """One side's study and its simulated clients over one shared engine."""

    def __init__(self, side: str, url: str, clients: int, workdir: Path) -> None:
        import optuna
        import sqlalchemy

        self.side, self.url = side, url
        self.name = f"scale-{side}"
        self.count = [0]
        if side == "hpo":
            from hpo.spec import load_spec
            from hpo.storage import open_storage
            from hpo.worker import WorkerOptions, create, load

            spec_file = workdir / "scale.yaml"
            spec_file.write_text(
                f"name: {self.name}\ndirection: minimize\nmetric: value\n"
                f"objective: {{kind: 'coordination_scale:objective'}}\n"
                "space:\n  x: {type: float, low: -10.0, high: 10.0}\n"
                "pruner: {name: none}\nbudget: {n_trials: 1000000}\n"
            )
            self.opts = WorkerOptions(heartbeat_interval=10, threads=1)
            self.backend = open_storage(url, heartbeat_interval=10, grace_period=60, max_retry=2)
            create(load_spec(spec_file), url, self.backend)
            made = [load(self.name, self.backend) for _ in range(clients)]
            self.studies = [s for s, _ in made]
            self.spec = made[0][1]
        else:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self.backend = optuna.storages.RDBStorage(url)
            optuna.create_study(study_name=self.name, storage=self.backend)
            self.studies = [optuna.load_study(study_name=self.name, storage=self.backend) for _ in range(clients)]
        self.study_id = self.studies[0]._study_id
        sqlalchemy.event.listen(self.backend.engine, "before_cursor_execute", self._count)

    def _count(self, *_args: object) -> None:
        self.count[0] += 1

    def trial(self, client: int) -> None:
        study = self.studies[client]
        if self.side == "optuna":
            trial = study.ask()
            study.tell(trial, objective(trial.suggest_float("x", -10.0, 10.0)))
            return
        from optuna.trial import TrialState

        from hpo import space
        from hpo.storage import set_trial_attrs
        from hpo.worker.lease import open_trial, take_slots, tell_finished

        ids, _ = take_slots(study, self.name, None, self.backend, self.opts)
        trial = open_trial(study, ids[0], self.opts.db_retry_for, self.url)
        params = space.suggest(trial, self.spec.space)
        attrs = {"seed": trial.number, "device": "cpu", "threads": 1, "worker": f"sim:{client}"}
        set_trial_attrs(trial, attrs)
        _, stored = tell_finished(trial.study, trial, TrialState.COMPLETE, objective(params["x"]))
        assert stored

    def warm_up(self) -> None:
        """One untimed trial per client: every client's cache reads what was inserted since its last turn."""
        for c in range(len(self.studies)):
            self.trial(c)

    def chunk(self) -> tuple[float, int, int]:
        """One trial per client, in turn: (seconds, statements, trials)."""
        before = self.count[0]
        started = time.perf_counter()
        for c in range(len(self.studies)):
            self.trial(c)
        return time.perf_counter() - started, self.count[0] - before, len(self.studies)

    def size(self) -> int:
        import sqlalchemy

        with self.backend.engine.connect() as conn:
            return int(
                conn.execute(
                    sqlalchemy.text("SELECT count(*) FROM trials WHERE study_id = :s"), {"s": self.study_id}
                ).scalar_one()
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_url = os.environ.get("HPO_BENCH_URL") or os.environ.get("HPO_TEST_POSTGRES_URL")
    parser.add_argument("--url", default=default_url, help="a PostgreSQL URL; the script makes its own database")
    parser.add_argument("--sizes", default="1000,5000,20000", help="study sizes at which to time a window")
    parser.add_argument("--clients", type=int, default=32, help="simulated workers")
    parser.add_argument("--window", type=int, default=4, help="timed rounds (one trial per client) at each size")
    parser.add_argument("--quick", action="store_true", help="sizes 200,400, 4 clients, 1 trial each")
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = parser.parse_args(argv)
    if not args.url:
        parser.error("--url (or HPO_BENCH_URL / HPO_TEST_POSTGRES_URL) is required")
    if args.quick:
        args.sizes, args.clients, args.window = "200,400", 4, 1
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[str, dict[int, tuple[float, float]]] = {"optuna": {}, "hpo": {}}
    rng = random.Random(0)
    import tempfile

    with fresh_database(args.url) as url, tempfile.TemporaryDirectory() as tmp:
        sides = {name: Side(name, url, args.clients, Path(tmp)) for name in ("optuna", "hpo")}
        for size in sizes:
            for side in sides.values():
                have = side.size()
                if size > have:
                    fill(side.backend.engine, side.study_id, have, size, rng)
                side.warm_up()
            # Rounds alternate the order (Optuna, hpo, hpo, Optuna, ...): the machine's load drifts over a run.
            totals = {name: [0.0, 0, 0] for name in sides}
            for r in range(args.window):
                for name in ("optuna", "hpo") if r % 2 == 0 else ("hpo", "optuna"):
                    seconds, statements, trials = sides[name].chunk()
                    totals[name][0] += seconds
                    totals[name][1] += statements
                    totals[name][2] += trials
            for name, (seconds, statements, trials) in totals.items():
                results[name][size] = (seconds / trials, statements / trials)
                if not args.json:
                    print(f"{name:7s} at {size:6d} trials: {seconds / trials * 1000:8.2f} ms/trial  "
                          f"{statements / trials:6.1f} statements/trial", flush=True)  # fmt: skip
        for side in sides.values():
            side.backend.engine.dispose()
    first, last = sizes[0], sizes[-1]
    summary = {
        "clients": args.clients,
        "window_trials": args.clients * args.window,
        "sizes": sizes,
        "ms_per_trial": {k: {s: round(v[s][0] * 1000, 2) for s in sizes} for k, v in results.items()},
        "statements_per_trial": {k: {s: round(v[s][1], 1) for s in sizes} for k, v in results.items()},
        "hpo_growth": round(results["hpo"][last][0] / results["hpo"][first][0], 2),
        "optuna_growth": round(results["optuna"][last][0] / results["optuna"][first][0], 2),
        "optuna_over_hpo_at_largest": round(results["optuna"][last][0] / results["hpo"][last][0], 2),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"hpo at {last} / hpo at {first}: {summary['hpo_growth']}x (target <= 1.5)")
        print(f"optuna at {last} / optuna at {first}: {summary['optuna_growth']}x")
        print(f"optuna / hpo at {last}: {summary['optuna_over_hpo_at_largest']}x (target >= 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
