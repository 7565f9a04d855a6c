"""Draft alignment (SPEC section 5): ``loss = (1 - alpha) * CE + alpha * L_align``.

CE is the draft's cross-entropy on the ground-truth response (SIDs + EOS, full vocabulary, response only), as the
target was trained. L_align is one of the objectives of ``atspeed_exp.losses.alignment``, on these rows:
- ``kl``, ``tvd``: the L ground-truth contexts of each example (teacher forcing on the true response);
- ``seqkd``, ``atspeed_s``, ``atspeed_r``: every context of every teacher beam (K_t x L rows per example; missing
  beams masked out).
One draft forward per batch over the packed sequences of ``atspeed_exp.data.draft_batches`` gives all of them.

Columns of a row (S_max = the largest level block):
- ``constrained=True``: the level-restricted softmax. Draft and target logits sliced to level t's block, -inf past
  S_t; the losses normalise over the block.
- ``constrained=False``: the full-vocabulary distribution, summarised as S_max + 1 columns: the block's full-vocab
  log-probabilities (-inf past S_t) and one last "rest of the vocabulary" column holding the log of the remaining
  mass. Draft: ``logsumexp(non-level logits) - logsumexp(all logits)``; target (only level logits and the log-
  normaliser are stored): ``log(max(1 - Σ_c exp(logit_c - lse), 1e-12))`` (fp16 storage can push the sum a little
  above 1). Each row's probabilities sum to 1, so KL/TVD between the summaries is that of the full distributions
  with all non-level tokens merged into one outcome; SeqKD's CE equals the full-vocabulary CE. A temperature acts on
  the merged column as on one token, and AtSpeed-S's top-K may pick the rest column.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from atspeed_exp.data.draft_batches import read_positions, split_read_logits
from atspeed_exp.data.prompts import IGNORE_INDEX
from atspeed_exp.lit.schedules import adamw_warmup_cosine
from atspeed_exp.losses.alignment import get_alignment_loss, mixed_loss

GROUND_TRUTH_OBJECTIVES = ("kl", "tvd")  # rows at the true response; the others use the teacher beams
REST_LOG_MASS_FLOOR = 1e-12


def constrained_rows(logits: torch.Tensor, level_blocks: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Level-restricted rows: full-vocabulary logits ``[..., L, V]`` -> ``[..., L, S_max]``, row t = the logits of
    level t's block, -inf past S_t."""
    s_max = max(end - start for start, end in level_blocks)
    rows = []
    for level, (start, end) in enumerate(level_blocks):
        block = logits[..., level, start:end]
        rows.append(nn.functional.pad(block, (0, s_max - (end - start)), value=float("-inf")))
    return torch.stack(rows, dim=-2)


