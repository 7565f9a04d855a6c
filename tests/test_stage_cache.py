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
