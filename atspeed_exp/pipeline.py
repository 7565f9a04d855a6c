"""The experiment pipeline: target fine-tuning -> teacher data -> draft alignment -> evaluation, with stage outputs
cached on disk.

A stage's output directory is named by a hash of exactly the settings that affect it, so a sweep over settings of
later stages reuses it, and a changed setting can never silently reuse a stale artifact. A stage is complete only
when its ``stage.json`` exists; it is written last and atomically, so a crash leaves an incomplete stage that the
next run resumes (from Lightning's ``last.ckpt``) instead of trusting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel

from atspeed_exp import artifacts, distributed, wandb_views
from atspeed_exp.artifacts import distributed_follower, load_checkpoint_state_dict, resume_checkpoint, stage_lock
from atspeed_exp.callbacks.atomic_checkpoint import AtomicCheckpointIO
from atspeed_exp.callbacks.progress import LogProgress
from atspeed_exp.callbacks.resume import MidEpochCheckpoint, ResumeState, TrainingStopped
from atspeed_exp.callbacks.speculative_eval import SpeculativeEvalCallback
from atspeed_exp.config_check import ConfigError, check_config
from atspeed_exp.data.datamodule import TargetDataModule
from atspeed_exp.data.draft_batches import DraftDataModule
from atspeed_exp.data.atspeed_format import SPLIT_FILES, build_examples, default_index_file
from atspeed_exp.data.recdata import EncodedSplit, RecData
from atspeed_exp.data.synthetic import ensure_synthetic_dataset
from atspeed_exp.data.teacher import (
    generate_teacher_data,
    load_teacher_data,
    teacher_size_bytes,
    weights_fingerprint,
)
from atspeed_exp.data.tokenizer import save_tokenizer
from atspeed_exp.decoding.drafters import (
    Drafter,
    LayerSkipDrafter,
    RetrievalDrafter,
    RetrievalPools,
    TrigramCounts,
    TrigramDrafter,
    build_retrieval_pools,
    build_trigram_counts,
)
from atspeed_exp.decoding.drafters.trigram import FORMAT_VERSION as TRIGRAM_FORMAT
from atspeed_exp.decoding.skip_search import FORMAT_VERSION as SKIP_SEARCH_FORMAT
from atspeed_exp.decoding.skip_search import SkipSearchResult, search_skip_set
from atspeed_exp.decoding.protocol import DecoderLM
from atspeed_exp.evaluation import evaluate_all_users, evaluate_speculative, generate_lists
from atspeed_exp.log_setup import quiet_wandb
from atspeed_exp.lit.draft_module import DraftAlignmentModule
from atspeed_exp.lit.target_module import TargetFinetuneModule
from atspeed_exp.metrics import most_popular_lists
from atspeed_exp.models.build import DTYPES, count_parameters, load_model, merge_lora, save_model
from atspeed_exp.models.lean import BACKENDS, decoder_for
from atspeed_exp.reporting import dataset_list_report

log = logging.getLogger(__name__)
STAGE_FILE = "stage.json"


# -- artifacts ---------------------------------------------------------------------------------------------------
def stage_key(*parts: Any) -> str:
    """A short, stable hash of the (resolved) settings that determine a stage's output."""
    blob = json.dumps([OmegaConf.to_container(p, resolve=True) if isinstance(p, DictConfig) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def write_json_atomic(path: Path, payload: dict) -> None:
    """Atomically, with the permissions of a plain open() under the umask (``artifacts.write_json_atomic``); only
    on rank 0 of a multi-process run (``is_rank_zero``)."""
    if is_rank_zero():
        artifacts.write_json_atomic(path, payload, indent=2, default=str)


# -- several processes (trainer=ddp, docs/scale.md) ---------------------------------------------------------------
# Lightning's DDP launcher starts the other ranks by running the same command again, so every rank runs the whole
# pipeline. Rank 0 writes the stages' files and logs; the fits run on all ranks together; teacher data and the
# all-users evaluation are split over the ranks (atspeed_exp.distributed); the other stages without a fit (model-free
# drafters' tables, the target's test figures) are built by rank 0 first and reused by the others.
def is_rank_zero() -> bool:
    """Lightning's rank-zero test (``rank_zero_only.rank``), and not a follower by the launchers' environment."""
    return rank_zero_only.rank == 0 and not artifacts.distributed_follower()


def sync_ranks() -> None:
    """Wait for every rank of a DDP run; nothing when torch.distributed is not initialised (one process, or before
    the first fit started the others)."""
    distributed.barrier()


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the body first; the other ranks run it after rank 0 finished (and so reuse what it built)."""
    if not is_rank_zero():
        sync_ranks()
    yield
    if is_rank_zero():
        sync_ranks()


def stage_done(stage_dir: Path) -> bool:
    return (stage_dir / STAGE_FILE).exists()


def wait_for_stage(stage_dir: Path, stage: str, poll_s: float = 2.0, report_s: float = 60.0) -> Path:
    """For a non-zero rank that runs before any process group exists (every task of a SLURM job starts at once): it
    neither builds the stage beside rank 0 nor reads it half-written, but waits until rank 0 has written its
    ``stage.json``, saying so every ``report_s`` seconds."""
    start = last = time.monotonic()
    while not stage_done(stage_dir):
        if time.monotonic() - last >= report_s:
            last = time.monotonic()
            log.info("%s stage: waiting %.0fs for rank 0 to finish %s", stage, last - start, stage_dir)
        time.sleep(poll_s)
    log.info("%s stage: reusing %s (built by rank 0)", stage, stage_dir)
    return stage_dir


def reusable(stage_dir: Path, inputs: dict[str, str], also_accepted: dict[str, str] | None = None) -> bool:
    """True when the stage is finished and was made from these ``inputs`` (fingerprints recorded in its stage.json
    under the same names). A finished stage made from other inputs (the dataset files changed in place, the target
    retrained or its weights replaced) is moved aside to ``<dir>.stale-<time>`` with a log line saying why, and the
    stage is rebuilt. Fingerprints a stage.json does not record are not checked. ``also_accepted``: an older form
    of a fingerprint that a stage made by an earlier version recorded, accepted as the same input."""
    if not stage_done(stage_dir):
        return False
    recorded = json.loads((stage_dir / STAGE_FILE).read_text())
    accepted = also_accepted or {}
    changed = [name for name, value in inputs.items()
               if name in recorded and recorded[name] != value and recorded[name] != accepted.get(name)]
    if not changed:
        return True
    stale = stage_dir.with_name(f"{stage_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    log.warning("%s was made from other inputs (%s changed since); rebuilding it, the old one is kept at %s",
                stage_dir, ", ".join(changed), stale)
    stage_dir.rename(stale)
    return False


def dataset_fingerprint(cfg: DictConfig) -> str:
    """A hash of the dataset files the pipeline reads (the three splits and the SID index: names and contents), so
    it changes when one is edited in place and not when an unrelated file is added to the folder."""
    root = data_root(cfg)
    names = [*SPLIT_FILES.values(), cfg.data.get("index_file") or default_index_file(cfg.data.name)]
    digest = hashlib.sha256()
    for path in (root / name for name in names):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def teacher_id(teacher_dir: Path) -> str:
    """The teacher data's identity: what it was made from and how (the target's id, the settings that change the
    data, and each split's manifest: examples, prompts and responses hashes, beams), not when or how fast. A teacher
    whose corrupt shard was regenerated keeps its id, so the drafts trained on it stay valid; a teacher made from
    another target, other settings or other examples gets another."""
    stage = json.loads((teacher_dir / STAGE_FILE).read_text())
    settings = {k: v for k, v in stage.get("settings", {}).items() if k not in TEACHER_SPEED_KEYS}
    manifests = {path.parent.name: json.loads(path.read_text())
                 for path in sorted(teacher_dir.glob("*/manifest.json"))}
    identity = {"target_id": stage.get("target_id"), "settings": settings, "manifests": manifests}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def legacy_teacher_id(teacher_dir: Path) -> str:
    """The teacher id earlier versions recorded in a draft's stage.json (a hash of the teacher's whole stage.json,
    timings included); still accepted for drafts made then, as long as that stage.json is unchanged."""
    return hashlib.sha256((teacher_dir / STAGE_FILE).read_bytes()).hexdigest()[:16]


def latest_checkpoint(stage_dir: Path) -> pl.callbacks.ModelCheckpoint:
    """Writes ``checkpoints/last.ckpt`` at the end of EVERY epoch (the resume point). A monitored checkpoint's
    ``save_last`` would write it only when the monitored metric improves, so an interruption after an epoch that
    did not improve would resume from an older one. One file, overwritten each epoch."""
    return pl.callbacks.ModelCheckpoint(dirpath=stage_dir / "checkpoints", filename="last", enable_version_counter=False)


def resume_callbacks(stage: str, stage_dir: Path, every_n_steps: int | None) -> list[pl.Callback]:
    """What makes a target or draft fit resume exactly from any step, mid-epoch included: ``last.ckpt`` rewritten
    every ``every_n_steps`` optimizer steps (``<stage>_training.checkpoint_every_n_steps``; None: at epoch ends
    only) and saved on SIGTERM / SIGINT before stopping, and the random states in every checkpoint
    (``atspeed_exp/callbacks/resume.py``). The sampler's position within the epoch is saved by Lightning from the
    training DataLoader (``ResumableDataLoader``)."""
    return [MidEpochCheckpoint(stage_dir / "checkpoints" / "last.ckpt", every_n_steps, stage), ResumeState()]


# training keys that change when and where a fit is checkpointed, not what it trains: not in the stage keys
RESUME_KEYS = ("checkpoint_every_n_steps",)
# settings added after stages were built with their behaviour: at these values they are left out of the stage key,
# so the stages made before they existed are still found
KEY_DEFAULTS = {"val_metric": "recall"}


def training_settings(training: DictConfig) -> dict:
    """A stage's training settings without ``RESUME_KEYS`` (and ``KEY_DEFAULTS`` keys at those values), for its
    stage key."""
    settings = OmegaConf.to_container(training, resolve=True)
    return {k: v for k, v in settings.items()
            if k not in RESUME_KEYS and not (k in KEY_DEFAULTS and v == KEY_DEFAULTS[k])}


def fit_resumable(trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule, last: Path,
                  stage: str) -> None:
    """``trainer.fit``, resumed from ``last`` when it exists. A stop by SIGTERM or SIGINT raises ``TrainingStopped``
    (exit status 128 + the signal's number) after saving ``last`` (``MidEpochCheckpoint``); Lightning's own SIGTERM
    stop, a ``SystemExit`` with status 0, becomes one too, so the stage is never taken for finished."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(last), weights_only=True)
    except SIGTERMException:  # during validation or an epoch's last batch: last.ckpt is the last one written
        where = f"resume from {last}" if last.exists() else "start it again (no checkpoint was written yet)"
        message = f"{stage} stopped by SIGTERM; rerun the same command to {where}"
        log.error(message)
        raise TrainingStopped(signal.SIGTERM, message) from None
    if trainer.interrupted:  # a stop Lightning returned from: the stage is not complete
        raise RuntimeError(f"{stage} interrupted; rerun the same command to resume from {last}")


def make_trainer(cfg: DictConfig, stage: str, callbacks: list, stage_dir: Path, **kwargs: Any) -> pl.Trainer:
    """``cfg.trainer`` with a stage's callbacks and its resume checkpoint (``latest_checkpoint``). On a terminal it
    shows Lightning's progress bar (if ``trainer.enable_progress_bar``); when the output goes to a file it logs
    progress lines with the time left instead (``LogProgress``), since a bar there is carriage returns nobody
    reads."""
    terminal = sys.stderr.isatty()
    bar = bool(cfg.trainer.get("enable_progress_bar", True)) and terminal
    extra = [latest_checkpoint(stage_dir)] + ([] if terminal else [LogProgress(stage)])
    return instantiate(cfg.trainer, enable_progress_bar=bar, callbacks=[*callbacks, *extra],
                       plugins=[AtomicCheckpointIO()], **kwargs)


# -- data --------------------------------------------------------------------------------------------------------
def data_root(cfg: DictConfig) -> Path:
    """The dataset folder; the synthetic dataset is generated there on first use."""
    root = Path(cfg.data.root)
    if cfg.data.get("synthetic"):
        with stage_lock(root):  # concurrent first runs generate it once
            return ensure_synthetic_dataset(root, cfg.data.name, **cfg.data.synthetic)
    return root


def check_data_files(cfg: DictConfig) -> None:
    """A released dataset's files must be in ``data.root`` before any stage starts: a missing folder or file is
    reported with the key to set and where the files come from (the synthetic dataset is generated instead)."""
    if cfg.data.get("synthetic"):
        return
    root = Path(cfg.data.root)
    index = cfg.data.get("index_file") or default_index_file(cfg.data.name)
    expected = [*SPLIT_FILES.values(), index]
    missing = expected if not root.is_dir() else [name for name in expected if not (root / name).is_file()]
    if missing:
        where = f"data.root={cfg.data.root!r} ({root.resolve()})"
        raise FileNotFoundError(
            f"dataset {cfg.data.name!r}: {where} {'does not exist' if not root.is_dir() else 'lacks ' + ', '.join(missing)}; "
            f"expected {', '.join(expected)} there. These files come from the AtSpeed authors' public release "
            f"(data/{cfg.data.name}/ of Linxyhaha/AtSpeed); put them in a folder and pass data.root=/path/to/it "
            f"(or set paths.shared_data_dir to the folder holding {cfg.data.name}/)"
        )


def load_data(cfg: DictConfig, tokenizer_dir: Path | None = None, cache_dir: Path | None = None) -> RecData:
    """The dataset encoded for the model's tokenizer (``tokenizer_dir``: a stage's saved one); with ``cache_dir``
    the encodings are kept there and read back by later runs (``data.encoded_cache``; written by rank 0 only)."""
    return RecData.build(
        root=data_root(cfg),
        name=cfg.data.name,
        index_file=cfg.data.get("index_file"),
        prompt_format=cfg.data.prompt_format,
        max_history=cfg.data.max_history,
        sliding_window=cfg.data.sliding_window,
        tokenizer_dir=tokenizer_dir,
        pretrained_tokenizer_dir=cfg.model.get("path") if tokenizer_dir is None else None,
        cache_dir=cache_dir,
        write_cache=is_rank_zero(),
    )


def data_settings(cfg: DictConfig) -> dict:
    """The data settings that change examples or token ids (the root by absolute path)."""
    settings = OmegaConf.to_container(cfg.data, resolve=True)
    settings["root"] = str(Path(settings["root"]).resolve())
    return settings


# -- target stage ------------------------------------------------------------------------------------------------
# Trainer arguments that change what a fit produces, with Lightning's defaults; a run that sets one of them to
# another value (e.g. +trainer.limit_train_batches=250) gets its own stage dirs. The trainer's other keys are
# hardware and logging. ``devices`` counts because under DDP each process trains its own batches (a step averages
# over devices x batch_size examples); its default here is the single process every non-DDP config sets.
TRAINER_OUTPUT_DEFAULTS = {
    "limit_train_batches": None, "limit_val_batches": None, "max_steps": -1, "min_epochs": None, "min_steps": None,
    "accumulate_grad_batches": 1, "check_val_every_n_epoch": 1, "val_check_interval": None,
    "gradient_clip_algorithm": None, "deterministic": None, "benchmark": None, "precision": "32-true",
    "devices": 1, "num_nodes": 1, "strategy": "auto", "overfit_batches": 0.0, "max_time": None,
}


def trainer_key(cfg: DictConfig) -> tuple:
    """The output-changing trainer settings that differ from Lightning's defaults (empty for the shipped configs,
    so their stage keys are unchanged), as key parts."""
    values = {k: OmegaConf.select(cfg.trainer, k, default=default) for k, default in TRAINER_OUTPUT_DEFAULTS.items()}
    changed = {k: v for k, v in values.items() if v != TRAINER_OUTPUT_DEFAULTS[k]}
    return (changed,) if changed else ()


def target_stage_dir(cfg: DictConfig) -> Path:
    key = stage_key(data_settings(cfg), cfg.model, training_settings(cfg.target_training), cfg.trainer.precision,
                    cfg.seed, *trainer_key(cfg))
    return Path(cfg.paths.artifacts_dir) / "target" / f"{cfg.data.name}-{key}"


def train_target(cfg: DictConfig, logger: Any, extra_callbacks: list | None = None) -> tuple[Path, RecData]:
    """Fine-tune the target (or reuse a finished run of the same settings); returns its stage dir and the data.
    An interrupted run leaves ``checkpoints/last.ckpt``; the next run with the same settings resumes from it.
    Concurrent runs of the same settings build it once (``stage_lock``)."""
    with stage_lock(target_stage_dir(cfg)):
        out = _train_target(cfg, logger, extra_callbacks)
    sync_ranks()  # the other ranks go on once rank 0 has written the stage
    return out


def _train_target(cfg: DictConfig, logger: Any, extra_callbacks: list | None = None) -> tuple[Path, RecData]:
    stage_dir = target_stage_dir(cfg)
    tokenizer_dir = stage_dir / "tokenizer"
    fingerprint = dataset_fingerprint(cfg)
    if reusable(stage_dir, {"dataset_sha": fingerprint}):
        log.info("target stage: reusing %s", stage_dir)
        return stage_dir, load_data(cfg, tokenizer_dir, stage_dir / "encoded")

    data = load_data(cfg, tokenizer_dir if tokenizer_dir.exists() else None, stage_dir / "encoded")
    if not tokenizer_dir.exists() and is_rank_zero():  # saved before training so a resumed run gets identical ids
        save_tokenizer(data.tokenizer, tokenizer_dir)
    pl.seed_everything(cfg.seed, workers=True)
    sid_token_ids = list(range(data.sid_index.level_blocks[0][0], data.sid_index.level_blocks[-1][1]))
    model = instantiate(cfg.model, tokenizer=data.tokenizer, sid_token_ids=sid_token_ids)
    log.info("target model: %s", count_parameters(model))

    training = cfg.target_training
    valid = data.splits["valid"]
    val_users = min(training.val_users, len(valid)) if training.val_users else len(valid)
    module = TargetFinetuneModule(
        model,
        lr=training.lr,
        weight_decay=training.weight_decay,
        betas=tuple(training.betas),
        warmup_steps=training.warmup_steps,
        min_lr_ratio=training.min_lr_ratio,
        val_prompts=valid.prompts[:val_users],
        val_ground_truth=valid.ground_truth()[:val_users],
        trie=data.trie(),
        pad_id=data.pad_id,
        val_beams=training.val_beams,
        val_batch_size=cfg.eval.batch_size,
    )
    datamodule = TargetDataModule(
        data, batch_size=training.batch_size, eval_batch_size=cfg.eval.batch_size, val_limit=val_users,
        seed=cfg.seed,
    )
    monitor = f"target/val_{training.get('val_metric', 'recall')}@{training.val_beams}"
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=stage_dir / "checkpoints", filename="best", monitor=monitor, mode="max",
        enable_version_counter=False,  # a resumed run overwrites best/last instead of writing best-v1
    )
    callbacks = [*resume_callbacks("target training", stage_dir, training.get("checkpoint_every_n_steps")), checkpoint,
                 *([pl.callbacks.LearningRateMonitor("step")] if logger else []), *(extra_callbacks or [])]
    trainer = make_trainer(
        cfg, "target", callbacks, stage_dir,
        max_epochs=training.max_epochs, gradient_clip_val=training.gradient_clip_val, logger=logger,
    )
    last = stage_dir / "checkpoints" / "last.ckpt"
    start = time.perf_counter()
    fit_resumable(trainer, module, datamodule, last, "target training")
    train_seconds = time.perf_counter() - start

    best = checkpoint.best_model_path
    if best:
        module.load_state_dict(load_checkpoint_state_dict(best))
    if is_rank_zero():
        save_model(module.model, stage_dir / "model", tokenizer=data.tokenizer)
    write_json_atomic(
        stage_dir / STAGE_FILE,
        {
            "stage": "target",
            "dataset_sha": fingerprint,
            "settings": {"data": data_settings(cfg), "model": OmegaConf.to_container(cfg.model, resolve=True),
                         "target_training": OmegaConf.to_container(cfg.target_training, resolve=True),
                         "seed": cfg.seed},
            "best_checkpoint": best,
            "best_score": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
            "monitor": monitor,
            "train_seconds_this_run": train_seconds,
            "parameters": count_parameters(module.model),
        },
    )
    return stage_dir, data


def load_target(stage_dir: Path, device: str = "cpu", dtype: str = "float32", backend: str = "auto") -> DecoderLM:
    """The saved model of a stage, in eval mode, behind the decoding protocol (``decoder_for``'s ``backend``)."""
    model = load_model(stage_dir / "model")
    if isinstance(model, PeftModel):  # unmerged token-row wrappers copy whole matrices on every forward
        model = merge_lora(model)
    return decoder_for(model.to(device=device, dtype=DTYPES[dtype]).eval(), backend)


def eval_backend(cfg: DictConfig) -> str:
    """The forward pass used for decoding (``eval.backend``): auto | lean | hf."""
    backend = cfg.eval.get("backend", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"eval.backend={backend!r}: expected one of {list(BACKENDS)}")
    return backend


def eval_dtype(cfg: DictConfig) -> str:
    """Decoding weights: bfloat16 on CUDA and float32 on CPU unless ``eval.dtype`` says otherwise."""
    dtype = cfg.eval.get("dtype", "auto")
    if dtype == "auto":
        return "bfloat16" if eval_device(cfg) == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"eval.dtype={dtype!r}: expected auto or one of {sorted(DTYPES)}")
    return dtype


