"""The multirun summary (atspeed_exp/sweep_summary.py) on a hand-made sweep dir; the slow multirun test in
test_pipeline.py checks it on a real sweep."""

import json

import pytest
import yaml

from atspeed_exp.sweep_summary import summarise_sweep


def fake_job(job_dir, form, seed, calls):
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"alignment={form}",
                                                                        f"draft_training.seed={seed}"]))
    metrics = {"eval/all/num_users": 10.0}
    for k in (5, 10):
        key = f"eval/all/strict/k{k}"
        for name, value in (("target_calls_per_list", calls), ("acceptance_rate", 0.5), ("overlap", 1.0),
                            (f"recall@{k}", 0.1), (f"recall@{k}_change", 0.0)):
            metrics[f"{key}/{name}"] = value
            metrics[f"{key}/{name}_lo95"], metrics[f"{key}/{name}_hi95"] = value - 0.1, value + 0.1
    config = {"experiment_name": "x", "alignment": {"name": form, "objective": form},
              "draft_training": {"seed": seed}, "decoding": {"modes": ["strict"], "ks": [5, 10]}}
    (job_dir / "summary.json").write_text(json.dumps({"config": config, "metrics": metrics}))


def test_summarise_sweep_writes_table_json_and_plot_with_every_job(tmp_path, caplog):
    for num, (form, seed, calls) in enumerate([("kl", 1, 3.0), ("kl", 2, 3.2), ("atspeed_s", 1, 2.0),
                                               ("atspeed_s", 2, 2.2)]):
        fake_job(tmp_path / str(num), form, seed, calls)
    (tmp_path / "4" / ".hydra").mkdir(parents=True)  # a job that failed before writing its summary
    with caplog.at_level("INFO", logger="atspeed_exp.sweep_summary"):
        payload = summarise_sweep(tmp_path)
    assert len(payload["jobs"]) == 5 and [j["has_summary"] for j in payload["jobs"]] == [True] * 4 + [False]
    assert {(r["form"], r["k"]) for r in payload["rows"]} == {(f, k) for f in ("kl", "atspeed_s") for k in (5, 10)}
    assert all(r["seeds"] == [1, 2] for r in payload["rows"])
    text = (tmp_path / "summary_table.md").read_text()
    assert "| x | atspeed_s | strict | 10 | 1,2 | 2.10 ± 0.14 (±0.10) |" in text
    assert "`4`: (no overrides) (no summary.json)" in text and "alignment=kl draft_training.seed=2" in text
    assert json.loads((tmp_path / "summary_table.json").read_text())["rows"] == payload["rows"]
    assert (tmp_path / "summary_plot.png").read_bytes()[:4] == b"\x89PNG"
    assert any("sweep summary" in r.getMessage() and "| kl | strict | 5 |" in r.getMessage() for r in caplog.records)


@pytest.mark.slow  # a Hydra multirun in a subprocess
def test_a_sweep_stopped_by_a_failing_job_still_has_its_summary(tmp_path):
    """Hydra's basic sweeper raises on a failed job before its multirun-end callbacks: the table is written after
    every job, so the jobs that finished are summarised."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pipeline_helpers import tiny_overrides

    repo = Path(__file__).resolve().parents[1]
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("paths.output_dir")]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    result = subprocess.run(
        [sys.executable, "run.py", "-m", "stages=[target]", "seed=0,-1", f"hydra.sweep.dir={tmp_path / 'sweep'}",
         *overrides], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "seed=-1" in result.stderr  # the second job's config is refused
    text = (tmp_path / "sweep" / "summary_table.md").read_text()
    assert "2 jobs, 1 with a summary" in text
    (failed,) = [line for line in text.splitlines() if "(no summary.json)" in line]
    assert "seed=-1" in failed
