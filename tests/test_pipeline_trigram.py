"""The pipeline with ``decoding.drafter=trigram``: no teacher data and no draft training, the counts built once per
dataset (a cached stage that decoding settings do not rebuild), and the same evaluation as with a draft model."""

import json
from pathlib import Path

from pipeline_helpers import compose_config, tiny_overrides

from atspeed_exp import pipeline
from atspeed_exp.decoding.drafters import TrigramCounts


def test_pipeline_trigram_drafter_builds_counts_instead_of_a_draft(tmp_path):
    overrides = tiny_overrides(tmp_path) + ["decoding.drafter=trigram", "decoding.modes=[strict,dare]",
                                            "decoding.trigram.tree=puct", "eval.bootstrap_resamples=20"]
    summary = pipeline.run(compose_config(overrides))
    artifacts = tmp_path / "artifacts"
    assert not (artifacts / "teacher").exists() and not (artifacts / "draft").exists()
    assert summary["drafter"] == "trigram" and "teacher_dir" not in summary
    counts_dir = Path(summary["draft_dir"])
    stage = json.loads((counts_dir / "stage.json").read_text())
    assert stage["stage"] == "trigram" and stage["contexts"] > 0
    counts = TrigramCounts.load(str(counts_dir / pipeline.TRIGRAM_COUNTS_FILE))
    assert counts.used == stage["contexts"] and int(counts.unigram.sum()) == stage["tokens"]

    metrics = summary["metrics"]
    for k in (5, 10):
        assert 1.0 <= metrics[f"eval/strict/k{k}/target_calls_per_list"] <= 4.0
        assert metrics[f"eval/strict/k{k}/draft_calls_per_list"] == 0.0  # no draft model runs
        assert metrics[f"eval/all/strict/k{k}/mismatches"] == 0.0  # strict stays lossless while learning
        assert metrics[f"eval/strict/k{k}/recall@5"] == metrics[f"eval/beam/k{k}/recall@5"]
        assert 0.0 <= metrics[f"eval/all/dare/k{k}/overlap"] <= 1.0

    # decoding settings use the same counts: the stage is reused, not rebuilt
    mtime = (counts_dir / "stage.json").stat().st_mtime_ns
    again = pipeline.run(compose_config(overrides + ["eval.all_users=false", "decoding.trigram.tree=beam",
                                                     "decoding.trigram.adapt=none"]))
    assert again["reused_stages"]["trigram"] == str(counts_dir)
    assert (counts_dir / "stage.json").stat().st_mtime_ns == mtime
