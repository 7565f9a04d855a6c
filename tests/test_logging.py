
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


def test_route_library_logs_leaves_one_handler_per_record_and_drops_noise(caplog):
    import logging

    from atspeed_exp.log_setup import route_library_logs

    library = logging.getLogger("somelibrary")
    extra = logging.StreamHandler()
    library.addHandler(extra)
    root_handler = logging.StreamHandler()
    logging.root.addHandler(root_handler)
    try:
        route_library_logs()
        assert extra not in library.handlers and library.propagate  # the root's handler prints it, once
        record = logging.LogRecord("lightning", logging.INFO, __file__, 1, "Tip: try litlogger", None, None)
        assert not all(f.filter(record) for f in root_handler.filters)
        record = logging.LogRecord("lightning", logging.INFO, __file__, 1, "Epoch 1", None, None)
        assert all(f.filter(record) for f in root_handler.filters)
    finally:
        logging.root.removeHandler(root_handler)


def test_log_progress_reports_steps_and_time_left(caplog):
    import logging

    import lightning.pytorch as pl
    import torch

    from atspeed_exp.callbacks.progress import LogProgress

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("tiny/train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(20, 2)), batch_size=2)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[LogProgress("tiny", every_percent=50, min_seconds=0)])
    with caplog.at_level(logging.INFO, logger="atspeed_exp.callbacks.progress"):
        trainer.fit(Tiny(), data)
    lines = [r.getMessage() for r in caplog.records if r.name == "atspeed_exp.callbacks.progress"]
    assert len(lines) == 4  # 50% and 100% of each of 2 epochs
    assert lines[0].startswith("tiny epoch 1/2:  50% (5/10 steps), loss ") and "run left" in lines[0]
    assert lines[-1].startswith("tiny epoch 2/2: 100% (10/10 steps)")
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[LogProgress("tiny", every_percent=10)])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="atspeed_exp.callbacks.progress"):
        trainer.fit(Tiny(), data)
    progress = [r.getMessage()[:22] for r in caplog.records if r.name == "atspeed_exp.callbacks.progress"]
    assert progress == ["tiny epoch 1/1: 100% ("]  # a short epoch: its end only
