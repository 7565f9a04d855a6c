"""Draft alignment (docs/method.md section 5): ``loss = (1 - alpha) * CE + alpha * L_align``.

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
- ``full_vocab=True`` (KL and TVD, the public WordKD / TVD-KD form): every row is the whole vocabulary, no level
  mask: the draft's logits and the target's full-vocabulary logits at the ground-truth positions, which the teacher
  stage stores with ``teacher.full_vocab_gt=true``.

Public-code variants (Linxyhaha/AtSpeed, code/model.py and its scripts), each an option beside the project's form:
``temperature_form="public"`` (AtSpeed-S: τ divides the top-K probabilities, ``atspeed_s_loss``), ``full_vocab``
(above) and ``seqkd_first_label="ground_truth"`` (SeqKD: the first position of every teacher beam is labelled with
the ground truth's first code instead of the beam's own; the other positions keep the beam's codes).

On-policy beams (``on_policy_ratio`` > 0, the paper's AtSpeed-S training on draft-generated sequences): in each
training batch a random ``ratio`` share of the examples (drawn per step from the global step, so a resumed run draws
the same; the length-bucketed batches are sorted by length, so a fixed slice would always pick the shortest
histories) get the draft's OWN K-beam constrained beam search instead of the stored teacher beams; the frozen target
(``attach_target``) scores them on the fly with one forward over the same packed layout (output projection only at
the rows read), and the objective then runs on these rows as on teacher rows. AtSpeed-S and AtSpeed-R only: they
compare the draft's distributions with the target's on the draft's beams; SeqKD's labels would become the draft's
own beams (nothing from the target). The time it
takes is logged as ``draft/on_policy_s``. Validation always uses the stored teacher beams.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from atspeed_exp.data.draft_batches import read_positions, split_read_logits
from atspeed_exp.data.prompts import IGNORE_INDEX
from atspeed_exp.decoding.beam_search import left_pad
from atspeed_exp.decoding.protocol import DecoderLM
from atspeed_exp.decoding.tree import tree_beam_search
from atspeed_exp.decoding.trie import ItemTrie
from atspeed_exp.lit.schedules import adamw_warmup_cosine
from atspeed_exp.losses.alignment import get_alignment_loss, mixed_loss
from atspeed_exp.models.lean import decoder_for

GROUND_TRUTH_OBJECTIVES = ("kl", "tvd")  # rows at the true response; the others use the teacher beams
SEQKD_FIRST_LABELS = ("beam", "ground_truth")
ON_POLICY_OBJECTIVES = ("atspeed_s", "atspeed_r")  # distribution matching on the draft's own beams
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
    full-vocabulary summary; full_vocab: KL/TVD over the whole vocabulary; temperature_form (AtSpeed-S) and
    seqkd_first_label (SeqKD): the public code's variants (module docstring)."""

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
        full_vocab: bool = False,
        temperature_form: str = "power",
        seqkd_first_label: str = "beam",
        on_policy_ratio: float = 0.0,
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
        if full_vocab and objective not in GROUND_TRUTH_OBJECTIVES:
            raise ValueError(f"alignment.full_vocab=true applies to {GROUND_TRUTH_OBJECTIVES} only, not {objective!r}")
        if not 0.0 <= on_policy_ratio <= 1.0:
            raise ValueError(f"alignment.on_policy_ratio must be in [0, 1], got {on_policy_ratio}")
        if on_policy_ratio > 0 and objective not in ON_POLICY_OBJECTIVES:
            raise ValueError(f"alignment.on_policy_ratio applies to {ON_POLICY_OBJECTIVES} only, not {objective!r}")
        if seqkd_first_label not in SEQKD_FIRST_LABELS:
            raise ValueError(f"alignment.seqkd_first_label={seqkd_first_label!r}: expected one of {SEQKD_FIRST_LABELS}")
        level_blocks = [tuple(int(x) for x in block) for block in level_blocks]
        self.save_hyperparameters(ignore=["model"])  # level_blocks as normalised above
        self.model = model
        self.level_blocks = level_blocks
        self._scorer: tuple[DecoderLM, ItemTrie] | None = None  # (frozen target, trie) for on-policy beams

    def attach_target(self, target: DecoderLM, trie: ItemTrie) -> None:
        """The frozen target (behind the decoding protocol, not a submodule: never trained nor checkpointed) and the
        item trie, both on the module's device; needed when ``on_policy_ratio`` > 0."""
        self._scorer = (target, trie)

    @torch.no_grad()
    def on_policy_batch(self, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``batch`` with the teacher beams of examples ``rows`` (``[n]`` indices) replaced by the draft's own beam
        search (K = the batch's beams) and the target's level logits at those beams' contexts (module docstring)."""
        if self._scorer is None:
            raise RuntimeError("on_policy_ratio > 0 needs the frozen target: call attach_target(target, trie)")
        target, trie = self._scorer
        rows = torch.as_tensor(rows, dtype=torch.long, device=batch["input_ids"].device)
        num_beams, num_levels = batch["beam_positions"].shape[1:]
        lengths = batch["prompt_lengths"][rows].tolist()
        ids, mask = left_pad([batch["input_ids"][r, :n] for r, n in zip(rows.tolist(), lengths)], 0)
        was_training = self.model.training
        self.model.eval()
        try:
            beams = tree_beam_search(decoder_for(self.model), ids, mask, trie, num_beams)
        finally:
            self.model.train(was_training)
        alive = torch.isfinite(beams.sequence_scores)  # [n, K]
        tokens = beams.sequences.masked_fill(~alive[:, :, None], 0)  # [n, K, L]; dead beams' rows are masked out
        out = dict(batch)
        input_ids = batch["input_ids"].clone()
        slots = batch["beam_positions"][rows, :, 1:]  # [n, K, L-1]: the slot of each beam's token j
        input_ids[rows] = input_ids[rows].scatter(1, slots.flatten(1), tokens[:, :, : num_levels - 1].flatten(1))
        out["input_ids"] = input_ids
        mask4d = batch["attention_mask"][rows].to(target.dtype)
        mask4d = mask4d.masked_fill(batch["attention_mask"][rows] < 0, torch.finfo(target.dtype).min)
        hidden, _ = target.hidden(input_ids[rows], batch["position_ids"][rows], mask4d, target.new_cache())  # [n, T, H]
        at = batch["beam_positions"][rows].flatten(1)  # [n, K*L]
        read = target.project(hidden.gather(1, at[:, :, None].expand(-1, -1, hidden.shape[-1])))  # [n, K*L, V]
        read = read.float().reshape(len(rows), num_beams, num_levels, -1)  # [n, K, L, V]
        starts = torch.tensor([start for start, _ in self.level_blocks], device=tokens.device)
        for key, value in (
            ("teacher_logits", constrained_rows(read, self.level_blocks)),
            ("teacher_logsumexp", read.logsumexp(-1)),
            ("beam_mask", alive),
            ("beam_labels", (tokens - starts).masked_fill(~alive[:, :, None], IGNORE_INDEX)),
        ):
            merged = batch[key].clone()
            merged[rows] = value.to(merged.dtype)
            out[key] = merged
        return out

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

    def seqkd_labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """SeqKD's hard labels ``[B, K, L]`` (level-local codes, -100 on missing beams): the beams' own codes, or
        with ``seqkd_first_label="ground_truth"`` the true response's first code at position 0 of every beam."""
        labels = batch["beam_labels"]
        if self.hparams.seqkd_first_label == "beam":
            return labels
        first = batch["labels"][:, 0] - self.level_blocks[0][0]  # [B] the true first code, level-local
        return torch.cat([torch.where(labels[:, :, :1] >= 0, first[:, None, None], labels[:, :, :1]),
                          labels[:, :, 1:]], dim=2)

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
            if hp.full_vocab:
                if "gt_teacher_full_logits" not in batch:
                    raise ValueError("alignment.full_vocab=true needs the target's full-vocabulary logits at the "
                                     "ground-truth positions: generate the teacher data with teacher.full_vocab_gt=true")
                draft, target = gt_logits[:, :num_levels], batch["gt_teacher_full_logits"]  # [B, L, V]
            else:
                draft, target = self._rows(gt_logits[:, :num_levels], batch["gt_teacher_logits"],
                                           batch["gt_teacher_logsumexp"])
            mask = torch.ones(draft.shape[:-1], dtype=torch.bool, device=draft.device)  # [B, L]
        else:
            draft, target = self._rows(beam_logits, batch["teacher_logits"], batch["teacher_logsumexp"])
            mask = batch["beam_mask"][:, :, None].expand(-1, -1, num_levels)  # [B, K, L]
        if hp.objective == "seqkd":
            align = self.alignment_loss(draft, self.seqkd_labels(batch), mask)
        elif hp.objective == "atspeed_s":
            align = self.alignment_loss(draft, target, mask, top_k=hp.top_k, temperature=hp.temperature,
                                        density_weight=hp.density_weight, temperature_form=hp.temperature_form)
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
        size = batch["input_ids"].shape[0]
        if self.hparams.on_policy_ratio > 0:
            generator = torch.Generator().manual_seed(self.global_step)  # the same draw after a resume
            rows = torch.rand(size, generator=generator) < self.hparams.on_policy_ratio  # [B] each with P = ratio
            rows = rows.nonzero().flatten().to(batch["input_ids"].device)
        else:
            rows = torch.zeros(0, dtype=torch.long)
        if len(rows):
            start = time.perf_counter()
            batch = self.on_policy_batch(batch, rows)
            self.log("draft/on_policy_s", time.perf_counter() - start, batch_size=size)
        losses = self.compute_losses(batch)
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
