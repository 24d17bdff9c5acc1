"""What a worker's log says (issue 22 item 9), read from real workers' stderr as docker logs and Slurm output files
hold it: one timestamped line per event, every trial by its number, the study's metric by name, an interrupted trial
and a resumed one said without -v, library errors on one line."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpo.errors import STOPPED_EXIT

from .conftest import hpo_cli, write_study
from .test_checkpoints import all_trials, checkpoint_epoch, ckpt_study
from .timing import ceiling

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def test_a_worker_by_name_names_the_stored_metric(sqlite_url: str, study_name: str, tmp_path: Path) -> None:
    study = write_study(tmp_path / "s.yaml", study_name, budget={"n_trials": 2})
    assert hpo_cli("create", str(study), "--storage", sqlite_url).returncode == 0
    res = hpo_cli("worker", study_name, "--storage", sqlite_url, "--threads", "1")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if " trial " in ln]
    assert len(lines) == 2, res.stderr
    for ln in lines:
        assert re.match(STAMP + r"trial \d COMPLETE val_accuracy=[0-9.]+ in [0-9.]+s$", ln), ln


def test_interrupted_and_resumed_trials_have_their_lines(sqlite_url: str, study_name: str, tmp_path: Path) -> None:
    """SIGTERM: the interrupted trial's line (it had none) and exit 75; the copy's worker says, without -v, that it
    resumes from the checkpoint, and the copy's line says from which epoch."""
    study = ckpt_study(tmp_path, study_name, n_train=30_000)
    env = {**os.environ, "HPO_STORAGE": sqlite_url}
    cmd = [sys.executable, "-m", "hpo", "worker", str(study), "--heartbeat", "1", "--grace", "3", "--threads", "1"]
    victim = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + ceiling(240)
    while checkpoint_epoch(sqlite_url, study_name) < 1:
        assert victim.poll() is None, victim.communicate()[1]
        assert time.monotonic() < deadline, "timed out waiting for the first checkpoint"
        time.sleep(0.05)
    victim.send_signal(signal.SIGTERM)
    _, stderr = victim.communicate(timeout=ceiling(120))
    assert victim.returncode == STOPPED_EXIT, stderr
    assert re.search(STAMP + r"trial 0 FAIL in [0-9.]+s reason=interrupted$", stderr, re.M), stderr
    saved = all_trials(sqlite_url, study_name)[0].user_attrs["checkpoint"]

    survivor = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=ceiling(300))
    assert survivor.returncode == 0, survivor.stderr
    assert re.search(
        STAMP + rf"trial 1 resumes from checkpoint {saved['id']} \(epoch {saved['epoch']}, step {saved['step']}\)$",
        survivor.stderr,
        re.M,
    ), survivor.stderr
    assert re.search(
        STAMP + rf"trial 1 COMPLETE val_accuracy=[0-9.]+ in [0-9.]+s resumed_from={saved['epoch']}$",
        survivor.stderr,
        re.M,
    ), survivor.stderr


def test_the_reaper_names_the_trial_number(sqlite_url: str, study_name: str, tmp_path: Path) -> None:
    """The reaper logged the internal trial id; now the number every other command shows, and whether a copy
    was queued."""
    study = ckpt_study(tmp_path, study_name, n_train=30_000)
    env = {**os.environ, "HPO_STORAGE": sqlite_url}
    cmd = [sys.executable, "-m", "hpo", "worker", str(study), "--heartbeat", "1", "--grace", "3", "--threads", "1"]
    # another study first, so that trial ids and numbers differ
    other = write_study(tmp_path / "o.yaml", f"{study_name}-o", budget={"n_trials": 2})
    assert hpo_cli("run", str(other), "--storage", sqlite_url).returncode == 0
    victim = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + ceiling(240)
    while checkpoint_epoch(sqlite_url, study_name) < 1:
        assert victim.poll() is None
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victim.kill()
    victim.wait()
    while True:  # until its heartbeat is older than the grace period
        res = hpo_cli("reap", study_name, "--storage", sqlite_url, "--grace", "3", "--max-retry", "0")
        assert res.returncode == 0, res.stderr
        if "reaped 1" in res.stdout:
            break
        assert time.monotonic() < deadline, res.stdout
        time.sleep(0.5)
    assert re.search(
        STAMP + r"WARNING hpo\.worker\.lease: trial 0: no heartbeat for 3 s; reaped \(failed, not re-queued: "
        r"retries used up\)$",
        res.stderr,
        re.M,
    ), res.stderr


def test_library_records_become_one_line() -> None:
    """A connection pool's error during a database restart arrives with a traceback and SQLAlchemy's statement,
    parameters and link: one line, hpo's own records untouched."""
    import sqlalchemy

    from hpo.logs import DATEFMT, FORMAT, OneLine

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    handler.addFilter(OneLine())
    logger = logging.getLogger("sqlalchemy.pool.impl.QueuePool")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise sqlalchemy.exc.OperationalError(
                "SELECT 1 FROM trials WHERE x = %(x)s",
                {"x": "s3cret"},
                Exception("server closed the connection\nunexpectedly"),
            )
        except sqlalchemy.exc.OperationalError:
            logger.error("Exception during reset or similar", exc_info=True)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    [line] = stream.getvalue().splitlines()
    assert re.match(STAMP + "ERROR sqlalchemy.pool.impl.QueuePool: Exception during reset or similar "
                    r"\(OperationalError: \(builtins.Exception\) server closed the connection unexpectedly\)$", line), line  # fmt: skip
    assert "s3cret" not in line and "SELECT" not in line


@pytest.mark.parametrize("name", ["hpo.worker.single"])
def test_hpo_records_keep_their_traceback(name: str) -> None:
    from hpo.logs import OneLine

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(OneLine())
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("the objective's own error")
        except ValueError:
            logger.error("trial 3 failed", exc_info=True)
    finally:
        logger.removeHandler(handler)
    assert "Traceback" in stream.getvalue() and "the objective's own error" in stream.getvalue()
