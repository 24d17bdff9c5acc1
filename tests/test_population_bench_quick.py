"""The population benchmark still runs, in its ``--quick`` mode, with tiny numbers (this measures nothing)."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT
from .timing import ceiling


def test_population_throughput_quick() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "population_throughput.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=ceiling(600),
    )
    assert proc.returncode == 0, proc.stderr
    assert "| case | batch | single-trial samples/s |" in proc.stdout
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["throughput"] and all(r["population"] > 0 and r["single"] > 0 for r in figures["throughput"])
    assert {r["mode"]: r["trials"] for r in figures["end_to_end"]} == {"single": 8, "population": 8}
