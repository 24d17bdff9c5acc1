"""The pull loops, both on one lease: create a study once, then any number of workers pull trials until its global
budget is met.

* :mod:`hpo.worker.lease`: a trial's lease on the shared database (slot under the budget lock, heartbeats, tell
  exactly once, re-queue at most once per failure, reap); the only code that decides a trial's fate.
* :mod:`hpo.worker.single`: one trial at a time (any objective).
* :mod:`hpo.worker.population`: K small trials at a time, stacked.
* :mod:`hpo.worker.study`: creating and loading a study with its study file.
"""

from __future__ import annotations

from hpo.storage import COUNTED, count_budget, requeued_numbers  # the budget's rule over trials read
from hpo.worker.lease import (
    FINISHED,
    GRACE_ATTR,
    budget_used,
    created_trial,
    fail_and_requeue,
    reap,
    study_grace,
    take_slots,
)
from hpo.worker.options import WorkerOptions, WorkerResult, default_threads
from hpo.worker.single import run_worker
from hpo.worker.study import SPEC_ATTR, check_agrees, create, load, replay, set_grace

__all__ = [
    "COUNTED",
    "FINISHED",
    "GRACE_ATTR",
    "SPEC_ATTR",
    "WorkerOptions",
    "WorkerResult",
    "budget_used",
    "check_agrees",
    "count_budget",
    "create",
    "created_trial",
    "default_threads",
    "fail_and_requeue",
    "load",
    "reap",
    "replay",
    "requeued_numbers",
    "run_worker",
    "set_grace",
    "study_grace",
    "take_slots",
]
