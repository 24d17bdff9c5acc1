"""The benchmarks still run: each in its ``--quick`` mode, with tiny numbers (this measures nothing)."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT, _server_url
from .timing import ceiling


def test_worker_throughput_quick() -> None:
    url = _server_url("postgres")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "worker_throughput.py"), "--quick", "--url", url],
        capture_output=True,
        text=True,
        timeout=ceiling(300),
    )
    assert proc.returncode == 0, proc.stderr
    assert "hpo / Optuna" in proc.stdout
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["trials_optuna"] == figures["trials_hpo"] == 16
    assert figures["statements_per_trial_hpo"] > 0 and figures["statements_per_trial_optuna"] > 0