# -- teacher stage -----------------------------------------------------------------------------------------------
def teacher_split(cfg: DictConfig, data: RecData, split: str, limit: int | None) -> EncodedSplit:
    """The examples teacher data is made for: one per user (the paper's examples, not sliding windows)."""
    examples = build_examples(data.dataset, split, max_history=cfg.data.max_history, sliding_window=False)
    return data.encode(examples[:limit] if limit else examples)


def target_id(target_dir: Path) -> str:
    return f"{target_dir.name}:{weights_fingerprint(target_dir / 'model')}"


# teacher settings that change how the data is made, not what it is (strict SD returns the target's own beams)
TEACHER_SPEED_KEYS = ("draft_dir", "draft_beams", "draft_gamma")


def teacher_stage_dir(cfg: DictConfig, target_dir: Path) -> Path:
    settings = {k: v for k, v in OmegaConf.to_container(cfg.teacher, resolve=True).items()
                if k not in TEACHER_SPEED_KEYS}
    return Path(cfg.paths.artifacts_dir) / "teacher" / f"{target_dir.name}-{stage_key(settings)}"


def make_teacher(cfg: DictConfig, target_dir: Path, data: RecData) -> Path:
    """Teacher data for the training (and a few validation) examples; resumes shard by shard. Under DDP (a process
    group initialised by an earlier fit) every rank generates its share of the shards (``generate_teacher_data``),
    rank 0 holding the stage lock and writing the manifests and ``stage.json``."""
    stage_dir = teacher_stage_dir(cfg, target_dir)
    if distributed.rank_and_world()[1] == 1:
        if distributed_follower():  # a launcher's other rank before any fit made the group (SLURM starts all tasks)
            return wait_for_stage(stage_dir, "teacher")
        with rank_zero_first(), stage_lock(stage_dir):
            return _make_teacher(cfg, target_dir, data)
    with stage_lock(stage_dir):  # held by rank 0 for the group (the other ranks take none)
        with rank_zero_first():  # rank 0 decides on reuse first (and moves a stale stage aside)
            reuse = reusable(stage_dir, {"target_id": target_id(target_dir)})
        _make_teacher(cfg, target_dir, data, reuse)
    sync_ranks()  # every rank reads the stage.json rank 0 wrote
    return stage_dir


