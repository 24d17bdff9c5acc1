"""Checks a study file must pass before anything is written: the database is left as it was found when one fails.

:func:`hpo.spec.load_spec` validates the file's shape; what needs more than the file (importing a user's objective,
a data folder on this machine) is checked here, by ``hpo run``, ``hpo create`` and ``hpo worker`` before they create
or touch the study.
"""

from __future__ import annotations

from pathlib import Path

from hpo.errors import SpecError
from hpo.spec import IdxData, StudySpec


def preflight(spec: StudySpec, source: str) -> None:
    """Raise :class:`SpecError` (``source: field: reason``) for what would fail only once the study exists.

    Checks: a ``module:function`` objective imports and names a callable; an ``idx`` data folder exists.
    """
    from hpo.objectives import resolve

    kind = spec.objective.kind
    if ":" in kind:
        try:
            resolve(kind)
        except SpecError as exc:
            raise SpecError(f"{source}: {exc}") from None
    data = getattr(spec.objective, "data", None)
    if isinstance(data, IdxData):
        folder = Path(data.path).expanduser()
        if not folder.is_dir():
            raise SpecError(f"{source}: objective.data.path: no such folder {folder}")
