"""Non-LLM baselines on the target's split and metrics: the ``sasrec`` stage (train SASRec, cached like the other
stages) and most-popular, both reported with ``reporting.dataset_list_report``.

The ``sasrec`` stage needs the dataset only (no tokenizer, no target). Its output directory
``{artifacts}/sasrec/{dataset}-{key}`` is keyed by the data settings that change the examples, ``cfg.sasrec`` less
its evaluation-only keys, the trainer precision and the seed; it is complete when ``stage.json`` exists and holds
``model.pt`` (state dict) and ``model.json`` (constructor arguments). Evaluation is not cached: scoring every item
for every test user takes about a second.

Logged as ``baseline/{sasrec,most_popular}/{key}`` with the keys of ``reporting.list_report``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from atspeed_exp.artifacts import atomic_save_to_path, load_checkpoint_state_dict, resume_checkpoint, stage_lock
from atspeed_exp.data.atspeed_format import build_examples, item_popularity, load_atspeed_dataset
from atspeed_exp.data.types import RecDataset
from atspeed_exp.decoding.trie import ItemTrie
from atspeed_exp.lit.sasrec_module import SASRecModule, example_tensors
from atspeed_exp.reporting import dataset_list_report
from atspeed_exp.metrics import most_popular_lists
from atspeed_exp.models.build import count_parameters
from atspeed_exp.models.sasrec import SASRec, left_pad_histories
from atspeed_exp.pipeline import (
    STAGE_FILE,
    trainer_key,
    make_trainer,
    close_logger,
    data_root,
    data_settings,
    make_logger,
    stage_done,
    stage_key,
    write_json_atomic,
)

log = logging.getLogger(__name__)

# cfg.sasrec keys that change how the model is evaluated, not what is trained
SASREC_EVAL_KEYS = ("eval_batch_size", "exclude_history", "diversity_n")


# -- sasrec stage ------------------------------------------------------------------------------------------------
def load_dataset(cfg: DictConfig) -> RecDataset:
    return load_atspeed_dataset(data_root(cfg), cfg.data.name, cfg.data.get("index_file"))


def sasrec_stage_dir(cfg: DictConfig) -> Path:
    # the prompt format changes the target's tokens, not SASRec's examples
    data = {k: v for k, v in data_settings(cfg).items() if k != "prompt_format"}
    training = {k: v for k, v in OmegaConf.to_container(cfg.sasrec, resolve=True).items() if k not in SASREC_EVAL_KEYS}
    key = stage_key(data, training, cfg.trainer.precision, cfg.seed, *trainer_key(cfg))
    return Path(cfg.paths.artifacts_dir) / "sasrec" / f"{cfg.data.name}-{key}"


def num_item_ids(dataset: RecDataset) -> int:
    return max(dataset.item_sids) + 1


def train_sasrec(cfg: DictConfig, logger: Any = False, extra_callbacks: list | None = None) -> Path:
    """Train SASRec on the target's training examples (or reuse a finished run of the same settings); returns the
    stage dir. The best epoch by ``sasrec/val_{monitor}@{val_k}`` on the validation users is kept; training stops
    after ``patience`` epochs without improvement. An interrupted run resumes from ``checkpoints/last.ckpt``;
    concurrent runs of the same settings build it once (``stage_lock``)."""
    with stage_lock(sasrec_stage_dir(cfg)):
        return _train_sasrec(cfg, logger, extra_callbacks)


def _train_sasrec(cfg: DictConfig, logger: Any = False, extra_callbacks: list | None = None) -> Path:
    stage_dir = sasrec_stage_dir(cfg)
    if stage_done(stage_dir):
        log.info("sasrec stage: reusing %s", stage_dir)
        return stage_dir
    settings = cfg.sasrec
    dataset = load_dataset(cfg)
    max_len = settings.model.max_len
    train = build_examples(dataset, "train", max_history=cfg.data.max_history, sliding_window=cfg.data.sliding_window)
    valid = build_examples(dataset, "valid", max_history=cfg.data.max_history)
    pl.seed_everything(cfg.seed, workers=True)
    model = instantiate(settings.model, num_items=num_item_ids(dataset))
    module = SASRecModule(model, lr=settings.lr, weight_decay=settings.weight_decay, betas=tuple(settings.betas),
                          val_k=settings.val_k)
    train_loader = DataLoader(example_tensors(train, max_len), batch_size=settings.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(example_tensors(valid, max_len), batch_size=settings.eval_batch_size)
    monitor = f"sasrec/val_{settings.monitor}@{settings.val_k}"
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=stage_dir / "checkpoints", filename="best", monitor=monitor,
                                              mode="max", enable_version_counter=False)
    stopping = pl.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=settings.patience)
    trainer = make_trainer(cfg, "sasrec", [checkpoint, stopping, *(extra_callbacks or [])], stage_dir,
                           max_epochs=settings.max_epochs, logger=logger)
    last = stage_dir / "checkpoints" / "last.ckpt"
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader,
                ckpt_path=resume_checkpoint(last), weights_only=True)
    train_seconds = time.perf_counter() - start
    if trainer.interrupted:
        raise RuntimeError(f"sasrec training interrupted; rerun the same command to resume from {last}")
    best = checkpoint.best_model_path
    if best:
        module.load_state_dict(load_checkpoint_state_dict(best))
    model_args = {**OmegaConf.to_container(settings.model, resolve=True), "num_items": model.num_items}
    model_args.pop("_target_")
    atomic_save_to_path(stage_dir / "model.pt", lambda tmp: torch.save(module.model.state_dict(), tmp))
    write_json_atomic(stage_dir / "model.json", model_args)
    write_json_atomic(stage_dir / STAGE_FILE, {
        "stage": "sasrec",
        "settings": {"data": data_settings(cfg), "sasrec": OmegaConf.to_container(settings, resolve=True),
                     "seed": cfg.seed},
        "best_checkpoint": str(Path(best).resolve().relative_to(stage_dir.resolve())) if best else None,
        "best_score": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "monitor": monitor,
        "epochs_run": trainer.current_epoch,
        "train_seconds_this_run": train_seconds,
        "parameters": count_parameters(module.model),
        "examples": {"train": len(train), "valid": len(valid)},
    })
    return stage_dir


def load_sasrec(stage_dir: Path) -> SASRec:
    """The stage's trained model, in eval mode on the CPU."""
    model = SASRec(**json.loads((stage_dir / "model.json").read_text()))
    model.load_state_dict(torch.load(stage_dir / "model.pt", map_location="cpu", weights_only=True))
    return model.eval()


