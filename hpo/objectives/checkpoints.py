"""Preemption-safe training trials: checkpoints in Optuna's artifact store, resumed by a re-queued copy.

A training trial whose study file has ``objective.checkpoint`` saves its state (model, optimizer, the epoch and step
reached, the batch losses of the epoch so far, the data order's generator and the torch, numpy and Python random
states, the learning curve so far) at the end of every ``every_epochs``-th epoch, every ``every_steps`` steps if set,
and once more when its worker is asked to stop (SIGTERM). The state is written to an Optuna artifact store
(:mod:`optuna.artifacts`: a folder by default, S3 or GCS by configuration) under a new id each time; the trial's user
attribute ``checkpoint`` then names it (``{"id", "epoch", "step", "bytes"}``) and the previous one is removed, so a
process killed while writing leaves the last complete checkpoint named.

A trial failed by a stop, a ``kill -9`` (reaped) or a lost database is re-queued by Optuna's retry callback with its
user attributes (:func:`hpo.storage.retry_callback`), ``checkpoint`` among them, and its system attribute
``failed_trial`` naming the original. The copy loads the named checkpoint, records ``resumed_from`` (the epochs
completed before it, with ``resumed_step`` where it resumed inside an epoch) and goes on from there. The training
loop draws nothing from a random source that the checkpoint does not hold, so a resumed trial's final value equals an
uninterrupted run's with the same seed, bit for bit on the CPU.

Checkpoints of a completed or pruned trial are removed unless ``keep: true``; ``checkpoint_bytes`` (user attribute,
0 once removed) is what ``hpo studies`` sums per study.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from torch import nn

from hpo.objectives.optim import LeanOptimizer
from hpo.spec import CheckpointSpec
from hpo.storage import set_trial_attrs

log = logging.getLogger(__name__)

ATTR = "checkpoint"
BYTES_ATTR = "checkpoint_bytes"
DIR_ENV = "HPO_CHECKPOINT_DIR"


def open_store(cfg: CheckpointSpec) -> Any:
    """The Optuna artifact store a study file's ``checkpoint`` section names."""
    if cfg.store == "filesystem":
        folder = Path(os.environ.get(DIR_ENV) or cfg.path)
        folder.mkdir(parents=True, exist_ok=True)
        return optuna.artifacts.FileSystemArtifactStore(folder)
    if cfg.store == "boto3":
        return optuna.artifacts.Boto3ArtifactStore(cfg.path)
    return optuna.artifacts.GCSArtifactStore(cfg.path)


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
        study = hashlib.sha1(trial.study.study_name.encode()).hexdigest()[:12]
        self.prefix = f"hpo-ckpt-{study}-{trial.study._study_id}-{root}"
        self.current: dict[str, Any] | None = self.inherited
        self.steps_since = 0
        #: Lists the objective and the loop keep (learning curve, epoch results): saved, and refilled in place on load.
        self.extra: dict[str, list[Any]] = {}

    def due(self, epoch_end: bool, epoch: int) -> bool:
        """Whether to save now: at the end of every ``every_epochs``-th epoch, or after ``every_steps`` steps."""
        if epoch_end:
            self.steps_since = 0
            return epoch % self.cfg.every_epochs == 0
        self.steps_since += 1
        return self.cfg.every_steps is not None and self.steps_since >= self.cfg.every_steps

    def save(self, model: nn.Module, opt: Any, state: LoopState) -> None:
        """Write the state under a new id, name it in the trial's user attributes, then remove the previous one."""
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
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "extra": {k: list(v) for k, v in self.extra.items()},
        }
        buf = io.BytesIO()
        torch.save(blob, buf)
        size = buf.tell()
        buf.seek(0)
        artifact_id = f"{self.prefix}-e{state.epoch}-s{state.step}"
        self.store.write(artifact_id, buf)
        previous = self.current
        self.current = {"id": artifact_id, "epoch": state.epoch, "step": state.step, "bytes": size}
        set_trial_attrs(self.trial, {ATTR: self.current, BYTES_ATTR: size})
        if previous is not None and previous.get("id") != artifact_id:
            self._remove(previous["id"])

    def load(self, model: nn.Module, opt: Any, device: str) -> LoopState | None:
        """Restore the checkpoint this trial's original left (None: nothing to resume from) and record
        ``resumed_from``."""
        if not self.inherited:
            return None
        artifact_id = self.inherited["id"]
        try:
            with self.store.open_reader(artifact_id) as fh:
                blob = torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=False)
        except Exception as exc:  # a missing or unreadable checkpoint: start again from epoch 0
            log.warning("trial %d: checkpoint %s unreadable (%s); starting from epoch 0", self.trial.number,
                        artifact_id, exc)  # fmt: skip
            self.current = None
            return None
        model.load_state_dict(blob["model"])  # copies into the existing parameters (the optimizer holds them)
        _load_optimizer_state(opt, blob["optimizer"], device)
        torch.set_rng_state(blob["torch_rng"])
        if blob["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        np.random.set_state(blob["numpy_rng"])
        random.setstate(blob["python_rng"])
        for key, values in blob["extra"].items():
            if key in self.extra:
                self.extra[key][:] = values
        attrs: dict[str, Any] = {"resumed_from": int(blob["epoch"])}
        if blob["step"]:
            attrs["resumed_step"] = int(blob["step"])
        set_trial_attrs(self.trial, attrs)
        log.info("trial %d resumes from checkpoint %s (epoch %d, step %d)", self.trial.number, artifact_id,
                 blob["epoch"], blob["step"])  # fmt: skip
        return LoopState(
            epoch=int(blob["epoch"]),
            step=int(blob["step"]),
            losses=[t.to(device) for t in blob["losses"]],
            gen_state=blob["gen_state"],
        )

    def finish(self) -> None:
        """The trial completed or was pruned: remove its checkpoint unless the study file keeps them."""
        if self.cfg.keep or self.current is None:
            return
        self._remove(self.current["id"])
        self.current = None
        set_trial_attrs(self.trial, {ATTR: None, BYTES_ATTR: 0})

    def _remove(self, artifact_id: str) -> None:
        try:
            self.store.remove(artifact_id)
        except Exception as exc:  # already removed (by another copy), or the store refused: not the trial's fault
            log.debug("checkpoint %s not removed: %s", artifact_id, exc)


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


def checkpoint_for(trial: optuna.trial.BaseTrial, cfg: CheckpointSpec | None) -> Checkpointer | None:
    """A :class:`Checkpointer` for a stored trial whose study file asks for checkpoints, else None (a replay with a
    fixed trial never checkpoints)."""
    if cfg is None or not isinstance(trial, optuna.Trial):
        return None
    return Checkpointer(trial, cfg)


__all__ = ["ATTR", "BYTES_ATTR", "Checkpointer", "LoopState", "checkpoint_for", "open_store"]
