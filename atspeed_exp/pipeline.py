"""The experiment pipeline: data -> target fine-tuning -> test evaluation, with stage outputs cached on disk.

A stage's output directory is named by a hash of exactly the settings that affect it, so a sweep over settings of
later stages reuses it, and a changed setting can never silently reuse a stale artifact. A stage is complete only
when its ``stage.json`` exists; it is written last and atomically, so a crash leaves an incomplete stage that the
next run resumes (from Lightning's ``last.ckpt``) instead of trusting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel

from atspeed_exp.data.datamodule import TargetDataModule
from atspeed_exp.data.recdata import RecData
from atspeed_exp.data.synthetic import ensure_synthetic_dataset
from atspeed_exp.data.tokenizer import save_tokenizer
from atspeed_exp.evaluation import accuracy, generate_lists, most_popular_accuracy
from atspeed_exp.lit.target_module import TargetFinetuneModule
from atspeed_exp.models.adapter import HFDecoderLM
from atspeed_exp.models.build import count_parameters, load_model, merge_lora, save_model

log = logging.getLogger(__name__)
STAGE_FILE = "stage.json"


# -- artifacts ---------------------------------------------------------------------------------------------------
def stage_key(*parts: Any) -> str:
    """A short, stable hash of the (resolved) settings that determine a stage's output."""
    blob = json.dumps([OmegaConf.to_container(p, resolve=True) if isinstance(p, DictConfig) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)


def stage_done(stage_dir: Path) -> bool:
    return (stage_dir / STAGE_FILE).exists()


# -- data --------------------------------------------------------------------------------------------------------
def data_root(cfg: DictConfig) -> Path:
    """The dataset folder; the synthetic dataset is generated there on first use."""
    root = Path(cfg.data.root)
    if cfg.data.get("synthetic"):
        return ensure_synthetic_dataset(root, cfg.data.name, **cfg.data.synthetic)
    return root


def load_data(cfg: DictConfig, tokenizer_dir: Path | None = None) -> RecData:
    return RecData.build(
        root=data_root(cfg),
        name=cfg.data.name,
        index_file=cfg.data.get("index_file"),
        prompt_format=cfg.data.prompt_format,
        max_history=cfg.data.max_history,
        sliding_window=cfg.data.sliding_window,
        tokenizer_dir=tokenizer_dir,
        pretrained_tokenizer_dir=cfg.model.get("path") if tokenizer_dir is None else None,
    )


def data_settings(cfg: DictConfig) -> dict:
    """The data settings that change examples or token ids (the root by absolute path)."""
    settings = OmegaConf.to_container(cfg.data, resolve=True)
    settings["root"] = str(Path(settings["root"]).resolve())
    return settings


# -- target stage ------------------------------------------------------------------------------------------------
def target_stage_dir(cfg: DictConfig) -> Path:
    key = stage_key(data_settings(cfg), cfg.model, cfg.target_training, cfg.seed)
    return Path(cfg.paths.artifacts_dir) / "target" / f"{cfg.data.name}-{key}"


def train_target(cfg: DictConfig, logger: Any, extra_callbacks: list | None = None) -> tuple[Path, RecData]:
    """Fine-tune the target (or reuse a finished run of the same settings); returns its stage dir and the data.
    An interrupted run leaves ``checkpoints/last.ckpt``; the next run with the same settings resumes from it."""
    stage_dir = target_stage_dir(cfg)
    tokenizer_dir = stage_dir / "tokenizer"
    if stage_done(stage_dir):
        log.info("target stage: reusing %s", stage_dir)
        return stage_dir, load_data(cfg, tokenizer_dir)

    data = load_data(cfg, tokenizer_dir if tokenizer_dir.exists() else None)
    if not tokenizer_dir.exists():  # saved before training so a resumed run gets identical ids
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
    monitor = f"target/val_recall@{training.val_beams}"
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=stage_dir / "checkpoints", filename="best", monitor=monitor, mode="max", save_last=True,
    )
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        logger=logger,
        callbacks=[checkpoint, *([pl.callbacks.LearningRateMonitor("step")] if logger else []), *(extra_callbacks or [])],
    )
    last = stage_dir / "checkpoints" / "last.ckpt"
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.exists() else None)
    train_seconds = time.perf_counter() - start
    if trainer.interrupted:  # Lightning returns normally on Ctrl-C: the stage is not complete
        raise RuntimeError(f"target training interrupted; rerun the same command to resume from {last}")

    best = checkpoint.best_model_path
    if best:
        module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    save_model(module.model, stage_dir / "model", tokenizer=data.tokenizer)
    write_json_atomic(
        stage_dir / STAGE_FILE,
        {
            "stage": "target",
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


def load_target(stage_dir: Path, device: str = "cpu") -> HFDecoderLM:
    model = load_model(stage_dir / "model")
    if isinstance(model, PeftModel):  # unmerged token-row wrappers copy whole matrices on every forward
        model = merge_lora(model)
    return HFDecoderLM.from_model(model.to(device))


# -- evaluation --------------------------------------------------------------------------------------------------
def evaluate_target(cfg: DictConfig, stage_dir: Path, data: RecData) -> dict[str, float]:
    """Target beam search on the test users, and the most-popular baseline on the same users."""
    device = "cuda" if cfg.eval.device == "auto" and torch.cuda.is_available() else (
        "cpu" if cfg.eval.device == "auto" else cfg.eval.device)
    target = load_target(stage_dir, device)
    test = data.splits["test"]
    users = min(cfg.eval.max_users, len(test)) if cfg.eval.max_users else len(test)
    cutoffs = tuple(n for n in cfg.eval.cutoffs if n <= cfg.eval.num_beams)
    lists = generate_lists(
        target, test.prompts[:users], data.trie().to(device), cfg.eval.num_beams, data.pad_id,
        batch_size=cfg.eval.batch_size, desc="test beam search",
    )
    truth = test.ground_truth()[:users]
    metrics = {f"eval/target/{k}": v for k, v in accuracy(lists.items, truth, cutoffs).items()}
    metrics.update({f"eval/most_popular/{k}": v for k, v in most_popular_accuracy(data.popularity(), truth, cutoffs).items()})
    metrics["eval/target/walltime_s_per_list"] = lists.walltime_s / max(1, users)
    metrics["eval/num_users"] = users
    return metrics


# -- entry -------------------------------------------------------------------------------------------------------
def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured pipeline; returns a summary (also logged)."""
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    stage_dir, data = train_target(cfg, logger)
    metrics = evaluate_target(cfg, stage_dir, data)
    if logger:
        logger.log_metrics(metrics)
        logger.finalize("success")
    stage = json.loads((stage_dir / STAGE_FILE).read_text())
    return {"target_dir": str(stage_dir), "stage": stage, "metrics": metrics,
            "log_dir": str(cfg.paths.output_dir)}


def format_summary(summary: dict[str, Any], cutoffs: tuple[int, ...] = (5, 10, 20)) -> str:
    metrics = summary["metrics"]
    params = summary["stage"]["parameters"]["total"]
    lines = [
        f"target: {summary['target_dir']} ({params / 1e6:.2f}M parameters, "
        f"trained {summary['stage']['train_seconds_this_run']:.0f}s, best {summary['stage']['monitor']}="
        f"{summary['stage']['best_score']})",
        f"test users: {metrics['eval/num_users']}",
        f"{'':14s}" + "".join(f"{f'R@{n}':>9s}{f'N@{n}':>9s}" for n in cutoffs),
    ]
    for name in ("target", "most_popular"):
        row = "".join(
            f"{metrics.get(f'eval/{name}/recall@{n}', float('nan')):9.4f}{metrics.get(f'eval/{name}/ndcg@{n}', float('nan')):9.4f}"
            for n in cutoffs
        )
        lines.append(f"{name:14s}{row}")
    lines.append(f"logs: {summary['log_dir']}")
    return "\n".join(lines)
