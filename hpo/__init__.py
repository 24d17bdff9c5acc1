"""hpo: hyperparameter optimization as a service, on Optuna and PyTorch.

Studies are YAML files (:func:`load_spec`); workers pull trials from a shared SQL storage (:func:`run_worker`);
analysts query and report on the stored studies (:mod:`hpo.query`, :mod:`hpo.report`); in a notebook,
:func:`run` runs a study in-process and returns the Optuna study.
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
import warnings
from typing import TYPE_CHECKING, Any

# Optuna imports tqdm.auto, which in a Jupyter kernel without ipywidgets warns on import; hpo shows no tqdm bar
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")

if TYPE_CHECKING:
    from hpo.api import run
    from hpo.errors import HpoError, SpecError, StorageError, StudyError
    from hpo.spec import StudySpec, load_spec, parse_spec
    from hpo.storage import mask, open_storage, resolve_url
    from hpo.worker import WorkerOptions, WorkerResult, create, run_worker

#: public names -> the module that defines them, imported on first use: ``import hpo`` (and so every ``hpo``
#: command's start) loads none of optuna, SQLAlchemy, pydantic, pandas, plotly or torch until a name needs them
_NAMES = {
    "run": "api",
    "HpoError": "errors",
    "SpecError": "errors",
    "StorageError": "errors",
    "StudyError": "errors",
    "StudySpec": "spec",
    "load_spec": "spec",
    "parse_spec": "spec",
    "mask": "storage",
    "open_storage": "storage",
    "resolve_url": "storage",
    "WorkerOptions": "worker",
    "WorkerResult": "worker",
    "create": "worker",
    "run_worker": "worker",
}
#: submodules that ``hpo.<name>`` imports on first use
_LAZY = ("query", "report")


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(f"hpo.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    if name in _LAZY:
        return importlib.import_module(f"hpo.{name}")
    raise AttributeError(f"module 'hpo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES, *_LAZY])


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
