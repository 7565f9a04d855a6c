"""Batched, trie-constrained beam search on one model with a KV cache and one prompt prefill per user.

Contract: for B prompts, return each user's top-K items under the model's cumulative log-probability of the SID
(the same ranking as transformers ``generate(num_beams=K, length_penalty=0)`` with the trie as
``prefix_allowed_tokens_fn``). Cost: exactly L model calls (one prefill, then L - 1 cached steps of B*K rows).
Beam state lives in ``[B, K, ...]`` tensors; every step is tensor operations, nothing per beam in Python.

The pieces (masked level log-probs of the needed rows, top-K selection, item expansion) are public because speculative beam
search reuses them: it must make exactly the same choices as this function to be lossless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from atspeed_exp.decoding.processors.base import ScoreProcessor, apply_processors, begin_all
from atspeed_exp.decoding.protocol import DecoderLM, mask_value
from atspeed_exp.decoding.trie import ItemTrie


@dataclass
class BeamSearchOutput:
    items: torch.Tensor  # [B, K] long, -1 where fewer than K items exist
    scores: torch.Tensor  # [B, K] float, cumulative log-prob of each item's SID (-inf for -1 items)
    sequences: torch.Tensor  # [B, K, L] long: the K beams' SID token ids, best first
    sequence_scores: torch.Tensor  # [B, K] float
    model_calls: int  # forward calls of the model for the whole batch
    tokens_processed: int  # tokens fed to the model (prompt tokens incl. padding + beam tokens)
    # With record_logits: for each final beam k and position t, the model's raw logits over level t's block at
    # the context (prompt + beam k's first t tokens): a list over t of [B, K, S_t]; and the log-normaliser over the
    # full vocabulary at the same contexts [B, K, L] (full-vocab log-prob = logit - lse). Teacher data for drafts.
    level_logits: list[torch.Tensor] | None = None
    full_logsumexp: torch.Tensor | None = None


def left_pad(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D prompts to ``ids [B, P]`` and ``mask [B, P]`` (bool), padded on the left so that every
    prompt ends at column P - 1."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    lengths = [int(p.numel()) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"empty prompt at position {lengths.index(0)}")
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):  # once per batch, not per step
        ids[row, width - lengths[row] :] = prompt
        mask[row, width - lengths[row] :] = True
    return ids, mask


def prompt_positions(prompt_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, P]`` of left-padded prompts: 0 at each prompt's first real token."""
    return (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_prefill_mask(prompt_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[B, 1, P, P]``: causal, and padding keys hidden."""
    width = prompt_mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=prompt_mask.device).tril()
    visible = causal[None] & prompt_mask[:, None, :]  # [B, P, P]
    return additive(visible[:, None], dtype)


def additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool visibility -> additive float mask (0 where visible)."""
    mask = torch.where(visible, 0.0, mask_value(dtype))  # one op (the default float dtype)
    return mask if mask.dtype == dtype else mask.to(dtype)


SCOPES = ("vocab", "level")


def level_scores(
    model: DecoderLM,
    hidden: torch.Tensor,  # [..., H] final hidden states of the rows that need scores
    trie: ItemTrie,
    nodes: torch.Tensor,  # [...] global trie nodes (a node carries its depth)
    depths: list[int],  # the distinct depths (< L) of the live rows, known on the host
    scope: str = "vocab",
    record: bool = False,
    same_depth: bool = False,
    processors: Sequence[ScoreProcessor] = (),
    rows: torch.Tensor | None = None,  # [B] each row's user in the call (processors only; None: row b is user b)
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Log-probabilities ``[..., max_block]`` of each row's next SID code, -inf where the trie forbids it (and past
    the row's block), from the output projection of these rows only.

    scope ``"vocab"``: normalised over the full vocabulary (the model's likelihood; transformers' beam search ranks
    by it), so the projection covers every token. ``"level"``: normalised over the row's level block, so the
    projection covers only that block (``max_block`` columns instead of V: the cheap form for large vocabularies;
    rankings differ only by the mass a model puts outside the block). Rows of several depths (ragged batches) get
    one projection per depth in ``depths``; rows at other depths (dead, finished) stay -inf.
    With ``record``: also (raw block logits ``[..., max_block]``, log-normaliser ``[...]``) for teacher data.
    ``same_depth``: the caller guarantees that every row's node is at ``depths[0]`` or dead (dead nodes and leaves
    allow nothing), as in beam search and single-depth speculative rounds, so the per-row depth check is skipped.
    ``processors`` (``processors/``, begun for the call) then map the masked log-probs ``[B, M, S]`` (``nodes``
    ``[B, M]``) to the step scores every decoder ranks by; the record stays the model's own.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    width = trie.max_block
    if len(depths) == 1 and not record:  # lockstep (beam search, batch-1 SD): one block, no per-row selection
        start, end = trie.block(depths[0])
        if scope == "vocab":
            log_probs = torch.log_softmax(model.project(hidden), dim=-1)[..., start:end]
        else:
            log_probs = torch.log_softmax(model.project(hidden, start, end), dim=-1)
        log_probs = _pad_block(log_probs, width)
        here = trie.global_allowed[nodes]
        if not same_depth:  # a live node of another depth (a ragged batch) must not read this block
            here = here & (trie.node_depth[nodes] == depths[0])[..., None]
        log_probs = torch.where(here, log_probs, float("-inf"))
        return apply_processors(processors, log_probs, nodes, trie, rows), None
    row_depth = trie.node_depth[nodes]
    out = torch.full((*nodes.shape, width), float("-inf"), device=hidden.device)
    raw = torch.full_like(out, float("-inf")) if record else None
    norm = torch.full(nodes.shape, float("-inf"), device=hidden.device) if record else None
    full = full_lse = None
    if scope == "vocab" and depths:
        full = model.project(hidden)  # [..., V]
        full_lse = torch.logsumexp(full, dim=-1)
    for depth in depths:
        start, end = trie.block(depth)
        if full is not None:
            block, lse = full[..., start:end], full_lse
        else:
            block = model.project(hidden, start, end)
            lse = torch.logsumexp(block, dim=-1)
        block = _pad_block(block, width)
        here = (row_depth == depth)[..., None]
        out = torch.where(here, block - lse[..., None], out)
        if record:
            raw = torch.where(here, block, raw)
            norm = torch.where(here[..., 0], lse, norm)
    out = out.masked_fill(~trie.global_allowed[nodes], float("-inf"))
    return apply_processors(processors, out, nodes, trie, rows), ((raw, norm) if record else None)


def _pad_block(block: torch.Tensor, width: int) -> torch.Tensor:
    """A level's scores ``[..., S]`` padded with -inf to the widest block's ``width`` columns."""
    missing = width - block.shape[-1]
    return block if missing == 0 else torch.cat([block, block.new_full((*block.shape[:-1], missing), float("-inf"))], -1)


def select_top_k(
    beam_scores: torch.Tensor, step_log_probs: torch.Tensor, num_beams: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``num_beams`` continuations of all beams.

    beam_scores: ``[B, M]``; step_log_probs: ``[B, M, S]``. Returns (scores ``[B, num_beams]`` descending,
    parent beam ``[B, num_beams]``, local code ``[B, num_beams]``). Missing candidates come back as -inf.
    """
    batch, beams, size = step_log_probs.shape
    total = (beam_scores[:, :, None] + step_log_probs).reshape(batch, beams * size)  # [B, M*S]
    if total.shape[1] < num_beams:  # fewer candidates than beams: pad with impossible ones
        pad = total.new_full((batch, num_beams - total.shape[1]), float("-inf"))
        total = torch.cat([total, pad], dim=1)
    scores, flat = total.topk(num_beams, dim=1)
    flat = flat.clamp(max=beams * size - 1)
    return scores, flat // size, flat % size


def expand_items(
    trie: ItemTrie, leaves: torch.Tensor, scores: torch.Tensor, num_items: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn ranked leaves ``[B, M]`` into ranked items ``[B, num_items]``: a SID shared by several items expands to
    all of them (ascending id) in its rank; the list is cut at ``num_items``; -1 / -inf pad short lists."""
    batch = leaves.shape[0]
    items = trie.items_of_leaves(leaves).reshape(batch, -1)  # [B, M*C], rank order kept
    width = trie.leaf_items.shape[1]
    item_scores = scores[:, :, None].expand(-1, -1, width).reshape(batch, -1)
    valid = items >= 0
    # stable compaction: valid entries first, in their original order
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    items = items.gather(1, order)[:, :num_items]
    item_scores = item_scores.gather(1, order)[:, :num_items]
    item_scores = item_scores.masked_fill(items < 0, float("-inf"))
    if items.shape[1] < num_items:
        pad = num_items - items.shape[1]
        items = torch.cat([items, items.new_full((batch, pad), -1)], dim=1)
        item_scores = torch.cat([item_scores, item_scores.new_full((batch, pad), float("-inf"))], dim=1)
    return items, item_scores


def check_beam_settings(trie: ItemTrie, num_beams: int) -> None:
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > trie.num_leaves:
        raise ValueError(f"num_beams={num_beams} exceeds the number of distinct valid SIDs ({trie.num_leaves})")


@torch.inference_mode()
def beam_search(
    model: DecoderLM,
    prompt_ids: torch.Tensor,  # [B, P] left-padded
    prompt_mask: torch.Tensor,  # [B, P] bool
    trie: ItemTrie,
    num_beams: int,
    record_logits: bool = False,
    select: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = select_top_k,
    scope: str = "vocab",
    processors: Sequence[ScoreProcessor] = (),
) -> BeamSearchOutput:
    """Trie-constrained beam search with ``num_beams`` beams for each of B prompts (see module docstring).
    ``record_logits`` also returns, per final beam, the level logits at each of its positions (no extra calls:
    a final beam's prefixes were all beams when their logits were computed). ``select`` picks each depth's beams
    (``select_top_k``: beam search; a sampler with the same signature gives beam sampling). ``scope``: the
    normaliser of the level log-probs (``level_scores``); logits are computed only for the rows selection uses.
    ``processors``: score processors (``processors/``) applied to every step's log-probs; beams, scores and items
    then follow the processed scores."""
    check_beam_settings(trie, num_beams)
    batch, prompt_width = prompt_ids.shape
    device = prompt_ids.device
    num_levels = trie.num_levels
    processors = begin_all(processors, prompt_ids, prompt_mask, trie)

    hidden, cache = model.hidden(
        prompt_ids, prompt_positions(prompt_mask), causal_prefill_mask(prompt_mask, model.dtype), model.new_cache()
    )
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []  # per depth: (level logits [B, M, S], lse [B, M])
    parents: list[torch.Tensor] = []  # per depth: parent beam [B, K] of each new beam
    # Level 0: one live beam per user (the prompt); its K copies come from the cache reorder below.
    nodes = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the root
    beam_scores = torch.zeros(batch, 1, device=device)
    step_logp, record = level_scores(model, hidden[:, -1:], trie, nodes, [0], scope, record_logits,
                                     same_depth=True, processors=processors)  # [B, 1, S]
    if record is not None:
        recorded.append(_level_record(record, trie, 0))
    beam_scores, parent, codes = select(beam_scores, step_logp, num_beams)
    parents.append(parent)
    nodes = _advance(trie, nodes, parent, codes, beam_scores, 1)
    sequences = codes[:, :, None] + trie.block(0)[0]  # [B, K, 1]
    rows = torch.arange(batch, device=device)
    cache = model.reorder_cache(cache, rows.repeat_interleave(num_beams))
    key_mask = prompt_mask.repeat_interleave(num_beams, dim=0)  # [B*K, P]
    positions = prompt_mask.long().sum(-1).repeat_interleave(num_beams)  # [B*K] next position per row
    calls, tokens = 1, batch * prompt_width

    for depth in range(1, num_levels):
        key_mask = torch.cat([key_mask, key_mask.new_ones(batch * num_beams, 1)], dim=1)
        hidden, cache = model.hidden(
            sequences[:, :, -1].reshape(-1, 1),  # [B*K, 1]
            (positions + depth - 1)[:, None],
            additive(key_mask[:, None, None, :], model.dtype),  # [B*K, 1, 1, P + depth]
            cache,
        )
        calls, tokens = calls + 1, tokens + batch * num_beams
        step_hidden = hidden[:, -1].view(batch, num_beams, -1)  # [B, K, H]
        step_logp, record = level_scores(model, step_hidden, trie, nodes, [depth], scope, record_logits,
                                         same_depth=True, processors=processors)
        if record is not None:
            recorded.append(_level_record(record, trie, depth))
        beam_scores, parent, codes = select(beam_scores, step_logp, num_beams)
        parents.append(parent)
        nodes = _advance(trie, nodes, parent, codes, beam_scores, depth + 1)
        sequences = torch.cat(
            [sequences.gather(1, parent[:, :, None].expand(-1, -1, depth)), (codes + trie.block(depth)[0])[:, :, None]],
            dim=2,
        )
        if depth < num_levels - 1:
            cache = model.reorder_cache(cache, (rows[:, None] * num_beams + parent).reshape(-1))

    # best first (a no-op after top-K selection; a sampler returns its draws in draw order)
    order = beam_scores.argsort(dim=1, descending=True, stable=True)  # [B, K]
    beam_scores, nodes = beam_scores.gather(1, order), nodes.gather(1, order)
    sequences = sequences.gather(1, order[:, :, None].expand_as(sequences))
    items, item_scores = expand_items(trie, trie.global_leaves_to_local(nodes), beam_scores, num_beams)
    output = BeamSearchOutput(items, item_scores, sequences, beam_scores, calls, tokens)
    if record_logits:
        output.level_logits, output.full_logsumexp = _backtrack_records(recorded, parents, order)
    return output


def _advance(
    trie: ItemTrie, nodes: torch.Tensor, parent: torch.Tensor, codes: torch.Tensor, scores: torch.Tensor, depth: int
) -> torch.Tensor:
    """Global nodes at ``depth`` of the selected (parent, code) pairs; the dead node for impossible selections."""
    new = trie.global_advance(nodes.gather(1, parent), codes)
    return torch.where(torch.isinf(scores), trie.global_dead[depth], new)


def _level_record(
    record: tuple[torch.Tensor, torch.Tensor], trie: ItemTrie, depth: int
) -> tuple[torch.Tensor, torch.Tensor]:
    start, end = trie.block(depth)
    raw, norm = record
    return raw[..., : end - start], norm


def _backtrack_records(
    recorded: list[tuple[torch.Tensor, torch.Tensor]], parents: list[torch.Tensor], final_order: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Align per-depth records with the final beams: the depth-t context of final beam k is its ancestor at
    depth t, found by following parent pointers back from the last step."""
    num_levels = len(recorded)
    ancestor = final_order  # [B, K]: the output's beam k is the last step's beam final_order[:, k]
    level_logits: list[torch.Tensor] = [None] * num_levels  # type: ignore[list-item]
    lse: list[torch.Tensor] = [None] * num_levels  # type: ignore[list-item]
    for depth in range(num_levels - 1, -1, -1):
        ancestor = parents[depth].gather(1, ancestor)  # beam index at depth `depth` (0 at the prompt)
        logits, norm = recorded[depth]
        level_logits[depth] = logits.gather(1, ancestor[:, :, None].expand(-1, -1, logits.shape[-1]))
        lse[depth] = norm.gather(1, ancestor)
    return level_logits, torch.stack(lse, dim=-1)
