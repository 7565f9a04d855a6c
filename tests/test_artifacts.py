"""Cached artifacts (docs/reliability.md): atomic writes with umask permissions, clear errors for corrupt files,
teacher-shard checksums and repair, the stage lock, weights-only checkpoint loading, and paths resolved against
the repository."""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from decoding_fixtures import make_trie, random_prompts
from toy_lm import ToyLM

from atspeed_exp.artifacts import (
    ArtifactError,
    atomic_directory,
    load_checkpoint_state_dict,
    lock_path,
    resume_checkpoint,
    stage_lock,
    write_json_atomic,
)
from atspeed_exp.callbacks.atomic_checkpoint import AtomicCheckpointIO
from atspeed_exp.data.teacher import (
    CorruptShardError,
    TeacherDataError,
    generate_teacher_data,
    load_teacher_data,
    remove_corrupt_shards,
    shard_path,
)
from atspeed_exp.data.tokenizer import build_scratch_tokenizer, load_tokenizer, save_tokenizer
from atspeed_exp.lit.target_module import TargetFinetuneModule
from atspeed_exp.models.build import build_scratch_llama, load_model, save_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tokenizer():
    return build_scratch_tokenizer([["<a_1>", "<a_2>"], ["<b_1>", "<b_2>"]], ["items", ":"])


def _tiny_model():
    return build_scratch_llama(30, 0, 1, 2, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, seed=0)


def _teacher(directory: Path, seed: int = 2) -> tuple:
    trie, _, _, vocab = make_trie(num_items=60, num_collisions=2, seed=11)
    prompts = [p.tolist() for p in random_prompts(20, vocab, seed=11)]
    model = ToyLM(vocab, seed=seed)
    generate_teacher_data(model, prompts, trie, directory, "toy", num_beams=5, shard_size=8, batch_size=8,
                          progress=False)
    return trie, vocab, prompts


# -- atomic writes and permissions -------------------------------------------------------------------------------
def test_atomic_writers_give_the_mode_of_a_plain_open_under_the_umask(tmp_path, umask_002):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    with atomic_directory(tmp_path / "folder") as tmp:
        (tmp / "f.txt").write_text("x")
    save_tokenizer(_tokenizer(), tmp_path / "tokenizer")
    save_model(_tiny_model(), tmp_path / "model")
    _teacher(tmp_path / "teacher")
    from atspeed_exp.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "synthetic", num_users=30, num_items=40)
    files = [tmp_path / "a.json", tmp_path / "teacher" / "manifest.json", shard_path(tmp_path / "teacher", 0),
             tmp_path / "synthetic" / "training_dict.npy", tmp_path / "synthetic" / "synthetic_meta.json",
             tmp_path / "teacher" / "shard-00000.pt.sha256"]
    for path in files:
        assert _mode(path) == 0o664, path  # tempfile.mkstemp alone gives 0o600
    for path in (tmp_path / "folder", tmp_path / "tokenizer", tmp_path / "model"):
        assert _mode(path) == 0o775, path  # tempfile.mkdtemp alone gives 0o700
    assert not [p for p in tmp_path.rglob(".*") if p.name.startswith(".")]  # no temporary left behind


