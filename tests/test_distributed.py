"""Training across processes: the length-bucketed sampler shards an epoch over ranks, and only rank 0 writes."""

from collections import Counter

import pytest

from atspeed_exp.artifacts import distributed_follower
from atspeed_exp.data.datamodule import LengthBucketBatchSampler


def rank_batches(lengths: list[int], world: int, epoch: int, **kwargs) -> list[list[list[int]]]:
    """The batches each of ``world`` simulated ranks draws in ``epoch``."""
    out = []
    for rank in range(world):
        sampler = LengthBucketBatchSampler(lengths, num_replicas=world, rank=rank, **kwargs)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
        assert len(out[-1]) == len(sampler)
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("num_examples", [1, 12, 29, 40])
def test_length_bucket_sampler_shards_every_example_once_per_epoch(world, num_examples):
    lengths = [(7 * i) % 11 + 1 for i in range(num_examples)]
    single = LengthBucketBatchSampler(lengths, batch_size=4, seed=3, pool_batches=2)
    for epoch in range(2):
        single.set_epoch(epoch)
        batches = list(single)
        per_rank = rank_batches(lengths, world, epoch, batch_size=4, seed=3, pool_batches=2)
        assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of steps
        dealt = [batch for rank in per_rank for batch in rank]
        # the padding rule: the first (-B mod W) batches of the single-process order, cyclically, are dealt again
        padding = (batches * world)[: (-len(batches)) % world]
        assert sorted(map(tuple, dealt)) == sorted(map(tuple, batches + padding))
        seen = Counter(index for batch in dealt for index in batch)
        expected = Counter(range(num_examples)) + Counter(index for batch in padding for index in batch)
        assert seen == expected
        if len(batches) % world == 0:
            assert seen == Counter(range(num_examples))  # every example exactly once


def test_length_bucket_sampler_resumes_each_rank_at_its_own_position():
    lengths = [3, 9, 4, 7, 1, 8, 2, 6, 5, 9, 3, 2, 4, 4]
    whole = LengthBucketBatchSampler(lengths, batch_size=2, seed=5, pool_batches=2, num_replicas=2, rank=1)
    whole.set_epoch(1)
    batches = list(whole)
    stopped = LengthBucketBatchSampler(lengths, batch_size=2, seed=5, pool_batches=2, num_replicas=2, rank=1)
    stopped.set_epoch(1)
    drawn = iter(stopped)
    next(drawn), next(drawn)
    resumed = LengthBucketBatchSampler(lengths, batch_size=2, seed=5, pool_batches=2, num_replicas=2, rank=1)
    resumed.load_state_dict(stopped.state_dict())
    resumed.set_epoch(1)
    assert list(resumed) == batches[2:]


def test_length_bucket_sampler_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2"):
        LengthBucketBatchSampler([1, 2, 3], batch_size=2, num_replicas=2, rank=2)


@pytest.fixture
def follower(monkeypatch):
    """This process as rank 1 of a DDP run, as Lightning's launcher starts it (LOCAL_RANK=1) before the fit."""
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(rank_zero_only, "rank", 1)


def test_only_rank_zero_writes_stage_files_and_logs(follower, tmp_path):
    from omegaconf import OmegaConf

    from atspeed_exp import pipeline

    assert not pipeline.is_rank_zero()
    pipeline.write_json_atomic(tmp_path / "stage.json", {"stage": "target"})
    assert not (tmp_path / "stage.json").exists()
    cfg = OmegaConf.create({"logger": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(tmp_path)},
                            "run_name": "r"})
    assert pipeline.make_logger(cfg, "target") is False
    with pipeline.rank_zero_first():  # without a process group: no waiting
        pass


