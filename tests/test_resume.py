"""Resuming an interrupted stage ends where an uninterrupted run ends: same batches, same weights."""

import lightning.pytorch as pl
import pytest
import torch
from pipeline_helpers import StopAtEpoch, compose_config, tiny_overrides

from atspeed_exp import pipeline
from atspeed_exp.data.datamodule import LengthBucketBatchSampler
from atspeed_exp.models.build import load_model


class _RecordBatches(pl.Callback):
    def __init__(self) -> None:
        self.batches: dict[int, list[list[int]]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.setdefault(trainer.current_epoch, []).append(batch["input_ids"][:, :4].tolist())


def test_length_bucket_sampler_order_is_a_function_of_seed_and_epoch():
    lengths = [3, 9, 4, 7, 1, 8, 2, 6, 5, 9, 3, 2]
    fresh = LengthBucketBatchSampler(lengths, batch_size=3, seed=5, pool_batches=2)
    first, second = list(fresh), list(fresh)
    assert first != second  # a new order each epoch
    resumed = LengthBucketBatchSampler(lengths, batch_size=3, seed=5, pool_batches=2)
    resumed.set_epoch(1)
    assert list(resumed) == second
    assert resumed.sampler is resumed  # what Lightning's set_epoch hook looks for


def test_target_training_resumed_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    overrides = ["target_training.max_epochs=2", "target_training.warmup_steps=1"]
    whole = compose_config(tiny_overrides(tmp_path / "whole") + overrides)
    record_whole = _RecordBatches()
    pipeline.train_target(whole, logger=False, extra_callbacks=[record_whole])

    crashed = compose_config(tiny_overrides(tmp_path / "crashed") + overrides)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.train_target(crashed, logger=False, extra_callbacks=[StopAtEpoch(1)])
    record_resumed = _RecordBatches()
    pipeline.train_target(crashed, logger=False, extra_callbacks=[record_resumed])
    assert list(record_resumed.batches) == [1]
    assert record_resumed.batches[1] == record_whole.batches[1]  # epoch 1 replays epoch 1's order, not epoch 0's

    a = load_model(pipeline.target_stage_dir(whole) / "model").state_dict()
    b = load_model(pipeline.target_stage_dir(crashed) / "model").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_latest_checkpoint_is_written_every_epoch_even_when_the_monitored_metric_does_not_improve(tmp_path):
    """The resume point must follow every epoch: a monitored checkpoint's save_last would keep epoch 0's."""
    class Flat(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("metric", 0.5)  # never improves after epoch 0

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seen = []

    class Watch(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            last = tmp_path / "checkpoints" / "last.ckpt"
            seen.append(torch.load(last, weights_only=False)["epoch"] if last.exists() else None)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=2)
    best = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="best", monitor="metric",
                                        mode="max", enable_version_counter=False)
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[best, pipeline.latest_checkpoint(tmp_path), Watch()])
    trainer.fit(Flat(), data, data)
    assert seen == [None, 0, 1]


@pytest.mark.slow
def test_sigterm_during_training_exits_non_zero_and_says_how_to_resume(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("target_training.max_epochs")]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    process = subprocess.Popen([sys.executable, "run.py", "stages=[target]", "target_training.max_epochs=500",
                                "threads=1", *overrides], cwd=repo, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    stage_dirs = tmp_path / "artifacts" / "target"
    while not list(stage_dirs.glob("*/checkpoints/last.ckpt")):  # an epoch has finished
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate()
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "stopped by SIGTERM" in output and "rerun the same command" in output
    assert not list(stage_dirs.glob("*/stage.json"))  # the unfinished stage is not marked done
