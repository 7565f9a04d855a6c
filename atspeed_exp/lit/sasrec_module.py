"""SASRec training: full softmax cross-entropy over all items for the next item after each history (the target's
sliding-window examples: every prefix of a training sequence -> the next item), AdamW at a constant rate, and a
validation pass that measures Recall/NDCG@k of the top-k over all items on the validation users (for checkpoint
selection and early stopping).

Batches are ``(history [B, T] long, -1 left padding; target [B] long)``, made by ``example_tensors``.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from atspeed_exp.data.types import Example
from atspeed_exp.metrics import recall_ndcg
from atspeed_exp.models.sasrec import SASRec, left_pad_histories


def example_tensors(examples: Sequence[Example], max_len: int) -> TensorDataset:
    """Examples -> a dataset of (history ``[T]``, target ``[]``) pairs, histories left-padded with -1."""
    histories = left_pad_histories([ex.history for ex in examples], max_len)  # [N, T]
    targets = torch.tensor([ex.target for ex in examples], dtype=torch.long)  # [N]
    return TensorDataset(histories, targets)


class SASRecModule(pl.LightningModule):
    def __init__(self, model: SASRec, lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.98), val_k: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model

    def training_step(self, batch, batch_idx):
        history, target = batch
        loss = F.cross_entropy(self.model.last_scores(history), target)
        self.log("sasrec/train_loss", loss, prog_bar=True, batch_size=target.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        history, target = batch
        scores = self.model.last_scores(history)  # [B, N]
        self.log("sasrec/val_loss", F.cross_entropy(scores, target), batch_size=target.shape[0])
        k = self.hparams.val_k
        metrics = recall_ndcg(scores.topk(k, dim=-1).indices.cpu(), target[:, None].cpu(), (k,))
        # Lightning averages per-batch values weighted by batch_size: the mean over all validation users
        self.log(f"sasrec/val_recall@{k}", metrics[f"recall@{k}"], prog_bar=True, batch_size=target.shape[0])
        self.log(f"sasrec/val_ndcg@{k}", metrics[f"ndcg@{k}"], batch_size=target.shape[0])

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=tuple(self.hparams.betas),
        )
