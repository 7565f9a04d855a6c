
import pytest
from hydra.utils import instantiate
from pipeline_helpers import compose_config, tiny_overrides

from atspeed_exp import pipeline


def test_wandb_logger_writes_offline_run_under_output_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_config([f"paths.output_dir={tmp_path}"])
    logger = instantiate(cfg.logger)
    logger.log_hyperparams({"seed": 0})
    logger.log_metrics({"eval/target/recall@10": 0.5})
    logger.experiment.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(p.suffix == ".wandb" for p in runs[0].iterdir())


@pytest.mark.slow
def test_pipeline_with_wandb_offline_writes_one_run_per_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [o for o in tiny_overrides(tmp_path) if o != "logger=csv"] + ["logger=wandb"]
    summary = pipeline.run(compose_config(overrides))
    assert summary["table"]
    runs = sorted((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 3  # target, draft, eval
