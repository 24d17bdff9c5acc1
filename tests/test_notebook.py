"""README's notebook cells, verbatim, in a real Jupyter kernel (nbclient + ipykernel): no errors, nothing on
stderr (no Optuna log lines, no tqdm or ipywidgets warnings), one progress output updated in place, and every
figure with an HTML fallback beside plotly's own mime type."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from .conftest import ROOT
from .timing import ceiling

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def readme_cells() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## In a notebook") :]
    section = section[: section.index("\n## ", 5)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_notebook_cells_run_in_a_kernel(tmp_path: Path) -> None:
    cells = readme_cells()
    assert cells, "README's notebook section has no python cells"
    shutil.copytree(ROOT / "studies", tmp_path / "studies")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = nbclient.NotebookClient(
        nb,
        timeout=int(ceiling(600)),
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    outputs = [o for c in nb.cells for o in c.outputs]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors, errors
    streams = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not streams, streams  # Optuna's INFO lines, tqdm's "IProgress not found", rich's "install ipywidgets"
    shown = [o for o in outputs if o.output_type in ("display_data", "execute_result")]
    progress = [o for o in shown if "text/plain" in o.data and "<progress" in o.data.get("text/html", "")]
    assert len(progress) == 1, [list(o.data) for o in shown]  # one output, updated in place (not one per refresh)
    assert re.search(r"spirals-optimizer 30/30", progress[0].data["text/plain"]), progress[0].data["text/plain"]
    plots = [o for o in shown if "application/vnd.plotly.v1+json" in o.data]
    assert plots, [list(o.data) for o in shown]
    assert all("text/html" in o.data for o in plots), [list(o.data) for o in plots]
    for o in shown:  # every output something a viewer without plotly's renderer can show
        assert {"text/plain", "text/html"} & set(o.data), list(o.data)
