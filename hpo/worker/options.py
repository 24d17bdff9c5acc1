"""What a worker is told (:class:`WorkerOptions`) and what it reports (:class:`WorkerResult`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import optuna

from hpo.errors import HpoError

#: Seconds a worker gives its trial to stop after SIGTERM: inside the 30 s that docker stop, Slurm's default KillWait
#: and Kubernetes' default grace period allow before SIGKILL (at 30 s, SIGKILL came first and left the trial RUNNING).
DEFAULT_STOP_TIMEOUT_S = 20.0


@dataclass
class WorkerOptions:
    """How one worker runs. Defaults suit one worker on this machine."""

    heartbeat_interval: int | None = 10
    grace_period: int | None = None  # None: Optuna's default, 2 x heartbeat_interval
    max_retry: int = 2
    threads: int | None = None
    device: str = "cpu"
    n_trials: int | None = None  # override the study's budget
    timeout: float | None = None
    db_retry_for: float = 120.0
    #: Seconds after a SIGTERM/SIGINT before a worker whose trial has not stopped fails and re-queues it and exits 0.
    stop_timeout: float = DEFAULT_STOP_TIMEOUT_S
    max_consecutive_failures: int = 5
    handle_signals: bool = True
    #: Added to a seeded sampler's seed: a different stream on purpose. Not needed for workers to differ: each trial
    #: is drawn from the seed and its own number (:func:`hpo.samplers.seed_per_trial`).
    seed_offset: int = 0
    on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None
    #: Trials trained at once, stacked (``hpo.objectives.population``); None: the study file's, else 1; or "auto".
    population: int | str | None = None
    #: Longest wait for the study's budget lock per attempt (attempts are retried), in seconds.
    lock_timeout: float = 5.0
    #: A worker idle this long inside the budget lock's transaction (SIGSTOPped, its network dead) loses the lock.
    lock_idle_timeout: float = 10.0
    #: ``module:function`` objectives a worker started by study name may run (``--objective``; also
    #: ``HPO_ALLOW_OBJECTIVES``): a stored study file naming any other code is refused (:mod:`hpo.trust`).
    objectives: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for flag, value in (("--lock-timeout", self.lock_timeout), ("--lock-idle-timeout", self.lock_idle_timeout)):
            if not value > 0:
                raise HpoError(f"{flag} must be a positive number of seconds, not {value:g}")


@dataclass
class WorkerResult:
    ran: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    interrupted: bool = False
    reason: str = ""
    trials: list[int] = field(default_factory=list)
    #: The number of the trial that called ``study.stop()``, when that is why this worker stopped.
    stopped_by_trial: int | None = None


def default_threads(local_workers: int = 1) -> int:
    """Torch threads per worker so that ``local_workers`` workers do not oversubscribe this machine's cores (the rule:
    :func:`hpo.threads.default_threads`)."""
    from hpo.threads import default_threads as rule

    return rule(local_workers)
