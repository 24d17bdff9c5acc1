"""The Python API for notebooks: :func:`run` a study file in-process and get the Optuna study back.

Example (a Jupyter cell)::

    import hpo
    study = hpo.run("studies/spirals-optimizer.yaml", storage="sqlite:///hpo.db", n_trials=30)
    study.best_params
    figs = hpo.report.figures(study)      # the report's figures as plotly figures, shown inline
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna

from hpo.checks import check_not_shadowed
from hpo.spec import StudySpec, load_spec


def run(
    study: str | Path | StudySpec,
    storage: str | None = None,
    n_trials: int | None = None,
    *,
    timeout: float | None = None,
    threads: int | None = None,
    device: str = "cpu",
    population: int | str | None = None,
    progress: bool = True,
) -> optuna.Study:
    """Create or resume a study and run it in this process to its budget, as ``hpo run`` does with one worker.

    Args:
        study: a study file's path or a :class:`~hpo.spec.StudySpec`.
        storage: a SQLAlchemy URL; default: ``$HPO_STORAGE``, then the study file's, then ``sqlite:///hpo.db``.
        n_trials: the total trial budget (overrides the file's).
        timeout: stop starting trials after this many seconds.
        threads: torch threads (default: :func:`hpo.threads.default_threads`).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        population: trials trained at once, stacked (a number or ``auto``); default: the file's, else 1.
        progress: show a progress bar (rich: it renders in a terminal and in Jupyter).

    Returns:
        The Optuna study, loaded from the storage with the study file's sampler and pruner.

    Raises:
        HpoError: a mistake in the study file, the storage URL or the options (one-line message).
    """
    check_not_shadowed()
    with _quiet_optuna():
        return _run(study, storage, n_trials, timeout, threads, device, population, progress)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's INFO lines ("A new study created ...") are the command line's log, not a notebook cell's output."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _run(
    study: str | Path | StudySpec,
    storage: str | None,
    n_trials: int | None,
    timeout: float | None,
    threads: int | None,
    device: str,
    population: int | str | None,
    progress: bool,
) -> optuna.Study:
    from rich.console import Console

    from hpo.progress import StudyProgress
    from hpo.storage import open_storage, resolve_url
    from hpo.worker import WorkerOptions, create, load, run_worker

    spec = study if isinstance(study, StudySpec) else load_spec(study)
    url = resolve_url(storage, spec.storage)
    create(spec, url)
    budget = n_trials if n_trials is not None else spec.budget.n_trials
    opts = WorkerOptions(
        threads=threads, device=device, n_trials=n_trials, timeout=timeout, population=population, handle_signals=False
    )
    stop = threading.Event()
    with _interrupts(stop):
        if progress:
            with StudyProgress(spec.name, url, budget, console=Console(), lines=False) as poll:
                opts.on_trial = lambda _t: poll(force=False)
                run_worker(spec, url, opts, stop=stop)
        else:
            run_worker(spec, url, opts, stop=stop)
    result, _ = load(spec.name, open_storage(url))
    return result


@contextlib.contextmanager
def _interrupts(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C / Kernel > Interrupt: the first stops the running trial (re-queued) and :func:`run` returns the study;
    a second raises ``KeyboardInterrupt`` as usual. (The command line's worker exits the process at the second
    signal, which in a notebook would kill the kernel.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


__all__ = ["run"]
