"""hpo: hyperparameter optimization as a service, on Optuna and PyTorch.

Studies are YAML files (:func:`load_spec`); workers pull trials from a shared SQL storage (:func:`run_worker`);
analysts query and report on the stored studies (:mod:`hpo.query`, :mod:`hpo.report`); in a notebook,
:func:`run` runs a study in-process and returns the Optuna study.
"""

from __future__ import annotations

__version__ = "0.1.0"

from hpo.api import run
from hpo.errors import HpoError, SpecError, StorageError, StudyError
from hpo.spec import StudySpec, load_spec, parse_spec
from hpo.storage import mask, open_storage, resolve_url
from hpo.worker import WorkerOptions, WorkerResult, create, run_worker

__all__ = [
    "HpoError",
    "SpecError",
    "StorageError",
    "StudyError",
    "StudySpec",
    "WorkerOptions",
    "WorkerResult",
    "__version__",
    "create",
    "load_spec",
    "mask",
    "open_storage",
    "parse_spec",
    "resolve_url",
    "run",
    "run_worker",
]