def _make_teacher(cfg: DictConfig, target_dir: Path, data: RecData, reuse: bool | None = None) -> Path:
    stage_dir = teacher_stage_dir(cfg, target_dir)
    if reuse if reuse is not None else reusable(stage_dir, {"target_id": target_id(target_dir)}):
        log.info("teacher stage: reusing %s", stage_dir)
        return stage_dir
    target = load_target(target_dir, eval_device(cfg), backend=eval_backend(cfg))
    draft = None
    if cfg.teacher.get("draft_dir"):
        draft_dir = Path(cfg.teacher.draft_dir)
        if not (draft_dir / "model").is_dir():
            raise FileNotFoundError(f"teacher.draft_dir={str(draft_dir)!r}: expected a draft stage dir holding model/")
        draft = load_target(draft_dir, eval_device(cfg), backend=eval_backend(cfg))
        log.info("teacher stage: beams by strict speculative beam search with the draft %s", draft_dir)
    trie = data.trie().to(target.device)
    start = time.perf_counter()
    for split, limit in (("train", cfg.teacher.max_examples), ("valid", cfg.teacher.max_val_examples)):
        encoded = teacher_split(cfg, data, split, limit)
        generate_teacher_data(
            target, encoded.prompts, trie, stage_dir / split, target_id(target_dir),
            num_beams=cfg.teacher.num_beams, shard_size=cfg.teacher.shard_size, batch_size=cfg.teacher.batch_size,
            pad_id=data.pad_id, responses=encoded.responses, draft=draft,
            draft_beams=cfg.teacher.get("draft_beams", 40), gamma=cfg.teacher.get("draft_gamma", 3),
            full_vocab_gt=cfg.teacher.get("full_vocab_gt", False),
        )
    write_json_atomic(stage_dir / STAGE_FILE, {
        "stage": "teacher",
        "target_id": target_id(target_dir),
        "settings": OmegaConf.to_container(cfg.teacher, resolve=True),
        "seconds_this_run": time.perf_counter() - start,
        "size_bytes": {split: teacher_size_bytes(stage_dir / split) for split in ("train", "valid")},
    })
    return stage_dir


