"""The ``hpo`` command line (typer + rich).

Users' mistakes (:class:`hpo.errors.HpoError`) print one line, ``error: ...``, on stderr and exit 2.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hpo.errors import HpoError, StudyError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="hpo",
    help="Hyperparameter optimization as a service: studies are files, trials run on workers, results live in SQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage", "-s", help="SQLAlchemy URL; default: $HPO_STORAGE, then the study file, then sqlite:///hpo.db."
    ),
]
ThreadsOpt = Annotated[int | None, typer.Option(help="Torch threads per worker (default: cores / local workers).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (one worker per GPU).")]
HeartbeatOpt = Annotated[int, typer.Option(help="Seconds between heartbeats of a running trial.")]
GraceOpt = Annotated[
    int | None, typer.Option(help="Seconds without heartbeat before a trial is stale (default 2 x heartbeat).")
]
RetryOpt = Annotated[int, typer.Option(help="How often a stale or interrupted trial is re-queued.")]


def _user_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HpoError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False) -> None:
    import optuna

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)


def _is_file(study: str) -> bool:
    return study.endswith((".yaml", ".yml")) or Path(study).is_file()


def _spec_and_url(study: str, storage: str | None) -> tuple[Any, str, str]:
    """(spec or None, storage URL, study name) for a study file path or a study name."""
    from hpo.spec import load_spec
    from hpo.storage import resolve_url

    if _is_file(study):
        spec = load_spec(study)
        return spec, resolve_url(storage, spec.storage), spec.name
    return None, resolve_url(storage), study


# --------------------------------------------------------------------------- running


@app.command()
@_user_errors
def run(
    study_file: Annotated[Path, typer.Argument(help="The study file (studies/*.yaml).")],
    storage: StorageOpt = None,
    n_trials: Annotated[int | None, typer.Option(help="Total trial budget (overrides the file's).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop starting trials after this many seconds.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Local worker processes.")] = 1,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    heartbeat: HeartbeatOpt = 10,
    grace: GraceOpt = None,
    max_retry: RetryOpt = 2,
) -> None:
    """Create or resume a study and run it to its budget, with a progress bar; print the best trial."""
    from hpo.spec import load_spec
    from hpo.storage import mask, resolve_url
    from hpo.worker import WorkerOptions, create, default_threads, run_worker

    spec = load_spec(study_file)
    url = resolve_url(storage, spec.storage)
    create(spec, url)
    budget = n_trials if n_trials is not None else spec.budget.n_trials
    threads = threads or default_threads(workers)
    with _progress(spec.name, url, budget) as poll:
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
            )
            result = run_worker(spec, url, opts)
            stopped = result.interrupted
        else:
            stopped = _run_processes(
                study_file, url, workers, threads, device, n_trials, timeout, heartbeat, grace, max_retry, poll
            )
    _summary(spec.name, url)
    out.print(
        f"stored in {mask(url)} (read it with: optuna trials --study-name {spec.name} --storage '{mask(url)}')",
        highlight=False,
        soft_wrap=True,
    )
    if stopped:
        out.print("stopped before the budget was met; run the same command again to resume")


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
) -> bool:
    cmd = [sys.executable, "-m", "hpo", "worker", str(study_file), "--threads", str(threads), "--device", device]
    cmd += ["--heartbeat", str(heartbeat), "--max-retry", str(max_retry), "--quiet"]
    if grace is not None:
        cmd += ["--grace", str(grace)]
    if n_trials is not None:
        cmd += ["--n-trials", str(n_trials)]
    if timeout is not None:
        cmd += ["--timeout", str(timeout)]
    env = {**os.environ, "HPO_STORAGE": url}  # never on a command line, where ps shows it
    procs = [subprocess.Popen([*cmd, "--seed-offset", str(i)], env=env) for i in range(workers)]
    stopped = False
    try:
        while any(p.poll() is None for p in procs):
            poll()
            time.sleep(0.5)
    except KeyboardInterrupt:
        stopped = True
        for p in procs:
            p.wait()
    codes = [p.returncode for p in procs]
    if any(c not in (0, None) for c in codes):
        raise HpoError(f"a worker exited with status {max(c for c in codes if c)}; see its message above")
    return stopped


class _progress:
    """A rich progress bar fed by polling the storage: trials done / budget, best so far, pruned, failed."""

    def __init__(self, name: str, url: str, budget: int | None) -> None:
        self.name, self.url, self.budget = name, url, budget
        self.last = 0.0
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=err,
            transient=False,
        )

    def __enter__(self) -> Callable[[], None]:
        import optuna

        from hpo.storage import open_storage

        self.study = optuna.load_study(study_name=self.name, storage=open_storage(self.url))
        self.task = self.bar.add_task(self.name, total=self.budget, info="")
        self.bar.start()
        self.poll(force=True)
        return self.poll

    def poll(self, force: bool = True) -> None:
        from optuna.trial import TrialState

        now = time.monotonic()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        trials = self.study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state.is_finished()]
        complete = [t for t in done if t.state == TrialState.COMPLETE]
        pruned = sum(t.state == TrialState.PRUNED for t in done)
        failed = sum(t.state == TrialState.FAIL for t in done)
        best = ""
        if complete:
            pick = max if self.study.direction.name == "MAXIMIZE" else min
            best = f"best {pick(t.value for t in complete):.4g}  "
        self.bar.update(self.task, completed=len(done), info=f"{best}pruned {pruned}  failed {failed}")

    def __exit__(self, *exc: Any) -> None:
        try:
            self.poll()
        finally:
            self.bar.stop()


def _summary(name: str, url: str) -> None:
    import optuna

    from hpo.storage import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(url))
    try:
        best = study.best_trial
    except ValueError:
        out.print(f"study {name}: no completed trial yet")
        return
    metric = study.user_attrs.get("metric", "value")
    out.print(f"best trial #{best.number}: {metric} = {best.value:.6g}", highlight=False)
    for k, v in best.params.items():
        out.print(f"  {k} = {v}", highlight=False)


@app.command()
@_user_errors
def create(study_file: Path, storage: StorageOpt = None) -> None:
    """Create a study from its file, once (idempotent); its sampler, pruner and budget are stored with it."""
    from hpo.spec import load_spec
    from hpo.storage import mask, resolve_url
    from hpo.worker import create as create_study

    spec = load_spec(study_file)
    url = resolve_url(storage, spec.storage)
    create_study(spec, url)
    out.print(f"study {spec.name} ready in {mask(url)}", highlight=False)


@app.command()
@_user_errors
def worker(
    study: Annotated[str, typer.Argument(help="A study name (created before) or a study file.")],
    storage: StorageOpt = None,
    n_trials: Annotated[int | None, typer.Option(help="Total trial budget (overrides the stored one).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop starting trials after this many seconds.")] = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    heartbeat: HeartbeatOpt = 10,
    grace: GraceOpt = None,
    max_retry: RetryOpt = 2,
    db_retry_for: Annotated[float, typer.Option(help="Seconds to keep retrying an unavailable database.")] = 120.0,
    seed_offset: Annotated[
        int | None, typer.Option(help="Added to the sampler's seed (default: the process id, so workers differ).")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="Print nothing on success.")] = False,
) -> None:
    """Pull trials of a study until its global budget is met (run many of these, on many machines)."""
    from hpo.worker import WorkerOptions, run_worker

    spec, url, name = _spec_and_url(study, storage)
    opts = WorkerOptions(
        heartbeat_interval=heartbeat,
        grace_period=grace,
        max_retry=max_retry,
        threads=threads,
        device=device,
        n_trials=n_trials,
        timeout=timeout,
        db_retry_for=db_retry_for,
        seed_offset=seed_offset,
    )
    result = run_worker(spec if spec is not None else name, url, opts)
    if not quiet:
        out.print(
            f"worker done ({result.reason}): ran {result.ran} trials, {result.complete} complete, "
            f"{result.pruned} pruned, {result.failed} failed",
            highlight=False,
        )


@app.command()
@_user_errors
def reap(
    study: Annotated[str, typer.Argument(help="Study name or file.")],
    storage: StorageOpt = None,
    heartbeat: HeartbeatOpt = 10,
    grace: GraceOpt = None,
    max_retry: RetryOpt = 2,
) -> None:
    """Fail running trials whose worker stopped sending heartbeats, and re-queue them."""
    import optuna

    from hpo.storage import open_storage
    from hpo.worker import load

    _, url, name = _spec_and_url(study, storage)
    st = open_storage(url, heartbeat_interval=heartbeat, grace_period=grace, max_retry=max_retry)
    s, _ = load(name, st)
    before = {t.number for t in s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
    optuna.storages.fail_stale_trials(s)
    after = {t.number for t in s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
    out.print(f"reaped {len(before - after)} stale trial(s); {len(after)} still running")


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
        params[key] = yaml.safe_load(value)
    _, url, name = _spec_and_url(study, storage)
    s, spec = load(name, open_storage(url))
    unknown = set(params) - set(spec.space)
    if unknown:
        raise StudyError(f"--param: {', '.join(sorted(unknown))} not in the study's space")
    s.enqueue_trial(params, user_attrs={"enqueued": True})
    out.print(f"queued {params} in {name}", highlight=False)


@app.command()
@_user_errors
def evaluate(
    study: Annotated[str, typer.Argument(help="Study name or file.")],
    storage: StorageOpt = None,
    trial: Annotated[int | None, typer.Option(help="Trial number (default: the best).")] = None,
) -> None:
    """Re-train a trial with its stored seed, check it reproduces, and measure it on the held-out test split.

    The test figure is stored as the study user attribute ``test_evaluation``; it never feeds back into selection.
    """
    from hpo.objectives.training import evaluate_on_test
    from hpo.storage import open_storage
    from hpo.worker import load

    _, url, name = _spec_and_url(study, storage)
    s, spec = load(name, open_storage(url))
    try:
        frozen = s.best_trial if trial is None else next(t for t in s.get_trials(deepcopy=False) if t.number == trial)
    except (ValueError, StopIteration):
        raise StudyError(f"study {name!r} has no {'completed trial' if trial is None else f'trial {trial}'}") from None
    if frozen.value is None:
        raise StudyError(f"trial {frozen.number} of {name!r} has no value (state {frozen.state.name})")
    value, test = evaluate_on_test(spec, frozen)
    record = {"trial": frozen.number, "reproduced": value == frozen.value, spec.metric: value, "test_accuracy": test}
    s.set_user_attr("test_evaluation", record)
    out.print(
        f"trial #{frozen.number}: stored {spec.metric} {frozen.value:.6g}, re-run {value:.6g} "
        f"({'reproduced' if value == frozen.value else 'DIFFERS'}); test accuracy {test:.4f}",
        highlight=False,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
