"""Hydra configs for tests: the real conf/ tree composed with overrides that make runs tiny and local."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import atspeed_exp.project_paths  # noqa: F401  (registers ${project_root:...}, used by conf/paths)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def tiny_overrides(tmp_path: Path) -> list[str]:
    return [
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.artifacts_dir={tmp_path / 'artifacts'}",
        f"paths.output_dir={tmp_path / 'out'}",
        "data.synthetic.num_users=150",
        "data.synthetic.num_items=120",
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "model.num_hidden_layers=1",
        "target_training.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "target_training.val_users=20",
        "eval.max_users=20",
        "eval.num_beams=10",
        "eval.speculative_users=6",
        "teacher.num_beams=10",
        "teacher.max_examples=40",
        "teacher.max_val_examples=10",
        "draft_training.max_epochs=1",
        "draft_training.eval_users=4",
        "decoding.ks=[5,10]",
        "decoding.draft_beams=20",
        "logger=csv",
    ]


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


class StopAtEpoch(pl.Callback):
    """Simulates a crash: raises when training reaches ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def random_target_stage(cfg: DictConfig, root: Path) -> Path:
    """``root/target/synthetic-random``: a target stage dir holding an untrained tiny target (``cfg.model``, seed 0)
    and the tokenizer of ``cfg``'s data, as the teacher stage and the benchmarks read them."""
    import torch
    from hydra.utils import instantiate

    from atspeed_exp import pipeline
    from atspeed_exp.data.tokenizer import save_tokenizer
    from atspeed_exp.models.build import save_model

    data = pipeline.load_data(cfg)
    torch.manual_seed(0)
    blocks = data.sid_index.level_blocks
    model = instantiate(cfg.model, tokenizer=data.tokenizer, sid_token_ids=list(range(blocks[0][0], blocks[-1][1])))
    target_dir = root / "target" / "synthetic-random"
    save_model(model, target_dir / "model")
    save_tokenizer(data.tokenizer, target_dir / "tokenizer")
    return target_dir
