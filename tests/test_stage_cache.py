"""What a rerun reuses: the target's test evaluation is read from its stage dir, not decoded again."""

from omegaconf import open_dict
from pipeline_helpers import compose_config, tiny_overrides

from atspeed_exp import pipeline
from atspeed_exp.data.recdata import RecData


def test_target_evaluation_is_cached_with_the_target_and_keyed_by_its_settings(tmp_path, monkeypatch):
    """A rerun reads the target's test figures and the encoded splits from the target stage; other evaluation
    settings decode again."""
    overrides = tiny_overrides(tmp_path) + ["stages=[target]"]
    first = pipeline.run(compose_config(overrides))
    cached = list((tmp_path / "artifacts" / "target").glob("*/eval/target-*.json"))
    assert len(cached) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cached target evaluation should have been reused")

    monkeypatch.setattr(pipeline, "generate_lists", no_decoding)
    monkeypatch.setattr(RecData, "encode", no_decoding)  # the encoded splits are read from the stage too
    assert {p.name for p in cached[0].parents[1].joinpath("encoded").iterdir()} == {"train.pt", "valid.pt", "test.pt"}
    second = pipeline.run(compose_config(overrides))
    assert second["target_reused"] and {k: v for k, v in second["metrics"].items() if k.startswith("eval/")} == {
        k: v for k, v in first["metrics"].items() if k.startswith("eval/")}
    monkeypatch.undo()
    third = pipeline.run(compose_config(overrides + ["eval.max_users=10"]))  # other settings: decoded again
    assert third["metrics"]["eval/num_users"] == 10
    assert len(list((tmp_path / "artifacts" / "target").glob("*/eval/target-*.json"))) == 2


def test_trainer_settings_that_change_a_fit_are_in_the_stage_keys(tmp_path):
    """+trainer.limit_train_batches=250 (or max_steps, accumulate_grad_batches) trains other weights than a full run:
    its stages get their own dirs, while the shipped configs keep their keys (no such setting differs there)."""
    from pathlib import Path

    from atspeed_exp.baselines import sasrec_stage_dir

    base = compose_config(tiny_overrides(tmp_path))
    teacher = Path("teacher-dir")
    for extra in (["+trainer.limit_train_batches=250"], ["+trainer.max_steps=7"],
                  ["+trainer.accumulate_grad_batches=2"], ["trainer.precision=bf16-mixed"]):
        other = compose_config(tiny_overrides(tmp_path) + extra)
        assert pipeline.target_stage_dir(other) != pipeline.target_stage_dir(base), extra
        assert pipeline.draft_stage_dir(other, teacher) != pipeline.draft_stage_dir(base, teacher), extra
        assert sasrec_stage_dir(other) != sasrec_stage_dir(base), extra
    same = compose_config(tiny_overrides(tmp_path) + ["+trainer.accumulate_grad_batches=1",
                                                      "trainer.log_every_n_steps=5"])
    assert pipeline.target_stage_dir(same) == pipeline.target_stage_dir(base)  # defaults and logging: same stage
    assert pipeline.trainer_key(base) == ()