def test_save_tokenizer_crashing_midway_keeps_the_previous_tokenizer(tmp_path, monkeypatch):
    directory = tmp_path / "tokenizer"
    save_tokenizer(_tokenizer(), directory)
    before = (directory / "tokenizer.json").read_bytes()
    tokenizer = _tokenizer()

    def half_then_crash(path, *args, **kwargs):
        (Path(path) / "tokenizer.json").write_text('{"trunc')
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(tokenizer, "save_pretrained", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_tokenizer(tokenizer, directory)
    assert (directory / "tokenizer.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]
    assert len(load_tokenizer(directory)) == len(tokenizer)


# -- corrupt artifacts -------------------------------------------------------------------------------------------
def test_load_model_with_truncated_weights_names_the_file_and_the_stage_dir(tmp_path):
    stage = tmp_path / "target" / "beauty-abc"
    save_model(_tiny_model(), stage / "model")
    (stage / "stage.json").write_text("{}")
    weights = stage / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ArtifactError) as info:
        load_model(stage / "model")
    message = str(info.value)
    assert str(stage / "model") in message and "SafetensorError" in message
    assert f"delete the stage directory {stage}" in message


def test_load_tokenizer_with_corrupt_json_names_the_file(tmp_path):
    save_tokenizer(_tokenizer(), tmp_path / "tokenizer")
    path = tmp_path / "tokenizer" / "tokenizer.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(ArtifactError, match=f"{path}: is not valid JSON"):
        load_tokenizer(tmp_path / "tokenizer")


def test_truncated_teacher_shard_is_refused_naming_it(tmp_path):
    _teacher(tmp_path)
    shard = shard_path(tmp_path, 1)
    shard.write_bytes(shard.read_bytes()[:500])
    with pytest.raises(CorruptShardError) as info:
        load_teacher_data(tmp_path)
    assert info.value.path == shard and str(shard) in str(info.value)
    assert "remove_corrupt_shards" in str(info.value)


def test_teacher_shard_with_other_content_fails_its_checksum(tmp_path):
    _teacher(tmp_path)
    shard = shard_path(tmp_path, 0)
    payload = torch.load(shard, weights_only=True)
    payload["scores"] = payload["scores"] + 1.0  # a valid shard, other numbers
    torch.save(payload, shard)
    with pytest.raises(CorruptShardError, match=f"{shard}: its content differs from the sha256"):
        load_teacher_data(tmp_path)


def test_corrupt_teacher_shard_is_removed_and_regenerated(tmp_path, caplog):
    stage = tmp_path / "teacher-stage"
    trie, vocab, prompts = _teacher(stage / "train")
    (stage / "stage.json").write_text("{}")
    expected = load_teacher_data(stage / "train").tensors
    shard_path(stage / "train", 2).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="atspeed_exp.data.teacher"):
        with pytest.raises(TeacherDataError, match="had corrupt shards .first: shard-00002.pt."):
            load_teacher_data(stage / "train", repair=True)
    assert not shard_path(stage / "train", 2).exists() and not (stage / "stage.json").exists()
    assert "removed teacher shard" in caplog.text and "shard-00002.pt" in caplog.text
    assert remove_corrupt_shards(stage / "train") == []

    model = ToyLM(vocab, seed=2)
    generate_teacher_data(model, prompts, trie, stage / "train", "toy", num_beams=5, shard_size=8, batch_size=8,
                          progress=False)
    assert model.calls == 4  # one batch of one shard: only the removed shard was recomputed
    regenerated = load_teacher_data(stage / "train").tensors
    for key in expected:
        assert torch.equal(expected[key], regenerated[key]), key


def test_generate_teacher_data_replaces_a_shard_that_fails_its_checksum(tmp_path):
    trie, vocab, prompts = _teacher(tmp_path)
    shard = shard_path(tmp_path, 0)
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    model = ToyLM(vocab, seed=2)
    generate_teacher_data(model, prompts, trie, tmp_path, "toy", num_beams=5, shard_size=8, batch_size=8,
                          progress=False)
    assert model.calls == 4
    assert len(load_teacher_data(tmp_path)) == 20


# -- checkpoints -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lightning_checkpoint(tmp_path_factory) -> Path:
    """last.ckpt of a real TargetFinetuneModule after two steps (optimizer, scheduler, hyper-parameters)."""
    return _fit_two_steps(tmp_path_factory.mktemp("ckpt"), plugins=[])


def _fit_two_steps(directory: Path, plugins: list) -> Path:
    module = TargetFinetuneModule(_tiny_model(), warmup_steps=1)
    ids = torch.randint(3, 30, (8, 6), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i : i + 4], "attention_mask": torch.ones(4, 6, dtype=torch.long),
                "labels": ids[i : i + 4]} for i in (0, 4)]
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", plugins=plugins,
                         callbacks=[pl.callbacks.ModelCheckpoint(directory, save_last=True)])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return directory / "last.ckpt"


