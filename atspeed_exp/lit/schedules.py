"""Learning-rate schedules shared by the target and draft modules."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """Linear warm-up to the base rate over ``warmup_steps``, then cosine decay to ``min_ratio`` x base at
    ``total_steps``. Stepped once per optimizer step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw_warmup_cosine(module, model: torch.nn.Module) -> dict:
    """``configure_optimizers`` of both LightningModules: AdamW without weight decay on norms and biases, stepped by
    ``warmup_cosine`` over the whole fit. Reads lr, weight_decay, betas, warmup_steps, min_lr_ratio from
    ``module.hparams``."""
    hp = module.hparams
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp.lr,
        betas=tuple(hp.betas),
    )
    total = int(module.trainer.estimated_stepping_batches)
    scheduler = warmup_cosine(optimizer, hp.warmup_steps, total, hp.min_lr_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
