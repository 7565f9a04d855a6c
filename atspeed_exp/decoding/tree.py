"""Tree attention over one cache row per user, and the token tree of a speculative round: the state beam search
(``tree_beam_search``), the speculative engine, the drafters and the verification rules share.

A beam is a bool visibility vector over its user's cache columns (the prompt and its own fed ancestors); a call
appends chains of tokens whose attention rows come from those vectors, so beams never copy or reorder the cache.
A round's tree is a list of ``Level``s (level 0: the current beams; level l: the l-th drafted depth), each node
holding its parent's index in the level before, its code and the draft's scores; drafters build it, the engine
verifies it, the rules in ``verify/`` accept from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from atspeed_exp.decoding.beam_search import (
    BeamSearchOutput,
    _advance,
    _backtrack_records,
    _level_record,
    additive,
    causal_prefill_mask,
    check_beam_settings,
    expand_items,
    level_scores,
    prompt_positions,
    select_top_k,
)
from atspeed_exp.decoding.processors.base import ScoreProcessor, begin_all
from atspeed_exp.decoding.protocol import DecoderLM
from atspeed_exp.decoding.sampling import NEG_INF
from atspeed_exp.decoding.trie import ItemTrie


def take_beams(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` ``[B, M']`` of ``x`` ``[B, M, *rest]`` -> ``[B, M', *rest]``."""
    if x.dim() == 2:  # one op instead of three: every op is a kernel launch on a GPU, ~5 us on the CPU
        return x.gather(1, index)
    view = index.reshape(*index.shape, *([1] * (x.dim() - 2)))
    return x.gather(1, view.expand(*index.shape, *x.shape[2:]))


def widen(visible: torch.Tensor, width: int) -> torch.Tensor:
    """Pad a visibility ``[..., w]`` with False up to ``width`` keys (keys appended after it was built)."""
    missing = width - visible.shape[-1]
    return visible if missing == 0 else torch.cat([visible, visible.new_zeros(*visible.shape[:-1], missing)], -1)


class TreeCall:
    """Assembles the queries of one model call: blocks of chains of tokens, each chain attending to its beam's
    visible cache columns, to the earlier valid tokens of its own chain and to itself (tree attention). Void
    tokens (padding, dead beams, levels a user does not need) are fed but seen by nobody and not counted."""

    def __init__(self, cache_len: int, device: torch.device) -> None:
        self.width, self.device = cache_len, device
        self.num_queries = 0
        self.ids: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []  # per block [B, n, width at its add]
        self.valid: list[torch.Tensor] = []

    def valid_counts(self) -> torch.Tensor:
        """Real (non-void) tokens of this call per batch row ``[B]``."""
        return (self.valid[0] if len(self.valid) == 1 else torch.cat(self.valid, 1)).sum(1)

    def add(
        self, visible: torch.Tensor, tokens: torch.Tensor, start: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, slice]:
        """visible ``[B, M, w <= width]``, tokens ``[B, M, p]`` (a chain per beam), start ``[B, M]`` position of
        each chain's first slot, valid ``[B, M, p]``. Returns the beams' visibility once the chain is fed
        ``[B, M, width']`` and the queries of the chains' last tokens, as a slice of the call's query axis (a view,
        not a gather: ``hidden[:, last]`` is ``[B, M, H]``)."""
        batch, beams, length = tokens.shape
        visible = widen(visible, self.width)
        if length == 1:  # one token per beam (every call but a round's first): it sees itself
            rows = torch.cat([visible, torch.diag_embed(valid[:, :, 0])], dim=-1)  # [B, M, width + M]
            positions = start.clamp(min=0)
            last_rows = rows
        else:
            eye = torch.eye(beams, dtype=torch.bool, device=self.device)
            causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
            own = (eye[:, None, :, None] & causal[None, :, None, :]).reshape(beams, length, beams * length)
            own = own[None] & valid.reshape(batch, 1, 1, beams * length)  # void keys hidden; [B, M, p, M*p]
            rows = torch.cat([visible[:, :, None].expand(-1, -1, length, -1), own], dim=-1)  # [B, M, p, width+M*p]
            positions = (start[:, :, None] + torch.arange(length, device=self.device)).clamp(min=0)
            last_rows = rows[:, :, -1]
            rows = rows.reshape(batch, beams * length, -1)
        first = self.num_queries + length - 1
        last = slice(first, first + beams * length, length)
        self.ids.append(tokens.reshape(batch, beams * length))
        self.positions.append(positions.reshape(batch, -1))
        self.rows.append(rows)
        self.valid.append(valid.reshape(batch, beams * length))
        self.width += beams * length
        self.num_queries += beams * length
        return last_rows, last

    def hidden(self, model: DecoderLM, cache: Any) -> tuple[torch.Tensor, Any]:
        if len(self.rows) == 1:
            ids, positions, rows = self.ids[0], self.positions[0], self.rows[0]
        else:  # blocks are narrower than the call's keys: place them in one mask instead of padding each
            ids, positions = torch.cat(self.ids, 1), torch.cat(self.positions, 1)
            rows = torch.zeros(ids.shape[0], self.num_queries, self.width, dtype=torch.bool, device=self.device)
            query = 0
            for block in self.rows:
                rows[:, query : query + block.shape[1], : block.shape[2]] = block
                query += block.shape[1]
        return model.hidden(ids, positions, additive(rows[:, None], model.dtype), cache)


