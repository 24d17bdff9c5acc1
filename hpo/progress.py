"""What a worker says while it works: one line per finished trial, and a live view of the study on a terminal.

Off a terminal (``docker logs``, a Slurm output file, a pipe) a worker writes plain log lines, one per trial it
finished::

    2026-11-29 21:57:12 trial 3 COMPLETE val_accuracy=0.8734 in 1.2s
    2026-11-29 21:57:13 trial 4 PRUNED val_accuracy=0.51 in 0.8s reason=diverged

On a terminal, :class:`StudyProgress` shows a progress bar of the study (trials finished / budget, best so far,
pruned, failed) with the same lines printed above it. It renders in Jupyter too (rich's own notebook support), which
is what :func:`hpo.run` uses.
"""

from __future__ import annotations

import html
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hpo.render import visible
from hpo.storage import best_of, count_budget, open_storage

#: The logger of the per-trial lines; :func:`trial_logger` gives it a plain handler of its own.
TRIAL_LOG = "hpo.trials"


def metric_names(study: Any) -> list[str]:
    """A study's metric names, one per objective: as hpo stores them (Optuna's ``set_metric_names``), else its
    ``metric`` attribute, else ``value`` (``value_0``, ``value_1``, ... for several). ``study``: an
    :class:`optuna.Study` or a :class:`optuna.study.FrozenStudy`."""
    n = len(study.directions)
    if isinstance(study, optuna.Study):
        names = study.metric_names
    else:
        names = study.system_attrs.get("study:metric_names")  # where Optuna keeps them
    if names and len(names) == n:
        return [str(x) for x in names]
    stored = str(study.user_attrs.get("metric") or "").split(",")
    if len(stored) == n and all(stored):
        return stored
    return ["value"] if n == 1 else [f"value_{i}" for i in range(n)]


def trial_line(t: FrozenTrial, metric: str | list[str] = "value") -> str:
    """``trial 3 COMPLETE val_accuracy=0.8734 in 1.2s`` (+ ``reason=...``, ``resumed_from=...`` and
    ``checkpoint_rejected=...`` of a re-queued copy, and the error of a failed trial); several
    objectives: ``val_accuracy=0.61 train_seconds=1.2``, one per name of ``metric``."""
    parts = [f"trial {t.number} {t.state.name}"]
    names = [metric] if isinstance(metric, str) else metric
    if t.values is not None and len(t.values) == len(names):
        parts += [f"{visible(m)}={v:.6g}" for m, v in zip(names, t.values, strict=True)]
    if t.datetime_start is not None and t.datetime_complete is not None:
        parts.append(f"in {(t.datetime_complete - t.datetime_start).total_seconds():.1f}s")
    reason = t.user_attrs.get("reason")
    if reason:
        parts.append(f"reason={visible(reason)}")
    if t.user_attrs.get("resumed_from") is not None:  # a re-queued copy that went on from its checkpoint
        parts.append(f"resumed_from={visible(t.user_attrs['resumed_from'])}")
    rejected = t.user_attrs.get("checkpoint_rejected")
    if rejected:
        parts.append(f"checkpoint_rejected={visible(str(rejected)[:200])!r}")
    error = t.user_attrs.get("error")
    if error and t.state == TrialState.FAIL:
        parts.append(f"error={visible(str(error).splitlines()[0][:200])!r}")
    return " ".join(parts)


