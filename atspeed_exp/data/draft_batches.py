"""Batches for draft alignment (docs/method.md section 5): one packed sequence per example holds the true response AND the
K_t teacher beams, so one draft forward gives the logits of every context the objectives need (tree attention:
the shared prompt is processed once for all beams).

Packed layout of one example (P prompt tokens, L SID levels, K = K_t beams; here L = 4), right-padded to the batch:

    slot      0 .. P-1  | P    P+1  P+2  P+3  | P+4  P+5  P+6  | P+7  P+8  P+9  | ... | padding
    token     prompt    | r_0  r_1  r_2  r_3  | y0_0 y0_1 y0_2 | y1_0 y1_1 y1_2 | ... | pad
    position  0 .. P-1  | P    P+1  P+2  P+3  | P    P+1  P+2  | P    P+1  P+2  | ... | 0
    sees      causal    | prompt + r_<=j     | prompt + own beam's tokens <= j  | ... | itself only

r = the ground-truth response's first L tokens (its SIDs), yk_j = token j of teacher beam k (its last token is never
an input). A token of segment s (response or beam k) sees the prompt and the earlier tokens of s only, at the
position it would have in the plain sequence ``prompt + s``; so the logits read below equal those of running
``prompt + s`` alone. Padding sees only itself (no fully masked row, no NaN) and its outputs are never read.

Where the draft's logits are read (slots):
    gt_positions    [B, L+1]   P-1+t predicts r_t (levels t = 0..L-1); P+L-1 predicts EOS (CE only)
    beam_positions  [B, K, L]  level 0: P-1 (the prompt's last slot, shared by all beams);
                               level j >= 1: the slot of yk_{j-1}
The module reads exactly ``gt_positions`` and ``beam_positions[:, :, 1:]`` (``read_positions``), so the output
projection runs on B * (L+1 + K*(L-1)) rows, not on every slot.

Batch keys (B examples, T slots, S_max = the largest level block):
    input_ids [B, T] long; position_ids [B, T] long; attention_mask [B, 1, T, T] additive float (0 = visible,
    finfo.min = hidden); prompt_lengths [B] long;
    labels [B, L+1] long: response ids (SIDs + EOS) for the draft's CE, -100 past a short response;
    gt_positions, beam_positions: as above;
    beam_mask [B, K] bool: the beam exists (finite teacher score);
    beam_labels [B, K, L] long: each beam's level-local codes (token id - block start), -100 on missing beams;
    teacher_logits [B, K, L, S_max] float32: the target's level-t logits at beam k's context, -inf past S_t;
    teacher_logsumexp [B, K, L] float32: the target's full-vocabulary log-normaliser there;
    gt_teacher_logits [B, L, S_max], gt_teacher_logsumexp [B, L]: the same at the true response's contexts
    (only when the teacher data has them); gt_teacher_full_logits [B, L, V]: the target's whole vocabulary there
    (only when the teacher was made with full_vocab_gt).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from atspeed_exp.data.datamodule import LengthBucketBatchSampler, ResumableDataLoader
from atspeed_exp.data.prompts import IGNORE_INDEX
from atspeed_exp.data.recdata import EncodedSplit
from atspeed_exp.data.teacher import TeacherData, TeacherDataError, load_teacher_data

Blocks = Sequence[tuple[int, int]]


class DraftAlignmentDataset(Dataset):
    """Example i = (prompt, response) of ``split`` with the teacher data of example i.

    num_beams: use the teacher's best ``num_beams`` beams (None: all K_t). level_blocks: when given, checked against
    the blocks the teacher was made with. Raises TeacherDataError when the teacher does not belong to the split
    (another number of examples, other prompts, other level blocks) or has fewer beams than asked for."""

    def __init__(
        self,
        split: EncodedSplit,
        teacher: TeacherData,
        num_beams: int | None = None,
        level_blocks: Blocks | None = None,
    ) -> None:
        if len(teacher) != len(split):
            raise TeacherDataError(
                f"teacher data has {len(teacher)} examples but the split has {len(split)}: example i of the teacher "
                f"must be example i of the split it was generated from"
            )
        expected_sha = teacher.manifest.get("prompts_sha")
        if expected_sha is not None:
            found = hashlib.sha256(json.dumps(split.prompts).encode()).hexdigest()[:16]
            if found != expected_sha:
                raise TeacherDataError("teacher data was generated from other prompts than this split's")
        if level_blocks is not None and "level_blocks" in teacher.manifest:
            if [list(b) for b in level_blocks] != [list(b) for b in teacher.manifest["level_blocks"]]:
                raise TeacherDataError(
                    f"teacher level blocks {teacher.manifest['level_blocks']} != {[list(b) for b in level_blocks]}"
                )
        stored = int(teacher.tensors["sequences"].shape[1])
        if num_beams is not None and not 1 <= num_beams <= stored:
            raise TeacherDataError(f"num_beams={num_beams} but the teacher data holds {stored} beams per example")
        self.split = split
        self.teacher = teacher
        self.num_beams = stored if num_beams is None else int(num_beams)
        self.num_levels = int(teacher.tensors["sequences"].shape[2])

    @property
    def has_ground_truth(self) -> bool:
        return "gt_logsumexp" in self.teacher.tensors

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict:
        return {
            "prompt": self.split.prompts[index],
            "response": self.split.responses[index],
            "teacher": self.teacher.example(index),
            "num_beams": self.num_beams,
        }

    def packed_lengths(self) -> list[int]:
        """Packed sequence length of every example (for length bucketing)."""
        extra = self.num_levels + self.num_beams * (self.num_levels - 1)
        return [len(p) + extra for p in self.split.prompts]


def _padded_levels(levels: list[torch.Tensor], width: int) -> torch.Tensor:
    """Per level ``[..., S_t]`` -> ``[..., L, width]`` float32, -inf past each S_t."""
    out = []
    for logits in levels:
        pad = logits.new_full((*logits.shape[:-1], width - logits.shape[-1]), float("-inf"))
        out.append(torch.cat([logits, pad], dim=-1).float())
    return torch.stack(out, dim=-2)


def collate_draft_batch(
    items: list[dict], pad_id: int, level_blocks: Blocks, mask_dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Pack ``DraftAlignmentDataset`` items into one batch (layout and keys: module docstring)."""
    num_levels = len(level_blocks)
    num_beams = items[0]["num_beams"]
    s_max = max(end - start for start, end in level_blocks)
    starts = torch.tensor([start for start, _ in level_blocks])
    batch = len(items)
    prompt_lengths = torch.tensor([len(item["prompt"]) for item in items])
    if int(prompt_lengths.min()) < 1:
        raise ValueError("empty prompt in a draft batch")
    tail = num_levels + num_beams * (num_levels - 1)  # response slots + beam slots
    width = int(prompt_lengths.max()) + tail

    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    segment = torch.full((batch, width), -1, dtype=torch.long)  # -1 pad, 0 prompt, 1 response, 2+k beam k
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, num_levels + 1), IGNORE_INDEX, dtype=torch.long)
    sequences = torch.stack([item["teacher"]["sequences"][:num_beams].long() for item in items])  # [B, K, L]
    for row, item in enumerate(items):
        prompt, response = item["prompt"], item["response"]
        if len(response) < num_levels:
            raise ValueError(f"response {response} is shorter than the {num_levels} SID levels")
        plen = len(prompt)
        beam_tokens = sequences[row, :, : num_levels - 1].reshape(-1)  # [K*(L-1)], beam by beam
        input_ids[row, : plen + tail] = torch.cat(
            [torch.tensor(prompt), torch.tensor(response[:num_levels]), beam_tokens]
        )
        segment[row, :plen] = 0
        segment[row, plen : plen + num_levels] = 1
        segment[row, plen + num_levels : plen + tail] = 2 + torch.arange(num_beams).repeat_interleave(num_levels - 1)
        position_ids[row, :plen] = torch.arange(plen)
        position_ids[row, plen : plen + num_levels] = plen + torch.arange(num_levels)
        position_ids[row, plen + num_levels : plen + tail] = plen + torch.arange(num_levels - 1).repeat(num_beams)
        labels[row, : min(len(response), num_levels + 1)] = torch.tensor(response[: num_levels + 1])

    # visible[b, q, k]: key k is in the prompt or in q's own segment, and not after q; padding sees itself only.
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    q_pos, k_pos = position_ids[:, :, None], position_ids[:, None, :]
    visible = ((k_seg == 0) | (k_seg == q_seg)) & (k_pos <= q_pos) & (q_seg >= 0) & (k_seg >= 0)
    visible |= torch.eye(width, dtype=torch.bool)[None]  # [B, T, T]
    attention_mask = torch.zeros((batch, 1, width, width), dtype=mask_dtype)
    attention_mask.masked_fill_(~visible[:, None], torch.finfo(mask_dtype).min)

    gt_positions = prompt_lengths[:, None] - 1 + torch.arange(num_levels + 1)  # [B, L+1]
    beam_slots = prompt_lengths[:, None, None] + num_levels + (
        torch.arange(num_beams)[:, None] * (num_levels - 1) + torch.arange(num_levels - 1)
    )  # [B, K, L-1]: slot of yk_j
    beam_positions = torch.cat([(prompt_lengths - 1)[:, None, None].expand(-1, num_beams, 1), beam_slots], dim=2)

    teacher = [item["teacher"] for item in items]
    beam_mask = torch.stack([t["scores"][:num_beams] for t in teacher]).isfinite()  # [B, K]
    beam_labels = (sequences - starts).masked_fill(~beam_mask[:, :, None], IGNORE_INDEX)
    level_logits = [torch.stack([t["logits_0"] for t in teacher])[:, None].expand(-1, num_beams, -1)]
    level_logits += [torch.stack([t[f"logits_{d}"][:num_beams] for t in teacher]) for d in range(1, num_levels)]
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "prompt_lengths": prompt_lengths,
        "labels": labels,
        "gt_positions": gt_positions,
        "beam_positions": beam_positions,
        "beam_mask": beam_mask,
        "beam_labels": beam_labels,
        "teacher_logits": _padded_levels(level_logits, s_max),  # [B, K, L, S_max]
        "teacher_logsumexp": torch.stack([t["logsumexp"][:num_beams] for t in teacher]).float(),  # [B, K, L]
    }
    if "gt_logsumexp" in teacher[0]:
        gt_levels = [torch.stack([t[f"gt_logits_{d}"] for t in teacher]) for d in range(num_levels)]
        out["gt_teacher_logits"] = _padded_levels(gt_levels, s_max)  # [B, L, S_max]
        out["gt_teacher_logsumexp"] = torch.stack([t["gt_logsumexp"] for t in teacher]).float()  # [B, L]
    if "gt_full_logits" in teacher[0]:
        out["gt_teacher_full_logits"] = torch.stack([t["gt_full_logits"] for t in teacher]).float()  # [B, L, V]
    return out


