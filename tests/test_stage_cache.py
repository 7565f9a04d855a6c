"""What a rerun reuses: the target's test evaluation is read from its stage dir, not decoded again."""

from pipeline_helpers import compose_config, tiny_overrides

from atspeed_exp import pipeline


def test_target_evaluation_is_cached_with_the_target_and_keyed_by_its_settings(tmp_path, monkeypatch):
    overrides = tiny_overrides(tmp_path) + ["stages=[target]"]
    first = pipeline.run(compose_config(overrides))
    cached = list((tmp_path / "artifacts" / "target").glob("*/eval/target-*.json"))
    assert len(cached) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cached target evaluation should have been reused")

    monkeypatch.setattr(pipeline, "generate_lists", no_decoding)
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
                  ["+trainer.accumulate_grad_batches=2"]):
        other = compose_config(tiny_overrides(tmp_path) + extra)
        assert pipeline.target_stage_dir(other) != pipeline.target_stage_dir(base), extra
        assert pipeline.draft_stage_dir(other, teacher) != pipeline.draft_stage_dir(base, teacher), extra
        assert sasrec_stage_dir(other) != sasrec_stage_dir(base), extra
    same = compose_config(tiny_overrides(tmp_path) + ["+trainer.accumulate_grad_batches=1",
                                                      "trainer.log_every_n_steps=5"])
    assert pipeline.target_stage_dir(same) == pipeline.target_stage_dir(base)  # defaults and logging: same stage
    assert pipeline.trainer_key(base) == ()
