"""The one error type for users' mistakes.

Every :class:`HpoError` carries a one-line message that the CLI prints before exiting with status 2.
Any other exception escaping hpo is a bug.
"""

from __future__ import annotations


class HpoError(Exception):
    """A mistake in what the user gave hpo: a study file, a URL, a path, a value."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class SpecError(HpoError):
    """A study file that cannot be read or does not validate."""


class StorageError(HpoError):
    """A storage URL that is malformed, unreachable or refused."""


class DataError(HpoError):
    """A data source that cannot be loaded (missing path, corrupt file)."""


class StudyError(HpoError):
    """A study that does not exist or disagrees with its study file."""


#: Exit status of a worker (and of ``hpo run``) stopped by a signal before the study's budget was met: "run me
#: again" (EX_TEMPFAIL). A Kubernetes Job's podFailurePolicy replaces such a pod without counting it, the Slurm script
#: requeues its task; 0 means the budget is met (or the worker's own --n-trials / --timeout ran out).
STOPPED_EXIT = 75
