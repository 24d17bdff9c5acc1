"""Preemption-safe training trials: checkpoints in an artifact store, resumed by a re-queued copy.

A training trial whose study file has ``objective.checkpoint`` saves its state (model, optimizer, the epoch and step
reached, the batch losses of the epoch so far, the data order's generator and the torch, numpy and Python random
states, the learning curve so far) at the end of every ``every_epochs``-th epoch, every ``every_steps`` steps if set,
and once more when its worker is asked to stop (SIGTERM). The state is written to an artifact store (a folder by
default, :class:`FolderStore`; Optuna's S3 or GCS store by configuration) under a new id each time; the trial's user
attribute ``checkpoint`` then names it (``{"id", "epoch", "step", "bytes", "sha256"}``) and the previous one is
removed, so a process killed while writing leaves the last complete checkpoint named.

A trial failed by a stop, a ``kill -9`` (reaped) or a lost database is re-queued by Optuna's retry callback with its
user attributes (:func:`hpo.storage.retry_callback`), ``checkpoint`` among them, and its system attribute
``failed_trial`` naming the original. The copy loads the named checkpoint, records ``resumed_from`` (the epochs
completed before it, with ``resumed_step`` where it resumed inside an epoch) and goes on from there. The training
loop draws nothing from a random source that the checkpoint does not hold, so a resumed trial's final value equals an
uninterrupted run's with the same seed, bit for bit on the CPU.

Nothing read back from the store runs as code (the trust rule, docs/security.md): a checkpoint holds tensors and plain
values only (the RNG states as tensors and lists) and is read with ``torch.load(weights_only=True)``, after its
SHA-256 digest is checked against the one the saving trial recorded. A missing file, a digest mismatch or a load
error is recorded on the copy (``checkpoint_rejected``: one line), logged as one line, and the copy starts from epoch
0; the rejected file is left where it is. A filesystem store must be a folder of the worker's own user, writable by
nobody else (created 0700; refused otherwise, in one line, before the study is touched); inside it files are written
to a new temporary file (``O_EXCL|O_NOFOLLOW``), fsynced and renamed into place, read only when they are regular files
of the worker's user (never through a link), and removed only then. S3/GCS stores are used as Optuna writes them:
there the digest is what protects a resumed trial.

Checkpoints of a completed or pruned trial are removed unless ``keep: true``; ``checkpoint_bytes`` (user attribute,
0 once removed) is what ``hpo studies`` sums per study.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import random
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import optuna
import torch
from optuna.artifacts.exceptions import ArtifactNotFound
from torch import nn

from hpo.checkpoint_folder import DIR_ENV, _check_dir, check_folder
from hpo.objectives.optim import LeanOptimizer
from hpo.spec import CheckpointSpec
from hpo.storage import set_trial_attrs

log = logging.getLogger(__name__)

ATTR = "checkpoint"
BYTES_ATTR = "checkpoint_bytes"
REJECTED_ATTR = "checkpoint_rejected"
#: What a checkpoint holds: a loaded file without all of them is rejected before anything is restored.
BLOB_KEYS = {"epoch", "step", "losses", "gen_state", "model", "optimizer", "torch_rng", "cuda_rng", "numpy_rng",
             "python_rng", "extra"}  # fmt: skip
#: The ids this module writes; an id read back from the database that is not one is never opened or removed.
ID_RE = re.compile(r"hpo-ckpt-[0-9a-f]{12}-\d+-\d+-e\d+-s\d+")
#: A file :meth:`FolderStore.write` had not renamed into place yet (its process was killed while writing).
TMP_RE = re.compile(r"\.(hpo-ckpt-[0-9a-f]{12}-\d+-\d+-e\d+-s\d+)\.[0-9a-f]{16}\.tmp")


def open_store(cfg: CheckpointSpec) -> Any:
    """The artifact store a study file's ``checkpoint`` section names (a folder: checked, see :func:`check_folder`)."""
    if cfg.store == "filesystem":
        return FolderStore(Path(os.environ.get(DIR_ENV) or cfg.path).expanduser())
    if cfg.store == "boto3":
        return optuna.artifacts.Boto3ArtifactStore(cfg.path)
    return optuna.artifacts.GCSArtifactStore(cfg.path)


