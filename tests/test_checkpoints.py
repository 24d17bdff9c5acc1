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
import pytest
from optuna.trial import TrialState

from hpo.spec import load_spec
from hpo.storage import open_storage
from hpo.worker import WorkerOptions, replay, run_worker

from .conftest import hpo_cli, write_study
from .timing import ceiling

FAST = ["--heartbeat", "1", "--grace", "3", "--threads", "1", "--quiet"]


def ckpt_study(tmp_path: Path, name: str, n_train: int, n_trials: int = 1, **checkpoint: object) -> Path:
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
        budget={"n_trials": n_trials},
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


def grok_study(tmp_path: Path, name: str, **checkpoint: object) -> Path:
    """A small grokking study of one trial in minibatches (the order's generator and cursor matter on resume)."""
    return write_study(
        tmp_path / f"{name}.yaml",
        name,
        direction="minimize",
        metric="steps_to_generalise",
        objective={
            "kind": "grokking",
            "data": {"source": "modular", "p": 31, "op": "+", "train_fraction": 0.5, "seed": 0},
            "model": {"kind": "mlp", "layers": [64, 64]},
            "steps": 1200,
            "eval_every": 20,
            "batch_size": 100,
            "lr": 0.01,
            "stop_at_threshold": False,
            "threads": 1,
            "checkpoint": {"path": str(tmp_path / "ckpt"), **checkpoint},
        },
        space={"weight_decay": {"type": "float", "low": 0.5, "high": 1.5}},
        budget={"n_trials": 1},
    )


def test_a_stopped_grokking_trial_resumes_from_its_checkpoint_bit_exact(
    sqlite_url: str, study_name: str, tmp_path: Path
) -> None:
    """Grokking trials could not checkpoint (``objective.checkpoint: unknown key``), though they are the long ones:
    now a stopped one saves where it stands (every_steps 50 also saves between evaluations) and its copy goes on from
    that step with the same minibatch order, curve and value as an uninterrupted run."""
    from hpo.objectives.grokking import train

    study = grok_study(tmp_path, study_name, every_steps=50)
    spec = load_spec(study)
    opts = WorkerOptions(heartbeat_interval=1, grace_period=3, threads=1, handle_signals=False)
    stop = threading.Event()

    def stop_after_some_evaluations() -> None:
        while not stop.is_set():
            ts = all_trials(sqlite_url, study_name)
            if ts and len(ts[0].intermediate_values) >= 12:
                stop.set()
            time.sleep(0.01)

    watcher = threading.Thread(target=stop_after_some_evaluations)
    watcher.start()
    first = run_worker(spec, sqlite_url, opts, stop=stop)
    watcher.join()
    assert first.interrupted
    [stopped, waiting] = all_trials(sqlite_url, study_name)
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["reason"] == "interrupted"
    assert waiting.state == TrialState.WAITING
    saved = stopped.user_attrs["checkpoint"]
    assert 240 <= saved["epoch"] < 1200  # steps done: at least the 12 evaluations seen

    second = run_worker(spec, sqlite_url, opts)
    assert second.complete == 1
    _, copy = all_trials(sqlite_url, study_name)
    assert copy.state == TrialState.COMPLETE
    assert copy.user_attrs["resumed_from"] == saved["epoch"]
    assert copy.user_attrs["checkpoint"] is None and list((tmp_path / "ckpt").iterdir()) == []

    history = train(spec.objective, copy.params, copy.user_attrs["seed"])  # uninterrupted, same seed
    assert copy.user_attrs["curve"] == {
        "step": [e.step for e in history],
        "train_accuracy": [round(e.train_accuracy, 4) for e in history],
        "val_accuracy": [round(e.val_accuracy, 4) for e in history],
    }
    assert copy.value == replay(spec, copy)
    assert copy.user_attrs["train_accuracy"] == round(history[-1].train_accuracy, 6)
    assert copy.user_attrs["memorised_step"] == next((e.step for e in history if e.train_accuracy >= 0.99), None)


def test_grokking_checkpoints_count_steps() -> None:
    from hpo.errors import SpecError
    from hpo.spec import parse_spec

    doc = {"name": "g", "direction": "minimize", "metric": "steps_to_generalise"}
    with pytest.raises(SpecError, match="grokking trials count steps, not epochs: use every_steps"):
        parse_spec({**doc, "objective": {"kind": "grokking", "checkpoint": {"every_epochs": 2}}})
    ok = parse_spec({**doc, "objective": {"kind": "grokking", "checkpoint": {"every_steps": 50}}})
    assert ok.objective.checkpoint is not None and ok.objective.checkpoint.every_steps == 50