# -- draft stage -------------------------------------------------------------------------------------------------
def draft_stage_dir(cfg: DictConfig, teacher_dir: Path) -> Path:
    key = stage_key(cfg.draft, cfg.alignment, training_settings(cfg.draft_training), cfg.decoding.beam_size,
                    cfg.seed, *trainer_key(cfg))
    label = cfg.alignment.get("name", cfg.alignment.objective)
    return Path(cfg.paths.artifacts_dir) / "draft" / f"{teacher_dir.name}-{label}-{key}"


def check_vocabulary_match(target_dir: Path, draft: torch.nn.Module, tokenizer: Any) -> None:
    """Target and draft must share one tokenizer: the verify step compares their token ids directly."""
    vocab = draft.get_input_embeddings().weight.shape[0]
    if vocab != len(tokenizer):
        raise ValueError(
            f"draft vocabulary ({vocab} ids) does not match the target's tokenizer at {target_dir / 'tokenizer'} "
            f"({len(tokenizer)} ids); build the draft from the target's tokenizer"
        )


def train_draft(cfg: DictConfig, target_dir: Path, teacher_dir: Path, data: RecData, logger: Any,
                extra_callbacks: list | None = None) -> Path:
    """Align a draft to the target on the teacher data (or keep it untrained for ``alignment=none``). An interrupted
    run leaves ``checkpoints/last.ckpt``; the next run with the same settings resumes from it."""
    with stage_lock(draft_stage_dir(cfg, teacher_dir)):
        out = _train_draft(cfg, target_dir, teacher_dir, data, logger, extra_callbacks)
    sync_ranks()  # the other ranks go on once rank 0 has written the stage
    return out


def _train_draft(cfg: DictConfig, target_dir: Path, teacher_dir: Path, data: RecData, logger: Any,
                 extra_callbacks: list | None = None) -> Path:
    stage_dir = draft_stage_dir(cfg, teacher_dir)
    if reusable(stage_dir, {"target_id": target_id(target_dir), "teacher_id": teacher_id(teacher_dir)},
                also_accepted={"teacher_id": legacy_teacher_id(teacher_dir)}):
        log.info("draft stage: reusing %s", stage_dir)
        return stage_dir
    draft_seed = cfg.draft_training.get("seed", cfg.seed)
    pl.seed_everything(draft_seed, workers=True)
    draft = instantiate(cfg.draft, tokenizer=data.tokenizer, sid_token_ids=[])
    check_vocabulary_match(target_dir, draft, data.tokenizer)
    objective = cfg.alignment.objective
    start = time.perf_counter()
    history: list[dict[str, float]] = []
    if objective != "none":
        training = cfg.draft_training
        teacher = load_teacher_data(teacher_dir / "train", target_id=target_id(target_dir),
                                    num_beams=cfg.teacher.num_beams, repair=True)
        val_teacher = load_teacher_data(teacher_dir / "valid", target_id=target_id(target_dir), repair=True)
        datamodule = DraftDataModule(
            teacher_split(cfg, data, "train", cfg.teacher.max_examples), teacher,
            teacher_split(cfg, data, "valid", cfg.teacher.max_val_examples), val_teacher,
            level_blocks=data.sid_index.level_blocks, pad_id=data.pad_id, batch_size=training.batch_size,
            seed=draft_seed,
        )
        alignment = OmegaConf.to_container(cfg.alignment, resolve=True)
        alignment.pop("name", None)  # a label, not a module argument
        module = DraftAlignmentModule(
            draft, data.sid_index.level_blocks, lr=training.lr, weight_decay=training.weight_decay,
            warmup_steps=training.warmup_steps, min_lr_ratio=training.min_lr_ratio, **alignment,
        )
        target = load_target(target_dir, eval_device(cfg), backend=eval_backend(cfg))
        if module.hparams.on_policy_ratio > 0:
            module.attach_target(target, data.trie().to(target.device))
        valid = data.splits["valid"]
        users = min(training.eval_users, len(valid))
        callback = SpeculativeEvalCallback(
            target, valid.prompts[:users], valid.ground_truth()[:users], data.trie().to(target.device),
            every_n_epochs=training.eval_every_n_epochs, ks=(cfg.decoding.beam_size,), backend=eval_backend(cfg),
            **decoding_settings(cfg),
        )
        resume = resume_callbacks("draft training", stage_dir, training.get("checkpoint_every_n_steps"))
        trainer = make_trainer(cfg, "draft", [*resume, callback, *(extra_callbacks or [])], stage_dir,
                               max_epochs=training.max_epochs, gradient_clip_val=training.gradient_clip_val,
                               logger=logger)
        last = stage_dir / "checkpoints" / "last.ckpt"
        fit_resumable(trainer, module, datamodule, last, "draft training")
        draft, history = module.model, callback.history
    if is_rank_zero():
        save_model(draft, stage_dir / "model")
    write_json_atomic(stage_dir / STAGE_FILE, {
        "stage": "draft",
        "objective": objective,
        "target_id": target_id(target_dir),
        "teacher_id": teacher_id(teacher_dir),
        "teacher_dir": str(teacher_dir),
        "settings": {key: OmegaConf.to_container(cfg[key], resolve=True)
                     for key in ("draft", "alignment", "draft_training", "decoding")},
        "train_seconds_this_run": time.perf_counter() - start,
        "parameters": count_parameters(draft),
        "eval_history": history,
    })
    return stage_dir


# -- retrieval drafter stage -------------------------------------------------------------------------------------
RETRIEVAL_POOLS_FILE = "pools.pt"


MODEL_FREE_DRAFTERS = ("retrieval", "trigram")  # built from the training split: no teacher data, no draft training


def drafter_name(cfg: DictConfig) -> str:
    """``decoding.drafter``: where drafts come from (model: the draft stage's model; retrieval: pools; trigram:
    tri-gram counts; layer_skip: the target with sublayers skipped)."""
    return cfg.decoding.get("drafter", "model")


def retrieval_stage_dir(cfg: DictConfig) -> Path:
    key = stage_key(data_settings(cfg), cfg.decoding.retrieval, cfg.seed)
    return Path(cfg.paths.artifacts_dir) / "retrieval" / f"{cfg.data.name}-{key}"


def training_sid_histories(data: RecData) -> list[torch.Tensor]:
    """Per training user (ascending user id): the SIDs of their training items as token ids ``[n_u, L]``."""
    row_of = {int(item): row for row, item in enumerate(data.sid_index.item_ids.tolist())}
    tokens = data.sid_index.item_token_ids
    return [tokens[[row_of[i] for i in items if i in row_of]] for _, items in sorted(data.dataset.train.items())]


def build_table_stage(cfg: DictConfig, data: RecData, stage: str, stage_dir: Path, filename: str, settings: dict,
                      build: Callable[[list[torch.Tensor]], Any], report: Callable[[Any], dict]) -> Path:
    """A model-free drafter's table (pools, counts) built from the training split's SID histories, or a finished
    build of the same dataset and settings: ``build(histories)`` gives an object with ``save(file)``, written
    atomically to ``filename``, then ``stage.json`` with ``settings`` and the figures ``report(table)`` gives.
    Concurrent runs build it once (``stage_lock``); under DDP rank 0 builds first."""
    with rank_zero_first(), stage_lock(stage_dir):
        fingerprint = dataset_fingerprint(cfg)
        if reusable(stage_dir, {"dataset_sha": fingerprint}):
            log.info("%s: reusing %s", stage, stage_dir)
            return stage_dir
        histories = training_sid_histories(data)
        start = time.perf_counter()
        table = build(histories)
        seconds = time.perf_counter() - start
        path = artifacts.atomic_write(stage_dir / filename, table.save, mode="wb")
        figures = report(table)
        log.info("%s: %s, built in %.1f s: %s", stage, ", ".join(f"{k} {v}" for k, v in figures.items()), seconds,
                 path)
        write_json_atomic(stage_dir / STAGE_FILE, {
            "stage": stage, "dataset_sha": fingerprint, "settings": settings, "users": len(histories), **figures,
            "size_bytes": path.stat().st_size, "build_seconds": seconds,
        })
        return stage_dir


def build_retrieval(cfg: DictConfig, data: RecData) -> Path:
    """The retrieval drafter's pools for this dataset and ``decoding.retrieval``: ``pools.pt`` (``RetrievalPools``)."""
    settings = OmegaConf.to_container(cfg.decoding.retrieval, resolve=True)
    return build_table_stage(
        cfg, data, "retrieval", retrieval_stage_dir(cfg), RETRIEVAL_POOLS_FILE,
        {"data": data_settings(cfg), "retrieval": settings, "seed": cfg.seed},
        lambda histories: build_retrieval_pools(histories, data.trie(), seed=cfg.seed, **settings),
        lambda pools: {"grouped_users": int(pools.group_sizes.sum()), "group_sizes": pools.group_sizes.tolist(),
                       "continuations": pools.codes.numel()},
    )


# -- tri-gram drafter stage ----------------------------------------------------------------------------------------
TRIGRAM_COUNTS_FILE = "counts.pt"


