"""A user's ``module:function`` (an objective, a callback, a sampler's callable keyword argument): imported the way
``python -m hpo`` imports it, with one line naming the file and line when the module cannot be imported.

The console script ``hpo`` does not put the current folder on ``sys.path`` (``python -m hpo`` does): a module that
is not found on the path but sits in the current folder is imported from there, the folder appended last so it
shadows nothing installed (child workers get the same folder through :data:`hpo.trust.PATH_ENV`).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpo.errors import SpecError

#: What a ``module:function`` reference looks like (the study file's fields check it with this pattern).
REFERENCE = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


def _in_cwd(top: str) -> bool:
    here = Path.cwd()
    return (here / f"{top}.py").is_file() or (here / top / "__init__.py").is_file()


def _where(exc: BaseException, module_name: str) -> str:
    """``file:line`` of the failure inside the user's code (the innermost frame outside the import machinery)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "importlib" not in f.filename]
    frames = [f for f in frames if not f.filename.startswith("<frozen")]
    if frames:
        return f"{frames[-1].filename}:{frames[-1].lineno}"
    return module_name


def import_module(module_name: str, field: str) -> Any:
    """Import a user's module; on failure one :class:`SpecError` line naming ``field``, the file and line.

    Raises:
        SpecError: the module is not found (with where hpo looked), or raised while it was imported.
    """
    top = module_name.split(".")[0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        here = str(Path.cwd())
        if exc.name == top and _in_cwd(top) and here not in sys.path:
            sys.path.append(here)  # as python -m hpo finds it, but last: it shadows nothing installed
            importlib.invalidate_caches()
            return import_module(module_name, field)
        if exc.name in (top, module_name):
            raise SpecError(
                f"{field}: cannot import {module_name!r}: no module of that name on the import path or in the current "
                f"folder ({here}); "
                f"run hpo from the folder that holds {top}.py, or add that folder to PYTHONPATH"
            ) from None
        raise SpecError(
            f"{field}: cannot import {module_name!r}: {type(exc).__name__}: {exc} ({_where(exc, module_name)})"
        ) from None
    except Exception as exc:  # any import-time failure of the user's module
        raise SpecError(
            f"{field}: cannot import {module_name!r}: {type(exc).__name__}: {exc} ({_where(exc, module_name)})"
        ) from None


def import_callable(ref: str, field: str) -> Callable[..., Any]:
    """The function (or callable instance) a ``module:function`` reference names.

    Raises:
        SpecError: it cannot be imported, or names nothing callable.
    """
    module_name, _, func_name = ref.partition(":")
    module = import_module(module_name, field)
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise SpecError(f"{field}: {module_name!r} has no function {func_name!r}")
    return fn


def check_call(fn: Callable[..., Any], ref: str, field: str, how: str, *args: Any) -> None:
    """Refuse, at load, a callable that cannot be called with ``args`` (``how`` says the call, e.g. ``cb(study,
    trial)``), in one line instead of a traceback mid-run."""
    if inspect.isclass(fn):
        raise SpecError(f"{field}: {ref} is a class; name a function (called as {how})")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*args)
    except TypeError as exc:
        raise SpecError(f"{field}: {ref} cannot be called as {how}: {exc}") from None


def callbacks(refs: list[str]) -> list[tuple[str, Callable[..., Any]]]:
    """A study file's ``callbacks:``, imported and checked to take ``(study, frozen_trial)`` as Optuna passes them.

    Raises:
        SpecError: one line naming ``callbacks.N``.
    """
    found = []
    for i, ref in enumerate(refs):
        fn = import_callable(ref, f"callbacks.{i}")
        check_call(fn, ref, f"callbacks.{i}", "cb(study, trial)", None, None)
        found.append((ref, fn))
    return found


__all__ = ["REFERENCE", "callbacks", "check_call", "import_callable", "import_module"]
