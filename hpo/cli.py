"""The ``hpo`` command line (typer + rich).

Users' mistakes (:class:`hpo.errors.HpoError`) print one line, ``error: ...``, on stderr and exit 2.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from hpo.cli_errors import OneLineErrorGroup
from hpo.errors import STOPPED_EXIT, HpoError, StudyError
from hpo.render import csv_cell, lit, shell_quote, text

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="hpo",
    help="Hyperparameter optimization as a service: studies are files, trials run on workers, results live in SQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=OneLineErrorGroup,
)
out = Console()
err = Console(stderr=True)

StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage", "-s", help="SQLAlchemy URL; default: $HPO_STORAGE, then the study file, then sqlite:///hpo.db."
    ),
]
ThreadsOpt = Annotated[
    int | None, typer.Option(min=1, max=4096, help="Torch threads per worker (default: cores / local workers).")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (one worker per GPU).")]
HeartbeatOpt = Annotated[int, typer.Option(min=1, max=86400, help="Seconds between heartbeats of a running trial.")]
GraceOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=864000,
        help="Seconds without heartbeat before a trial is stale: stored with a new study (default 2 x heartbeat); "
        "an existing study keeps its own (hpo grace STUDY SECONDS).",
    ),
]
RetryOpt = Annotated[int, typer.Option(min=0, max=1000, help="How often a stale or interrupted trial is re-queued.")]
PopulationOpt = Annotated[
    str | None,
    typer.Option(
        help="Trials trained at once, stacked: a number or auto (default: the file's population.size, else 1)."
    ),
]
DbRetryOpt = Annotated[float, typer.Option(min=0, max=86400, help="Seconds to keep retrying an unavailable database.")]
StopTimeoutOpt = Annotated[
    float,
    typer.Option(
        min=0,
        max=86400,
        help="Seconds after SIGTERM before a trial that did not stop is re-queued and the worker exits.",
    ),
]
LockTimeoutOpt = Annotated[
    float, typer.Option(help="Longest wait for the study's budget lock per attempt (retried), seconds.")
]
LockIdleOpt = Annotated[float, typer.Option(help="A worker idle this long inside the budget lock loses it, seconds.")]


def _user_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HpoError as exc:
            err.print(f"[bold red]error:[/] {lit(exc)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except Exception as exc:
            from hpo.storage import denied_reason

            reason = denied_reason(exc)  # a write under a read-only role (e.g. the analyst's): a mistake, not a bug
            if reason is None:
                raise
            err.print(
                f"[bold red]error:[/] the database refused this role: {lit(reason)} "
                "(the analyst role may only read; run, worker, create and enqueue need the worker role)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False) -> None:
    from hpo.checks import check_not_shadowed

    try:
        check_not_shadowed()  # before any command reads or writes anything
    except HpoError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    from hpo.logs import setup

    setup(verbose)


def _is_file(study: str) -> bool:
    try:
        return study.endswith((".yaml", ".yml")) or Path(study).is_file()
    except (OSError, ValueError):  # a name too long or with NUL for a path: a study name
        return False


def _spec_and_url(study: str, storage: str | None) -> tuple[Any, str, str]:
    """(spec or None, storage URL, study name) for a study file path or a study name."""
    from hpo.storage import resolve_url

    if _is_file(study):
        from hpo.spec import load_spec  # pydantic: only for a file

        spec = load_spec(study)
        return spec, resolve_url(storage, spec.storage), spec.name
    return None, resolve_url(storage), study


def _check_timeout(timeout: float | None) -> None:
    import math

    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise HpoError(f"--timeout: must be a number of seconds > 0 (got {timeout})")


def _preflight(spec: Any, study_file: Path, population: str | None = None) -> None:
    """What can be checked before the study is created or touched (hpo.preflight), naming the file."""
    from hpo.preflight import preflight

    preflight(spec, str(study_file))
    if population is not None:
        from hpo.objectives.population import population_size

        population_size(spec, population)


# --------------------------------------------------------------------------- running


def _interrupt_exits(fn: F) -> F:
    """Ctrl-C exits at once (130, one line) until a worker's own handler takes over (and after it hands back).

    Python's default raises KeyboardInterrupt wherever the main thread is, a garbage collector's callback included,
    where it is printed as "Exception ignored" and the run went on through all its trials (issue 23). Nothing is
    lost by exiting: a study whose creation stopped midway is completed by the next run."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)

        def handle(signum: int, _frame: Any) -> None:
            os.write(2, b"\ninterrupted: what is stored is kept; run the same command again to resume\n")
            os._exit(130)

        previous = signal.signal(signal.SIGINT, handle)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, previous)

    return wrapper  # type: ignore[return-value]


