"""Checks a study file must pass before anything is written: the database is left as it was found when one fails.

:func:`hpo.spec.load_spec` validates the file's shape; what needs more than the file (importing a user's objective,
a data folder on this machine) is checked here, by ``hpo run``, ``hpo create`` and ``hpo worker`` before they create
or touch the study.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hpo.checkpoint_folder import DIR_ENV, check_folder
from hpo.errors import HpoError, SpecError
from hpo.spec import IdxData, StudySpec


def preflight(spec: StudySpec, source: str) -> None:
    """Raise :class:`SpecError` (``source: field: reason``) for what would fail only once the study exists.

    Checks: a ``module:function`` objective, each of ``callbacks:`` and a sampler's callable keyword argument import
    and name a callable that takes what Optuna passes; an ``idx`` data folder exists and can be
    read; a filesystem checkpoint folder can be written (a probe file is written and removed): an unwritable one
    failed every trial in 0.1 s and the worker reported the budget met.
    """
    from hpo.objectives import resolve

    kind = spec.objective.kind
    if ":" in kind:
        try:
            resolve(kind)
        except SpecError as exc:
            raise SpecError(f"{source}: {exc}") from None
    from hpo.samplers import sampler_callables
    from hpo.user_code import callbacks

    try:
        callbacks(spec.callbacks)
        sampler_callables(spec)
    except SpecError as exc:
        raise SpecError(f"{source}: {exc}") from None
    data = getattr(spec.objective, "data", None)
    if isinstance(data, IdxData):
        folder = Path(data.path).expanduser()
        if not folder.is_dir():
            raise SpecError(f"{source}: objective.data.path: no such folder {folder}")
        if not os.access(folder, os.R_OK | os.X_OK):
            raise SpecError(f"{source}: objective.data.path: cannot read the folder {folder}")
    checkpoint = getattr(spec.objective, "checkpoint", None)
    if checkpoint is not None and checkpoint.store == "filesystem":
        _check_writable(Path(os.environ.get(DIR_ENV) or checkpoint.path).expanduser(), source)


def _check_writable(folder: Path, source: str) -> None:
    """Create ``folder`` (0700) if missing, check it is this user's alone, write and remove a probe file in it; else
    one line naming the fix."""
    where = f"{DIR_ENV}" if os.environ.get(DIR_ENV) else "objective.checkpoint.path"
    try:
        check_folder(folder)  # created 0700; refused unless this user's and writable by nobody else
        fd, probe = tempfile.mkstemp(prefix=".hpo-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except HpoError as exc:
        raise SpecError(f"{source}: {where}: {exc}") from None
    except OSError as exc:
        raise SpecError(
            f"{source}: {where}: cannot write checkpoints in {folder} ({exc.strerror or exc}); "
            f"set {DIR_ENV} to a folder this worker can write"
        ) from None
