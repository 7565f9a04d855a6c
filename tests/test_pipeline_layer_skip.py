"""The pipeline with ``decoding.drafter=layer_skip``: no teacher data and no draft training; the target drafts for
itself with a configured skip set or one the draft stage searches (a cached stage keyed by the target and the search
settings), with the same evaluation as with a draft model."""

import json
from pathlib import Path

from pipeline_helpers import compose_config, tiny_overrides

from atspeed_exp import pipeline
from atspeed_exp.decoding.skip_search import SkipSearchResult


def test_pipeline_layer_skip_drafter_searches_a_skip_set_instead_of_a_draft(tmp_path):
    overrides = tiny_overrides(tmp_path) + ["decoding.drafter=layer_skip", "decoding.layer_skip.search=true",
                                            "decoding.layer_skip.search_users=4", "eval.all_users=false"]
    summary = pipeline.run(compose_config(overrides))
    artifacts = tmp_path / "artifacts"
    assert not (artifacts / "teacher").exists() and not (artifacts / "draft").exists()
    assert summary["drafter"] == "layer_skip" and "teacher_dir" not in summary
    search_dir = Path(summary["draft_dir"])
    assert search_dir.parent == artifacts / "layer_skip"
    stage = json.loads((search_dir / "stage.json").read_text())
    result = SkipSearchResult.from_state(json.loads((search_dir / pipeline.LAYER_SKIP_FILE).read_text()))
    assert stage["stage"] == "layer_skip" and stage["best"]["objective"] == result.best.objective
    assert result.best.objective <= min(result.trace[0]["objective"], result.trace[-1]["objective"])
    metrics = summary["metrics"]
    for k in (5, 10):
        assert metrics[f"eval/strict/k{k}/recall@5"] == metrics[f"eval/beam/k{k}/recall@5"]  # lossless
        assert metrics[f"eval/strict/k{k}/draft_calls_per_list"] > 0  # the target's own layers draft

    # evaluation settings reuse the search; a search setting makes a new stage
    mtime = (search_dir / "stage.json").stat().st_mtime_ns
    again = pipeline.run(compose_config(overrides + ["decoding.ks=[5]"]))
    assert again["reused_stages"]["layer_skip"] == str(search_dir)
    assert (search_dir / "stage.json").stat().st_mtime_ns == mtime
    other = pipeline.layer_skip_stage_dir(compose_config(overrides + ["decoding.layer_skip.max_skipped=1"]),
                                          Path(summary["target_dir"]))
    assert other != search_dir


def test_pipeline_layer_skip_drafter_with_a_configured_set(tmp_path):
    overrides = tiny_overrides(tmp_path) + ["decoding.drafter=layer_skip", "decoding.layer_skip.skip_mlp=[0]",
                                            "eval.all_users=false"]
    summary = pipeline.run(compose_config(overrides))
    assert summary["drafter"] == "layer_skip" and "draft_dir" not in summary
    assert not (tmp_path / "artifacts" / "layer_skip").exists()
    metrics = summary["metrics"]
    assert metrics["eval/strict/k5/recall@5"] == metrics["eval/beam/k5/recall@5"]