def trial_logger(stream: Any = None) -> logging.Logger:
    """The per-trial logger, writing ``<time> <line>`` to ``stream`` (stderr) whatever the root logger's level."""
    logger = logging.getLogger(TRIAL_LOG)
    for h in logger.handlers:  # the process's stderr now (an in-process CLI run swaps and closes it)
        if getattr(h, "_hpo_trials", False) and isinstance(h, logging.StreamHandler):
            h.stream = stream or sys.stderr  # not setStream: it flushes the old, maybe closed, stream
    if not any(getattr(h, "_hpo_trials", False) for h in logger.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
        handler._hpo_trials = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


class TrialLog:
    """``on_trial`` callback of a worker (:class:`hpo.worker.WorkerOptions`): one log line per finished trial."""

    def __init__(self, metric: str | list[str] = "value", logger: logging.Logger | None = None) -> None:
        self.metric = metric
        self.log = logger or trial_logger()

    def __call__(self, t: FrozenTrial) -> None:
        self.log.info("%s", trial_line(t, self.metric))


class StudyProgress:
    """A rich progress bar of a study, fed by polling its storage: trials finished / budget, best so far, pruned,
    failed; a line per trial that finished since the last poll is printed above the bar.

    Use as ``with StudyProgress(name, url, budget) as poll: ...`` and call ``poll()`` after each trial (or every
    half second from a loop that waits for worker processes).
    """

    def __init__(
        self,
        name: str,
        url: str,
        budget: int | None,
        console: Console | None = None,
        lines: bool = True,
        storage: optuna.storages.BaseStorage | None = None,
    ) -> None:
        self.name, self.url, self.budget, self.lines = name, url, budget, lines
        self.storage = storage
        self.last = 0.0
        self.seen: set[int] = set()
        self.metric: list[str] = ["value"]
        self.console = console or Console(stderr=True)
        #: in Jupyter one output updated in place (IPython's display handle): rich's live bar needs ipywidgets there,
        #: and without it printed a copy of the bar (and a warning) per refresh
        self.handle: Any = None
        self.started = time.monotonic()
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            # off a terminal (a log file) the final line is printed whole by __exit__, not cut at 80 columns
            transient=not self.console.is_terminal,
        )

    def __enter__(self) -> Callable[[], None]:
        from rich.text import Text

        storage = self.storage if self.storage is not None else open_storage(self.url)
        self.study = optuna.load_study(study_name=self.name, storage=storage)
        self.metric = metric_names(self.study)
        if self.budget is None:
            stored = self.study.user_attrs.get("budget") or {}
            self.budget = stored.get("n_trials") if isinstance(stored, dict) else None
        # trials finished before this run are counted, not listed again
        self.seen = {t.number for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()}
        self.task = self.bar.add_task(Text(visible(self.name), style="bold").markup, total=self.budget, info="")
        self.started = time.monotonic()
        if self.console.is_jupyter:
            from IPython.display import display

            self.handle = display(self._bundle(0, ""), raw=True, display_id=True)
        else:
            self.bar.start()
        self.poll(force=True)
        return self.poll

    def poll(self, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        trials = self.study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state.is_finished()]
        complete = [t for t in done if t.state == TrialState.COMPLETE]
        pruned = sum(t.state == TrialState.PRUNED for t in done)
        failed = sum(t.state == TrialState.FAIL for t in done)
        if self.lines:
            for t in sorted((t for t in done if t.number not in self.seen), key=lambda t: t.number):
                self.bar.console.print(trial_line(t, self.metric), highlight=False, markup=False, soft_wrap=True)
        self.seen.update(t.number for t in done)
        best = ""
        if complete and len(self.metric) > 1:  # several objectives: the size of the Pareto front
            best = f"front {len(self.study.best_trials)}  "
        elif complete:  # the best feasible trial, as Optuna's study.best_trial
            top = best_of(complete, self.study.direction)
            best = f"best {top.value:.4g}  " if top is not None else "best none feasible  "
        # against the budget, by its rule: a failed trial that was re-queued gives its slot to its copy
        counted, running = count_budget(trials)
        info = f"{best}pruned {pruned}  failed {failed}"
        if self.handle is not None:
            self.handle.update(self._bundle(counted - running, info), raw=True)
        else:
            self.bar.update(self.task, completed=counted - running, info=info)

    def _bundle(self, done: int, info: str) -> dict[str, str]:
        """The bar as a notebook output: text for any viewer, an HTML ``<progress>`` where HTML renders."""
        elapsed = int(time.monotonic() - self.started)
        clock = f"{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}"
        of = f"{done}/{self.budget}" if self.budget else f"{done}"
        line = f"{visible(self.name)} {of}  {info}  {clock}"
        bar = f"<progress value='{done}' max='{self.budget or max(done, 1)}'></progress>"
        return {"text/plain": line, "text/html": f"{bar} <code>{html.escape(line)}</code>"}

    def __exit__(self, *exc: Any) -> None:
        try:
            self.poll()
        finally:
            if self.handle is None:
                self.bar.stop()
                if not self.console.is_terminal:  # the elapsed time at its end included, whatever the name's length
                    wide = Console(file=self.console.file, width=10_000, color_system=None, force_terminal=False)
                    wide.print(self.bar.make_tasks_table(self.bar.tasks))


__all__ = ["TRIAL_LOG", "StudyProgress", "TrialLog", "metric_names", "trial_line", "trial_logger"]