class SASRecItemProbabilities:
    """The item probabilities of the ``cf_assistant`` score processor from a trained SASRec: each prompt's history
    is read off its ids (``ItemTrie.find_items``: the runs of L prompt tokens that spell a catalogue SID, in prompt
    order; a SID shared by several items stands for the lowest of their ids), the latest ``model.max_len`` items
    are scored, and the softmax over all items is returned, ``[B, num_items]`` on the prompts' device."""

    def __init__(self, model: SASRec) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, trie: ItemTrie) -> torch.Tensor:
        history = prompt_histories(prompt_ids, prompt_mask, trie, self.model.max_len)  # [B, T]
        device = self.model.item_embedding.weight.device
        return torch.softmax(self.model.last_scores(history.to(device)), -1).to(prompt_ids.device)  # [B, I]


def prompt_histories(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, trie: ItemTrie, max_len: int) -> torch.Tensor:
    """The history item ids that prompts ``[B, P]`` spell, the latest ``max_len`` right-aligned and -1 before
    (``SASRec``'s input ``[B, max_len]``)."""
    leaves = trie.find_items(prompt_ids, prompt_mask)  # [B, W]; the dead leaf where a window is not an item
    items = trie.items_of_leaves(leaves)[..., 0]  # [B, W]: lowest item id of the SID, -1 for the dead leaf
    order = torch.argsort((items >= 0).to(torch.int8), dim=1, stable=True)  # non-items first, items in prompt order
    items = items.gather(1, order)[:, -max_len:]
    if items.shape[1] < max_len:
        items = torch.cat([items.new_full((items.shape[0], max_len - items.shape[1]), -1), items], dim=1)
    return items


def sasrec_lists(model: SASRec, histories: Sequence[Sequence[int]], k: int, batch_size: int = 1024,
                 exclude_history: bool = False) -> torch.Tensor:
    """Top-``k`` over all items for each history (the latest ``model.max_len`` items count): ``[U, k]``."""
    padded = left_pad_histories(histories, model.max_len)  # [U, T]
    lists = [model.recommend(padded[i : i + batch_size], k, exclude_history) for i in range(0, len(padded), batch_size)]
    return torch.cat(lists) if lists else torch.empty(0, k, dtype=torch.long)


def evaluate_baselines(cfg: DictConfig, stage_dir: Path, dataset: RecDataset | None = None) -> dict[str, float]:
    """SASRec and most-popular on all test users (history = training + validation items), top-K over all items with
    K = max(eval.cutoffs): ``baseline/{sasrec,most_popular}/{list_report key}``."""
    dataset = dataset if dataset is not None else load_dataset(cfg)
    test = build_examples(dataset, "test", max_history=cfg.data.max_history)
    cutoffs = tuple(cfg.eval.cutoffs)
    k = max(cutoffs)
    truth = [ex.ground_truth for ex in test]
    popularity = torch.as_tensor(item_popularity(dataset), dtype=torch.long)
    model = load_sasrec(stage_dir)
    start = time.perf_counter()
    sasrec = sasrec_lists(model, [ex.history for ex in test], k, cfg.sasrec.eval_batch_size,
                          cfg.sasrec.exclude_history)
    seconds = time.perf_counter() - start
    lists = {"sasrec": sasrec, "most_popular": most_popular_lists(popularity, len(test), k)}
    metrics = {}
    for name, items in lists.items():
        metrics.update({f"baseline/{name}/{key}": value
                        for key, value in dataset_list_report(dataset, items, truth, cutoffs,
                                                              cfg.sasrec.diversity_n).items()})
    metrics["baseline/sasrec/walltime_s_per_list"] = seconds / max(1, len(test))
    return metrics


def run_sasrec(cfg: DictConfig) -> tuple[Path, dict[str, float]]:
    """The ``sasrec`` stage of ``pipeline.run``: train (or reuse) and evaluate; returns the stage dir and metrics."""
    logger = False if stage_done(sasrec_stage_dir(cfg)) else make_logger(cfg, "sasrec")
    stage_dir = train_sasrec(cfg, logger)
    close_logger(logger)
    return stage_dir, evaluate_baselines(cfg, stage_dir)
