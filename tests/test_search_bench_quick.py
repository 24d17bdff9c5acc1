"""The search-efficiency benchmark still runs, in its ``--quick`` mode (tiny budget: this measures nothing)."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT
from .timing import ceiling


def test_search_efficiency_quick(tmp_path) -> None:
    out = tmp_path / "search.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "search_efficiency.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=ceiling(600),
    )
    assert proc.returncode == 0, proc.stderr
    assert "| problem (target) | strategy | median epochs | median CPU s |" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| digits")]
    assert [line.split(" | ")[1] for line in rows] == ["random", "shipped"]
    figures = json.loads(out.read_text())
    assert len(figures["runs"]) == 4  # 2 strategies x 2 seeds
    assert all(r["trials"] >= 1 and r["epochs"] >= 1 and r["cpu"] > 0 for r in figures["runs"])
    assert figures["table"][0]["ratio_epochs"] == 1.0
