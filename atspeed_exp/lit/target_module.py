"""Target fine-tuning: response-only cross-entropy (docs/method.md section 3), AdamW with warm-up and cosine decay, and a
validation pass that measures what the target is for: Recall/NDCG of its constrained beam search on a fixed
sample of validation users (used to pick the best checkpoint)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from atspeed_exp.data.prompts import IGNORE_INDEX
from atspeed_exp.decoding.trie import ItemTrie
from atspeed_exp.evaluation import accuracy, generate_lists
from atspeed_exp.lit.schedules import adamw_warmup_cosine
from atspeed_exp.models.lean import decoder_for


def response_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions. logits ``[B, T, V]`` predict ``labels[:, 1:]``;
    labels are -100 on prompt and padding, so only response tokens (SIDs + EOS) count."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # [B*(T-1), V]
    shifted_labels = labels[:, 1:].reshape(-1)
    return nn.functional.cross_entropy(shifted_logits.float(), shifted_labels, ignore_index=IGNORE_INDEX)


class TargetFinetuneModule(pl.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.05,
        val_prompts: list[list[int]] | None = None,
        val_ground_truth: list[tuple[int, ...]] | None = None,
        trie: ItemTrie | None = None,
        pad_id: int = 0,
        val_beams: int = 10,
        val_batch_size: int = 64,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "val_prompts", "val_ground_truth", "trie"])
        self.model = model
        self.val_prompts = val_prompts or []
        self.val_ground_truth = val_ground_truth or []
        self.trie = trie

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def on_fit_start(self) -> None:
        # from_pretrained returns modules in eval mode and Lightning keeps module modes as it finds them:
        # switch to train mode so dropout (e.g. LoRA's) is active while fitting.
        self.model.train()

    def training_step(self, batch, batch_idx):
        loss = response_cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("target/train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = response_cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("target/val_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def on_validation_epoch_end(self) -> None:
        if not self.val_prompts or self.trie is None or self.trainer.sanity_checking:
            return
        self.trie.to(self.device)
        lists = generate_lists(
            decoder_for(self.model), self.val_prompts, self.trie, self.hparams.val_beams,
            self.hparams.pad_id, batch_size=self.hparams.val_batch_size, progress=False,
        )
        n = self.hparams.val_beams
        metrics = accuracy(lists.items, self.val_ground_truth, (n,))
        self.log(f"target/val_recall@{n}", metrics[f"recall@{n}"], prog_bar=True)
        self.log(f"target/val_ndcg@{n}", metrics[f"ndcg@{n}"])

    def configure_optimizers(self):
        return adamw_warmup_cosine(self, self.model)