def test_a_trial_failed_without_a_copy_leaves_no_checkpoint(sqlite_url: str, study_name: str, tmp_path: Path) -> None:
    """A FAIL without a copy (here: its retries used up, --max-retry 0) kept its checkpoint forever while nothing
    would ever resume from it: the worker now removes it when the trial ends and the trial says so."""
    study = ckpt_study(tmp_path, study_name, n_train=6_000)
    spec = load_spec(study)
    opts = WorkerOptions(heartbeat_interval=1, grace_period=3, threads=1, handle_signals=False, max_retry=0)
    stop = threading.Event()

    def stop_after_epoch_2() -> None:
        while not stop.is_set():
            if checkpoint_epoch(sqlite_url, study_name) >= 2:
                stop.set()
            time.sleep(0.01)

    watcher = threading.Thread(target=stop_after_epoch_2)
    watcher.start()
    result = run_worker(spec, sqlite_url, opts, stop=stop)
    watcher.join()
    assert result.interrupted
    [stopped] = all_trials(sqlite_url, study_name)  # no copy: max_retry 0
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["reason"] == "interrupted"
    assert list((tmp_path / "ckpt").iterdir()) == []
    assert stopped.user_attrs["checkpoint"] is None and stopped.user_attrs["checkpoint_bytes"] == 0


def test_checkpoints_prune_removes_what_no_trial_resumes_from(sqlite_url: str, study_name: str, tmp_path: Path) -> None:
    """``hpo checkpoints prune``: finished trials' kept checkpoints and a killed write's file go; another study's
    files and anything hpo did not name stay; a folder only this side names (never the database's)."""
    import hashlib

    study = ckpt_study(tmp_path, study_name, n_train=400, n_trials=2, keep=True)
    assert hpo_cli("run", str(study), "--storage", sqlite_url).returncode == 0
    folder = tmp_path / "ckpt"
    kept = sorted(p.name for p in folder.iterdir())
    assert len(kept) == 2
    storage = open_storage(sqlite_url)
    sid = optuna.load_study(study_name=study_name, storage=storage)._study_id
    storage.engine.dispose()
    prefix = f"hpo-ckpt-{hashlib.sha1(study_name.encode()).hexdigest()[:12]}-{sid}-"
    cut_short = folder / f".{prefix}99-e1-s0.0123456789abcdef.tmp"  # a write killed before its rename
    others = [folder / "hpo-ckpt-000000000000-1-0-e1-s0", folder / "notes.txt"]
    for p in [cut_short, *others]:
        p.write_bytes(b"x" * 10)

    by_name = hpo_cli("checkpoints", "prune", study_name, "--storage", sqlite_url)
    assert by_name.returncode == 2 and "Traceback" not in by_name.stderr
    [line] = [ln for ln in by_name.stderr.splitlines() if ln.strip()]
    assert line.startswith("error:") and "--dir" in line and "HPO_CHECKPOINT_DIR" in line

    orphans = hpo_cli(
        "checkpoints", "prune", study_name, "--storage", sqlite_url, "--dir", str(folder), "--orphans-only"
    )
    assert orphans.returncode == 0, orphans.stderr
    assert "removed 1 checkpoint file(s)" in orphans.stdout and "2 kept by finished trials" in orphans.stdout
    assert sorted(p.name for p in folder.iterdir()) == sorted([*kept, *(p.name for p in others)])

    pruned = hpo_cli("checkpoints", "prune", str(study), "--storage", sqlite_url)  # the file names the folder
    assert pruned.returncode == 0, pruned.stderr
    assert "removed 2 checkpoint file(s)" in pruned.stdout and "0 left for running or waiting trials" in pruned.stdout
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in others)
    for t in all_trials(sqlite_url, study_name):
        assert t.user_attrs["checkpoint"] is None and t.user_attrs["checkpoint_bytes"] == 0
    listed = hpo_cli("studies", "--storage", sqlite_url, "--format", "json")
    [row] = [r for r in json.loads(listed.stdout) if r["name"] == study_name]
    assert row["checkpoint_mb"] == 0


def test_checkpoints_prune_leaves_a_waiting_trial_its_checkpoint(
    sqlite_url: str, study_name: str, tmp_path: Path
) -> None:
    study = ckpt_study(tmp_path, study_name, n_train=6_000)
    spec = load_spec(study)
    opts = WorkerOptions(heartbeat_interval=1, grace_period=3, threads=1, handle_signals=False)
    stop = threading.Event()

    def stop_after_epoch_1() -> None:
        while not stop.is_set():
            if checkpoint_epoch(sqlite_url, study_name) >= 1:
                stop.set()
            time.sleep(0.01)

    watcher = threading.Thread(target=stop_after_epoch_1)
    watcher.start()
    run_worker(spec, sqlite_url, opts, stop=stop)
    watcher.join()
    [stopped, waiting] = all_trials(sqlite_url, study_name)
    assert waiting.state == TrialState.WAITING
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert before == [stopped.user_attrs["checkpoint"]["id"]]
    res = hpo_cli(
        "checkpoints", "prune", study_name, "--storage", sqlite_url, env={"HPO_CHECKPOINT_DIR": str(tmp_path / "ckpt")}
    )
    assert res.returncode == 0, res.stderr
    assert "removed 0 checkpoint file(s)" in res.stdout and "1 left for running or waiting trials" in res.stdout
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before