def test_changed_inputs_rebuild_the_stages_made_from_them(tmp_path, caplog):
    """Dataset files edited in place rebuild the target; a target whose weights were replaced rebuilds the teacher
    and draft made from it. The stale stages are moved aside, never deleted, with a log line saying why."""
    import logging

    overrides = tiny_overrides(tmp_path) + ["stages=[target,teacher,draft]"]
    first = pipeline.run(compose_config(overrides))
    target_dir = first["target_dir"]
    draft_dir = first["draft_dir"]

    # the target's weights replaced: the teacher and the draft no longer belong to it
    weights = next(p for p in (tmp_path / "artifacts" / "target").glob("*/model/*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # other values in the last tensor
    with caplog.at_level(logging.WARNING, logger="atspeed_exp.pipeline"):
        second = pipeline.run(compose_config(overrides))
    assert second["target_dir"] == target_dir and second["draft_dir"] == draft_dir  # same settings, rebuilt
    assert "target_id changed" in caplog.text
    assert len(list((tmp_path / "artifacts" / "teacher").glob("*.stale-*"))) == 1
    assert len(list((tmp_path / "artifacts" / "draft").glob("*.stale-*"))) == 1

    # a dataset file edited in place: the target is rebuilt
    caplog.clear()
    split = next((tmp_path / "data" / "synthetic").glob("training_dict.npy"))
    import numpy as np

    train = np.load(split, allow_pickle=True).item()
    user = next(iter(train))
    train[user] = list(reversed(train[user]))
    np.save(split, np.array(train, dtype=object), allow_pickle=True)
    with caplog.at_level(logging.WARNING, logger="atspeed_exp.pipeline"):
        pipeline.run(compose_config(tiny_overrides(tmp_path) + ["stages=[target]"]))
    assert "dataset_sha changed" in caplog.text
    assert len(list((tmp_path / "artifacts" / "target").glob("*.stale-*"))) == 1


def test_a_repaired_teacher_keeps_its_id_and_the_drafts_made_from_it(tmp_path, monkeypatch):
    """A corrupt teacher shard removed and regenerated rewrites the teacher's stage.json (new timings), but the data
    is made from the same target, settings and examples: the teacher id stays, and the draft is reused rather than
    retrained. A draft recorded by an earlier version (the id was a hash of the whole teacher stage.json) is still
    reused while that stage.json is unchanged; a teacher made with other settings gets another id."""
    import json
    from pathlib import Path

    from atspeed_exp.data.teacher import remove_corrupt_shards

    overrides = tiny_overrides(tmp_path) + ["stages=[target,teacher,draft]"]
    first = pipeline.run(compose_config(overrides))
    teacher_dir, draft_dir = Path(first["teacher_dir"]), Path(first["draft_dir"])
    before = pipeline.teacher_id(teacher_dir)
    draft_stage = json.loads((draft_dir / "stage.json").read_text())
    assert draft_stage["teacher_id"] == before

    # an earlier version's record: accepted as long as the teacher's stage.json is the one it hashed
    legacy = dict(draft_stage, teacher_id=pipeline.legacy_teacher_id(teacher_dir))
    (draft_dir / "stage.json").write_text(json.dumps(legacy))
    assert pipeline.reusable(draft_dir, {"teacher_id": before},
                             also_accepted={"teacher_id": pipeline.legacy_teacher_id(teacher_dir)})
    (draft_dir / "stage.json").write_text(json.dumps(draft_stage))

    shard = sorted((teacher_dir / "train").glob("shard-*.pt"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    assert remove_corrupt_shards(teacher_dir / "train") and not (teacher_dir / "stage.json").exists()

    def no_draft_training(*args, **kwargs):
        raise AssertionError("the draft of a repaired teacher should have been reused")

    monkeypatch.setattr(pipeline, "check_vocabulary_match", no_draft_training)  # called by draft training only
    second = pipeline.run(compose_config(overrides))
    assert (teacher_dir / "stage.json").exists() and Path(second["draft_dir"]) == draft_dir
    assert pipeline.teacher_id(teacher_dir) == before
    assert not list((tmp_path / "artifacts" / "draft").glob("*.stale-*"))

    stage = json.loads((teacher_dir / "stage.json").read_text())
    stage["settings"]["num_beams"] += 1  # as if made with other settings
    (teacher_dir / "stage.json").write_text(json.dumps(stage))
    assert pipeline.teacher_id(teacher_dir) != before


def test_all_users_evaluation_reuses_the_target_beam_lists_it_cached(tmp_path, caplog):
    """A second all-users evaluation on the same target (another drafter setting that leaves the target's lists
    alone) reads the target's beam lists per K from its stage dir; they equal a fresh decode, and so do the
    figures. Settings that change the lists (the batching) get lists of their own."""
    import logging

    import torch

    overrides = tiny_overrides(tmp_path) + ["decoding.drafter=trigram", "eval.bootstrap_resamples=0",
                                            "eval.speculative_users=2"]
    first = pipeline.run(compose_config(overrides))
    cached = sorted((tmp_path / "artifacts" / "target").glob("*/eval/beam-lists-*.pt"))
    assert len(cached) == 2  # one file per K (5, 10)
    with caplog.at_level(logging.INFO, logger="atspeed_exp.pipeline"):
        second = pipeline.run(compose_config(overrides + ["decoding.trigram.tree=beam"]))
    assert sum("target beam lists" in r.getMessage() and "reusing" in r.getMessage() for r in caplog.records) == 2
    for k in (5, 10):
        for name in ("recall@5", "ndcg@5"):
            assert second["metrics"][f"eval/all/beam/k{k}/{name}"] == first["metrics"][f"eval/all/beam/k{k}/{name}"]

    cfg = compose_config(overrides)
    target_dir, data = pipeline.train_target(cfg, False)
    test = data.splits["test"]
    for path in cached:
        saved = torch.load(path)
        fresh = pipeline.generate_lists(pipeline.load_target(target_dir), test.prompts[:20], data.trie(), saved["k"],
                                        data.pad_id, batch_size=cfg.eval.batch_size, progress=False).items
        assert torch.equal(saved["items"], fresh)

    other = compose_config(overrides + [f"eval.batch_size={cfg.eval.batch_size // 2}"])
    decoded = []
    pipeline.cached_target_lists(other, target_dir, 20)(5, lambda: decoded.append(5) or torch.zeros(20, 5))
    assert decoded == [5] and len(list(target_dir.glob("eval/beam-lists-*.pt"))) == 3


def test_the_validation_metric_picks_the_monitored_checkpoint_and_only_a_non_default_one_changes_the_key(tmp_path):
    """target_training.val_metric=ndcg keeps the best epoch by validation NDCG (recorded as the stage's monitor) in a
    stage of its own; at its default (recall) the key is the one the stages built before the option existed have."""
    import json

    base = compose_config(tiny_overrides(tmp_path))
    ndcg = compose_config(tiny_overrides(tmp_path) + ["target_training.val_metric=ndcg"])
    assert pipeline.target_stage_dir(ndcg) != pipeline.target_stage_dir(base)
    legacy = compose_config(tiny_overrides(tmp_path))  # the configuration as it was before the option existed
    with open_dict(legacy):
        del legacy.target_training["val_metric"]
    assert pipeline.target_stage_dir(legacy) == pipeline.target_stage_dir(base)
    target_dir, _ = pipeline.train_target(ndcg, False)
    stage = json.loads((target_dir / "stage.json").read_text())
    assert stage["monitor"] == "target/val_ndcg@10" and stage["best_score"] is not None
