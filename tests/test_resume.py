"""Resuming an interrupted stage ends where an uninterrupted run ends: same batches, same weights, from an epoch's
end or from any step within one (a process killed, or stopped by SIGTERM / SIGINT)."""

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from pipeline_helpers import StopAtEpoch, compose_config, tiny_overrides

from atspeed_exp import pipeline
from atspeed_exp.artifacts import load_checkpoint_state_dict, resume_checkpoint
from atspeed_exp.callbacks.atomic_checkpoint import AtomicCheckpointIO
from atspeed_exp.data.datamodule import LengthBucketBatchSampler, ResumableDataLoader
from atspeed_exp.models.build import load_model

REPO = Path(__file__).resolve().parents[1]


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


def test_length_bucket_sampler_resumes_after_the_batches_of_its_state():
    lengths = [3, 9, 4, 7, 1, 8, 2, 6, 5, 9, 3, 2, 4, 4]
    whole = LengthBucketBatchSampler(lengths, batch_size=3, seed=5, pool_batches=2)
    whole.set_epoch(1)
    batches = list(whole)
    stopped = LengthBucketBatchSampler(lengths, batch_size=3, seed=5, pool_batches=2)
    stopped.set_epoch(1)
    drawn = iter(stopped)
    for _ in range(2):
        next(drawn)
    assert stopped.state_dict() == {"epoch": 1, "batches_done": 2}

    resumed = LengthBucketBatchSampler(lengths, batch_size=3, seed=5, pool_batches=2)
    resumed.load_state_dict(stopped.state_dict())
    assert resumed.state_dict() == {"epoch": 1, "batches_done": 2}  # saved again before any batch: the same point
    resumed.set_epoch(1)
    assert list(resumed) == batches[2:]
    assert resumed.state_dict() == {"epoch": 1, "batches_done": len(batches)}
    assert list(resumed) != batches  # the next pass is epoch 2, whole

    ended = LengthBucketBatchSampler(lengths, batch_size=3, seed=5, pool_batches=2)
    ended.load_state_dict({"epoch": 0, "batches_done": 5})  # the state at the end of epoch 0
    ended.set_epoch(1)
    assert list(ended) == batches  # epoch 1 starts from its first batch


def test_resumable_data_loader_hands_its_sampler_state_to_lightning_and_refuses_workers():
    sampler = LengthBucketBatchSampler([1, 2, 3, 4], batch_size=2)
    loader = ResumableDataLoader(list(range(4)), sampler)
    next(iter(loader))
    assert loader.state_dict() == {"epoch": 0, "batches_done": 1}
    with pytest.raises(ValueError, match="num_workers=0"):
        ResumableDataLoader(list(range(4)), sampler, num_workers=2)


