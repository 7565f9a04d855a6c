"""The results notebook executes on the outputs of a (tiny) synthetic pipeline run."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from pipeline_helpers import compose_config, tiny_overrides

from atspeed_exp import pipeline
from atspeed_exp.analysis import load_summaries, speculative_rows

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "results.ipynb"


def printed(notebook) -> str:
    return "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))


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
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # this checkout's package, whatever the environment installed
    # from the repository root, as `jupyter execute notebooks/results.ipynb` is documented
    NotebookClient(notebook, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    assert "8 rows from 2 runs" in printed(notebook)
    assert any(o.get("data", {}).get("image/png") for cell in notebook.cells for o in cell.get("outputs", []))


def test_results_notebook_defaults_to_the_repository_runs_from_notebooks_dir(monkeypatch):
    """`jupyter execute notebooks/results.ipynb` runs the kernel in notebooks/: the parameter cell still points at
    the repository's outputs/ and multirun/."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    monkeypatch.delenv("RUNS_DIR", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    NotebookClient(notebook, timeout=None, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    assert f"runs from: {REPO / 'outputs'}, {REPO / 'multirun'}" in printed(notebook)


def test_repo_root_found_from_any_folder_inside_or_from_the_package(tmp_path):
    from atspeed_exp.analysis import default_runs_dirs, repo_root

    assert repo_root(REPO / "notebooks") == REPO and repo_root(REPO) == REPO
    assert repo_root(tmp_path) == REPO  # outside a checkout: the one this package was imported from
    assert default_runs_dirs(REPO / "notebooks") == [REPO / "outputs", REPO / "multirun"]


def test_across_seeds_aggregates_all_users_rows_by_form_mode_and_k():
    from atspeed_exp.analysis import across_seeds, all_users_rows

    def summary(seed: int, calls: float, path: str, temperature: float = 0.001) -> dict:
        metrics = {"eval/all/num_users": 10.0}
        key = "eval/all/strict/k10"
        for name, value in (("target_calls_per_list", calls), ("acceptance_rate", 0.5), ("overlap", 1.0),
                            ("recall@10", 0.1), ("recall@10_change", 0.0)):
            metrics[f"{key}/{name}"] = value
            metrics[f"{key}/{name}_lo95"], metrics[f"{key}/{name}_hi95"] = value - 0.1, value + 0.1
        config = {"experiment_name": "x", "paths": {"output_dir": path},
                  "alignment": {"name": "atspeed_s_public", "objective": "atspeed_s", "temperature": temperature},
                  "draft_training": {"seed": seed}, "decoding": {"modes": ["strict"], "ks": [10]}}
        return {"path": path, "config": config, "metrics": metrics}

    rows = all_users_rows([summary(1, 2.0, "a"), summary(2, 2.5, "b"), summary(3, 9.0, "c"), summary(3, 3.0, "d"),
                           summary(1, 2.2, "e", temperature=1.0)])
    assert [r["seed"] for r in rows] == [1, 2, 3, 3, 1] and rows[0]["form"] == "atspeed_s_public"
    entry, other = across_seeds(rows)  # another temperature is another setting; seed 3 counts once (the later run)
    assert entry["seeds"] == [1, 2, 3] and entry["target_calls_per_list"] == pytest.approx(2.5)
    assert entry["target_calls_per_list_std"] == pytest.approx(0.5)  # sample std of 2.0, 2.5, 3.0
    assert entry["target_calls_per_list_ci95_halfwidth"] == pytest.approx(0.1)
    assert other["seeds"] == [1] and other["target_calls_per_list"] == pytest.approx(2.2)
    assert other["target_calls_per_list_std"] != other["target_calls_per_list_std"]  # nan: one seed has no spread


def test_group_key_ignores_settings_a_run_does_not_use():
    """A run written before the tri-gram or layer-skip drafter, DARE, score processors, the batch-1 check or the
    target's validation metric existed
    groups with one written after, when it uses none of them; a run that uses one of them is another setting."""
    from atspeed_exp.analysis import group_key

    old = {"alignment": {"name": "atspeed_s"}, "decoding": {"modes": ["strict"], "gamma": 3}, "eval": {"num_beams": 20},
           "target_training": {"lr": 0.002}}
    new = {"alignment": {"name": "atspeed_s"},
           "decoding": {"modes": ["strict"], "gamma": 3, "drafter": "model", "dare_top_k": None,
                        "dare_threshold": 0.0, "processors": [], "ghost_threshold": None,
                        "trigram": {"adapt": "evaluation"}, "retrieval": {"groups": 8},
                        "layer_skip": {"skip_attention": [], "search": False},
                        "cf_weight": 0.5, "cf_epsilon": 1e-8},
           "eval": {"num_beams": 20, "batch1_users": 500}, "target_training": {"lr": 0.002, "val_metric": "recall"}}
    assert group_key(old) == group_key(new)
    assert group_key({**new, "target_training": {"lr": 0.002, "val_metric": "ndcg"}}) != group_key(new)  # another target
    for changed in ({"drafter": "trigram"}, {"drafter": "layer_skip"}, {"modes": ["strict", "dare"]},
                    {"processors": ["ghost_debias"]}, {"processors": ["cf_assistant"]}, {"gamma": 2}):
        other = {**new, "decoding": {**new["decoding"], **changed}}
        assert group_key(other) != group_key(new), changed
