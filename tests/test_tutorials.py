"""The tutorials run top to bottom: each notebook is executed in quick mode (REFTGRAPH_QUICK=1:
a few prompts, layers and training steps) in a temporary copy; any cell error fails the test.
The committed notebooks must carry the outputs of a full run, every code cell executed in order.
What the cells show is checked too: no figure shown twice, results as HTML views, no raw tensors."""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("*.ipynb"))
VIEWS = ("RunResult(", "Generation(", "Circuit:", "EdgeCircuit:")          # results with an HTML view, as text/plain begins
SHOWN = {"02_sites_positions_heads": "RunResult(", "08_attribution_and_circuits": "Circuit:", "09_edges": "EdgeCircuit"}   # must appear


def check_views(nb, name: str) -> None:
    """Each figure shown once; reftgraph results shown as HTML; no tensor printed raw."""
    seen = set()
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        shown = [o for o in cell.outputs if o.output_type in ("display_data", "execute_result")]
        images = [o for o in shown if "image/png" in o.get("data", {})]
        pngs = [o.data["image/png"] for o in images]
        assert len(pngs) == len(set(pngs)), f"code cell {i} shows a figure twice"
        assert not ({o.output_type for o in images} >= {"display_data", "execute_result"}), \
            f"code cell {i} shows a figure as its value and again from pyplot"
        for o in shown:
            text = o.get("data", {}).get("text/plain", "")
            assert "tensor([" not in text, f"code cell {i} prints a raw tensor: {text[:200]}"
            if text.startswith(VIEWS):
                assert "<table" in o.data.get("text/html", ""), f"code cell {i}: {text[:40]} has no HTML view"
                seen.add(text.split(":")[0].split("(")[0])
    if name in SHOWN:
        assert SHOWN[name].rstrip("(:") in seen, f"{name} shows no {SHOWN[name]} view"


def test_there_are_tutorials():
    assert len(TUTORIALS) >= 4, [p.name for p in TUTORIALS]


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_committed_with_full_run_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "not executed top to bottom"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0].ename if errors else ""
    first = "".join(o.get("text", "") for o in code[0].outputs)
    assert "full run" in first, "the committed outputs must come from a full run (REFTGRAPH_QUICK unset)"
    check_views(nb, path.stem)


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_runs_in_quick_mode(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    copy = tmp_path / path.name
    nbformat.write(nb, copy)
    monkeypatch.setenv("REFTGRAPH_QUICK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2 threads on 2 busy cores run ~10x slower than 1
    # a kernel spec of our own, so the notebook runs in this interpreter (this .venv)
    spec = tmp_path / "jupyter" / "kernels" / "reftgraph-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "reftgraph test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    client = NotebookClient(nb, timeout=300, kernel_name="reftgraph-test",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "quick mode" in "".join(o.get("text", "") for o in first.outputs)
    check_views(nb, path.stem)