@torch.inference_mode()
def tree_beam_search(
    model: DecoderLM,
    prompt_ids: torch.Tensor,  # [B, P] left-padded
    prompt_mask: torch.Tensor,  # [B, P] bool
    trie: ItemTrie,
    num_beams: int,
    scope: str = "vocab",
    record_logits: bool = False,
    processors: Sequence[ScoreProcessor] = (),
) -> BeamSearchOutput:
    """The same lists as ``beam_search`` (up to float rounding), with ONE cache row per user: each step appends the
    K beams' new tokens to their user's row with tree attention instead of keeping K copies of the prompt's cache and
    reordering them. L calls; a step processes B*K tokens as in ``beam_search`` but never copies the cache, which is
    what large batches pay for on memory-bound hardware (``beam_search`` replicates and reorders B*K rows).
    ``record_logits``, ``processors``: as in ``beam_search``."""
    check_beam_settings(trie, num_beams)
    batch, prompt_width = prompt_ids.shape
    device = prompt_ids.device
    processors = begin_all(processors, prompt_ids, prompt_mask, trie)
    hidden, cache = model.hidden(
        prompt_ids, prompt_positions(prompt_mask), causal_prefill_mask(prompt_mask, model.dtype), model.new_cache()
    )
    nodes = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the root
    scores = torch.zeros(batch, 1, device=device)
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []  # per depth: (level logits, normaliser) of all beams
    parents: list[torch.Tensor] = []
    log_probs, record = level_scores(model, hidden[:, -1:], trie, nodes, [0], scope, record_logits, same_depth=True,
                                     processors=processors)
    if record is not None:
        recorded.append(_level_record(record, trie, 0))
    scores, parent, codes = select_top_k(scores, log_probs, num_beams)
    parents.append(parent)
    nodes = _advance(trie, nodes, parent, codes, scores, 1)
    visible = prompt_mask[:, None, :].expand(-1, num_beams, -1)  # [B, K, C]: every level-1 beam sees the prompt
    position = prompt_mask.long().sum(1, keepdim=True).expand(-1, num_beams)  # [B, K] next position
    sequences = (codes + trie.block(0)[0])[:, :, None]
    calls, tokens = 1, batch * prompt_width
    for depth in range(1, trie.num_levels):
        call = TreeCall(visible.shape[2], device)
        visible, last = call.add(visible, sequences[:, :, -1:], position, torch.isfinite(scores)[:, :, None])
        hidden, cache = call.hidden(model, cache)
        calls, tokens = calls + 1, tokens + batch * num_beams
        log_probs, record = level_scores(model, hidden[:, last], trie, nodes, [depth], scope, record_logits,
                                         same_depth=True, processors=processors)
        if record is not None:
            recorded.append(_level_record(record, trie, depth))
        scores, parent, codes = select_top_k(scores, log_probs, num_beams)
        parents.append(parent)
        nodes = _advance(trie, nodes, parent, codes, scores, depth + 1)
        visible, position = take_beams(visible, parent), take_beams(position, parent) + 1
        sequences = torch.cat([take_beams(sequences, parent), (codes + trie.block(depth)[0])[:, :, None]], dim=2)
    items, item_scores = expand_items(trie, trie.global_leaves_to_local(nodes), scores, num_beams)
    output = BeamSearchOutput(items, item_scores, sequences, scores, calls, tokens)
    if record_logits:  # top-K selection leaves the final beams best first: the identity order
        order = torch.arange(num_beams, device=device).expand(batch, -1)
        output.level_logits, output.full_logsumexp = _backtrack_records(recorded, parents, order)
    return output


