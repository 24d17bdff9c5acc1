"""Preemption-safe training trials: a re-queued copy resumes from its original's checkpoint and ends where an
uninterrupted run with the same seed ends, bit for bit (``hpo.objectives.checkpoints``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from hpo.spec import load_spec
from hpo.storage import open_storage
from hpo.worker import WorkerOptions, replay, run_worker

from .conftest import hpo_cli, write_study
from .timing import ceiling

FAST = ["--heartbeat", "1", "--grace", "3", "--threads", "1", "--quiet"]


def ckpt_study(tmp_path: Path, name: str, n_train: int, **checkpoint: object) -> Path:
    """A 10-epoch spirals study of one trial, small batches so that an epoch takes a visible time."""
    return write_study(
        tmp_path / f"{name}.yaml",
        name,
        objective={
            "kind": "training",
            "data": {"source": "spirals", "n_train": n_train, "n_val": 200, "n_test": 200, "seed": 0},
            "model": {"kind": "mlp", "layers": [16]},
            "loss": "bce",
            "defaults": {"batch_size": 8, "lr": 0.01, "epochs": 10, "optimizer": "adam"},
            "checkpoint": {"path": str(tmp_path / "ckpt"), **checkpoint},
        },
        budget={"n_trials": 1},
    )


def all_trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return []
    finally:
        storage.engine.dispose()


def checkpoint_epoch(url: str, name: str) -> int:
    """The epoch of the last checkpoint the first trial has recorded (0: none yet)."""
    ts = all_trials(url, name)
    ckpt = ts[0].user_attrs.get("checkpoint") if ts else None
    return int(ckpt["epoch"]) if ckpt else 0


def test_kill_9_in_epoch_6_resumes_from_the_checkpoint_bit_exact(
    sqlite_url: str, study_name: str, tmp_path: Path
) -> None:
    study = ckpt_study(tmp_path, study_name, n_train=30_000)
    env = {**os.environ, "HPO_STORAGE": sqlite_url}
    cmd = [sys.executable, "-m", "hpo", "worker", str(study), *FAST]
    victim = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + ceiling(240)
    while checkpoint_epoch(sqlite_url, study_name) < 5:  # epoch 5 saved: the worker is in epoch 6
        assert victim.poll() is None, victim.communicate()[1]
        assert time.monotonic() < deadline, "timed out waiting for the checkpoint of epoch 5"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    [killed] = all_trials(sqlite_url, study_name)
    assert killed.state == TrialState.RUNNING
    saved = killed.user_attrs["checkpoint"]["epoch"]
    assert 5 <= saved < 10

    survivor = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=ceiling(300))
    assert survivor.returncode == 0, survivor.stderr
    original, copy = all_trials(sqlite_url, study_name)
    assert original.state == TrialState.FAIL
    assert copy.system_attrs["failed_trial"] == original.number
    assert copy.state == TrialState.COMPLETE
    assert copy.user_attrs["resumed_from"] == saved > 0
    assert copy.user_attrs["epochs_reached"] == 10
    assert len(copy.user_attrs["train_loss"]) == 10  # the curve before the kill came with the checkpoint

    spec = load_spec(study)
    assert copy.value == replay(spec, copy)  # an uninterrupted run with the same seed: the same value, exactly
    assert copy.user_attrs["checkpoint"] is None and copy.user_attrs["checkpoint_bytes"] == 0
    assert list((tmp_path / "ckpt").iterdir()) == []  # a finished trial's checkpoint is removed by default


def test_stop_mid_epoch_saves_there_and_the_copy_resumes_inside_the_epoch(
    postgres_url: str, study_name: str, tmp_path: Path
) -> None:
    """SIGTERM's path (the worker's stop event): the trial saves where it stands, every_steps also saves within an
    epoch; the copy resumes at that step; ``keep: true`` keeps the finished trial's checkpoint, shown by studies."""
    study = ckpt_study(tmp_path, study_name, n_train=6_000, every_steps=100, keep=True)
    spec = load_spec(study)
    opts = WorkerOptions(heartbeat_interval=1, grace_period=3, threads=1, handle_signals=False)
    stop = threading.Event()

    def stop_in_epoch_4() -> None:
        while not stop.is_set():
            ts = all_trials(postgres_url, study_name)
            if ts and len(ts[0].intermediate_values) >= 3:
                stop.set()
            time.sleep(0.01)

    watcher = threading.Thread(target=stop_in_epoch_4)
    watcher.start()
    first = run_worker(spec, postgres_url, opts, stop=stop)
    watcher.join()
    assert first.interrupted or first.failed or first.ran <= 1
    [stopped, waiting] = all_trials(postgres_url, study_name)
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["reason"] == "interrupted"
    assert waiting.state == TrialState.WAITING
    saved = stopped.user_attrs["checkpoint"]
    assert saved["epoch"] >= 3

    second = run_worker(spec, postgres_url, opts)
    assert second.complete == 1
    _, copy = all_trials(postgres_url, study_name)
    assert copy.user_attrs["resumed_from"] == saved["epoch"]
    assert copy.user_attrs.get("resumed_step", 0) == saved["step"]
    assert copy.value == replay(spec, copy)
    kept = copy.user_attrs["checkpoint"]
    assert kept["epoch"] == 10 and (tmp_path / "ckpt" / kept["id"]).stat().st_size == kept["bytes"]

    listed = hpo_cli("studies", "--storage", postgres_url, "--format", "json")
    assert listed.returncode == 0, listed.stderr
    [row] = [r for r in json.loads(listed.stdout) if r["name"] == study_name]
    assert row["checkpoint_mb"] == round(kept["bytes"] / 2**20, 3) > 0


def test_an_unwritable_checkpoint_folder_is_refused_before_any_trial(tmp_path: Path, sqlite_url: str) -> None:
    """Every trial failed in 0.1 s and the worker said "budget met" (the image's default folder is root-owned, the
    process uid 1000): now the folder is probed before the study is touched; one line, exit 2, no trial."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    study = ckpt_study(tmp_path, "ckpt-unwritable", n_train=200, path=str(blocker / "ckpt"))
    for args in (["run", str(study)], ["worker", str(study)], ["create", str(study)]):
        res = hpo_cli(*args, "--storage", sqlite_url)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "cannot write checkpoints" in errors[0] and "HPO_CHECKPOINT_DIR" in errors[0]
    assert all_trials(sqlite_url, "ckpt-unwritable") == []
    res = hpo_cli("run", str(study), "--storage", sqlite_url, env={"HPO_CHECKPOINT_DIR": str(tmp_path / "mine")})
    assert res.returncode == 0, res.stderr
    assert oct((tmp_path / "mine").stat().st_mode & 0o777) == "0o700"