class FolderStore:
    """A folder as an artifact store (``open_reader``/``write``/``remove`` as Optuna's FileSystemArtifactStore) that
    never follows a link and touches only regular files of its own user directly inside the folder."""

    def __init__(self, folder: Path) -> None:
        check_folder(folder)
        self.folder = folder

    @contextmanager
    def _dir(self) -> Iterator[int]:
        """The folder, opened and checked again (it may have been replaced or chmodded since)."""
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _check_dir(fd, self.folder)
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def _name(artifact_id: str) -> str:
        if TMP_RE.fullmatch(artifact_id):  # a write cut short (the process killed): removed by a sweep
            return artifact_id
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", artifact_id):
            raise ValueError(f"invalid artifact id {artifact_id!r}")
        return artifact_id

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        """A new temporary file (never an existing name, never through a link), fsynced, renamed over the id: a link
        planted at the id is replaced, not followed."""
        name = self._name(artifact_id)
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with self._dir() as dfd:
            fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
            try:
                with os.fdopen(fd, "wb") as fh:
                    shutil.copyfileobj(content_body, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                os.unlink(tmp, dir_fd=dfd)
                raise
            os.fsync(dfd)

    def open_reader(self, artifact_id: str) -> BinaryIO:
        """The file, if it is a regular file of this user directly in the folder (a link, a FIFO: refused)."""
        name = self._name(artifact_id)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        with self._dir() as dfd:
            try:
                fd = os.open(name, flags, dir_fd=dfd)
            except FileNotFoundError:
                raise ArtifactNotFound(f"{name}: no such file") from None
            except OSError as exc:  # ELOOP: a symbolic link
                raise OSError(f"{name}: not opened ({exc.strerror}; a link?)") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            raise OSError(f"{name}: not a regular file of this user")
        return os.fdopen(fd, "rb")

    def entries(self) -> list[tuple[str, int]]:
        """(name, bytes) of the regular files of this user directly in the folder (links and others: not listed)."""
        found = []
        with self._dir() as dfd:
            for name in os.listdir(dfd):
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                    found.append((name, st.st_size))
        return found

    def remove(self, artifact_id: str) -> None:
        """Unlink a regular file of this user; anything else (a link, another user's file) is left in place."""
        name = self._name(artifact_id)
        with self._dir() as dfd:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                raise ArtifactNotFound(f"{name}: no such file") from None
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise OSError(f"{name}: not a regular file of this user; left in place")
            os.unlink(name, dir_fd=dfd)


@dataclass
class LoopState:
    """Where a training loop stands: ``epoch`` epochs done and ``step`` steps into the next one."""

    epoch: int = 0
    step: int = 0
    losses: list[torch.Tensor] = field(default_factory=list)  # the batch losses of the unfinished epoch
    gen_state: torch.Tensor | None = None  # the data order's generator, as it was before the unfinished epoch's draw


class Checkpointer:
    """Saves and loads one trial's training state; the training loop calls :meth:`due`, :meth:`save` and
    :meth:`load`, the objective :meth:`finish`."""

    def __init__(self, trial: optuna.Trial, cfg: CheckpointSpec, store: Any | None = None) -> None:
        self.trial, self.cfg = trial, cfg
        self.store = store if store is not None else open_store(cfg)
        cached = getattr(trial, "_cached_frozen_trial", None)
        frozen = cached if cached is not None else trial.storage.get_trial(trial._trial_id)
        self.inherited: dict[str, Any] | None = frozen.user_attrs.get(ATTR)
        root = int(frozen.system_attrs.get("failed_trial", trial.number))
        self.prefix = f"{study_prefix(trial.study)}{root}"
        self.current: dict[str, Any] | None = self.inherited
        self.steps_since = 0
        #: Lists the objective and the loop keep (learning curve, epoch results): saved, and refilled in place on load.
        self.extra: dict[str, list[Any]] = {}
        #: The record type of an extra list's items (saved as dicts of their fields, rebuilt on load).
        self.records: dict[str, Any] = {}

    def due(self, epoch_end: bool, epoch: int) -> bool:
        """Whether to save now: at the end of every ``every_epochs``-th epoch, or after ``every_steps`` steps."""
        if epoch_end:
            self.steps_since = 0
            return epoch % self.cfg.every_epochs == 0
        self.steps_since += 1
        return self.cfg.every_steps is not None and self.steps_since >= self.cfg.every_steps

    def save(self, model: nn.Module, opt: Any, state: LoopState) -> None:
        """Write the state under a new id, name it (with its digest) in the trial's user attributes, then remove the
        previous one."""
        self.steps_since = 0
        blob = {
            "epoch": state.epoch,
            "step": state.step,
            "losses": [t.detach().cpu() for t in state.losses],
            "gen_state": state.gen_state,
            "model": model.state_dict(),
            "optimizer": _optimizer_state(opt),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy_rng": _numpy_state(),
            "python_rng": _python_state(),
            "extra": {k: [_plain(v) for v in values] for k, values in self.extra.items()},
        }
        buf = io.BytesIO()
        torch.save(blob, buf)
        size = buf.tell()
        digest = hashlib.sha256(buf.getbuffer()).hexdigest()
        buf.seek(0)
        artifact_id = f"{self.prefix}-e{state.epoch}-s{state.step}"
        self.store.write(artifact_id, buf)
        previous = self.current
        self.current = {"id": artifact_id, "epoch": state.epoch, "step": state.step, "bytes": size, "sha256": digest}
        set_trial_attrs(self.trial, {ATTR: self.current, BYTES_ATTR: size})
        if previous is not None and previous.get("id") != artifact_id:
            self._remove(previous.get("id"))

    def load(self, model: nn.Module, opt: Any, device: str) -> LoopState | None:
        """Restore the checkpoint this trial's original left and record ``resumed_from``; None: nothing to resume
        from, or the checkpoint was rejected (recorded in ``checkpoint_rejected``: the trial starts from epoch 0)."""
        if not self.inherited:
            return None
        try:
            blob = self._read(self.inherited, model)
        except Exception as exc:  # missing, altered, unreadable: start again from epoch 0, saying why
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            log.warning("trial %d: checkpoint rejected (%s); starting from epoch 0", self.trial.number, reason)
            self.current = None
            set_trial_attrs(self.trial, {REJECTED_ATTR: reason, ATTR: None, BYTES_ATTR: 0})
            return None
        model.load_state_dict(blob["model"])  # copies into the existing parameters (the optimizer holds them)
        _load_optimizer_state(opt, blob["optimizer"], device)
        torch.set_rng_state(blob["torch_rng"])
        if blob["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        np.random.set_state(_numpy_tuple(blob["numpy_rng"]))
        random.setstate(_python_tuple(blob["python_rng"]))
        for key, values in blob["extra"].items():
            if key in self.extra:
                record = self.records.get(key)
                self.extra[key][:] = [record(**v) if record is not None else v for v in values]
        attrs: dict[str, Any] = {"resumed_from": int(blob["epoch"])}
        if blob["step"]:
            attrs["resumed_step"] = int(blob["step"])
        set_trial_attrs(self.trial, attrs)
        logging.getLogger("hpo.trials").info(  # the worker's trial lines: said whatever the log level
            "trial %d resumes from checkpoint %s (epoch %d, step %d)", self.trial.number, self.inherited["id"],
            blob["epoch"], blob["step"],
        )  # fmt: skip
        return LoopState(
            epoch=int(blob["epoch"]),
            step=int(blob["step"]),
            losses=[t.to(device) for t in blob["losses"]],
            gen_state=blob["gen_state"],
        )

    def _read(self, named: Any, model: nn.Module) -> dict[str, Any]:
        """The checkpoint ``named`` (the inherited attribute) describes, once its size and digest match; raises with
        a one-line reason otherwise. Nothing in it runs: ``weights_only=True`` unpickles tensors and plain values."""
        if not isinstance(named, dict) or not ID_RE.fullmatch(str(named.get("id"))):
            raise ValueError(f"malformed checkpoint attribute {str(named)[:100]!r}")
        artifact_id, expected, size = named["id"], named.get("sha256"), named.get("bytes")
        if not isinstance(expected, str) or not isinstance(size, int):
            raise ValueError(f"{artifact_id}: no digest recorded (saved by an older hpo?)")
        try:
            with self.store.open_reader(artifact_id) as fh:
                data = fh.read(size + 1)  # a planted huge file is not read whole
        except ArtifactNotFound:
            raise ValueError(f"{artifact_id}: missing from the store") from None
        except OSError as exc:
            raise ValueError(f"{artifact_id}: unreadable ({exc})") from None
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != size or digest != expected:
            raise ValueError(f"{artifact_id}: sha256 {digest[:16]}... ({len(data)} bytes) is not the one recorded")
        try:
            blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{artifact_id}: not a checkpoint ({type(exc).__name__}: {exc})") from None
        missing = BLOB_KEYS - set(blob) if isinstance(blob, dict) else BLOB_KEYS
        if missing:
            raise ValueError(f"{artifact_id}: not a checkpoint (no {', '.join(sorted(missing))})")
        want = {k: v.shape for k, v in model.state_dict().items()}
        got = (
            {k: getattr(v, "shape", None) for k, v in blob["model"].items()} if isinstance(blob["model"], dict) else {}
        )
        if got != want:  # checked before anything is copied: never half-loaded
            raise ValueError(f"{artifact_id}: its model is not this trial's model")
        return blob

    def finish(self) -> None:
        """The trial completed or was pruned: remove its checkpoint unless the study file keeps them."""
        if self.cfg.keep or self.current is None:
            return
        self._remove(self.current.get("id"))
        self.current = None
        set_trial_attrs(self.trial, {ATTR: None, BYTES_ATTR: 0})

    def _remove(self, artifact_id: Any) -> None:
        if not isinstance(artifact_id, str) or not ID_RE.fullmatch(artifact_id):  # an id we never wrote
            log.warning("checkpoint %r not removed: not an id hpo writes", artifact_id)
            return
        try:
            self.store.remove(artifact_id)
        except ArtifactNotFound:  # already removed (by another copy)
            pass
        except Exception as exc:  # not ours to remove (a link, another user's file), or the store refused
            log.warning("checkpoint %s not removed: %s", artifact_id, exc)


def _plain(value: Any) -> Any:
    """A value of an extra list as ``weights_only`` loads it: a dataclass record becomes the dict of its fields."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


def _numpy_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}  # fmt: skip


def _numpy_tuple(state: dict[str, Any]) -> tuple[Any, ...]:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["kind"], keys, state["pos"], state["has_gauss"], state["gauss"])


def _python_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _python_tuple(state: dict[str, Any]) -> tuple[Any, ...]:
    return (state["version"], tuple(state["internal"]), state["gauss"])


def _optimizer_state(opt: Any) -> dict[str, Any]:
    if isinstance(opt, LeanOptimizer):
        return {"lean": True, "t": opt.t, "buf": opt.buf, "sq": opt.sq}
    return {"lean": False, "torch": opt.state_dict()}


def _load_optimizer_state(opt: Any, state: dict[str, Any], device: str) -> None:
    if isinstance(opt, LeanOptimizer):
        opt.t = state["t"]
        opt.buf = None if state["buf"] is None else [t.to(device) for t in state["buf"]]
        opt.sq = None if state["sq"] is None else [t.to(device) for t in state["sq"]]
    else:
        opt.load_state_dict(state["torch"])


def study_prefix(study: optuna.Study) -> str:
    """The start of every checkpoint id of ``study``'s trials: ``hpo-ckpt-<name digest>-<study id>-``."""
    return f"hpo-ckpt-{hashlib.sha1(study.study_name.encode()).hexdigest()[:12]}-{study._study_id}-"


@dataclass
class Swept:
    """What :func:`sweep` did: files and bytes removed, and files left for trials that may still resume."""

    removed: int = 0
    removed_bytes: int = 0
    live: int = 0
    kept: int = 0


def sweep(study: optuna.Study, store: Any, *, keep: bool = False) -> Swept:
    """Remove the checkpoints of ``study`` that no trial will resume from, from a folder store: those of a trial that
    ended (complete, pruned, or failed without a re-queued copy: its objective's own error, its retries used up, its
    copy finished elsewhere) and files a killed write left. A trial family (a trial and its re-queued copies share one
    root number in the id) is left alone while any of its trials is running or waiting. ``keep``: the finished
    trials' named checkpoints stay (the study file's ``keep: true``). Finished trials whose named checkpoint is gone
    get ``checkpoint: null, checkpoint_bytes: 0``.

    Only files this module names (:data:`ID_RE`) of this study, regular files of this worker's user directly in its
    own folder, are removed: the folder is the one the worker's own side gave (``HPO_CHECKPOINT_DIR`` or the study
    file it was started with), never one the database names (:mod:`hpo.trust`)."""
    from optuna.trial import TrialState

    from hpo.storage import set_trial_user_attrs

    swept = Swept()
    if not isinstance(store, FolderStore):
        return swept
    prefix = study_prefix(study)
    files = []  # listed before the trials are read: a trial created after the read has written nothing listed here
    for name, size in store.entries():
        tmp = TMP_RE.fullmatch(name)
        artifact_id = tmp.group(1) if tmp else name
        if artifact_id.startswith(prefix) and ID_RE.fullmatch(artifact_id):
            root = int(artifact_id[len(prefix) :].split("-", 1)[0])
            files.append((name, artifact_id, root, size))
    if not files:
        return swept
    live, named = _live_roots_and_named(study)
    kept = {
        i for i, rows in named.items() if any(state in (TrialState.COMPLETE, TrialState.PRUNED) for _, state in rows)
    }
    gone = set()
    for name, artifact_id, root, size in files:
        if root in live:
            swept.live += 1
            continue
        if keep and name == artifact_id and artifact_id in kept:
            swept.kept += 1
            continue
        try:
            store.remove(name)
        except ArtifactNotFound:  # another worker's sweep was first
            pass
        except Exception as exc:
            log.warning("checkpoint %s not removed: %s", name, exc)
            continue
        swept.removed += 1
        swept.removed_bytes += size
        gone.add(artifact_id)
    for artifact_id in gone & named.keys():
        for trial_id, _ in named[artifact_id]:
            set_trial_user_attrs(study._storage, trial_id, {ATTR: None, BYTES_ATTR: 0})
    if swept.removed:
        log.info(
            "study %s: removed %d checkpoint file(s) no trial resumes from (%d bytes)",
            study.study_name, swept.removed, swept.removed_bytes,
        )  # fmt: skip
    return swept


def _live_roots_and_named(study: optuna.Study) -> tuple[set[int], dict[str, list[tuple[int, Any]]]]:
    """In two statements, whatever the study's size: the root numbers of its running and waiting trials (a copy's
    root is its ``failed_trial``), and for each checkpoint id a finished trial still names, those trials
    (trial id, state)."""
    import json

    import sqlalchemy as sa
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    from hpo.storage import rdb_backend

    t = models.TrialModel.__table__
    sa_ = models.TrialSystemAttributeModel.__table__
    ua = models.TrialUserAttributeModel.__table__
    sid = study._study_id
    unfinished = [TrialState.RUNNING, TrialState.WAITING]
    live_stmt = (
        sa.select(t.c.number, sa_.c.value_json)
        .select_from(t.outerjoin(sa_, (sa_.c.trial_id == t.c.trial_id) & (sa_.c.key == "failed_trial")))
        .where(t.c.study_id == sid, t.c.state.in_(unfinished))
    )
    named_stmt = (
        sa.select(t.c.trial_id, t.c.state, ua.c.value_json)
        .select_from(t.join(ua, ua.c.trial_id == t.c.trial_id))
        .where(t.c.study_id == sid, ~t.c.state.in_(unfinished), ua.c.key == ATTR, ua.c.value_json != "null")
    )
    live: set[int] = set()
    named: dict[str, list[tuple[int, Any]]] = {}
    with rdb_backend(study._storage).engine.connect() as conn:
        for number, root in conn.execute(live_stmt):
            live.add(int(json.loads(root)) if root is not None else int(number))
        for trial_id, state, value in conn.execute(named_stmt):
            ckpt = json.loads(value)
            if isinstance(ckpt, dict) and isinstance(ckpt.get("id"), str):
                named.setdefault(ckpt["id"], []).append((int(trial_id), state))
    return live, named


def sweeper(study: optuna.Study, cfg: CheckpointSpec | None) -> Any:
    """A worker's :func:`sweep` of its study's folder store (a callable; None without one): run when the worker
    starts, after a trial it ran failed, and when it ends. A sweep that fails (the database away) is logged and
    skipped: the next one catches up."""
    if cfg is None or cfg.store != "filesystem":
        return None
    store = open_store(cfg)

    def run() -> None:
        try:
            sweep(study, store, keep=cfg.keep)
        except Exception as exc:
            log.warning("checkpoints of study %s not swept: %s", study.study_name, " ".join(str(exc).split())[:300])

    return run


def checkpoint_for(trial: optuna.trial.BaseTrial, cfg: CheckpointSpec | None) -> Checkpointer | None:
    """A :class:`Checkpointer` for a stored trial whose study file asks for checkpoints, else None (a replay with a
    fixed trial never checkpoints)."""
    if cfg is None or not isinstance(trial, optuna.Trial):
        return None
    return Checkpointer(trial, cfg)


__all__ = [
    "ATTR",
    "BYTES_ATTR",
    "REJECTED_ATTR",
    "Checkpointer",
    "FolderStore",
    "LoopState",
    "check_folder",
    "checkpoint_for",
    "open_store",
    "study_prefix",
    "sweep",
    "sweeper",
]
