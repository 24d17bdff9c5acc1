"""The checkpoint folder's ownership rules, without torch: :mod:`hpo.preflight` checks a folder before a study is
touched and :mod:`hpo.trust` names the variable, both without importing the training stack; the store itself
(:class:`hpo.objectives.checkpoints.FolderStore`) checks again before every write, read and remove."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hpo.errors import HpoError

#: The worker's own checkpoint folder; it wins over a study file's ``objective.checkpoint.path``.
DIR_ENV = "HPO_CHECKPOINT_DIR"


def check_folder(folder: Path) -> None:
    """Create ``folder`` (0700) if missing; raise :class:`HpoError` (one line) unless it is a folder of this user
    that no other user can write: anyone who can write there could swap a checkpoint or plant a link."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check_dir(fd, folder)
    finally:
        os.close(fd)


def _check_dir(fd: int, folder: Path) -> None:
    st, uid = os.fstat(fd), os.geteuid()
    link = os.lstat(folder)
    if stat.S_ISLNK(link.st_mode) and link.st_uid != uid:
        raise HpoError(f"checkpoint store {folder}: a link made by uid {link.st_uid}; use a folder of your own")
    if st.st_uid != uid:
        raise HpoError(
            f"checkpoint store {folder}: owned by uid {st.st_uid}, not this worker's user (uid {uid}); "
            f"use a folder of your own ({DIR_ENV})"
        )
    if st.st_mode & 0o022:
        raise HpoError(
            f"checkpoint store {folder}: writable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"chmod 700 it or use a folder of your own ({DIR_ENV})"
        )
