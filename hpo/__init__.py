"""hpo: hyperparameter optimization as a service, on Optuna and PyTorch.

Studies are YAML files (:func:`load_spec`); workers pull trials from a shared SQL storage (:func:`run_worker`);
analysts query and report on the stored studies (:mod:`hpo.query`, :mod:`hpo.report`); in a notebook,
:func:`run` runs a study in-process and returns the Optuna study.
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
import warnings
from typing import Any

# Optuna imports tqdm.auto, which in a Jupyter kernel without ipywidgets warns on import; hpo shows no tqdm bar
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")

from hpo.api import run  # noqa: E402
from hpo.errors import HpoError, SpecError, StorageError, StudyError  # noqa: E402
from hpo.spec import StudySpec, load_spec, parse_spec  # noqa: E402
from hpo.storage import mask, open_storage, resolve_url  # noqa: E402
from hpo.worker import WorkerOptions, WorkerResult, create, run_worker  # noqa: E402

#: submodules that ``hpo.<name>`` imports on first use (plotly, pandas and scipy stay out of ``import hpo``)
_LAZY = ("query", "report")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"hpo.{name}")
    raise AttributeError(f"module 'hpo' has no attribute {name!r}")


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