def read_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The slots whose logits the objectives use, ``[B, L+1 + K*(L-1)]``: ``gt_positions`` then each beam's token
    slots (``beam_positions[:, :, 1:]``, beam by beam). Level 0 of every beam is ``gt_positions[:, 0]``."""
    return torch.cat([batch["gt_positions"], batch["beam_positions"][:, :, 1:].flatten(1)], dim=1)


def split_read_logits(logits: torch.Tensor, num_beams: int, num_levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at ``read_positions`` ``[B, L+1 + K*(L-1), V]`` -> (ground-truth contexts ``[B, L+1, V]``,
    beam contexts ``[B, K, L, V]``)."""
    batch, _, vocab = logits.shape
    gt = logits[:, : num_levels + 1]
    later = logits[:, num_levels + 1 :].reshape(batch, num_beams, num_levels - 1, vocab)  # [B, K, L-1, V]
    first = gt[:, None, :1].expand(-1, num_beams, -1, -1)  # [B, K, 1, V]: the shared prompt context
    return gt, torch.cat([first, later], dim=2)


def _as_teacher(teacher: TeacherData | str | Path) -> TeacherData:
    return teacher if isinstance(teacher, TeacherData) else load_teacher_data(teacher)


class DraftDataModule(pl.LightningDataModule):
    """Training (and optionally validation) batches for draft alignment from (split, teacher) pairs. Teachers may
    be given loaded or as directories. Without validation data there are no validation batches."""

    def __init__(
        self,
        train_split: EncodedSplit,
        train_teacher: TeacherData | str | Path,
        val_split: EncodedSplit | None = None,
        val_teacher: TeacherData | str | Path | None = None,
        *,
        level_blocks: Blocks,
        pad_id: int,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_beams: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if (val_split is None) != (val_teacher is None):
            raise ValueError("give both val_split and val_teacher, or neither")
        self.level_blocks = [tuple(b) for b in level_blocks]
        self.train_set = DraftAlignmentDataset(train_split, _as_teacher(train_teacher), num_beams, self.level_blocks)
        self.val_set = (
            DraftAlignmentDataset(val_split, _as_teacher(val_teacher), num_beams, self.level_blocks)
            if val_split is not None else None
        )
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.collate = partial(collate_draft_batch, pad_id=pad_id, level_blocks=self.level_blocks)

    def train_dataloader(self) -> DataLoader:
        sampler = LengthBucketBatchSampler(self.train_set.packed_lengths(), self.batch_size, seed=self.seed)
        return ResumableDataLoader(self.train_set, batch_sampler=sampler, seed=self.seed, collate_fn=self.collate,
                                   num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate,
                          num_workers=self.num_workers)
