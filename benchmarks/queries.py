"""Time ``hpo trials --limit 20`` and ``hpo studies`` on a 10,000-trial study, against Optuna's load-everything way.

Usage: python benchmarks/queries.py postgresql+psycopg://postgres@127.0.0.1:5432/test [n_trials]

Creates a scratch database next to the given one, fills a study with ``optuna.trial.create_trial`` +
``Study.add_trials`` (4 params, 10 intermediate values, 5 user attributes per trial), times each CLI command as a
real subprocess (best of 3, including Python start-up) and the same answers through plain Optuna
(``load_study().trials_dataframe().head(20)``, ``get_all_study_summaries``), and drops the scratch database.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
import uuid

import optuna
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from sqlalchemy.engine import make_url


def fill(url: str, n: int) -> None:
    study = optuna.create_study(study_name="bench-10k", storage=url, direction="maximize")
    study.set_user_attr("sampler", {"name": "tpe", "seed": 0})
    study.set_user_attr("pruner", {"name": "median"})
    rnd = random.Random(0)
    dists = {
        "lr": FloatDistribution(1e-3, 10, log=True),
        "batch_size": IntDistribution(16, 1024, log=True),
        "epochs": IntDistribution(1, 50),
        "optimizer": CategoricalDistribution(["sgd", "adam", "rmsprop"]),
    }
    batch = []
    for i in range(n):
        state = rnd.choices([TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL], [0.6, 0.35, 0.05])[0]
        params = {
            "lr": 10 ** rnd.uniform(-3, 1),
            "batch_size": int(2 ** rnd.uniform(4, 10)),
            "epochs": rnd.randint(1, 50),
            "optimizer": rnd.choice(["sgd", "adam", "rmsprop"]),
        }
        batch.append(
            create_trial(
                state=state,
                value=rnd.random() if state == TrialState.COMPLETE else None,
                params=params,
                distributions=dists,
                intermediate_values={s: rnd.random() for s in range(10)},
                user_attrs={"seed": i, "device": "cpu", "epochs_reached": 10, "reason": None, "worker": "bench:1"},
            )
        )
        if len(batch) == 1000:
            study.add_trials(batch)
            batch = []
    study.add_trials(batch)


def best_of(cmd: list[str], env: dict[str, str], k: int = 3) -> float:
    times = []
    for _ in range(k):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - t)
    return min(times)


def timed(fn, k: int = 3) -> float:  # noqa: ANN001
    times = []
    for _ in range(k):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    import os

    admin = make_url(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    name = f"hpo_bench_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with engine.connect() as c:
        c.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    url = admin.set(database=name).render_as_string(hide_password=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        t = time.perf_counter()
        fill(url, n)
        print(f"filled {n} trials in {time.perf_counter() - t:.1f} s")
        env = {**os.environ, "HPO_STORAGE": url}
        hpo = [sys.executable, "-m", "hpo"]
        startup = best_of([sys.executable, "-c", "import hpo.cli"], env)
        rows = [
            ("hpo trials bench-10k --limit 20", best_of([*hpo, "trials", "bench-10k", "--limit", "20"], env)),
            (
                "hpo trials bench-10k --limit 20 -f json",
                best_of([*hpo, "trials", "bench-10k", "-n", "20", "-f", "json"], env),
            ),
            ("hpo studies", best_of([*hpo, "studies"], env)),
            ("hpo best bench-10k", best_of([*hpo, "best", "bench-10k"], env)),
        ]
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
        base = [
            (
                "optuna: load_study(...).trials_dataframe().head(20)",
                timed(lambda: optuna.load_study(study_name="bench-10k", storage=storage).trials_dataframe().head(20)),
            ),
            (
                "optuna: get_all_study_summaries(include_best_trial=True)",
                timed(lambda: optuna.get_all_study_summaries(storage, include_best_trial=True)),
            ),
        ]
        from hpo import query

        lib = [
            ("hpo.query.trials(url, 'bench-10k', limit=20)", timed(lambda: query.trials(url, "bench-10k", limit=20))),
            ("hpo.query.studies(url)", timed(lambda: query.studies(url))),
        ]
        print(f"python start-up + import hpo.cli: {startup:.2f} s")
        for label, secs in rows + lib + base:
            print(f"{secs:8.3f} s  {label}")
    finally:
        with engine.connect() as c:
            c.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        engine.dispose()


if __name__ == "__main__":
    main()