def unconstrained_rows(logits: torch.Tensor, level_blocks: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Full-vocabulary rows, summarised: logits ``[..., L, V]`` -> log-probabilities ``[..., L, S_max + 1]``: the
    level block's, -inf past S_t, then the log of the mass of all other tokens (module docstring)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    vocab = logits.shape[-1]
    block = constrained_rows(log_probs, level_blocks)  # [..., L, S_max]
    outside = torch.ones(len(level_blocks), vocab, dtype=torch.bool, device=logits.device)  # [L, V]
    for level, (start, end) in enumerate(level_blocks):
        outside[level, start:end] = False
    rest = log_probs.masked_fill(~outside, float("-inf")).logsumexp(-1)  # [..., L]
    return torch.cat([block, rest[..., None]], dim=-1)


def unconstrained_teacher_rows(level_logits: torch.Tensor, logsumexp: torch.Tensor) -> torch.Tensor:
    """The target's rows in the same summary, from stored level logits ``[..., L, S_max]`` (-inf past S_t) and the
    full-vocabulary log-normaliser ``[..., L]``: ``[..., L, S_max + 1]``."""
    block = level_logits.float() - logsumexp.float()[..., None]
    level_mass = block.logsumexp(-1)  # [..., L], log Σ p over the block (≈ <= 0)
    rest = torch.log((-torch.expm1(level_mass)).clamp(min=REST_LOG_MASS_FLOOR))
    return torch.cat([block, rest[..., None]], dim=-1)


def topk_overlap(draft: torch.Tensor, target: torch.Tensor, row_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over real rows of |top-k(draft) ∩ top-k(target)| / k', k' = min(k, finite columns of the row): the
    fraction of the target's top-k the draft also ranks in its top-k (what strict verification needs).
    draft, target: ``[..., S]`` (-inf = unusable); row_mask ``[...]``. Returns a scalar."""
    draft, target = draft.reshape(-1, draft.shape[-1]).float(), target.reshape(-1, target.shape[-1]).float()
    real = row_mask.reshape(-1)
    k = min(k, draft.shape[-1])
    k_row = (~torch.isneginf(target)).sum(-1).clamp(max=k)  # [R]
    slot_ok = torch.arange(k, device=draft.device) < k_row[:, None]  # [R, k]
    draft_top, target_top = draft.topk(k, dim=-1).indices, target.topk(k, dim=-1).indices  # [R, k]
    shared = (draft_top[:, :, None] == target_top[:, None, :]) & slot_ok[:, :, None] & slot_ok[:, None, :]
    per_row = shared.any(-1).sum(-1) / k_row.clamp(min=1)  # [R]
    real = real & (k_row > 0)
    return per_row[real].mean() if real.any() else per_row.new_zeros(())


class DraftAlignmentModule(pl.LightningModule):
    """Trains ``model`` (a causal LM taking ``input_ids, attention_mask (4-D additive), position_ids,
    logits_to_keep``, e.g. ``LlamaForCausalLM``) on ``draft_batches`` batches with the chosen objective.

    level_blocks: per SID level its token id range [start, end). objective: kl | tvd | seqkd | atspeed_s |
    atspeed_r. alpha: weight of L_align. temperature, top_k, density_weight: the objectives' knobs (top_k and
    density_weight: AtSpeed-S only; temperature: not SeqKD). constrained: level-restricted rows or the
    full-vocabulary summary (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        level_blocks: Sequence[Sequence[int]],
        objective: str = "atspeed_s",
        alpha: float = 0.7,
        temperature: float = 1.0,
        top_k: int = 10,
        density_weight: float = 1.0,
        constrained: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.05,
    ) -> None:
        super().__init__()
        self.alignment_loss = get_alignment_loss(objective)  # ValueError listing the valid names
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        level_blocks = [tuple(int(x) for x in block) for block in level_blocks]
        self.save_hyperparameters(ignore=["model"])  # level_blocks as normalised above
        self.model = model
        self.level_blocks = level_blocks

    # -- forward -------------------------------------------------------------------------------------------------
    def _model_mask(self, mask: torch.Tensor) -> torch.Tensor:
        dtype = getattr(self.model, "dtype", mask.dtype)
        if dtype == mask.dtype:
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask < 0, torch.finfo(dtype).min)

    def draft_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over the packed batch; the draft's float32 logits at the ground-truth contexts ``[B, L+1, V]``
        (the last one predicts EOS) and at the beam contexts ``[B, K, L, V]``."""
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=self._model_mask(batch["attention_mask"]),
            position_ids=batch["position_ids"],
            use_cache=False,
            logits_to_keep=read_positions(batch),
        )
        num_beams, num_levels = batch["beam_positions"].shape[1:]
        return split_read_logits(out.logits.float(), num_beams, num_levels)

    def _rows(self, draft_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_lse: torch.Tensor):
        if self.hparams.constrained:
            return constrained_rows(draft_logits, self.level_blocks), teacher_logits
        return unconstrained_rows(draft_logits, self.level_blocks), unconstrained_teacher_rows(teacher_logits,
                                                                                               teacher_lse)

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"loss", "ce", "align"}`` scalars for a batch, plus the draft's ``"beam_logits"`` ``[B, K, L, V]``."""
        hp = self.hparams
        gt_logits, beam_logits = self.draft_logits(batch)
        ce = nn.functional.cross_entropy(gt_logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
        num_levels = len(self.level_blocks)
        if hp.objective in GROUND_TRUTH_OBJECTIVES:
            if "gt_teacher_logits" not in batch:
                raise ValueError(f"objective {hp.objective!r} needs the target's logits at the ground-truth positions: "
                                 f"generate the teacher data with responses")
            draft, target = self._rows(gt_logits[:, :num_levels], batch["gt_teacher_logits"],
                                       batch["gt_teacher_logsumexp"])
            mask = torch.ones(draft.shape[:-1], dtype=torch.bool, device=draft.device)  # [B, L]
        else:
            draft, target = self._rows(beam_logits, batch["teacher_logits"], batch["teacher_logsumexp"])
            mask = batch["beam_mask"][:, :, None].expand(-1, -1, num_levels)  # [B, K, L]
        if hp.objective == "seqkd":
            align = self.alignment_loss(draft, batch["beam_labels"], mask)
        elif hp.objective == "atspeed_s":
            align = self.alignment_loss(draft, target, mask, top_k=hp.top_k, temperature=hp.temperature,
                                        density_weight=hp.density_weight)
        else:
            align = self.alignment_loss(draft, target, mask, temperature=hp.temperature)
        return {"loss": mixed_loss(ce, align, hp.alpha), "ce": ce, "align": align,
                "beam_logits": beam_logits}

    # -- Lightning -----------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # from_pretrained returns modules in eval mode and Lightning keeps module modes as it finds them:
        # switch to train mode so dropout (e.g. LoRA's) is active while fitting.
        self.model.train()

    def training_step(self, batch, batch_idx):
        losses = self.compute_losses(batch)
        size = batch["input_ids"].shape[0]
        self.log("draft/train_loss", losses["loss"], prog_bar=True, batch_size=size)
        self.log("draft/train_ce", losses["ce"], batch_size=size)
        self.log("draft/train_align", losses["align"], batch_size=size)
        return losses["loss"]

    def validation_step(self, batch, batch_idx):
        losses = self.compute_losses(batch)
        size = batch["input_ids"].shape[0]
        self.log("draft/val_loss", losses["loss"], prog_bar=True, batch_size=size)
        self.log("draft/val_ce", losses["ce"], batch_size=size)
        self.log("draft/val_align", losses["align"], batch_size=size)
        # How much of the target's top-k (level-restricted, on its beams) the draft ranks in its own top-k.
        mask = batch["beam_mask"][:, :, None].expand(-1, -1, len(self.level_blocks))
        overlap = topk_overlap(constrained_rows(losses["beam_logits"], self.level_blocks), batch["teacher_logits"],
                               mask, self.hparams.top_k)
        self.log("draft/val_topk_overlap", overlap, batch_size=size)

    def configure_optimizers(self):
        return adamw_warmup_cosine(self, self.model)