def trigram_stage_dir(cfg: DictConfig) -> Path:
    """The counts depend on the dataset alone (``decoding.trigram`` only changes how they are used)."""
    key = stage_key(data_settings(cfg), {"trigram_format": TRIGRAM_FORMAT})
    return Path(cfg.paths.artifacts_dir) / "trigram" / f"{cfg.data.name}-{key}"


def build_trigram(cfg: DictConfig, data: RecData) -> Path:
    """The tri-gram drafter's counts of this dataset's training split: ``counts.pt`` (``TrigramCounts``)."""
    return build_table_stage(
        cfg, data, "trigram", trigram_stage_dir(cfg), TRIGRAM_COUNTS_FILE,
        {"data": data_settings(cfg), "trigram_format": TRIGRAM_FORMAT},
        lambda histories: build_trigram_counts(histories, data.trie()),
        lambda counts: {"tokens": int(counts.unigram.sum()), "contexts": counts.used,
                        "trigrams": counts.state()["trigram_keys"].numel()},
    )


def trigram_settings(cfg: DictConfig) -> dict[str, Any]:
    """``decoding.trigram``: how the drafter uses its counts (``TrigramDrafter``'s arguments)."""
    return OmegaConf.to_container(cfg.decoding.trigram, resolve=True)


# -- layer-skip drafter stage --------------------------------------------------------------------------------------
LAYER_SKIP_FILE = "skip_set.json"


def layer_skip_search_settings(cfg: DictConfig) -> dict[str, Any]:
    """What the skip-set search's result depends on besides the target (``decoding.layer_skip`` search keys and the
    decoding settings it decodes with)."""
    layer_skip = cfg.decoding.layer_skip
    return {
        "users": layer_skip.search_users, "mode": layer_skip.search_mode, "max_skipped": layer_skip.max_skipped,
        "num_beams": cfg.decoding.beam_size, "draft_beams": cfg.decoding.draft_beams, "gamma": cfg.decoding.gamma,
        "scope": cfg.decoding.get("scope", "vocab"), "seed": cfg.seed, "format": SKIP_SEARCH_FORMAT,
        # how it decodes: batching, precision and kernels can break near-ties differently
        "batch_size": cfg.eval.batch_size, "dtype": eval_dtype(cfg), "backend": eval_backend(cfg),
        "device": eval_device(cfg),
    }


def layer_skip_stage_dir(cfg: DictConfig, target_dir: Path) -> Path:
    """The skip-set search of this target and these settings (the target's dir name carries the dataset's key)."""
    key = stage_key(layer_skip_search_settings(cfg))
    return Path(cfg.paths.artifacts_dir) / "layer_skip" / f"{target_dir.name}-{key}"


def build_layer_skip(cfg: DictConfig, target_dir: Path, data: RecData) -> Path:
    """The skip set ``search_skip_set`` finds for this target on the first ``search_users`` validation users:
    ``skip_set.json`` (``SkipSearchResult``: the set, its figures and the objective trace). Reused while the
    target's weights are the same; concurrent runs search once (``stage_lock``); under DDP rank 0 searches first."""
    stage_dir = layer_skip_stage_dir(cfg, target_dir)
    with rank_zero_first(), stage_lock(stage_dir):
        if reusable(stage_dir, {"target_id": target_id(target_dir)}):
            log.info("layer_skip: reusing %s", stage_dir)
            return stage_dir
        settings = layer_skip_search_settings(cfg)
        device = settings["device"]
        target = load_target(target_dir, device, settings["dtype"], settings["backend"])
        prompts = [torch.tensor(p, dtype=torch.long) for p in data.splits["valid"].prompts[:settings["users"]]]
        start = time.perf_counter()
        result = search_skip_set(
            target, prompts, data.trie().to(device), data.pad_id, settings["num_beams"], settings["draft_beams"],
            settings["gamma"], mode=settings["mode"], seed=settings["seed"], max_skipped=settings["max_skipped"],
            batch_size=settings["batch_size"], scope=settings["scope"],
        )
        seconds = time.perf_counter() - start
        path = artifacts.atomic_write(stage_dir / LAYER_SKIP_FILE, result.save)
        best = result.best
        log.info("layer_skip: skip attention %s, MLP %s (objective %.3f target calls per list, acceptance %.3f, "
                 "%d sets measured in %.1f s): %s", list(best.skip_attention), list(best.skip_mlp), best.objective,
                 best.acceptance_rate, len(result.trace), seconds, path)
        write_json_atomic(stage_dir / STAGE_FILE, {
            "stage": "layer_skip", "target_id": target_id(target_dir), "settings": settings,
            "best": result.state()["best"], "measured_sets": len(result.trace),
            "search_seconds": seconds,
        })
        return stage_dir


def layer_skip_drafter(cfg: DictConfig, target: DecoderLM, draft_dir: Path | None) -> LayerSkipDrafter:
    """The layer-skip drafter over ``target``: the searched set of ``draft_dir`` (a layer_skip stage) with
    ``decoding.layer_skip.search``, else the configured ``skip_attention`` / ``skip_mlp``."""
    layer_skip = cfg.decoding.layer_skip
    if layer_skip.search:
        if draft_dir is None or not (draft_dir / LAYER_SKIP_FILE).is_file():
            raise FileNotFoundError(f"decoding.layer_skip.search=true: no {LAYER_SKIP_FILE} in {draft_dir}")
        result = SkipSearchResult.from_state(json.loads((draft_dir / LAYER_SKIP_FILE).read_text()))
        return LayerSkipDrafter(target, result.skip_attention, result.skip_mlp)
    return LayerSkipDrafter(target, layer_skip.skip_attention, layer_skip.skip_mlp)


def load_drafter(cfg: DictConfig, draft_dir: Path | None, device: str, dtype: str, backend: str,
                 target: DecoderLM | None = None) -> DecoderLM | Drafter:
    """The drafter ``decoding.drafter`` names, from its stage dir: the draft model (a ``DecoderLM``, which the
    engine drafts with), the retrieval drafter over the stage's pools, the tri-gram drafter over its counts, or the
    layer-skip drafter over ``target`` (the loaded target: the draft shares its weights)."""
    if drafter_name(cfg) == "layer_skip":
        if target is None:
            raise ValueError("decoding.drafter=layer_skip drafts with the target: pass the loaded target")
        return layer_skip_drafter(cfg, target, draft_dir)
    if drafter_name(cfg) == "retrieval":
        return RetrievalDrafter(RetrievalPools.load(draft_dir / RETRIEVAL_POOLS_FILE).to(device))
    if drafter_name(cfg) == "trigram":
        return TrigramDrafter(TrigramCounts.load(draft_dir / TRIGRAM_COUNTS_FILE).to(device), **trigram_settings(cfg))
    return load_target(draft_dir, device, dtype, backend)


# -- evaluation --------------------------------------------------------------------------------------------------
def make_processors(cfg: DictConfig) -> tuple:
    """The score processors ``decoding.processors`` names, in order (``decoding/processors/``); cf_assistant's
    item probabilities come from the trained ``sasrec`` stage of this config."""
    from atspeed_exp.decoding.processors import PROCESSORS, CFAssistant, GhostDebias

    made = []
    for name in cfg.decoding.get("processors") or ():
        if name not in PROCESSORS:
            raise ValueError(f"decoding.processors: unknown {name!r}; expected some of {sorted(PROCESSORS)}")
        if name == GhostDebias.name:
            made.append(GhostDebias(cfg.decoding.get("ghost_threshold")))
        elif name == CFAssistant.name:
            made.append(CFAssistant(cfg.decoding.cf_weight, cf_source(cfg), cfg.decoding.cf_epsilon))
        else:
            made.append(PROCESSORS[name]())
    return tuple(made)


def cf_source(cfg: DictConfig) -> Any:
    """The collaborative item probabilities of ``cf_assistant``: the ``sasrec`` stage's model, which must exist."""
    from atspeed_exp.baselines import SASRecItemProbabilities, load_sasrec, sasrec_stage_dir

    stage_dir = sasrec_stage_dir(cfg)
    if not stage_done(stage_dir):
        raise FileNotFoundError(f"decoding.processors=[cf_assistant] needs the trained sasrec stage ({stage_dir}); "
                                f"add sasrec to stages")
    return SASRecItemProbabilities(load_sasrec(stage_dir))


def check_processor_inputs(cfg: DictConfig) -> None:
    """Before any work: ``cf_assistant`` reads SASRec's item probabilities, so the run either builds the sasrec stage
    (``sasrec`` in ``stages``) or finds it already built with these settings; ConfigError otherwise."""
    processors = list(cfg.decoding.get("processors") or ())
    if "cf_assistant" not in processors or "sasrec" in cfg.stages:
        return
    from atspeed_exp.baselines import sasrec_stage_dir

    stage_dir = sasrec_stage_dir(cfg)
    if not stage_done(stage_dir):
        raise ConfigError(f"decoding.processors={processors} with stages={list(cfg.stages)}: cf_assistant needs "
                          f"SASRec's item probabilities and no sasrec stage of these settings is built ({stage_dir}); "
                          f"add sasrec to stages")