def test_a_follower_takes_no_stage_lock(tmp_path, monkeypatch):
    import subprocess
    import sys

    from atspeed_exp.artifacts import stage_lock

    code = ("import sys, time; from atspeed_exp.artifacts import stage_lock\n"
            f"with stage_lock({str(tmp_path / 'stage')!r}):\n    print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("LOCAL_RANK", "1")
        with stage_lock(tmp_path / "stage", quiet_s=0.1):  # would block for 30 s as rank 0
            pass
    finally:
        holder.kill()
        holder.wait()


def target_val_loss(tmp_path, *overrides: str) -> float:
    """Train a tiny target with ``run.py`` (a process of its own: Lightning's DDP launcher reruns the command for the
    other ranks) and return its last ``target/val_loss`` from the CSV log."""
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = [f"paths.data_dir={tmp_path / 'data'}", f"paths.artifacts_dir={tmp_path / 'artifacts'}",
            f"paths.output_dir={tmp_path / 'out'}", "stages=[target]", "logger=csv", "trainer.enable_progress_bar=false",
            "data.synthetic.num_users=150", "data.synthetic.num_items=120", "model.hidden_size=32",
            "model.intermediate_size=64", "model.num_hidden_layers=1", "target_training.max_epochs=2",
            "target_training.warmup_steps=2", "target_training.val_users=20", "eval.max_users=20", "eval.num_beams=10",
            *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(root / "run.py"), *args], cwd=root, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics,) = (tmp_path / "out").glob("*-target/version_0/metrics.csv")
    losses = [float(row["target/val_loss"]) for row in csv.DictReader(metrics.open()) if row["target/val_loss"]]
    assert len(list((tmp_path / "artifacts" / "target").glob("*/stage.json"))) == 1
    return losses[-1]


@pytest.mark.slow
def test_target_training_on_two_gloo_processes_matches_one_process(tmp_path):
    """Two CPU processes with batch size 32 each against one with 64: the same examples per step, batched
    differently, so the validation loss after two epochs agrees within 5 % (not exactly)."""
    one = target_val_loss(tmp_path / "one", "target_training.batch_size=64")
    two = target_val_loss(tmp_path / "two", "trainer=ddp", "trainer.devices=2", "target_training.batch_size=32")
    assert two == pytest.approx(one, rel=0.05)


@pytest.mark.parametrize(("env", "follower"), [
    ({}, False),
    ({"SLURM_PROCID": "0"}, False),
    ({"SLURM_PROCID": "3"}, True),  # a SLURM task other than the first: a rank of the job's DDP group
    ({"SLURM_PROCID": "3", "LOCAL_RANK": "0"}, False),  # another launcher's rank wins, as in Lightning's order
    ({"LOCAL_RANK": "1"}, True),
    ({"NODE_RANK": "1", "SLURM_PROCID": "0"}, True),
])
def test_distributed_follower_reads_the_launchers_rank_variables(monkeypatch, env, follower):
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed_follower() is follower


def test_a_slurm_task_before_any_process_group_waits_for_rank_zeros_teacher(tmp_path, monkeypatch):
    """Every task of a SLURM job starts at once; with the target reused, no fit has made a process group yet when the
    teacher stage runs. A non-zero task must neither generate the shards beside rank 0 nor read a half-made stage:
    it waits for rank 0's stage.json."""
    import threading

    from omegaconf import OmegaConf

    from atspeed_exp import pipeline

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    cfg = OmegaConf.create({"teacher": {"num_beams": 4}, "paths": {"artifacts_dir": str(tmp_path)}})
    target_dir = tmp_path / "target" / "t-1"
    stage_dir = pipeline.teacher_stage_dir(cfg, target_dir)

    def builds(*args, **kwargs):
        raise AssertionError("a follower task built the teacher stage")

    monkeypatch.setattr(pipeline, "_make_teacher", builds)
    stage_dir.mkdir(parents=True)
    writer = threading.Timer(0.3, lambda: (stage_dir / "stage.json").write_text("{}"))
    writer.start()
    try:
        assert pipeline.make_teacher(cfg, target_dir, data=None) == stage_dir
        assert (stage_dir / "stage.json").exists()  # it returned only once rank 0's stage was complete
    finally:
        writer.join()
