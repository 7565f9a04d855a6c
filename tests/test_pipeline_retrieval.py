"""The pipeline with ``decoding.drafter=retrieval``: no teacher data and no draft training, the pools built once per
dataset and settings (a cached stage), and the same evaluation as with a draft model."""

import json
from pathlib import Path

from pipeline_helpers import compose_config, tiny_overrides

from atspeed_exp import pipeline
from atspeed_exp.decoding.drafters import RetrievalPools


def test_pipeline_retrieval_drafter_builds_pools_instead_of_a_draft(tmp_path):
    overrides = tiny_overrides(tmp_path) + ["decoding.drafter=retrieval", "decoding.modes=[strict,dare]",
                                            "decoding.retrieval.groups=3", "eval.bootstrap_resamples=20"]
    summary = pipeline.run(compose_config(overrides))
    artifacts = tmp_path / "artifacts"
    assert not (artifacts / "teacher").exists() and not (artifacts / "draft").exists()
    assert summary["drafter"] == "retrieval" and "teacher_dir" not in summary
    pools_dir = Path(summary["draft_dir"])
    stage = json.loads((pools_dir / "stage.json").read_text())
    assert stage["stage"] == "retrieval" and stage["settings"]["retrieval"]["groups"] == 3
    pools = RetrievalPools.load(str(pools_dir / pipeline.RETRIEVAL_POOLS_FILE))
    assert pools.num_groups == 3 and pools.group_sizes.tolist() == stage["group_sizes"]

    metrics = summary["metrics"]
    for k in (5, 10):
        assert 1.0 <= metrics[f"eval/strict/k{k}/target_calls_per_list"] <= 4.0
        assert metrics[f"eval/strict/k{k}/draft_calls_per_list"] == 0.0  # no draft model runs
        assert metrics[f"eval/all/strict/k{k}/mismatches"] == 0.0  # strict stays lossless
        assert metrics[f"eval/strict/k{k}/recall@5"] == metrics[f"eval/beam/k{k}/recall@5"]
        assert 0.0 <= metrics[f"eval/all/dare/k{k}/overlap"] <= 1.0
    assert "speculative decoding" in pipeline.format_summary(summary, (5, 10))

    # the same dataset and settings: the pools are reused, not rebuilt
    mtime = (pools_dir / "stage.json").stat().st_mtime_ns
    again = pipeline.run(compose_config(overrides + ["eval.all_users=false"]))
    assert again["reused_stages"]["retrieval"] == str(pools_dir)
    assert (pools_dir / "stage.json").stat().st_mtime_ns == mtime
    other = compose_config(overrides + ["decoding.retrieval.top_n=5"])
    assert pipeline.retrieval_stage_dir(other) != pools_dir