def processor_settings(cfg: DictConfig) -> list:
    """What the configured processors change in the lists (a cache key part): their names and settings, the
    SASRec stage behind cf_assistant."""
    processors = list(cfg.decoding.get("processors") or ())
    settings = [*processors, cfg.decoding.get("ghost_threshold")]
    if "cf_assistant" in processors:
        from atspeed_exp.baselines import sasrec_stage_dir

        stage_dir = sasrec_stage_dir(cfg)
        weights = stage_dir / "model.pt"  # the stage's weights, not only its name: a retrained SASRec is another input
        settings += [cfg.decoding.cf_weight, cfg.decoding.cf_epsilon,
                     f"{stage_dir.name}:{artifacts.sha256_file(weights)[:16] if weights.exists() else 'unbuilt'}"]
    return settings


def decoding_settings(cfg: DictConfig) -> dict[str, Any]:
    """The speculative-decoding settings shared by the training callback and the final evaluation."""
    return {
        "processors": make_processors(cfg),
        "modes": tuple(cfg.decoding.modes), "draft_beams": cfg.decoding.draft_beams, "gamma": cfg.decoding.gamma,
        "seed": cfg.seed, "verify_beams": cfg.decoding.get("verify_beams"),
        "scope": cfg.decoding.get("scope", "vocab"), "prune": cfg.decoding.get("prune_caches", True),
        "official_top_k": cfg.decoding.get("official_top_k", 50),
        "verify_options": {"dare_top_k": cfg.decoding.get("dare_top_k"),
                           "dare_threshold": cfg.decoding.get("dare_threshold", 0.0)},
    }


def evaluate_draft(cfg: DictConfig, target_dir: Path, draft_dir: Path | None, data: RecData) -> dict[str, float]:
    """Final speculative evaluation on test users: every configured mode and K, against target-only beam search
    measured in the same call (``evaluate_speculative``)."""
    device, dtype, backend = eval_device(cfg), eval_dtype(cfg), eval_backend(cfg)
    target = load_target(target_dir, device, dtype, backend)
    draft = load_drafter(cfg, draft_dir, device, dtype, backend, target=target)
    test = data.splits["test"]
    users = min(cfg.eval.speculative_users, len(test)) if cfg.eval.speculative_users else len(test)
    return evaluate_speculative(
        target, draft, test.prompts[:users], test.ground_truth()[:users], data.trie().to(device),
        ks=tuple(cfg.decoding.ks), cutoffs=tuple(cfg.eval.cutoffs), batch_size=cfg.eval.get("throughput_batch_size"),
        pad_id=data.pad_id, **decoding_settings(cfg),
    )


def evaluate_draft_all_users(cfg: DictConfig, target_dir: Path, draft_dir: Path | None, data: RecData
                             ) -> dict[str, float]:
    """Calls, acceptance, overlap with beam search and accuracy on every test user (``eval.max_users`` caps it),
    batched, with 95% bootstrap intervals over users (``evaluate_all_users``). Under DDP the ranks share the
    passes that split exactly (``order_independent``) and every rank gets the one-process figures."""
    device, dtype, backend = eval_device(cfg), eval_dtype(cfg), eval_backend(cfg)
    target = load_target(target_dir, device, dtype, backend)
    draft = load_drafter(cfg, draft_dir, device, dtype, backend, target=target)
    test = data.splits["test"]
    users = min(cfg.eval.max_users, len(test)) if cfg.eval.max_users else len(test)
    settings = decoding_settings(cfg)
    return evaluate_all_users(
        target, draft, test.prompts[:users], test.ground_truth()[:users], data.trie().to(device), data.pad_id,
        modes=settings["modes"], ks=tuple(cfg.decoding.ks), cutoffs=tuple(cfg.eval.cutoffs),
        batch_size=cfg.eval.batch_size, draft_beams=settings["draft_beams"], gamma=settings["gamma"],
        verify_beams=settings["verify_beams"], scope=settings["scope"], prune=settings["prune"], seed=cfg.seed,
        resamples=cfg.eval.get("bootstrap_resamples", 1000), official_top_k=settings["official_top_k"],
        verify_options=settings["verify_options"], batch1_users=min(users, cfg.eval.get("batch1_users") or 0),
        processors=settings["processors"], beam_lists=cached_target_lists(cfg, target_dir, users), sharded=True,
    )


ALL_USERS_COLUMNS = ("target_calls_per_list", "acceptance_rate", "overlap")


def all_users_table(metrics: dict[str, float], modes: tuple[str, ...], ks: tuple[int, ...]) -> list[dict]:
    """One row per (mode, K) of the all-users evaluation: each figure with its 95% interval."""
    rows = []
    for k in ks:
        for mode in ("beam", *modes):
            key = f"eval/all/{mode}/k{k}"
            row: dict[str, Any] = {"mode": mode, "k": k}
            names = (*(ALL_USERS_COLUMNS if mode != "beam" else ()), f"recall@{k}", f"ndcg@{k}",
                     *((f"recall@{k}_change",) if mode != "beam" else ()))
            for name in names:
                row[name] = metrics.get(f"{key}/{name}", float("nan"))
                row[f"{name}_lo95"] = metrics.get(f"{key}/{name}_lo95", float("nan"))
                row[f"{name}_hi95"] = metrics.get(f"{key}/{name}_hi95", float("nan"))
            if mode == "beam" and f"{key}/batch1_users" in metrics:  # batch invariance of the beam lists
                row["batch1_mismatches"] = metrics[f"{key}/batch1_mismatches"]
                row["batch1_users"] = metrics[f"{key}/batch1_users"]
            rows.append(row)
    return rows


def speculative_table(metrics: dict[str, float], modes: tuple[str, ...], ks: tuple[int, ...]) -> list[dict]:
    """One row per (mode, K) of the final evaluation: the numbers the paper's figures plot."""
    rows = []
    for k in ks:
        for mode in ("beam", *modes):
            key = f"eval/{mode}/k{k}"
            rows.append({
                "mode": mode,
                "k": k,
                "speedup": metrics.get(f"{key}/speedup", 1.0),
                "speedup_mean_ratio": metrics.get(f"{key}/speedup_mean_ratio", 1.0),
                "target_calls_per_list": metrics.get(f"{key}/target_calls_per_list", 4.0),
                "draft_calls_per_list": metrics.get(f"{key}/draft_calls_per_list", 0.0),
                "acceptance_rate": metrics.get(f"{key}/acceptance_rate", float("nan")),
                "walltime_ms": 1000 * metrics[f"{key}/walltime_s"],
                f"recall@{k}": metrics.get(f"{key}/recall@{k}", float("nan")),
                f"ndcg@{k}": metrics.get(f"{key}/ndcg@{k}", float("nan")),
                "throughput_lists_per_s": metrics.get(f"{key}/throughput_lists_per_s", float("nan")),
            })
    return rows


def eval_device(cfg: DictConfig) -> str:
    if cfg.eval.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.eval.device


def target_list_settings(cfg: DictConfig, stage_dir: Path, users: int) -> dict[str, Any]:
    """What the target's beam-search lists on the first ``users`` test users depend on besides K: the weights, the
    batching (ties can break differently), dtype, backend, device, scope and score processors."""
    settings = {"users": users, "batch_size": cfg.eval.batch_size, "dtype": eval_dtype(cfg),
                "backend": eval_backend(cfg), "device": eval_device(cfg), "scope": cfg.decoding.get("scope", "vocab"),
                "weights": weights_fingerprint(stage_dir / "model")}
    if cfg.decoding.get("processors"):  # the lists follow the processed scores (absent: the keys of older caches)
        settings["processors"] = processor_settings(cfg)
    return settings


def cached_target_lists(cfg: DictConfig, stage_dir: Path, users: int
                        ) -> Callable[[int, Callable[[], torch.Tensor]], torch.Tensor]:
    """``evaluate_all_users``' ``beam_lists``: the target's beam-search lists at K are kept in its stage dir
    (``eval/beam-lists-<key>.pt``, keyed by K and ``target_list_settings``), so every evaluation of another draft,
    objective or rule on the same target reads them instead of decoding every user again."""
    settings = {"version": 1, **target_list_settings(cfg, stage_dir, users)}

    def lists(k: int, decode: Callable[[], torch.Tensor]) -> torch.Tensor:
        path = stage_dir / "eval" / f"beam-lists-{stage_key({**settings, 'num_beams': k})}.pt"
        items = None
        if path.exists():
            try:
                items = torch.load(path, weights_only=True)["items"]
            except Exception as err:  # a damaged cache file is decoded again and rewritten, never trusted
                log.warning("target beam lists K=%d: %s is unreadable (%s: %s); decoding them again", k, path,
                            type(err).__name__, err)
        # the ranks decide together: the decode below is sharded and gathers from every rank, so one rank reading
        # the file while another decodes (a file written or damaged between their checks) would wait forever
        if all(loaded for loaded in distributed.gather_objects(items is not None)):
            log.info("target beam lists K=%d: reusing %s", k, path)
            return items
        items = decode()
        if is_rank_zero():
            artifacts.atomic_save_to_path(path, lambda tmp: torch.save({"settings": settings, "k": k, "items": items},
                                                                       tmp))
        return items

    return lists