# -- the token tree of a speculative round --------------------------------------------------------------------------
@dataclass
class View:
    """One model's view of the current beams."""

    cache: Any
    visible: torch.Tensor  # [B, M, C] bool over the C cache columns: prompt + the beam's fed ancestors
    pending: torch.Tensor  # [B, M, p] token ids not fed to this model yet (round 1: the prompt)
    pending_valid: torch.Tensor  # [B, M, p] bool: False for void slots (left padding, dead beams)
    position: torch.Tensor  # [B, M] position id of the first pending slot (the last slot is always real)

    @classmethod
    def round_one(cls, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cache: Any = None) -> "View":
        """Before the first call: one beam per user, nothing in ``cache``, the (left-padded) prompt ``[B, P]``
        pending, so the first call is the prefill; void padding slots get positions < 0."""
        batch, width = prompt_ids.shape
        empty = torch.zeros(batch, 1, 0, dtype=torch.bool, device=prompt_ids.device)
        position = (prompt_mask.long().sum(1) - width)[:, None]
        return cls(cache, empty, prompt_ids[:, None], prompt_mask[:, None], position)


@dataclass
class Level:
    """One depth of a round's token tree: level 0 = the current beams, level l = the l-th drafted step. A drafter
    fills the tree fields and the draft's scores (``draft_visible`` only if it runs a model); the engine fills the
    target's fields in the verify call."""

    sequences: torch.Tensor  # [B, M, L]
    nodes: torch.Tensor  # [B, M] global trie nodes (dead for placeholders and void levels)
    draft_scores: torch.Tensor  # [B, M] cumulative score the drafter ranks / samples with (-inf: dead)
    position: torch.Tensor  # [B, M] position id of the next token after this node
    token: torch.Tensor | None = None  # [B, M] this node's token id (drafted levels)
    parent: torch.Tensor | None = None  # [B, M] index into the previous level
    codes: torch.Tensor | None = None  # [B, M] local code of this node's token
    draft_visible: torch.Tensor | None = None  # [B, M, C_d] once fed to a draft model
    draft_log_probs: torch.Tensor | None = None  # [B, M, S] the drafter's next-level log-probs (Q's rows;
    #                                               expanded levels only; after relaxed_official's warper)
    draft_log_norm: torch.Tensor | None = None  # [B] log-normaliser of the draft's sampling distribution over the
    #                                             continuations of ALL this level's beams (relaxed_official only)
    target_visible: torch.Tensor | None = None  # [B, M, C_t] after the verify call
    target_log_probs: torch.Tensor | None = None  # [B, M, S] the target's next-level log-probs at this node
    target_record: tuple[torch.Tensor, torch.Tensor] | None = None  # (raw level logits [B, M, S], normaliser [B, M])


def uniform(host: list[int]) -> int | None:
    """The index every user picks, if they all pick the same one (always at B = 1), else None; ``host`` is read
    from the host, so deciding costs no device sync. Decided once per round for all the ``pick`` calls that share
    it."""
    return host[0] if len(set(host)) == 1 else None