def test_atomic_checkpoint_io_writes_beside_the_checkpoint_not_in_the_system_temp(tmp_path, monkeypatch, umask_002):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))  # where mkstemp() without dir writes
    with pytest.raises(FileNotFoundError):  # Lightning's own writer goes through the system temporary folder
        _fit_two_steps(tmp_path / "plain", plugins=[])
    atomic = _fit_two_steps(tmp_path / "atomic", plugins=[AtomicCheckpointIO()])
    assert _mode(atomic) == 0o664
    assert sorted(p.name for p in atomic.parent.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    epoch = atomic.parent / "epoch=0-step=2.ckpt"
    assert load_checkpoint_state_dict(atomic).keys() == load_checkpoint_state_dict(epoch).keys()


def test_load_checkpoint_state_dict_reads_a_lightning_checkpoint_weights_only(lightning_checkpoint):
    state = load_checkpoint_state_dict(lightning_checkpoint)
    expected = torch.load(lightning_checkpoint, weights_only=False)["state_dict"]
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert resume_checkpoint(lightning_checkpoint) == str(lightning_checkpoint)
    assert resume_checkpoint(lightning_checkpoint.with_name("absent.ckpt")) is None


def test_checkpoint_with_a_code_running_global_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hook": os.getpid}, path)  # any global outside weights_only's allow-list
    with pytest.raises(ArtifactError, match="refused by weights_only"):
        load_checkpoint_state_dict(path)


def test_corrupt_checkpoint_is_named(tmp_path, lightning_checkpoint):
    path = tmp_path / "last.ckpt"
    path.write_bytes(lightning_checkpoint.read_bytes()[:2000])
    with pytest.raises(ArtifactError, match=f"{path}: the checkpoint to resume from is truncated or corrupt"):
        resume_checkpoint(path)
    with pytest.raises(ArtifactError, match=f"{path}: is not a readable checkpoint"):
        load_checkpoint_state_dict(path)


# -- stage lock --------------------------------------------------------------------------------------------------
_BUILD_ONCE = """
import logging, sys, time
from pathlib import Path
from atspeed_exp.artifacts import stage_lock
logging.basicConfig(level=logging.INFO, format="%(message)s")
stage = Path(sys.argv[1])
with stage_lock(stage, quiet_s=0.2):
    if (stage / "stage.json").exists():
        print("reused", flush=True)
    else:
        with open(stage.parent / "builds.log", "a") as f:
            f.write("build\\n")
        time.sleep(1.5)
        stage.mkdir(parents=True, exist_ok=True)
        (stage / "stage.json").write_text("{}")
        print("built", flush=True)
"""


def _python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_stage_lock_makes_a_second_process_wait_and_reuse_the_stage(tmp_path):
    stage = tmp_path / "artifacts" / "target" / "toy-123"
    first = _python(_BUILD_ONCE, str(stage))
    _wait_for(tmp_path / "artifacts" / "target" / "builds.log")  # the first holds the lock and is building
    second = _python(_BUILD_ONCE, str(stage))
    (out1, err1), (out2, err2) = first.communicate(), second.communicate()
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert (out1.strip(), out2.strip()) == ("built", "reused")
    assert (tmp_path / "artifacts" / "target" / "builds.log").read_text() == "build\n"  # the work ran once
    assert f"waiting for {lock_path(stage)} held by pid {first.pid}" in err2


def test_stage_lock_is_released_when_its_process_is_killed(tmp_path):
    stage = tmp_path / "stage"
    holder = _python("import sys, time\nfrom atspeed_exp.artifacts import stage_lock\n"
                     "with stage_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n",
                     str(stage))
    assert holder.stdout.readline().strip() == "locked"
    with open(lock_path(stage)) as f:
        with pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.kill()
        holder.communicate()
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again: the lock died with its process


# -- paths -------------------------------------------------------------------------------------------------------
def test_paths_resolve_under_the_repository_from_another_directory(tmp_path, monkeypatch):
    from pipeline_helpers import compose_config

    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["paths.output_dir=out"])
    for key in ("data_dir", "artifacts_dir", "shared_data_dir"):
        value = Path(cfg.paths[key])
        assert value.is_absolute() and value == Path(os.path.normpath(value)), (key, value)
    assert Path(cfg.paths.data_dir) == ROOT / "data" and Path(cfg.paths.artifacts_dir) == ROOT / "artifacts"
    assert Path(cfg.paths.shared_data_dir) == ROOT / "data"
    assert Path(cfg.data.root) == ROOT / "data" / "synthetic"