class _DropoutRegression(pl.LightningModule):
    """Training that draws from the global RNG at every step (dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.dropout = torch.nn.Dropout(0.5)

    def training_step(self, batch, batch_idx):
        features, target = batch
        return (self.layer(self.dropout(features)).squeeze(-1) - target).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _CrashAtStep(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def _fit_dropout_regression(root: Path, callbacks: list) -> dict[str, torch.Tensor]:
    """Two epochs of 12 steps with the pipeline's resume callbacks (last.ckpt every 5 steps), resumed from
    ``root/checkpoints/last.ckpt`` when it exists."""
    pl.seed_everything(0)
    module = _DropoutRegression()
    generator = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(24, 4, generator=generator), torch.randn(24, generator=generator))
    loader = ResumableDataLoader(data, LengthBucketBatchSampler([1] * 24, batch_size=2, seed=0))
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[pipeline.latest_checkpoint(root), *pipeline.resume_callbacks("toy", root, 5),
                                    *callbacks], plugins=[AtomicCheckpointIO()])
    trainer.fit(module, loader, ckpt_path=resume_checkpoint(root / "checkpoints" / "last.ckpt"))
    return module.state_dict()


def test_resumed_fit_draws_the_random_numbers_of_an_uninterrupted_one(tmp_path):
    """Dropout masks after a mid-epoch resume are those of the uninterrupted fit: the random states are saved with
    the checkpoint (step 15, epoch 1) and restored before the next batch."""
    whole = _fit_dropout_regression(tmp_path / "whole", [])
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit_dropout_regression(tmp_path / "crashed", [_CrashAtStep(17)])
    assert torch.load(tmp_path / "crashed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 15
    resumed = _fit_dropout_regression(tmp_path / "crashed", [])
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0, msg=name)


@pytest.fixture
def one_thread():
    """In-process fits on one thread, as the child processes of these tests run (same float sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run_child(stage: str, signal_name: str, step: int, overrides: list[str]) -> subprocess.CompletedProcess:
    """``tests/resume_child.py``: a real process training ``stage`` that sends itself ``signal_name`` at ``step``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "tests" / "resume_child.py"), stage, signal_name, str(step),
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True)


def _stopped_mid_epoch_at(stage: str, every: int, steps_per_epoch: int, seed: str) -> int:
    """A reproducible random step of the second epoch after which ``last.ckpt`` lies within that epoch (a step
    checkpoint every ``every`` steps, or the point the signal stopped at), not at its last batch."""
    candidates = [s for s in range(steps_per_epoch + 1, 2 * steps_per_epoch - 1) if s // every * every > steps_per_epoch]
    return random.Random(f"{stage}-{seed}").choice(candidates)


def _mid_epoch_checkpoint_step(stage_dir: Path, steps_per_epoch: int, output: str) -> int:
    """The global step of the ``last.ckpt`` a stopped process left, checked to lie within the second epoch."""
    checkpoint = torch.load(stage_dir / "checkpoints" / "last.ckpt", weights_only=True)
    step = checkpoint["global_step"]
    assert steps_per_epoch < step < 2 * steps_per_epoch, (step, output[-3000:])  # within the second epoch
    # what Lightning saved of the training DataLoader: the sampler's epoch and the batches it has handed out
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches_done": step - steps_per_epoch}]
    return step


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def _steps_per_epoch(stage_dir: Path, epochs: int) -> int:
    return torch.load(stage_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] // epochs


@pytest.mark.parametrize(("signal_name", "exit_status"),
                         [pytest.param("KILL", -9, marks=pytest.mark.slow), ("TERM", 143)])  # subprocess runs
def test_target_training_stopped_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(
        tmp_path, one_thread, signal_name, exit_status):
    """A real training process killed (SIGKILL: last.ckpt every 4 steps) or stopped by SIGTERM (saved at that
    step) at a random step of the second epoch, rerun: the same final weights, bit for bit."""
    overrides = tiny_overrides(tmp_path) + ["target_training.max_epochs=2", "target_training.warmup_steps=1",
                                            "target_training.checkpoint_every_n_steps=4"]
    cfg = compose_config(overrides)
    whole_dir = pipeline.train_target(cfg, logger=False)[0].rename(tmp_path / "whole")
    per_epoch = _steps_per_epoch(whole_dir, 2)
    step = _stopped_mid_epoch_at("target", 4, per_epoch, signal_name)

    child = _run_child("target", signal_name, step, overrides)
    output = child.stdout + child.stderr
    assert child.returncode == exit_status, (step, output[-3000:])
    stage_dir = pipeline.target_stage_dir(cfg)
    assert not (stage_dir / "stage.json").exists()
    saved = _mid_epoch_checkpoint_step(stage_dir, per_epoch, output)
    if signal_name == "TERM":
        assert saved == step and "rerun the same command" in output
    else:
        assert saved == step // 4 * 4

    pipeline.train_target(cfg, logger=False)
    _assert_same_weights(load_checkpoint_state_dict(whole_dir / "checkpoints" / "last.ckpt"),
                         load_checkpoint_state_dict(stage_dir / "checkpoints" / "last.ckpt"))  # the last epoch's end
    _assert_same_weights(load_model(whole_dir / "model").state_dict(),
                         load_model(stage_dir / "model").state_dict())  # the best epoch's, saved as the stage's model


DRAFT_OVERRIDES = ["target_training.warmup_steps=1", "draft_training.batch_size=4", "draft_training.max_epochs=2",
                   "draft_training.warmup_steps=1", "draft_training.checkpoint_every_n_steps=3",
                   "alignment.on_policy_ratio=0.5"]


@pytest.fixture(scope="module")
def draft_whole(tmp_path_factory):
    """A target, its teacher data and an uninterrupted draft training (moved to ``whole/``) on them; on-policy
    rows (half of each batch, drawn from the global step) included."""
    root = tmp_path_factory.mktemp("draft")
    overrides = tiny_overrides(root) + DRAFT_OVERRIDES
    cfg = compose_config(overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        target_dir, data = pipeline.train_target(cfg, logger=False)
        teacher_dir = pipeline.make_teacher(cfg, target_dir, data)
        stage_dir = pipeline.train_draft(cfg, target_dir, teacher_dir, data, logger=False)
    finally:
        torch.set_num_threads(threads)
    return overrides, stage_dir, stage_dir.rename(root / "whole"), (target_dir, teacher_dir, data)


@pytest.mark.slow  # subprocess runs; the target test above keeps a kill-and-resume run in the fast suite
@pytest.mark.parametrize(("signal_name", "exit_status"), [("KILL", -9), ("INT", 130)])
def test_draft_training_stopped_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(
        draft_whole, one_thread, signal_name, exit_status):
    """A real draft training process killed (SIGKILL: last.ckpt every 3 steps) or stopped by SIGINT (saved at the
    end of the next step) at a random step of the second epoch, rerun: the same weights, bit for bit."""
    overrides, stage_dir, whole_dir, (target_dir, teacher_dir, data) = draft_whole
    shutil.rmtree(stage_dir, ignore_errors=True)
    per_epoch = _steps_per_epoch(whole_dir, 2)
    step = _stopped_mid_epoch_at("draft", 3, per_epoch, signal_name)

    child = _run_child("draft", signal_name, step, overrides)
    output = child.stdout + child.stderr
    assert child.returncode == exit_status, (step, output[-3000:])
    saved = _mid_epoch_checkpoint_step(stage_dir, per_epoch, output)
    if signal_name == "INT":
        assert saved == step + 1 and "stopped by SIGINT" in output and "rerun the same command" in output
    else:
        assert saved == step // 3 * 3

    pipeline.train_draft(compose_config(overrides), target_dir, teacher_dir, data, logger=False)
    _assert_same_weights(load_model(whole_dir / "model").state_dict(), load_model(stage_dir / "model").state_dict())


def test_checkpoint_interval_is_not_in_the_stage_keys(tmp_path):
    """How often last.ckpt is written does not change what a training produces: the stage is the same."""
    base = compose_config(tiny_overrides(tmp_path))
    other = compose_config(tiny_overrides(tmp_path) + ["target_training.checkpoint_every_n_steps=7",
                                                       "draft_training.checkpoint_every_n_steps=3"])
    teacher = Path("teacher-dir")
    assert pipeline.target_stage_dir(other) == pipeline.target_stage_dir(base)
    assert pipeline.draft_stage_dir(other, teacher) == pipeline.draft_stage_dir(base, teacher)


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
    """run.py sent SIGTERM by another process, at whatever step it has reached (after its first mid-epoch
    checkpoint): it saves last.ckpt, logs how to resume and exits 143, the stage not marked done."""
    import signal
    import time

    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("target_training.max_epochs")]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "run.py", "stages=[target]", "target_training.max_epochs=500",
                                "target_training.checkpoint_every_n_steps=2", "threads=1", *overrides], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stage_dirs = tmp_path / "artifacts" / "target"
    while not list(stage_dirs.glob("*/checkpoints/last.ckpt")):  # two steps are done
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate()
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "stopped by SIGTERM" in output and "rerun the same command" in output
    assert not list(stage_dirs.glob("*/stage.json"))  # the unfinished stage is not marked done