def evaluate_target(cfg: DictConfig, stage_dir: Path, data: RecData) -> dict[str, float]:
    """Target beam search on the test users, and the most-popular baseline on the same users: Recall/NDCG and the
    diversity of the top 10 (``reporting.dataset_list_report``: distinct items, coverage, mean popularity, Gini,
    first-level codes per list), the same figures the SASRec baseline reports.

    The figures are a function of the target and these settings, so they are cached in the target's stage dir
    (``eval/target-<key>.json``) and a rerun reads them instead of decoding every test user again (their walltime
    is the one measured when they were made)."""
    device = eval_device(cfg)
    test = data.splits["test"]
    users = min(cfg.eval.max_users, len(test)) if cfg.eval.max_users else len(test)
    cutoffs = tuple(n for n in cfg.eval.cutoffs if n <= cfg.eval.num_beams)
    settings = {"version": 2, "cutoffs": cutoffs, "num_beams": cfg.eval.num_beams,
                **target_list_settings(cfg, stage_dir, users)}
    cached = stage_dir / "eval" / f"target-{stage_key(settings)}.json"
    if cached.exists():
        log.info("target evaluation: reusing %s", cached)
        return json.loads(cached.read_text())["metrics"]
    target = load_target(stage_dir, device, eval_dtype(cfg), eval_backend(cfg))
    lists = generate_lists(
        target, test.prompts[:users], data.trie().to(device), cfg.eval.num_beams, data.pad_id,
        batch_size=cfg.eval.batch_size, desc="test beam search", scope=cfg.decoding.get("scope", "vocab"),
        processors=make_processors(cfg),
    )
    truth = test.ground_truth()[:users]
    popular = most_popular_lists(data.popularity(), users, cfg.eval.num_beams)
    metrics = {}
    for name, items in (("target", lists.items), ("most_popular", popular)):
        report = dataset_list_report(data.dataset, items, truth, cutoffs)
        report.pop("num_users")
        metrics.update({f"eval/{name}/{k}": v for k, v in report.items()})
    metrics["eval/target/walltime_s_per_list"] = lists.walltime_s / max(1, users)
    metrics["eval/num_users"] = users
    write_json_atomic(cached, {"settings": settings, "metrics": metrics})
    return metrics


# -- entry -------------------------------------------------------------------------------------------------------
STAGES = ("target", "teacher", "draft", "eval", "sasrec")


def make_logger(cfg: DictConfig, stage: str, reused: dict[str, str] | None = None) -> Any:
    """One logger run per stage that does work: W&B groups them by experiment with job_type = stage. ``reused``
    (stage -> dir) names the stages taken from the cache so far, which open no run of their own: this run carries
    them as tags ``reused:<stage>`` and as ``reused_stages`` in its config (and, on W&B, its summary)."""
    if not cfg.get("logger") or not is_rank_zero():  # under DDP, rank 0 logs for the group
        return False
    settings = OmegaConf.to_container(cfg.logger, resolve=True)
    settings.pop("wandb_artifacts", None)  # ours, not the logger's
    if settings["_target_"].endswith("WandbLogger"):
        tags = [*(settings.pop("tags", None) or []), *(f"reused:{name}" for name in reused or {})]
        logger = instantiate(quiet_wandb(settings), job_type=stage, name=f"{cfg.run_name}-{stage}", tags=tags or None)
    else:
        logger = instantiate(settings, name=f"{cfg.run_name}-{stage}")
    logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "reused_stages": dict(reused or {})})
    if wandb_views.is_wandb(logger):
        wandb_views.log_reused(logger, reused or {})
    return logger


def close_logger(logger: Any) -> None:
    if not logger:
        return
    logger.finalize("success")
    if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
        logger.experiment.finish()  # W&B: end this stage's run before the next stage starts its own


