"""What a worker takes from the shared database, and what only from its own side.

Anyone with the worker login can rewrite a study's stored file (``hpo:spec``). A worker given the study FILE runs
that file and refuses a differing stored copy; a worker given only the study NAME reads the stored copy, and takes
from it the search space, budget, sampler, pruner and the built-in objectives' settings, but no code and no path:

* a ``module:function`` objective runs only when the worker's side names it: ``--objective`` or
  ``HPO_ALLOW_OBJECTIVES`` (``mod:fn,other.mod:*``); so do ``callbacks:`` and a sampler's callable keyword
  arguments (``constraints_func: mod:fn``), under the same list;
* a filesystem checkpoint store only when ``HPO_CHECKPOINT_DIR`` gives the folder (the stored path is never used);
  a bucket only when ``HPO_CHECKPOINT_BUCKET`` names the same one;
* an ``idx`` data folder only inside a folder ``HPO_ALLOW_DATA`` lists (``os.pathsep``-separated).

Anything else is refused in one line, before the worker writes anything or takes a trial.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from hpo.checkpoint_folder import DIR_ENV
from hpo.errors import HpoError
from hpo.spec import CustomObjective, IdxData, StudySpec

ALLOW_ENV = "HPO_ALLOW_OBJECTIVES"
DATA_ENV = "HPO_ALLOW_DATA"
BUCKET_ENV = "HPO_CHECKPOINT_BUCKET"

_ENTRY = re.compile(r"^[A-Za-z_][\w.]*:([A-Za-z_]\w*|\*)$")


class TrustError(HpoError):
    """A stored study file names code or a path that this worker's own side did not allow."""


def allowed_objectives(given: Iterable[str] = ()) -> list[str]:
    """The ``module:function`` (or ``module:*``) entries this worker may run: ``given`` (``--objective``) and
    ``HPO_ALLOW_OBJECTIVES``; a malformed entry is refused."""
    entries = [*given, *os.environ.get(ALLOW_ENV, "").split(",")]
    entries = [e.strip() for e in entries if e.strip()]
    for entry in entries:
        if not _ENTRY.match(entry):
            raise HpoError(f"{ALLOW_ENV} / --objective: {entry!r} is not module:function or module:*")
    return entries


def objective_allowed(kind: str, allowed: Iterable[str]) -> bool:
    module = kind.partition(":")[0]
    return any(entry in (kind, f"{module}:*") for entry in allowed)


def check_stored(spec: StudySpec, name: str, objectives: Iterable[str] = ()) -> None:
    """Refuse a stored study file that would have a worker started by name run code or use a path its own side did
    not give (see the module's docstring).

    Raises:
        TrustError: naming the field and the variable or option to set, on one line.
    """
    where = f"stored study {name!r}"
    check_objective_flag(spec, objectives)
    obj = spec.objective
    if isinstance(obj, CustomObjective) and not objective_allowed(obj.kind, allowed_objectives(objectives)):
        raise TrustError(
            f"{where}: objective.kind {obj.kind!r} is code named by the database: a worker started by study name "
            f"runs it only if its own side allows it: --objective {obj.kind} or {ALLOW_ENV}={obj.kind} "
            "(or start the worker with the study file)"
        )
    refs = [(f"callbacks.{i}", ref) for i, ref in enumerate(spec.callbacks)]
    refs += [(f"sampler.kwargs.{key}", ref) for key, ref in spec.sampler.callables().items()]
    for field, ref in refs:  # code as much as the objective is: the same allow-list
        if not objective_allowed(ref, allowed_objectives(objectives)):
            raise TrustError(
                f"{where}: {field} {ref!r} is code named by the database: a worker started by study name runs it "
                f"only if its own side allows it: --objective {ref} or {ALLOW_ENV}={ref} "
                "(or start the worker with the study file)"
            )
    ckpt = getattr(obj, "checkpoint", None)
    if ckpt is not None:
        if ckpt.store == "filesystem" and not os.environ.get(DIR_ENV):
            raise TrustError(
                f"{where}: objective.checkpoint.path {ckpt.path!r} is a folder named by the database: a worker "
                f"started by study name writes checkpoints only where its own side says: set {DIR_ENV} "
                "(or start the worker with the study file)"
            )
        if ckpt.store != "filesystem" and os.environ.get(BUCKET_ENV) != ckpt.path:
            raise TrustError(
                f"{where}: objective.checkpoint.path {ckpt.path!r} is a {ckpt.store} bucket named by the database: "
                f"a worker started by study name uses it only if {BUCKET_ENV}={ckpt.path} "
                "(or start the worker with the study file)"
            )
    data = getattr(obj, "data", None)
    if isinstance(data, IdxData) and not _inside_allowed(data.path):
        raise TrustError(
            f"{where}: objective.data.path {data.path!r} is a folder named by the database: a worker started by "
            f"study name reads data only inside folders its own side lists: set {DATA_ENV} "
            "(or start the worker with the study file)"
        )


def check_objective_flag(spec: StudySpec, objectives: Iterable[str]) -> None:
    """``--objective`` says which code this worker expects: a study whose objective is another is refused."""
    given = list(objectives)
    if given and spec.objective.kind not in given:
        raise HpoError(
            f"--objective {', '.join(given)}: the study {spec.name!r} runs objective.kind {spec.objective.kind!r}"
        )


def _inside_allowed(path: str) -> bool:
    target = Path(path).expanduser().resolve()
    for folder in os.environ.get(DATA_ENV, "").split(os.pathsep):
        if folder.strip():
            root = Path(folder.strip()).expanduser().resolve()
            if target == root or root in target.parents:
                return True
    return False


def objective_root(kind: str) -> str | None:
    """The folder on ``sys.path`` that a user's ``module:function`` objective was imported from (this process
    imported it); None for a built-in objective.

    Child workers start with an isolated import path (``python -P``) and get this folder appended to theirs, so they
    import the same objective as the parent without putting the working folder first for every other module.
    """
    import sys

    if ":" not in kind:
        return None
    top = sys.modules.get(kind.partition(":")[0].split(".")[0])
    if top is None:
        return None
    paths = list(getattr(top, "__path__", []) or [])
    file = getattr(top, "__file__", None)
    if paths:
        return str(Path(paths[0]).resolve().parent)
    return str(Path(file).resolve().parent) if file else None


#: Folders a child worker appends to its import path (last, so they shadow nothing installed): set by ``hpo run``.
PATH_ENV = "HPO_OBJECTIVE_PATH"


def extend_import_path() -> None:
    """Append the folders ``HPO_OBJECTIVE_PATH`` names to ``sys.path`` (a child worker of ``hpo run``)."""
    import sys

    for folder in os.environ.get(PATH_ENV, "").split(os.pathsep):
        if folder and folder not in sys.path:
            sys.path.append(folder)


__all__ = [
    "ALLOW_ENV",
    "BUCKET_ENV",
    "DATA_ENV",
    "PATH_ENV",
    "TrustError",
    "allowed_objectives",
    "check_objective_flag",
    "check_stored",
    "extend_import_path",
    "objective_allowed",
    "objective_root",
]