@app.command()
@_interrupt_exits
@_user_errors
def run(
    study_file: Annotated[Path, typer.Argument(help="The study file (studies/*.yaml).")],
    storage: StorageOpt = None,
    n_trials: Annotated[
        int | None, typer.Option(min=1, max=10**9, help="Total trial budget (overrides the file's).")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop starting trials after this many seconds.")] = None,
    workers: Annotated[int, typer.Option(min=1, max=256, help="Local worker processes.")] = 1,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    heartbeat: HeartbeatOpt = 10,
    grace: GraceOpt = None,
    max_retry: RetryOpt = 2,
    population: PopulationOpt = None,
    db_retry_for: DbRetryOpt = 120.0,
    stop_timeout: StopTimeoutOpt = 20.0,
    lock_timeout: LockTimeoutOpt = 5.0,
    lock_idle_timeout: LockIdleOpt = 10.0,
) -> None:
    """Create or resume a study and run it to its budget, with a progress bar; print the best trial."""
    from hpo.spec import load_spec
    from hpo.storage import mask, resolve_url
    from hpo.worker import WorkerOptions, create, default_threads, run_worker

    _check_timeout(timeout)
    spec = load_spec(study_file)
    url = resolve_url(storage, spec.storage)
    _preflight(spec, study_file, population)
    fault_opts = {  # checked before anything is written: WorkerOptions checks its own values
        "db_retry_for": db_retry_for,
        "stop_timeout": stop_timeout,
        "lock_timeout": lock_timeout,
        "lock_idle_timeout": lock_idle_timeout,
    }
    WorkerOptions(**fault_opts)  # type: ignore[arg-type]
    if grace is not None:
        from hpo.worker.study import check_grace

        check_grace(grace, heartbeat)
    create(spec, url, grace=grace if grace is not None else 2 * heartbeat)
    before = _finished_ids(spec.name, url)  # this run's outcome: the trials that finish from now on
    stop_mark = _stop_mark(spec.name, url)  # a study.stop() from now on stops this run (hpo.worker.single)
    budget = n_trials if n_trials is not None else spec.budget.n_trials
    if n_trials is None and "budget" not in spec.model_fields_set:
        err.print(
            f"no budget in {study_file}: running {budget} trials (the default; set budget: {{n_trials: N}})",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    threads = threads or getattr(spec.objective, "threads", None) or default_threads(workers)  # the file's, if set
    from hpo.progress import StudyProgress

    by_study = False  # one worker says why it stopped; several are quiet children
    with StudyProgress(spec.name, url, budget, console=err) as poll:
        if workers == 1:
            opts = WorkerOptions(
                heartbeat_interval=heartbeat,
                grace_period=grace,
                max_retry=max_retry,
                threads=threads,
                device=device,
                n_trials=n_trials,
                timeout=timeout,
                on_trial=lambda _t: poll(),
                population=population,
                **fault_opts,  # type: ignore[arg-type]
            )
            result = run_worker(spec, url, opts)
            stopped = result.interrupted
            by_study = result.reason == "stopped by study.stop()"
        else:
            stopped = _run_processes(
                study_file, url, workers, threads, device, n_trials, timeout, heartbeat, grace, max_retry, poll,
                population=population, fault_opts=fault_opts,
                references=(spec.objective.kind, *spec.callbacks, *spec.sampler.callables().values()),
            )  # fmt: skip
            by_study = not stopped and _stop_mark(spec.name, url) != stop_mark
    _summary(spec.name, url)
    out.print(
        f"stored in {lit(mask(url))} (read it with: hpo trials {lit(shell_quote(spec.name))} "
        f"--storage {lit(shell_quote(mask(url), always=True))})",
        highlight=False,
        soft_wrap=True,
    )
    if by_study:  # as Optuna's optimize returns: not an error, and nothing to resume
        out.print(
            "stopped by study.stop() (in the objective or a callback) before the budget was met",
            highlight=False,
            soft_wrap=True,
        )
    if stopped:
        out.print("stopped before the budget was met; run the same command again to resume")
        raise typer.Exit(STOPPED_EXIT)
    _require_a_completed_trial(spec.name, url, before=before)


def _run_processes(
    study_file: Path,
    url: str,
    workers: int,
    threads: int,
    device: str,
    n_trials: int | None,
    timeout: float | None,
    heartbeat: int,
    grace: int | None,
    max_retry: int,
    poll: Callable[[], None],
    population: str | None = None,
    fault_opts: dict[str, float] | None = None,
    references: tuple[str, ...] = (),
) -> bool:
    # -P: the working folder is not put first on the children's import path (a typer.py there would run in each);
    # a user's objective is imported from where this process found it, appended last (hpo.trust.PATH_ENV)
    cmd = [sys.executable, "-P", "-m", "hpo", "worker", str(study_file), "--threads", str(threads), "--device", device]
    for key, value in (fault_opts or {}).items():  # --db-retry-for, --stop-timeout, --lock-timeout, ...
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    cmd += ["--heartbeat", str(heartbeat), "--max-retry", str(max_retry), "--quiet", "--no-require-complete"]
    if grace is not None:
        cmd += ["--grace", str(grace)]
    if n_trials is not None:
        cmd += ["--n-trials", str(n_trials)]
    if timeout is not None:
        cmd += ["--timeout", str(timeout)]
    if population is not None:
        cmd += ["--population", population]
    from hpo.trust import PATH_ENV, objective_root

    env = {**os.environ}
    roots = [objective_root(ref) for ref in references]  # the objective, callbacks, sampler functions
    roots = [r for r in dict.fromkeys(roots) if r is not None]
    if roots:
        env[PATH_ENV] = os.pathsep.join(p for p in (*roots, os.environ.get(PATH_ENV)) if p)
    # Own process groups: a Ctrl-C reaches the workers once, forwarded, not twice (which would exit them at once).
    procs = [_start_child(cmd, env, url) for _ in range(workers)]
    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:  # SIGTERM/SIGINT: to every worker; then wait for them
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while any(p.poll() is None for p in procs):
            with contextlib.suppress(Exception):  # the progress bar's database may be away; the workers cope
                poll()
            time.sleep(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stopped = bool(received)
    codes = [p.returncode for p in procs]
    if stopped and all(c in (0, STOPPED_EXIT, -signal.SIGINT, 130) for c in codes):
        return stopped
    if any(c not in (0, None) for c in codes):
        raise HpoError(f"a worker exited with status {max(c for c in codes if c)}; see its message above")
    return stopped


def _start_child(cmd: list[str], env: dict[str, str], url: str) -> subprocess.Popen[bytes]:
    """Start a child worker with the storage URL in its environment (never on a command line, where ps shows it)
    and the URL's password, if any, only in a pipe it inherits (``HPO_STORAGE_PASSWORD_FILE=/dev/fd/N``): not in
    its environment, which other processes of the same user can read and which its own children inherit."""
    from sqlalchemy.engine import URL, make_url

    from hpo.storage import SECRET_FILE_MAX

    try:
        parsed = make_url(url)
    except Exception:  # the child says what is wrong with the URL
        parsed = None
    password = parsed.password if parsed is not None else None
    if not password or "\n" in password or len(password.encode()) >= SECRET_FILE_MAX:
        return subprocess.Popen(cmd, env={**env, "HPO_STORAGE": url}, start_new_session=True)
    p = parsed  # the same URL without its password (URL.set cannot unset one)
    bare_url = URL.create(p.drivername, p.username, None, p.host, p.port, p.database, p.query)
    bare = bare_url.render_as_string(hide_password=False)
    read, write = os.pipe()
    try:
        os.write(write, f"{password}\n".encode())  # a few bytes: the pipe holds them, the write cannot block
        os.close(write)
        child_env = {**env, "HPO_STORAGE": bare, "HPO_STORAGE_PASSWORD_FILE": f"/dev/fd/{read}"}
        return subprocess.Popen(cmd, env=child_env, pass_fds=(read,), start_new_session=True)
    finally:
        os.close(read)


def _stop_mark(name: str, url: str) -> Any:
    """The study's record of the last ``study.stop()`` (:data:`hpo.worker.single.STOP_MARK`), or None."""
    from hpo import query
    from hpo.worker.single import STOP_MARK

    return query.study_system_attrs(url, name).get(STOP_MARK)  # by SQL: no Optuna storage set up twice a run


def _finished_ids(name: str, url: str) -> set[int]:
    from hpo import query

    return {t["trial_id"] for t in query.finished_trials(url, name)}  # ids by SQL: no FrozenTrial, no params


#: Trials failed by their objective (it raised, or returned something that is not a number, or NaN), as opposed to
#: a stop, a reap or a lost database (re-queued) or a pruner's verdict.
_OBJECTIVE_FAILURES = ("error", "objective returned NaN")


def _require_a_completed_trial(
    name: str, url: str, *, before: Collection[int] = (), numbers: Collection[int] | None = None
) -> None:
    """A run whose trials all failed is no success: status 2, with the first failure's reason (one line).

    The run's trials: those finished since ``before`` (ids), and among those ``numbers`` when given."""
    from hpo import query

    def is_mine(t: dict[str, Any]) -> bool:
        return t["trial_id"] not in before and (numbers is None or t["number"] in numbers)

    finished = query.finished_trials(url, name)  # three columns by SQL, not every FrozenTrial
    if any(t["state"] == "COMPLETE" and is_mine(t) for t in finished):
        return
    ids = {t["trial_id"] for t in finished if is_mine(t)}  # none completed: their reasons, read for these alone
    mine = [t for t in query.finished_trials(url, name, attrs_of=ids) if t["trial_id"] in ids]
    failed = [t for t in mine if t["user_attrs"].get("reason") in _OBJECTIVE_FAILURES]
    if failed:
        first = min(failed, key=lambda t: t["number"])
        why = first["user_attrs"].get("error") or first["user_attrs"].get("reason")
        raise HpoError(
            f"no trial completed: {len(failed)} of {len(mine)} failed; the first, trial #{first['number']}: {why}"
        )


def _summary(name: str, url: str) -> None:
    import optuna

    from hpo.progress import metric_names
    from hpo.storage import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(url))
    names = metric_names(study)
    if len(names) > 1:  # several objectives: the Pareto front, sorted by the first metric
        front = sorted(study.best_trials, key=lambda t: (t.values[0], t.number))
        if study.directions[0].name == "MAXIMIZE":
            front.reverse()
        if not front:
            out.print(f"study {lit(name)}: no completed trial yet")
            return
        against = " against ".join(f"{lit(m)} ({d.name.lower()})" for m, d in zip(names, study.directions, strict=True))
        out.print(
            f"Pareto front of {against}: {len(front)} trials, none beaten in every metric",
            highlight=False,
            soft_wrap=True,
        )
        for t in front:
            values = "  ".join(f"{lit(m)} = {v:.4g}" for m, v in zip(names, t.values, strict=True))
            params = ", ".join(f"{lit(k)}={_param(v)}" for k, v in t.params.items())
            out.print(f"  #{t.number}: {values}  ({params})", highlight=False, soft_wrap=True)
        return
    try:
        best = study.best_trial
    except ValueError:
        out.print(f"study {lit(name)}: no completed trial yet")
        return
    metric = study.user_attrs.get("metric", "value")
    out.print(f"best trial #{best.number}: {lit(metric)} = {best.value:.6g}", highlight=False)
    for k, v in best.params.items():
        out.print(f"  {lit(k)} = {_param(v)}", highlight=False)


def _param(value: Any) -> str:
    """A parameter as a person reads it: floats to 4 significant digits (``hpo trials`` has them whole)."""
    return f"{value:.4g}" if isinstance(value, float) else lit(value)


@app.command()
@_user_errors
def create(study_file: Path, storage: StorageOpt = None, grace: GraceOpt = None) -> None:
    """Create a study from its file, once (idempotent); its sampler, pruner, budget and grace period are stored
    with it."""
    from hpo.spec import load_spec
    from hpo.storage import mask, resolve_url
    from hpo.worker import create as create_study

    spec = load_spec(study_file)
    url = resolve_url(storage, spec.storage)
    _preflight(spec, study_file)
    create_study(spec, url, grace=grace)
    out.print(f"study {lit(spec.name)} ready in {lit(mask(url))}", highlight=False)


@app.command()
@_user_errors
def worker(
    study: Annotated[str, typer.Argument(help="A study name (created before) or a study file.")],
    storage: StorageOpt = None,
    n_trials: Annotated[
        int | None, typer.Option(min=1, max=10**9, help="Total trial budget (overrides the stored one).")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop starting trials after this many seconds.")] = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    heartbeat: HeartbeatOpt = 10,
    grace: GraceOpt = None,
    max_retry: RetryOpt = 2,
    db_retry_for: DbRetryOpt = 120.0,
    stop_timeout: StopTimeoutOpt = 20.0,
    seed_offset: Annotated[
        int,
        typer.Option(
            min=0,
            max=2**31 - 1,
            help="Added to the sampler's seed (default 0: each trial is drawn from the seed and its own number, so "
            "workers differ already and one worker or many draw the same points).",
        ),
    ] = 0,
    quiet: Annotated[
        bool, typer.Option(help="Print nothing on success (no line per trial, no progress view, no summary).")
    ] = False,
    population: PopulationOpt = None,
    lock_timeout: LockTimeoutOpt = 5.0,
    lock_idle_timeout: LockIdleOpt = 10.0,
    objective: Annotated[
        list[str] | None,
        typer.Option(
            help="A module:function objective this worker may run when started by study name (the stored study file "
            "is the database's word; also $HPO_ALLOW_OBJECTIVES); with a study file, the objective it must name."
        ),
    ] = None,
    require_complete: Annotated[bool, typer.Option(hidden=True)] = True,  # hpo run's children: hpo run decides
) -> None:
    """Pull trials of a study until its global budget is met (run many of these, on many machines).

    Says what it does: a line per finished trial (plain log lines off a terminal, for docker logs and Slurm output
    files) and, on a terminal, a live progress view of the study. Started by study name, it runs no code and uses
    no folder that only the database names (README: "What a worker started by name trusts")."""
    from hpo.progress import StudyProgress, TrialLog
    from hpo.trust import allowed_objectives, check_objective_flag, extend_import_path
    from hpo.worker import WorkerOptions, create, run_worker

    extend_import_path()  # a child of hpo run: its parent's objective folder, last on the path
    _check_timeout(timeout)
    objectives = tuple(objective or ())
    allowed_objectives(objectives)  # a malformed --objective or HPO_ALLOW_OBJECTIVES: before anything is read
    spec, url, name = _spec_and_url(study, storage)
    if spec is not None:
        check_objective_flag(spec, objectives)
        _preflight(spec, Path(study), population)
    opts = WorkerOptions(  # checks its own values: before anything is written or logged
        heartbeat_interval=heartbeat,
        grace_period=grace,
        max_retry=max_retry,
        threads=threads,
        device=device,
        n_trials=n_trials,
        timeout=timeout,
        db_retry_for=db_retry_for,
        stop_timeout=stop_timeout,
        seed_offset=seed_offset,
        population=population,
        lock_timeout=lock_timeout,
        lock_idle_timeout=lock_idle_timeout,
        objectives=objectives,
    )
    live = None
    if not quiet and err.is_terminal:
        if spec is not None:
            create(spec, url)
        budget = n_trials if n_trials is not None else (spec.budget.n_trials if spec is not None else None)
        live = StudyProgress(name, url, budget, console=err)
    elif not quiet:
        if spec is not None:  # a file that disagrees with the stored study: its error is the only line
            create(spec, url)
        opts.on_trial = trial_log = TrialLog(spec.metric_names if spec is not None else _stored_metrics(name, url))
        from hpo.render import visible
        from hpo.storage import mask

        trial_log.log.info(
            "worker %s:%d: pulling trials of %s from %s", os.uname().nodename, os.getpid(), visible(name), mask(url)
        )
    if live is not None:
        with live as poll:
            opts.on_trial = lambda _t: poll()
            result = run_worker(spec if spec is not None else name, url, opts)
    else:
        result = run_worker(spec if spec is not None else name, url, opts)
    if not quiet:
        out.print(
            f"worker done ({result.reason}): ran {result.ran} trials, {result.complete} complete, "
            f"{result.pruned} pruned, {result.failed} failed",
            highlight=False,
        )
    if result.interrupted:
        raise typer.Exit(STOPPED_EXIT)  # stopped by a signal before the budget: engines run it again
    if require_complete and result.ran and not result.complete:
        _require_a_completed_trial(name, url, numbers=set(result.trials))


def _stored_metrics(name: str, url: str) -> list[str]:
    """A stored study's metric names for its trial lines (``value`` where it cannot be read now: the worker says
    why when it loads the study)."""
    import optuna

    from hpo.progress import metric_names
    from hpo.storage import open_storage

    try:
        storage = open_storage(url, retry_for=0)
        try:
            return metric_names(optuna.load_study(study_name=name, storage=storage))
        finally:
            storage.engine.dispose()
    except Exception:
        return ["value"]


@app.command()
@_user_errors
def reap(
    study: Annotated[str, typer.Argument(help="Study name or file.")],
    storage: StorageOpt = None,
    heartbeat: HeartbeatOpt = 10,
    grace: GraceOpt = None,
    max_retry: RetryOpt = 2,
) -> None:
    """Fail running trials whose worker stopped sending heartbeats for the study's grace period (or --grace), and
    re-queue them."""
    import optuna

    from hpo.storage import open_storage
    from hpo.worker import load
    from hpo.worker import reap as hpo_reap

    _, url, name = _spec_and_url(study, storage)
    st = open_storage(url, heartbeat_interval=heartbeat, grace_period=grace, max_retry=max_retry)
    s, _ = load(name, st)
    reaped = hpo_reap(s, grace)
    running = len(s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
    out.print(f"reaped {len(reaped)} stale trial(s); {running} still running")


@app.command("grace")
@_user_errors
def grace_period(
    study: Annotated[str, typer.Argument(help="Study name or file.")],
    seconds: Annotated[float, typer.Argument(help="Seconds without a heartbeat before a running trial is reaped.")],
    storage: StorageOpt = None,
    heartbeat: Annotated[
        int,
        typer.Option(
            min=1, max=86400, help="The running workers' --heartbeat: the grace period must be at least twice it."
        ),
    ] = 10,
) -> None:
    """Set a study's grace period, which every worker and hpo reap use (workers read it at their next reap)."""
    from hpo.storage import open_storage
    from hpo.worker import load, set_grace
    from hpo.worker.study import check_grace

    check_grace(seconds, heartbeat)  # running workers keep their heartbeat: a shorter grace reaps their live trials
    _, url, name = _spec_and_url(study, storage)
    s, _ = load(name, open_storage(url))
    set_grace(s, seconds)
    out.print(f"study {name}: grace period {seconds:g} s", highlight=False)


@app.command()
@_user_errors
def enqueue(
    study: Annotated[str, typer.Argument(help="Study name or file.")],
    param: Annotated[list[str], typer.Option("--param", "-p", help="name=value (YAML value), repeatable.")],
    storage: StorageOpt = None,
) -> None:
    """Queue a trial with fixed parameters; the next worker runs it first."""
    import yaml

    from hpo.storage import open_storage
    from hpo.worker import load

    params: dict[str, Any] = {}
    for item in param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HpoError(f"--param {item!r}: write name=value")
        try:
            params[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise HpoError(f"--param {item!r}: the value is not a YAML value") from None
    _, url, name = _spec_and_url(study, storage)
    s, spec = load(name, open_storage(url))
    from hpo.space import encode_params
    from hpo.spec import check_params

    problem = check_params(spec.space, params, own_names=":" in spec.objective.kind)  # before anything is stored
    if problem:
        raise StudyError(f"--param {problem}")
    s.enqueue_trial(encode_params(params), user_attrs={"enqueued": True})
    out.print(f"queued {lit(params)} in {lit(name)}", highlight=False)


@app.command()
@_user_errors
def evaluate(
    study: Annotated[str, typer.Argument(help="Study name or file.")],
    storage: StorageOpt = None,
    trial: Annotated[int | None, typer.Option(min=0, help="Trial number (default: the best).")] = None,
) -> None:
    """Re-train a trial with its stored seed, check it reproduces, and measure it on the held-out test split.

    The test figure is stored as the study user attribute ``test_evaluation``; it never feeds back into selection.
    """
    from hpo.objectives.training import evaluate_on_test
    from hpo.storage import open_storage
    from hpo.worker import load

    _, url, name = _spec_and_url(study, storage)
    s, spec = load(name, open_storage(url))
    if trial is None and spec.multi_objective:
        raise StudyError(
            f"study {name!r} has several objectives: pick a trial of its Pareto front (hpo best) with --trial"
        )
    try:
        frozen = s.best_trial if trial is None else next(t for t in s.get_trials(deepcopy=False) if t.number == trial)
    except (ValueError, StopIteration):
        raise StudyError(f"study {name!r} has no {'completed trial' if trial is None else f'trial {trial}'}") from None
    if frozen.values is None:
        raise StudyError(f"trial {frozen.number} of {name!r} has no value (state {frozen.state.name})")
    metric, stored = spec.metric_names[0], frozen.values[0]  # several objectives: the first metric
    value, test = evaluate_on_test(spec, frozen)
    # single-trial mode reproduces bit for bit; a population member's arithmetic differs in rounding only (1e-5)
    tolerance = 1e-5 if frozen.user_attrs.get("population") else 0.0
    reproduced = abs(value - stored) <= tolerance
    record = {"trial": frozen.number, "reproduced": reproduced, metric: value, "test_accuracy": test}
    s.set_user_attr("test_evaluation", record)
    out.print(
        f"trial #{frozen.number}: stored {lit(metric)} {stored:.6g}, re-run {value:.6g} "
        f"({'reproduced' if reproduced else 'DIFFERS'}); test accuracy {test:.4f}",
        highlight=False,
    )


# --------------------------------------------------------------------------- analysts (issue 4)


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


FormatOpt = Annotated[OutputFormat, typer.Option("--format", "-f", help="table (rich), json or csv.")]
StateOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--state", help="Keep only trials in this state (complete, pruned, fail, running, waiting); repeatable."
    ),
]
LimitOpt = Annotated[int | None, typer.Option("--limit", "-n", min=0, help="At most this many rows.")]
ColumnsOpt = Annotated[
    str | None,
    typer.Option("--columns", help="Comma-separated columns to show, in order (names or headers), for table and csv."),
]


def _jsonable(v: Any) -> Any:
    import math

    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if hasattr(v, "item"):  # numpy scalars
        return _jsonable(v.item())
    if v is None or isinstance(v, str | int | bool):
        return v
    try:
        import pandas as pd

        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    return str(v)


def _cell(v: Any) -> str:
    import json

    v = _jsonable(v)
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _emit(
    rows: list[dict[str, Any]],
    fmt: OutputFormat,
    title: str,
    columns: list[str] | None = None,
    wanted: str | None = None,
    all_columns: list[str] | None = None,
) -> None:
    """Print rows as a rich table fitted to the terminal, raw JSON (a list of objects) or CSV on stdout.

    ``wanted`` (``--columns``) picks among ``all_columns`` (default: ``columns``)."""
    import csv
    import json

    from hpo.output import fit_table, pick

    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    if wanted:
        columns = pick(all_columns or columns, wanted)
    if fmt == OutputFormat.json:
        sys.stdout.write(json.dumps([_jsonable(r) for r in rows], indent=2, allow_nan=False) + "\n")
    elif fmt == OutputFormat.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([csv_cell(c, str(c)) for c in columns])
        for r in rows:  # formulas neutralised (render.csv_cell): spreadsheet users open these files
            writer.writerow([csv_cell(r.get(c), _cell(r.get(c))) for c in columns])
    else:
        fitted = fit_table(rows, columns, out.width, title, _cell)
        out.print(fitted.table)
        if fitted.note():
            out.print(text(fitted.note(), style="dim"), highlight=False)


@app.command()
@_user_errors
def studies(
    storage: StorageOpt = None, fmt: FormatOpt = OutputFormat.table, limit: LimitOpt = None, columns: ColumnsOpt = None
) -> None:
    """List the studies in a storage: trial counts by state, best value, created / updated, sampler and pruner."""
    from hpo import query
    from hpo.storage import mask, resolve_url

    url = resolve_url(storage)
    rows = query.studies(url)[:limit]
    every = list(dict.fromkeys(k for r in rows for k in r))
    if fmt == OutputFormat.table:
        for r in rows:
            r["sampler"] = (r["sampler"] or {}).get("name") if isinstance(r["sampler"], dict) else r["sampler"]
            if r.get("strategy"):  # auto: the strategy it chose, in words
                r["sampler"] = f"{r['sampler']}: {r['strategy']}"
            r["pruner"] = (r["pruner"] or {}).get("name") if isinstance(r["pruner"], dict) else r["pruner"]
            if not columns:
                for key in ("budget", "waiting", "best_trial", "metric", "strategy"):
                    r.pop(key, None)
    _emit(rows, fmt, f"studies in {mask(url)}", wanted=columns, all_columns=every)


@app.command()
@_user_errors
def trials(
    study: Annotated[str, typer.Argument(help="Study name or file.")],
    storage: StorageOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    state: StateOpt = None,
    limit: LimitOpt = None,
    columns: ColumnsOpt = None,
) -> None:
    """Trials of a study (params, value, state, duration, epochs reached, pruning reason, seed, device).

    JSON: one object per trial in the schema ``hpo best -f json`` shares (README: "Output for scripts")."""
    from hpo import query

    _, url, name = _spec_and_url(study, storage)
    if fmt != OutputFormat.table:  # streamed by SQL, a chunk at a time: any size of study in bounded memory
        _stream_trials(url, name, fmt, state, limit, columns)
        return
    names, metrics, raws = query.iter_trials(url, name, states=state, limit=limit, user_attrs=query.TRIAL_ATTRS)
    every = query.trial_columns(names, metrics)
    shown = [c for c in every if c not in ("datetime_start", "datetime_complete", "worker")]
    rows = [query.flat_row(raw, names, metrics) for raw in raws]
    _emit(rows, fmt, f"trials of {name}", shown, wanted=columns, all_columns=every)


def _stream_trials(
    url: str, name: str, fmt: OutputFormat, state: list[str] | None, limit: int | None, columns: str | None
) -> None:
    """``hpo trials -f csv|json``: rows written as they are read (:func:`hpo.query.iter_trials`), never all held.

    Same columns and cells as the table's data (CSV formulas neutralised); JSON: the list ``_emit`` writes."""
    import csv
    import io
    import json

    from hpo import query
    from hpo.output import pick

    keys = None if fmt == OutputFormat.json else query.TRIAL_ATTRS
    names, metrics, raws = query.iter_trials(url, name, states=state, limit=limit, user_attrs=keys)
    write = sys.stdout.write
    if fmt == OutputFormat.json:
        first = True
        for raw in raws:
            body = json.dumps(_jsonable(query.raw_record(raw, metrics)), indent=2, allow_nan=False)
            write(("[\n" if first else ",\n") + "  " + body.replace("\n", "\n  "))
            first = False
        write("[]\n" if first else "\n]\n")
        return
    every = query.trial_columns(names, metrics)
    chosen = pick(every, columns) if columns else every
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([csv_cell(c, str(c)) for c in chosen])
    for i, raw in enumerate(raws, 1):  # formulas neutralised (render.csv_cell): spreadsheet users open these files
        r = query.flat_row(raw, names, metrics)
        writer.writerow([_csv_fast(r[c]) for c in chosen])
        if i % 1000 == 1:  # the first row at once, then a block at a time
            write(buffer.getvalue())
            buffer.seek(0)
            buffer.truncate()
    write(buffer.getvalue())


def _csv_fast(v: Any) -> str:
    """``csv_cell(v, _cell(v))`` with the common types (None, int, float, text, datetime) done inline: same text,
    3x faster."""

    kind = type(v)
    if v is None:
        return ""
    if kind is float:
        if v != v:
            return ""
        return ("inf" if v > 0 else "-inf") if v in (float("inf"), float("-inf")) else f"{v:.6g}"
    if kind is int or kind is bool:
        return str(v)
    if kind is str:
        return csv_cell(v, v)
    if kind is datetime:
        return v.isoformat()
    return csv_cell(v, _cell(v))


@app.command()
@_user_errors
def best(
    study: Annotated[str, typer.Argument(help="Study name or file.")],
    storage: StorageOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    limit: Annotated[
        int | None,
        typer.Option("--limit", "-n", min=1, help="How many of the best trials (default 1; several objectives: all)."),
    ] = None,
    columns: ColumnsOpt = None,
) -> None:
    """The best COMPLETE trial(s) of a study, best first (JSON: the schema of ``hpo trials -f json``); a study with
    several objectives: its Pareto front, sorted by the first metric."""
    from hpo import query

    _, url, name = _spec_and_url(study, storage)
    rows, names = query.best_and_params(url, name, n=limit)
    if not rows and fmt == OutputFormat.table:
        out.print(f"study {lit(name)}: no completed trial yet", highlight=False)
        return
    if fmt == OutputFormat.json:
        _emit(rows, fmt, "")
        return
    # names: columns from the study, not from the trials shown
    flat = [
        {
            "number": r["number"],
            **(r["values"] if "values" in r else {"value": r["value"]}),  # several objectives: a column per metric
            **{f"params_{k}": r["params"].get(k) for k in names},
            "duration": r["duration"],
            "seed": r["user_attrs"].get("seed"),
        }
        for r in rows
    ]
    front = bool(rows) and "values" in rows[0]
    _emit(flat, fmt, f"Pareto front of {name}" if front else f"best trials of {name}", wanted=columns)


@app.command()
@_user_errors
def importance(
    study: Annotated[str, typer.Argument(help="Study name or file.")],
    storage: StorageOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    limit: LimitOpt = None,
) -> None:
    """Parameter importances (fANOVA over COMPLETE trials), most important first."""
    from hpo import query

    _, url, name = _spec_and_url(study, storage)
    imps, sample = query.importances_of_sample(url, name)  # several objectives: the first metric's
    rows = [{"param": k, "importance": v} for k, v in list(imps.items())[:limit]]
    if not rows and fmt == OutputFormat.table:
        out.print(f"study {lit(name)}: fewer than 2 completed trials, no importances yet", highlight=False)
        return
    metrics = query.study_metrics(url, name)
    of = f" for {metrics[0]}, the first of its metrics" if len(metrics) > 1 else ""
    _emit(rows, fmt, f"parameter importances of {name}{of}", ["param", "importance"])
    if sample is not None:  # a big study: say which trials (stderr for csv/json, whose stdout is data)
        note = sample.describe("importances") + "."
        if fmt == OutputFormat.table:
            out.print(text(note, style="dim"), highlight=False)
        else:
            print(note, file=sys.stderr)


@app.command()
@_user_errors
def report(
    study: Annotated[str, typer.Argument(help="Study name or file.")],
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="The HTML file, or a folder for <study>.html (default: .).")
    ] = None,
    storage: StorageOpt = None,
) -> None:
    """Write a self-contained HTML report on how each hyperparameter influences the result."""
    from hpo.report import write_report

    if output is not None and output.endswith(("/", "\\")) and not Path(output).is_dir():
        raise HpoError(f"--output {output}: no such folder (create it first)")
    spec, url, name = _spec_and_url(study, storage)
    path = write_report(url, name, output, spec=spec)
    out.print(f"report written to {lit(path)}", highlight=False)


@app.command()
@_user_errors
def check(
    study: Annotated[str, typer.Argument(help="Study name or file (the file's predictions win).")],
    storage: StorageOpt = None,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Check the study file's predictions against the COMPLETE trials: supported, refuted or not enough evidence."""
    from hpo.hypotheses import check_study  # not hpo.report: no plotly or pandas to load

    spec, url, name = _spec_and_url(study, storage)
    verdicts = check_study(url, name, spec)
    if not verdicts and fmt == OutputFormat.table:
        out.print(f"study {lit(name)}: no predictions in its study file", highlight=False)
        return
    if fmt == OutputFormat.json:
        _emit([v.as_dict() for v in verdicts], fmt, "")
        return
    if fmt == OutputFormat.csv:
        rows = [
            {
                "param": v.param,
                "claim": v.claim + (f" ({v.better} is better)" if v.better else ""),
                "verdict": v.verdict,
                "trials": v.n_trials,
                "evidence": v.reason + (f" To settle it: {v.next_step}." if v.next_step else ""),
            }
            for v in verdicts
        ]
        _emit(rows, fmt, f"predictions of {name}")
        return
    _print_verdicts(name, verdicts)


def _print_verdicts(name: str, verdicts: list[Any]) -> None:
    """One block per prediction, wrapped to the terminal: the claim in plain words, then the verdict and its evidence
    as a sentence, indented (reads at 80 columns; a table squeezed the evidence into a narrow column)."""
    import textwrap

    from rich.text import Text

    from hpo.hypotheses import claim_words
    from hpo.render import visible

    width = max(40, out.width)
    style = {"supported": "green", "refuted": "red"}
    out.print(text(f"predictions of {name}", style="bold"))
    for v in verdicts:
        words = claim_words(v.claim, v.param, v.better)
        said = f"{v.param}: " + (f"“{v.note}” ({words})" if v.note else words)
        evidence = f"{v.verdict} ({v.n_trials} trials). {v.reason}" + (
            f" To settle it: {v.next_step}." if v.next_step else ""
        )
        head = "\n".join(textwrap.wrap(visible(said), width))
        body = Text("\n".join(textwrap.wrap(visible(evidence), width, initial_indent="  ", subsequent_indent="  ")))
        body.stylize(style.get(v.verdict, "yellow"), 2, 2 + len(v.verdict))
        out.print()
        out.print(Text(head), soft_wrap=True)
        out.print(body, soft_wrap=True)


@app.command()
@_user_errors
def dashboard(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option(help="Interface to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8080,
    allow_writes: Annotated[
        bool, typer.Option("--allow-writes", help="Allow DELETE/POST/PUT/PATCH (deleting, renaming, telling).")
    ] = False,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(help="Also answer requests for this Host: name (besides localhost and --host); repeatable."),
    ] = None,
) -> None:
    """Serve optuna-dashboard on the storage; read-only unless --allow-writes."""
    from hpo.dashboard import create_app, make_dashboard_server
    from hpo.storage import mask, resolve_url

    url = resolve_url(storage)
    app_ = create_app(url, allow_writes=allow_writes, allowed_hosts=[host, *(allow_host or [])])
    try:
        httpd = make_dashboard_server(app_, host, port)
    except OSError as exc:
        raise HpoError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    mode = "read-write" if allow_writes else "read-only"
    err.print(f"dashboard ({mode}) on {lit(mask(url))}: http://{lit(host)}:{port}/  (Ctrl-C stops)", highlight=False)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


# --------------------------------------------------------------------------- database roles (issue 7)

ckpt_app = typer.Typer(help="Checkpoints of preemption-safe trials.", no_args_is_help=True)
app.add_typer(ckpt_app, name="checkpoints")


@ckpt_app.command("prune")
@_user_errors
def checkpoints_prune(
    study: Annotated[str, typer.Argument(help="Study name or file.")],
    storage: StorageOpt = None,
    folder: Annotated[
        Path | None,
        typer.Option("--dir", help="The checkpoint folder (default: $HPO_CHECKPOINT_DIR, else the study file's)."),
    ] = None,
    orphans_only: Annotated[
        bool, typer.Option("--orphans-only", help="Keep the checkpoints finished trials kept (keep: true).")
    ] = False,
) -> None:
    """Remove the checkpoints no trial will resume from: those of complete and pruned trials, of failed trials
    without a re-queued copy, and files a killed write left; a running or waiting trial's are never touched. Only in
    a folder this side names (--dir, $HPO_CHECKPOINT_DIR or the study file given), never one read from the database."""
    from hpo.checkpoint_folder import DIR_ENV
    from hpo.storage import open_storage
    from hpo.worker import load

    spec, url, name = _spec_and_url(study, storage)
    cfg = getattr(spec.objective, "checkpoint", None) if spec is not None else None
    if folder is None:
        named = os.environ.get(DIR_ENV) or (cfg.path if cfg is not None and cfg.store == "filesystem" else None)
        if named is None:
            raise HpoError(
                f"checkpoints prune: which folder? give --dir or set {DIR_ENV} (a folder named by the database is "
                "never used)"
            )
        folder = Path(named)
    folder = folder.expanduser()
    if not folder.is_dir():
        raise HpoError(f"checkpoints prune: {folder}: no such folder")
    from hpo.objectives.checkpoints import FolderStore, sweep

    store = FolderStore(folder)  # a folder of this user that nobody else can write, or one line
    st = open_storage(url)
    s, _ = load(name, st)
    swept = sweep(s, store, keep=orphans_only)
    out.print(
        f"removed {swept.removed} checkpoint file(s), {swept.removed_bytes / 2**20:.3f} MB, of study {lit(name)} "
        f"from {lit(folder)}; {swept.live} left for running or waiting trials"
        + (f", {swept.kept} kept by finished trials" if orphans_only else ""),
        highlight=False,
        soft_wrap=True,
    )


db_app = typer.Typer(help="Set up a shared study database: the worker and analyst roles.", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _role_password(kind: str, file: Path | None) -> str | None:
    """The role's password: from ``file`` (``--KIND-password-file`` / ``$HPO_KIND_PASSWORD_FILE``), else
    ``$HPO_KIND_PASSWORD``; never from the command line itself."""
    if file is not None:
        try:
            return file.read_text().splitlines()[0].strip()
        except (OSError, IndexError):
            raise HpoError(f"--{kind}-password-file: cannot read a password from {file}") from None
    return os.environ.get(f"HPO_{kind.upper()}_PASSWORD") or None


@db_app.command("init")
@_user_errors
def db_init(
    storage: StorageOpt = None,
    worker_role: Annotated[str, typer.Option(help="Name of the role workers connect as.")] = "hpo_worker",
    analyst_role: Annotated[str, typer.Option(help="Name of the read-only role analysts connect as.")] = "hpo_analyst",
    worker_password_file: Annotated[
        Path | None,
        typer.Option(
            envvar="HPO_WORKER_PASSWORD_FILE", help="File with the worker's password (else $HPO_WORKER_PASSWORD)."
        ),
    ] = None,
    analyst_password_file: Annotated[
        Path | None,
        typer.Option(
            envvar="HPO_ANALYST_PASSWORD_FILE", help="File with the analyst's password (else $HPO_ANALYST_PASSWORD)."
        ),
    ] = None,
    mysql_host: Annotated[str, typer.Option(help="MySQL/MariaDB: the host part of both users.")] = "%",
    analyst_connections: Annotated[
        int, typer.Option(help="Most sessions of the analyst role at once (all analysts and dashboards together).")
    ] = 10,
) -> None:
    """Create Optuna's tables and two roles (idempotent), with an admin's --storage URL: a worker role that reads and
    writes trials, and an analyst role that may only SELECT. PostgreSQL and MySQL/MariaDB."""
    from hpo.db import AnalystLimits, Role, init_roles, summary
    from hpo.storage import mask, resolve_url

    url = resolve_url(storage)
    worker_ = Role(worker_role, _role_password("worker", worker_password_file), "worker")
    analyst_ = Role(analyst_role, _role_password("analyst", analyst_password_file), "analyst")
    limits = AnalystLimits(connections=analyst_connections)
    grants = init_roles(url, worker_, analyst_, mysql_host=mysql_host, limits=limits)
    out.print(f"database ready: {lit(mask(url))}", highlight=False, soft_wrap=True)
    for role in (worker_, analyst_):
        out.print(
            f"  {role.kind} role {lit(role.name)}: {lit(summary(grants[role.name]))}", highlight=False, soft_wrap=True
        )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