def pick(tensors: list[torch.Tensor], index: torch.Tensor, same: int | None) -> torch.Tensor:
    """Per user b, ``tensors[index[b]][b]``; ``same``: ``uniform`` of the same indices on the host. Bool
    visibilities ``[B, M, C_i]`` are widened to the longest C. When every user picks the same level that level is
    returned as is (widened); otherwise the tensors are padded to a common M and stacked, and the result is
    ``[B, max M, ...]``."""
    widen_to = max(t.shape[2] for t in tensors) if tensors[0].dtype == torch.bool and tensors[0].dim() == 3 else None
    if same is not None:
        return tensors[same] if widen_to is None else widen(tensors[same], widen_to)
    if widen_to is not None:
        tensors = [widen(t, widen_to) for t in tensors]
    width = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        if t.shape[1] < width:
            t = torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1], *t.shape[2:])], dim=1)
        padded.append(t)
    stacked = torch.stack(padded, 1)  # [B, n, W, ...]
    view = index.reshape(-1, 1, *([1] * (stacked.dim() - 2))).expand(-1, 1, *stacked.shape[2:])
    return stacked.gather(1, view).squeeze(1)


def child_level(
    prev: Level,
    scores: torch.Tensor,
    parent: torch.Tensor,
    codes: torch.Tensor,
    trie: ItemTrie,
    depth: torch.Tensor | int,
    valid: torch.Tensor | None = None,
) -> Level:
    """The level reached from ``prev`` (whose nodes are at trie depth ``depth``: ``[B]``, or an int when every user
    is at the same depth, which saves the per-user lookups) by (parent, code) ``[B, n]``; users with ``valid``
    False get a void (dead) level."""
    num_levels = trie.num_levels
    alive = torch.isfinite(scores) if valid is None else torch.isfinite(scores) & valid[:, None]
    nodes = trie.global_advance(take_beams(prev.nodes, parent), codes)
    sequences = take_beams(prev.sequences, parent)
    if isinstance(depth, int):
        nodes = torch.where(alive, nodes, trie.global_dead_ids[min(depth + 1, num_levels + 1)])
        start = trie.level_blocks[min(depth, num_levels - 1)][0]
        tokens = torch.where(alive, codes, 0) + start  # a dead beam's code can lie past a short block's end
        if depth < num_levels:
            sequences[:, :, depth] = tokens  # a fresh tensor (the gather above)
    else:
        nodes = torch.where(alive, nodes, trie.global_dead[(depth + 1).clamp(max=num_levels + 1)][:, None])
        start = trie.block_starts[depth.clamp(max=num_levels - 1)][:, None]
        tokens = torch.where(alive, codes + start, start)  # a dead beam's code can lie past a short block's end
        column = torch.arange(num_levels, device=depth.device) == depth[:, None]  # [B, L]
        sequences = torch.where(column[:, None, :], tokens[:, :, None], sequences)
    return Level(
        sequences=sequences,
        nodes=nodes,
        draft_scores=torch.where(alive, scores, NEG_INF),
        position=take_beams(prev.position, parent) + 1,
        token=tokens,
        parent=parent,
        codes=codes,
    )


def depths_at(host: list[tuple[int, int]], ell: int, offset: int = 0) -> list[int]:
    """Distinct trie depths t_b + ell + offset over the users whose round reaches level ``ell`` (ell <= d_b), from
    the round's distinct (t_b, d_b) pairs read on the host: the only projections a call needs."""
    return [t + ell + offset for t, steps in host if steps >= ell]


def level_depth(host: list[tuple[int, int]], ell: int) -> int | None:
    """The trie depth of level ``ell``'s nodes if every user is at the same depth (always at B = 1), else None."""
    return host[0][0] + ell if len(host) == 1 else None


def prune_cache(
    model: DecoderLM, cache: Any, visible: torch.Tensor, keep: torch.Tensor, width: int
) -> tuple[Any, torch.Tensor]:
    """Keep, per user, the cache columns in ``keep`` ``[B, C]`` (``width`` >= the most any user keeps; shorter rows
    are padded with columns nobody sees) and compact the visibilities ``[B, K, C]`` to them."""
    columns = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept columns first, in order
    visible = visible.gather(2, columns[:, None, :].expand(-1, visible.shape[1], -1))
    return model.gather_cache(cache, columns), visible
