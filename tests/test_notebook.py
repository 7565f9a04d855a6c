"""The results notebook executes on the outputs of a (tiny) synthetic pipeline run."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from pipeline_helpers import compose_config, tiny_overrides

from atspeed_exp import pipeline
from atspeed_exp.analysis import load_summaries, speculative_rows

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "results.ipynb"


@pytest.mark.slow
def test_results_notebook_executes_on_synthetic_run(tmp_path, monkeypatch):
    for objective in ("kl", "atspeed_s"):
        out = tmp_path / "runs" / objective
        pipeline.run(compose_config(
            [o for o in tiny_overrides(tmp_path) if not o.startswith("paths.output_dir")]
            + [f"paths.output_dir={out}", f"alignment={objective}", "decoding.modes=[strict,relaxed]"]
        ))
    rows = speculative_rows(load_summaries(tmp_path / "runs"))
    assert {(r["objective"], r["mode"]) for r in rows} == {
        (o, m) for o in ("kl", "atspeed_s") for m in ("strict", "relaxed")}

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # committed stripped
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "8 rows from 2 runs" in printed
    assert any(o.get("data", {}).get("image/png") for cell in notebook.cells for o in cell.get("outputs", []))
