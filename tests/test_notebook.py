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
    NotebookClient(notebook, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "8 rows from 2 runs" in printed
    assert any(o.get("data", {}).get("image/png") for cell in notebook.cells for o in cell.get("outputs", []))


def test_across_seeds_aggregates_all_users_rows_by_form_mode_and_k():
    from atspeed_exp.analysis import across_seeds, all_users_rows

    def summary(seed: int, calls: float, path: str) -> dict:
        metrics = {"eval/all/num_users": 10.0}
        key = "eval/all/strict/k10"
        for name, value in (("target_calls_per_list", calls), ("acceptance_rate", 0.5), ("overlap", 1.0),
                            ("recall@10", 0.1), ("recall@10_change", 0.0)):
            metrics[f"{key}/{name}"] = value
            metrics[f"{key}/{name}_lo95"], metrics[f"{key}/{name}_hi95"] = value - 0.1, value + 0.1
        config = {"experiment_name": "x", "alignment": {"name": "atspeed_s_public", "objective": "atspeed_s"},
                  "draft_training": {"seed": seed}, "decoding": {"modes": ["strict"], "ks": [10]}}
        return {"path": path, "config": config, "metrics": metrics}

    rows = all_users_rows([summary(1, 2.0, "a"), summary(2, 2.5, "b"), summary(3, 3.0, "c")])
    assert [r["seed"] for r in rows] == [1, 2, 3] and rows[0]["form"] == "atspeed_s_public"
    (entry,) = across_seeds(rows)
    assert entry["seeds"] == [1, 2, 3] and entry["target_calls_per_list"] == pytest.approx(2.5)
    assert entry["target_calls_per_list_std"] == pytest.approx(0.5)  # sample std of 2.0, 2.5, 3.0
    assert entry["target_calls_per_list_ci95_halfwidth"] == pytest.approx(0.1)
