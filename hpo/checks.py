"""Checks on the environment hpo runs in, made before anything is written.

A folder named ``hpo`` on ``PYTHONPATH`` or in the current directory (a checkout, or a folder holding a user's
objectives) can take the place of the installed package: Python then imports ``hpo`` from that folder, and with an
editable install ``hpo.cli`` still loads from the package, so the first sign was ``module 'hpo' has no attribute
'__version__'`` after a study had been created. :func:`check_not_shadowed` says so in one line instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hpo.errors import HpoError

#: The folder this package was loaded from (this file's folder).
PACKAGE_DIR = Path(__file__).resolve().parent


def shadowing_folder() -> str | None:
    """The folder that the module named ``hpo`` was imported from, when it is not this package; else None."""
    mod = sys.modules.get("hpo")
    if mod is None:
        return None
    file = getattr(mod, "__file__", None)
    if file is not None and Path(file).resolve().parent == PACKAGE_DIR and hasattr(mod, "__version__"):
        return None
    if file is not None:
        return str(Path(file).resolve().parent)
    locations = [str(p) for p in getattr(mod, "__path__", []) if Path(p).resolve() != PACKAGE_DIR]
    return locations[0] if locations else str(getattr(mod, "__path__", ["?"]))


def check_not_shadowed() -> None:
    """Raise :class:`HpoError` when a folder named ``hpo`` shadows the installed package.

    Raises:
        HpoError: naming the folder and what to do, on one line.
    """
    folder = shadowing_folder()
    if folder is None:
        return
    parent = str(Path(folder).parent)
    raise HpoError(
        f"the folder {folder} shadows the hpo package (installed at {PACKAGE_DIR}): Python imports 'hpo' from it; "
        f"rename that folder, or take {parent} off PYTHONPATH (and do not run from it)"
    )


__all__ = ["PACKAGE_DIR", "check_not_shadowed", "shadowing_folder"]