def log_stage_model(cfg: DictConfig, logger: Any, stage: str, stage_dir: Path) -> None:
    """The stage's saved model as a W&B artifact when ``logger.wandb_artifacts`` is set."""
    if wandb_views.is_wandb(logger) and cfg.logger.get("wandb_artifacts", False):
        wandb_views.log_model_artifact(logger, stage, stage_dir)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured stages (``cfg.stages``: target, teacher, draft, eval, sasrec); returns a summary. The
    whole configuration is checked first (``check_config``): unknown keys and bad values fail before any work.
    A stage that trains or generates logs to a run of its own; a stage reused from the cache opens none, and the
    runs after it name it (``make_logger``'s ``reused``)."""
    check_config(cfg, STAGES)
    check_processor_inputs(cfg)
    from atspeed_exp.prepare import prepare_for_run  # it imports the sasrec stage, which imports this module

    prepare_for_run(cfg)  # a data config with prepare / sid builds data.root and its index when missing or stale
    check_data_files(cfg)
    threads = cfg.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    summary: dict[str, Any] = {"log_dir": str(cfg.paths.output_dir)}
    metrics: dict[str, float] = {}
    reused: dict[str, str] = {}  # stage -> its dir, for the stages taken from the cache

    if "sasrec" in cfg.stages:  # a baseline: needs the dataset only, not the target
        from atspeed_exp.baselines import run_sasrec, sasrec_stage_dir  # they import this module: not at the top

        if stage_done(sasrec_stage_dir(cfg)):
            reused["sasrec"] = str(sasrec_stage_dir(cfg))
        sasrec_dir, baseline_metrics = run_sasrec(cfg)
        summary["sasrec_dir"] = str(sasrec_dir)
        summary["sasrec"] = json.loads((sasrec_dir / STAGE_FILE).read_text())
        metrics.update(baseline_metrics)

    if set(cfg.stages) != {"sasrec"}:  # every other stage list starts with the target
        target_reused = stage_done(target_stage_dir(cfg))
        if target_reused:
            reused["target"] = str(target_stage_dir(cfg))
        logger = False if target_reused else make_logger(cfg, "target", reused)
        target_dir, data = train_target(cfg, logger)
        log_stage_model(cfg, logger, "target", target_dir)
        summary["target_reused"] = target_reused
        close_logger(logger)
        summary["target_dir"] = str(target_dir)
        summary["stage"] = json.loads((target_dir / STAGE_FILE).read_text())

        with rank_zero_first():  # the other DDP ranks read the figures rank 0 cached
            metrics.update(evaluate_target(cfg, target_dir, data))
        if drafter_name(cfg) in MODEL_FREE_DRAFTERS:
            run_model_free_stages(cfg, target_dir, data, summary, metrics, reused)
        elif drafter_name(cfg) == "layer_skip":
            run_layer_skip_stages(cfg, target_dir, data, summary, metrics, reused)
        elif "teacher" in cfg.stages or "draft" in cfg.stages:
            if stage_done(teacher_stage_dir(cfg, target_dir)):
                reused["teacher"] = str(teacher_stage_dir(cfg, target_dir))
                teacher_logger = False
            else:
                teacher_logger = make_logger(cfg, "teacher", reused)
            teacher_dir = make_teacher(cfg, target_dir, data)
            summary["teacher_dir"] = str(teacher_dir)
            summary["teacher"] = json.loads((teacher_dir / STAGE_FILE).read_text())
            if teacher_logger:
                examples = (wandb_views.teacher_examples(data, teacher_split(cfg, data, "train", 5), teacher_dir)
                            if wandb_views.is_wandb(teacher_logger) else [])
                wandb_views.log_teacher_view(teacher_logger, summary["teacher"], teacher_dir, examples)
            close_logger(teacher_logger)
            if "draft" in cfg.stages:
                if stage_done(draft_stage_dir(cfg, teacher_dir)):
                    reused["draft"] = str(draft_stage_dir(cfg, teacher_dir))
                    draft_logger = False
                else:
                    draft_logger = make_logger(cfg, "draft", reused)
                draft_dir = train_draft(cfg, target_dir, teacher_dir, data, draft_logger)
                log_stage_model(cfg, draft_logger, "draft", draft_dir)
                close_logger(draft_logger)
                summary["draft_dir"] = str(draft_dir)
                evaluate_drafter(cfg, target_dir, draft_dir, data, summary, metrics)
    summary["reused_stages"] = reused
    # W&B keeps one active run per process: the eval run starts only after the draft stage's run has finished
    logger = make_logger(cfg, "eval", reused)
    if logger:
        logger.log_metrics(metrics)
        if wandb_views.is_wandb(logger):
            wandb_views.log_eval_views(logger, summary)
    close_logger(logger)
    summary["metrics"] = metrics
    # the run's results in one file next to its logs (read by notebooks/results.ipynb)
    write_json_atomic(Path(cfg.paths.output_dir) / "summary.json",
                      {**summary, "config": OmegaConf.to_container(cfg, resolve=True)})
    return summary


def run_model_free_stages(cfg: DictConfig, target_dir: Path, data: RecData, summary: dict[str, Any],
                          metrics: dict[str, float], reused: dict[str, str]) -> None:
    """``decoding.drafter=retrieval`` or ``trigram``: the draft stage builds (or reuses) the retrieval pools or the
    tri-gram counts instead of training a draft, so the teacher stage, whose data only trains drafts, is skipped;
    eval then runs as with a draft model, with the same metrics and tables. Fills ``summary`` and ``metrics`` in
    place."""
    name = drafter_name(cfg)
    if "teacher" in cfg.stages:
        log.info("teacher stage skipped: decoding.drafter=%s trains no draft model", name)
    if "draft" not in cfg.stages:
        return
    stage_dir, build = ((retrieval_stage_dir(cfg), build_retrieval) if name == "retrieval"
                        else (trigram_stage_dir(cfg), build_trigram))
    if stage_done(stage_dir):
        reused[name] = str(stage_dir)
    built_dir = build(cfg, data)
    summary["draft_dir"] = str(built_dir)
    summary["drafter"] = name
    evaluate_drafter(cfg, target_dir, built_dir, data, summary, metrics)


def run_layer_skip_stages(cfg: DictConfig, target_dir: Path, data: RecData, summary: dict[str, Any],
                          metrics: dict[str, float], reused: dict[str, str]) -> None:
    """``decoding.drafter=layer_skip``: the target drafts for itself, so neither teacher data nor a draft is made;
    the draft stage searches the skip set (``decoding.layer_skip.search``, a cached stage) or takes the configured
    one, and eval runs as with a draft model. Fills ``summary`` and ``metrics`` in place."""
    if "teacher" in cfg.stages:
        log.info("teacher stage skipped: decoding.drafter=layer_skip trains no draft model")
    if "draft" not in cfg.stages:
        return
    draft_dir = None
    if cfg.decoding.layer_skip.search:
        if stage_done(layer_skip_stage_dir(cfg, target_dir)):
            reused["layer_skip"] = str(layer_skip_stage_dir(cfg, target_dir))
        draft_dir = build_layer_skip(cfg, target_dir, data)
        summary["draft_dir"] = str(draft_dir)
    summary["drafter"] = "layer_skip"
    evaluate_drafter(cfg, target_dir, draft_dir, data, summary, metrics)


def evaluate_drafter(cfg: DictConfig, target_dir: Path, draft_dir: Path | None, data: RecData,
                     summary: dict[str, Any], metrics: dict[str, float]) -> None:
    """The eval stage, whichever drafter drafts (``draft_dir``: its stage, or None for a configured layer-skip set):
    the batch-1 table on ``eval.speculative_users``, then every test user batched (``eval.all_users``). Fills
    ``summary`` and ``metrics`` in place; nothing without eval in ``stages``."""
    if "eval" not in cfg.stages:
        return
    modes, ks = tuple(cfg.decoding.modes), tuple(cfg.decoding.ks)
    metrics.update(evaluate_draft(cfg, target_dir, draft_dir, data))
    summary["table"] = speculative_table(metrics, modes, ks)
    if cfg.eval.get("all_users", True):
        metrics.update(evaluate_draft_all_users(cfg, target_dir, draft_dir, data))
        summary["table_all_users"] = all_users_table(metrics, modes, ks)


def format_summary(summary: dict[str, Any], cutoffs: tuple[int, ...] = (5, 10, 20)) -> str:
    metrics = summary["metrics"]
    lines = []
    if "stage" in summary:
        stage = summary["stage"]
        trained = (f"reused from the cache (trained in {stage['train_seconds_this_run']:.0f}s when built)"
                   if summary.get("target_reused") else f"trained in {stage['train_seconds_this_run']:.0f}s")
        lines += [
            f"target: {summary['target_dir']} ({stage['parameters']['total'] / 1e6:.2f}M parameters, {trained}, "
            f"best {stage['monitor']}={stage['best_score']:.4f})",
            f"test users: {metrics['eval/num_users']}",
        ]
    if "sasrec" in summary:
        lines.append(f"sasrec: {summary['sasrec_dir']} (best {summary['sasrec']['monitor']}="
                     f"{summary['sasrec']['best_score']:.4f}; test users: {metrics['baseline/sasrec/num_users']:.0f})")
    # rows: eval/target, eval/most_popular (target's users), baseline/... (all test users); most-popular once when
    # both evaluations ran on the same users (the same lists, the same figures)
    rows = [f"eval/{name}" for name in ("target", "most_popular") if "stage" in summary]
    same_users = "stage" in summary and metrics.get("eval/num_users") == metrics.get("baseline/sasrec/num_users")
    rows += [f"baseline/{name}" for name in ("sasrec", "most_popular")
             if "sasrec" in summary and not (name == "most_popular" and same_users)]
    width = max([14, *(len(r) + 1 for r in rows)])
    lines.append(f"{'':{width}s}" + "".join(f"{f'R@{n}':>9s}{f'N@{n}':>9s}" for n in cutoffs)
                 + f"{'items@10':>10s}{'pop@10':>8s}")
    for key in rows:
        row = "".join(
            f"{metrics.get(f'{key}/recall@{n}', float('nan')):9.4f}{metrics.get(f'{key}/ndcg@{n}', float('nan')):9.4f}"
            for n in cutoffs
        )
        row += (f"{metrics.get(f'{key}/distinct_items@10', float('nan')):10.0f}"
                f"{metrics.get(f'{key}/mean_popularity@10', float('nan')):8.1f}")
        lines.append(f"{key.removeprefix('eval/'):{width}s}{row}")
    if summary.get("table"):
        lines.append(f"speculative decoding ({summary['draft_dir']}):")
        lines.append(f"{'mode':>8s} {'K':>3s} {'speedup':>8s} {'mean-ratio':>10s} {'tgt calls':>9s} "
                     f"{'accept':>7s} {'ms/list':>8s} {'R@K':>7s} {'N@K':>7s} {'batched lists/s':>15s}")
        for row in summary["table"]:
            k = row["k"]
            lines.append(f"{row['mode']:>8s} {k:3d} {row['speedup']:8.2f} {row['speedup_mean_ratio']:10.2f} "
                         f"{row['target_calls_per_list']:9.2f} {row['acceptance_rate']:7.3f} {row['walltime_ms']:8.1f} "
                         f"{row[f'recall@{k}']:7.4f} {row[f'ndcg@{k}']:7.4f} "
                         f"{row.get('throughput_lists_per_s', float('nan')):15.1f}")
    if summary.get("table_all_users"):
        lines.append(f"all {metrics.get('eval/all/num_users', float('nan')):.0f} test users, batched "
                     f"(95% bootstrap intervals over users; overlap = shared items with beam search's list / K):")
        lines.append(f"{'mode':>14s} {'K':>3s} {'tgt calls':>19s} {'accept':>19s} {'overlap':>7s} "
                     f"{'R@K':>25s} {'R@K change':>10s}")

        def cell(row: dict, name: str, digits: int) -> str:
            return (f"{row[name]:.{digits}f} [{row[name + '_lo95']:.{digits}f}, {row[name + '_hi95']:.{digits}f}]"
                    if name in row else "")

        for row in summary["table_all_users"]:
            k = row["k"]
            beam = row["mode"] == "beam"  # the reference: no drafting, nothing to compare with
            overlap = "" if beam else f"{row['overlap']:.3f}"
            change = "" if beam else f"{row[f'recall@{k}_change']:.4f}"
            lines.append(f"{row['mode']:>14s} {k:3d} {cell(row, 'target_calls_per_list', 2):>19s} "
                         f"{cell(row, 'acceptance_rate', 3):>19s} {overlap:>7s} "
                         f"{cell(row, f'recall@{k}', 4):>25s} {change:>10s}")
        invariance = [row for row in summary["table_all_users"] if "batch1_users" in row]
        if invariance:
            lines.append("beam lists that batching changes (float near-ties; batched against one user per call): "
                         + ", ".join(f"K={row['k']}: {row['batch1_mismatches']:.0f} of {row['batch1_users']:.0f}"
                                     for row in invariance))
    lines.append(f"logs: {summary['log_dir']}")
    return "\n".join(line.rstrip() for line in lines)
