"""Issue 21, items 1 and 4: nothing in the checkpoint store runs as code or makes a worker write outside it.

A re-queued trial's checkpoint swapped for a pickle payload, altered, removed or replaced by a link is rejected
before anything is unpickled: recorded on the copy (``checkpoint_rejected``), which starts from epoch 0 and ends where
an uninterrupted run ends. A link planted where the next checkpoint goes is replaced, never followed. A store folder
of another user, or writable by others, is refused in one line before the study is touched. Real training, real
PostgreSQL (skipped without ``HPO_TEST_POSTGRES_URL``).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from hpo.spec import StudySpec, load_spec
from hpo.storage import open_storage
from hpo.worker import WorkerOptions, replay, run_worker

from .conftest import hpo_cli
from .test_checkpoints import FAST, all_trials, checkpoint_epoch, ckpt_study
from .timing import ceiling

OPTS = WorkerOptions(heartbeat_interval=1, grace_period=3, threads=1, handle_signals=False)


class Payload:
    """Unpickling this creates ``marker`` (``open(marker, "w")``): what an attacker's code would do first."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def payload_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": Payload(marker)}, buf)
    return buf.getvalue()


def stopped_trial(tmp_path: Path, url: str, name: str) -> tuple[StudySpec, optuna.trial.FrozenTrial, Path]:
    """Run a 10-epoch trial, stop its worker in epoch 3: the original FAILs having named a checkpoint, a copy WAITs.
    Returns the spec, the waiting copy and the checkpoint file."""
    spec = load_spec(ckpt_study(tmp_path, name, n_train=2_000))
    stop = threading.Event()

    def stop_in_epoch_3() -> None:
        deadline = time.monotonic() + ceiling(120)
        while not stop.is_set() and time.monotonic() < deadline:
            ts = all_trials(url, name)
            if ts and len(ts[0].intermediate_values) >= 2:
                stop.set()
            time.sleep(0.01)

    watcher = threading.Thread(target=stop_in_epoch_3)
    watcher.start()
    run_worker(spec, url, OPTS, stop=stop)
    stop.set()
    watcher.join()
    stopped, waiting = all_trials(url, name)
    assert stopped.state == TrialState.FAIL and waiting.state == TrialState.WAITING
    saved = waiting.user_attrs["checkpoint"]
    assert saved["epoch"] >= 2 and len(saved["sha256"]) == 64
    path = tmp_path / "ckpt" / saved["id"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == saved["sha256"]
    return spec, waiting, path


def set_user_attr(url: str, trial_id: int, key: str, value: object) -> None:
    """What anyone with the worker's database login can do."""
    storage = open_storage(url)
    try:
        storage.set_trial_user_attr(trial_id, key, value)
    finally:
        storage.engine.dispose()


@pytest.mark.parametrize("attack", ["payload", "payload-and-digest", "corrupt", "missing", "link"])
def test_a_swapped_checkpoint_is_rejected_recorded_and_the_copy_starts_from_zero(
    postgres_url: str, study_name: str, tmp_path: Path, attack: str
) -> None:
    """payload: a pickle whose unpickling creates a marker file, swapped in (store access only); payload-and-digest:
    the same with the recorded digest and size rewritten to match (store and database access: then ``weights_only``
    is what refuses it); corrupt: bytes flipped; missing: removed; link: a symbolic link to a file outside."""
    spec, waiting, path = stopped_trial(tmp_path, postgres_url, study_name)
    marker, victim = tmp_path / "marker", tmp_path / "victim"
    victim.write_bytes(b"root's secret")
    victim.chmod(0o600)

    probe = tmp_path / "probe"  # the payload is real: loaded as before this fix, it runs
    torch.load(io.BytesIO(payload_bytes(probe)), weights_only=False)
    assert probe.exists()

    if attack.startswith("payload"):
        data = payload_bytes(marker)
        path.write_bytes(data)
        if attack == "payload-and-digest":
            forged = {
                **waiting.user_attrs["checkpoint"],
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
            }
            set_user_attr(postgres_url, waiting._trial_id, "checkpoint", forged)
    elif attack == "corrupt":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif attack == "missing":
        path.unlink()
    else:
        path.unlink()
        path.symlink_to(victim)

    assert run_worker(spec, postgres_url, OPTS).complete == 1
    assert not marker.exists()
    assert victim.read_bytes() == b"root's secret"
    _, copy = all_trials(postgres_url, study_name)
    assert copy.state == TrialState.COMPLETE
    reason = copy.user_attrs["checkpoint_rejected"]
    expected = {
        "payload": "sha256",
        "payload-and-digest": "not a checkpoint",
        "corrupt": "sha256",
        "missing": "missing",
        "link": "unreadable",
    }[attack]
    assert expected in reason and "\n" not in reason, reason
    assert "resumed_from" not in copy.user_attrs
    assert copy.user_attrs["epochs_reached"] == 10 and len(copy.user_attrs["train_loss"]) == 10
    assert copy.value == replay(spec, copy)  # from epoch 0: what an uninterrupted run gives


def test_a_link_planted_where_the_next_checkpoint_goes_is_not_followed(
    postgres_url: str, study_name: str, tmp_path: Path
) -> None:
    """Checkpoint ids are predictable: links at every id of the trial, to a 0600 file outside the store, leave it
    unchanged; the trial completes and ends with an empty store."""
    study = ckpt_study(tmp_path, study_name, n_train=400)
    res = hpo_cli("create", str(study), "--storage", postgres_url)
    assert res.returncode == 0, res.stderr
    storage = open_storage(postgres_url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    finally:
        storage.engine.dispose()
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's secret")
    victim.chmod(0o600)
    store = tmp_path / "ckpt"
    prefix = f"hpo-ckpt-{hashlib.sha1(study_name.encode()).hexdigest()[:12]}-{study_id}-0"
    for epoch in range(1, 11):
        (store / f"{prefix}-e{epoch}-s0").symlink_to(victim)

    res = hpo_cli("run", str(study), "--storage", postgres_url)
    assert res.returncode == 0, res.stderr
    assert victim.read_bytes() == b"root's secret" and oct(victim.stat().st_mode & 0o777) == "0o600"
    [trial] = all_trials(postgres_url, study_name)
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["checkpoint"] is None
    assert list(store.iterdir()) == []  # the links were replaced by our files (rename), which were then removed


@pytest.mark.parametrize("how", ["mode-0777", "owner-65534"])
def test_a_store_of_another_user_or_writable_by_others_is_refused_in_one_line(
    postgres_url: str, study_name: str, tmp_path: Path, how: str
) -> None:
    store = tmp_path / "ckpt"
    store.mkdir(mode=0o700)
    if how == "mode-0777":
        store.chmod(0o777)
        why = "writable by others (mode 0777)"
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a folder to uid 65534 needs root")
        os.chown(store, 65534, 65534)
        why = "owned by uid 65534"
    study = ckpt_study(tmp_path, study_name, n_train=400)
    for args in (["create", str(study)], ["run", str(study)], ["worker", str(study)]):
        res = hpo_cli(*args, "--storage", postgres_url)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and str(store) in errors[0] and why in errors[0], res.stderr
    assert all_trials(postgres_url, study_name) == []
    assert list(store.iterdir()) == []


def test_a_new_store_is_0700_and_kill_9_still_resumes_bit_exact(
    postgres_url: str, study_name: str, tmp_path: Path
) -> None:
    """The weights-only checkpoint (RNG states as tensors and lists) resumes exactly: a worker killed in epoch 4,
    the next one ends where an uninterrupted run ends, bit for bit."""
    study = ckpt_study(tmp_path, study_name, n_train=6_000)
    env = {**os.environ, "HPO_STORAGE": postgres_url}
    cmd = [sys.executable, "-m", "hpo", "worker", str(study), *FAST]
    victim = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + ceiling(240)
    while checkpoint_epoch(postgres_url, study_name) < 3:
        assert victim.poll() is None, victim.communicate()[1]
        assert time.monotonic() < deadline, "timed out waiting for the checkpoint of epoch 3"
        time.sleep(0.02)
    victim.kill()
    victim.wait()
    store = tmp_path / "ckpt"
    assert oct(store.stat().st_mode & 0o777) == "0o700"
    [killed] = all_trials(postgres_url, study_name)
    saved = killed.user_attrs["checkpoint"]
    ckpt = store / saved["id"]
    assert oct(ckpt.stat().st_mode & 0o777) == "0o600" and ckpt.stat().st_size == saved["bytes"]
    torch.load(ckpt, weights_only=True)  # plain tensors and values only

    survivor = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=ceiling(300))
    assert survivor.returncode == 0, survivor.stderr
    original, copy = all_trials(postgres_url, study_name)
    assert copy.state == TrialState.COMPLETE and copy.system_attrs["failed_trial"] == original.number
    assert copy.user_attrs["resumed_from"] == saved["epoch"] >= 3
    assert "checkpoint_rejected" not in copy.user_attrs
    assert len(copy.user_attrs["train_loss"]) == 10
    assert copy.value == replay(load_spec(study), copy)
    assert [p.name for p in store.iterdir() if not p.name.endswith(".tmp")] == []
