"""Speculative beam search (SPEC section 6): a draft model runs d = min(gamma, L - t - 1) steps ahead of the K current
beams, the target scores every drafted token of every depth in ONE call with tree attention, then accepts depth by
depth and produces the next depth from the logits it already has, so a round advances >= 1 token and a list costs
1..L target calls (1 when everything is accepted: the first round's verify call also prefills the prompt).

Contract (batch size 1; the state carries a leading batch dim B for a later ragged-batch version):
- ``mode="strict"``: the draft runs N-beam search; a depth is accepted iff the target's exact top-K continuations of
  the accepted beams are all drafted beams; the returned beams are exactly those of ``beam_search(target, ..., K)``
  for any draft (choices and order; scores up to float rounding of the tree forward).
- ``mode="relaxed"`` (SPEC section 6, ``relaxed_select``): the draft samples N continuations without replacement per
  depth (beam sampling from its joint distribution Q over the (beam, token) continuations). At depth i, P and Q are
  the target's and the draft's joint distributions over the continuations of the K accepted beams (softmax of the
  flattened [K x S] cumulative log-probs, trie-masked; Q renormalised to these continuations). Each drafted
  candidate whose parent was accepted is accepted independently with probability min(1, P/Q); with >= K accepted
  the K with the highest P are kept and depth i+1 is verified; otherwise the accepted ones are kept, K - |accepted|
  are drawn without replacement from the residual max(P - Q, 0) (renormalised, accepted excluded; then from P if
  the residual runs out), and the round stops there. Only APPROXIMATELY distribution-preserving with respect to
  ``beam_sample(target, ..., K)``: with N > K candidates each accepted on its own, what the draft likes gets more
  chances to be accepted, and keeping the top-P K of the accepted ones (rather than a random K) sharpens the
  selection (Q == P with N > K turns sampling into "top K of N samples"). Measured: total variation 0.18 from the
  target's exact beam-sampling distribution on the tests' enumerable setup (K = 2, N = 3, 3 levels; the draft's
  own is 0.41 away); 0.13-0.40 at one depth on small hand-made P, Q (0.40 for Q == P, K = 2, N = 4). In exchange,
  a depth passes when ANY K of the N candidates are accepted, so acceptance stays high with large K.
- ``mode="relaxed_exact"`` (``relaxed_exact_select``): the same drafts, verified as speculative sampling draw by
  draw (the first K candidates in draw order, residual only at the first rejection, later draws from P), so the
  returned set of K beams has EXACTLY the distribution of ``beam_sample(target, ..., K)`` for any draft. Kept as
  the lossless reference for the relaxed setting; its acceptance falls quickly with K (all of the first K draws
  must pass, in order).
- Both relaxed modes need an explicit ``torch.Generator``; lists are ranked by target cumulative log-prob.
- Each model keeps ONE cache row per user holding the prompt and a token tree. A beam is a bool visibility vector over
  that row (prompt + its own fed ancestors), its pending (not yet fed) tokens and the position id of the first one;
  every call appends tokens whose mask rows come from those vectors (``_Call``: the tree mask), so nothing is copied
  while drafting; after a round both caches are pruned with ``gather_cache`` to the kept beams' paths.

Phases of a round: ``_draft_phase`` -> ``_verify_phase`` (tree mask + one target call) -> ``_accept_phase``, then
pruning. Beams are matched across draft and target by their full prefix (parent + code), never by position.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from atspeed_exp.decoding.beam_search import (
    BeamSearchOutput,
    additive,
    beam_search,
    check_beam_settings,
    expand_items,
    level_log_probs,
    select_top_k,
)
from atspeed_exp.decoding.protocol import DecoderLM
from atspeed_exp.decoding.trie import ItemTrie

MODES = ("strict", "relaxed", "relaxed_exact")
NEG_INF = float("-inf")


@dataclass
class SpeculativeStats:
    """Counters of one list (batch 1)."""

    target_calls: int = 0
    draft_calls: int = 0
    rounds: int = 0
    drafted_steps: int = 0  # sum over rounds of d
    accepted_steps: int = 0  # drafted steps the target accepted
    target_tokens: int = 0  # tokens fed to the target (prompt + tree)
    draft_tokens: int = 0
    draft_time_s: float = 0.0  # draft calls + draft selection
    verify_time_s: float = 0.0  # tree mask + the target call
    accept_time_s: float = 0.0  # acceptance, the target's own step, cache pruning
    other_time_s: float = 0.0  # setup and item expansion

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_steps / self.drafted_steps if self.drafted_steps else float("nan")


@dataclass
class SpeculativeOutput:
    items: torch.Tensor  # [B, K] long, SID collisions expanded (expand_items)
    scores: torch.Tensor  # [B, K] float: target cumulative log-prob of each item's SID
    sequences: torch.Tensor  # [B, K, L] long: the K beams' SID token ids, best first
    sequence_scores: torch.Tensor  # [B, K] float
    stats: SpeculativeStats


# -- small helpers on (B, beams, ...) tensors ----------------------------------------------------------------------
def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` ``[B, M']`` of ``x`` ``[B, M, *rest]`` -> ``[B, M', *rest]``."""
    view = index.reshape(*index.shape, *([1] * (x.dim() - 2)))
    return x.gather(1, view.expand(*index.shape, *x.shape[2:]))


def _widen(visible: torch.Tensor, width: int) -> torch.Tensor:
    """Pad a visibility ``[..., w]`` with False up to ``width`` keys (keys appended after it was built)."""
    missing = width - visible.shape[-1]
    return visible if missing == 0 else torch.cat([visible, visible.new_zeros(*visible.shape[:-1], missing)], -1)


def _gumbel(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    uniform = torch.rand(shape, generator=generator, device=generator.device).to(device)
    return -torch.log(-torch.log(uniform.clamp(min=torch.finfo(uniform.dtype).tiny)))


def sample_top_k(
    beam_scores: torch.Tensor, step_log_probs: torch.Tensor, num_samples: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``num_samples`` continuations drawn without replacement from softmax over all beams' continuations
    (Gumbel-top-k = successive sampling), in draw order; the sampling counterpart of ``select_top_k``.

    beam_scores: ``[B, M]``; step_log_probs: ``[B, M, S]``. Returns (true cumulative scores ``[B, n]``, parent beam
    ``[B, n]``, local code ``[B, n]``); -inf scores where fewer continuations exist.
    """
    batch, beams, size = step_log_probs.shape
    total = (beam_scores[:, :, None] + step_log_probs).reshape(batch, beams * size)  # [B, M*S]
    if total.shape[1] < num_samples:
        total = torch.cat([total, total.new_full((batch, num_samples - total.shape[1]), NEG_INF)], dim=1)
    keys = total + _gumbel(tuple(total.shape), generator, total.device)
    flat = keys.topk(num_samples, dim=1).indices  # sorted by key: the draw order
    scores = total.gather(1, flat)
    flat = flat.clamp(max=beams * size - 1)
    return scores, flat // size, flat % size


def relaxed_select(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    candidates: torch.Tensor,
    num_beams: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC section 6 relaxed sampling verification of one depth (``mode="relaxed"``).

    log_p, log_q: ``[B, C]`` normalised log-probs (-inf: impossible) over the flattened (beam, code) continuations
    of the accepted beams, under the target (P) and the distribution the draft sampled from, restricted to these
    continuations (Q). candidates: ``[B, R]`` flat indices into C of the draft's samples (-1: none; order unused).

    Every candidate c is accepted independently with probability min(1, P(c) / Q(c)) (one uniform each). If at least
    K are accepted, the K accepted ones with the highest P are kept: all of them are continuations the target
    accepts, and the top of them by P is what the target's own beam search would prefer among them (ties need
    equal float log-probs, which do not happen in practice; they go to the lower index). Otherwise all accepted
    candidates are kept and the K - |accepted| others are drawn without replacement (Gumbel-top-k) from the
    residual max(P - Q, 0), renormalised, accepted ones excluded; if the residual has fewer non-zero entries than
    needed (Q >= P everywhere else, or Q == P: empty), the rest are drawn without replacement from P excluding
    everything chosen. With no candidate at all (Q = 0) this is plain successive sampling of K from P, the target's
    beam-sampling step. One sort by (tier, key) does all of it: tier 0 accepted (key log P), 1 residual (key log
    residual + Gumbel), 2 possible under P (key log P + Gumbel), 3 impossible (placeholders).
    Not exactly distribution-preserving (see the module docstring; ``relaxed_exact_select`` is).

    The depth counts as accepted when the accepted candidates cover min(K, number of possible continuations):
    with fewer than K possible continuations, accepting all of them leaves only placeholders to add.
    Returns (chosen ``[B, K]`` flat indices, alive ``[B, K]`` False for placeholders, accepted ``[B]``: K when the
    depth is accepted, else the number of accepted candidates (< K)), the convention of ``relaxed_exact_select``.
    """
    batch, width = log_p.shape
    device = log_p.device
    k = num_beams
    if width < k:  # fewer continuations than beams: pad with impossible ones
        pad = log_p.new_full((batch, k - width), NEG_INF)
        log_p, log_q = torch.cat([log_p, pad], 1), torch.cat([log_q, pad], 1)
    columns = log_p.shape[1]

    # independent acceptance of every candidate the draft could have drawn
    safe = candidates.clamp(min=0)
    lp_c, lq_c = log_p.gather(1, safe), log_q.gather(1, safe)  # [B, R]
    exists = (candidates >= 0) & torch.isfinite(lq_c)
    log_u = torch.log(torch.rand(tuple(candidates.shape), generator=generator, device=generator.device).to(device))
    accept_c = exists & (log_u < lp_c - lq_c)  # P(c) = 0: never
    slot = torch.where(accept_c, safe, columns)  # rejected ones to a dummy column
    accepted_mask = torch.zeros(batch, columns + 1, dtype=torch.bool, device=device)
    accepted_mask = accepted_mask.scatter(1, slot, True)[:, :-1]  # [B, C]; duplicates harmless
    count = accepted_mask.sum(1)  # [B]
    possible = torch.isfinite(log_p)
    need = possible.sum(1).clamp(max=k)

    # log max(P - Q, 0) without cancellation or underflow: log P + log(1 - Q / P) where Q < P
    positive = possible & (log_q < log_p)
    log_res = torch.where(
        positive, log_p + torch.log(-torch.expm1(torch.where(positive, log_q - log_p, -1.0))), NEG_INF
    )
    residual = torch.isfinite(log_res) & ~accepted_mask
    tier = torch.where(accepted_mask, 0, torch.where(residual, 1, torch.where(possible, 2, 3)))  # [B, C]
    gumbel = _gumbel((batch, columns), generator, device)
    key = torch.where(
        accepted_mask, log_p, torch.where(residual, log_res + gumbel, torch.where(possible, log_p + gumbel, 0.0))
    )
    order = key.argsort(dim=1, descending=True, stable=True)
    order = order.gather(1, tier.gather(1, order).argsort(dim=1, stable=True))[:, :k]  # by tier, then key
    alive = possible.gather(1, order) & (order < width)
    chosen = order.clamp(max=width - 1)  # placeholders beyond the real continuations
    return chosen, alive, torch.where(count >= need, k, count)


def relaxed_exact_select(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    candidates: torch.Tensor,
    num_beams: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact relaxed sampling verification of one depth (``mode="relaxed_exact"``): K draws without replacement
    from P, using the draft's samples from Q as proposals, with exactly the distribution of successive sampling
    from P.

    log_p, log_q: ``[B, C]`` normalised log-probs (-inf: impossible) over the flattened (beam, code) continuations
    of the accepted beams, under the target (P) and the distribution the draft sampled from, restricted to these
    continuations (Q). candidates: ``[B, R]`` flat indices into C of the draft's samples in draw order (-1: none).

    Draw j proposes the j-th candidate d_j and accepts it with probability min(1, P_j(d_j) / Q_j(d_j)), where P_j and
    Q_j are P and Q with d_<j removed and renormalised: the conditionals of the j-th draw of both samplers, so each
    draw is one ordinary speculative-sampling step and its output has law P_j exactly. The first rejected draw j*
    takes one sample from the residual max(P_j* - Q_j*, 0) (renormalised; P_j* itself if there is no proposal or the
    residual is empty by rounding); the draws after j* come from P with everything chosen removed, because the
    remaining proposals no longer have the law of the draft's conditional given what was chosen.
    Unlike SPEC's literal scheme (``relaxed_select``: every candidate accepted independently with min(1, P/Q) of
    the marginals, keep K, fill from one residual), which with N > K favours what the draft likes and is biased,
    this version is exact; the price is that only the first K draws can be accepted, in order, so its acceptance
    falls quickly with K.
    A draw with no mass left (fewer than K possible continuations) is a placeholder and counts as accepted.

    Returns (chosen ``[B, K]`` flat indices, alive ``[B, K]`` False for placeholders, accepted ``[B]`` number of
    leading draws taken from the draft; the depth is accepted iff it equals K).
    """
    batch, width = log_p.shape
    device = log_p.device
    k = num_beams
    if width < k:  # fewer continuations than draws: pad with impossible ones
        pad = log_p.new_full((batch, k - width), NEG_INF)
        log_p, log_q = torch.cat([log_p, pad], 1), torch.cat([log_q, pad], 1)
    draws = torch.arange(k, device=device)

    # d_j: the first K candidates in draw order (the rest never propose: the K draws stop at a rejection)
    listed = candidates >= 0
    order = torch.argsort((~listed).to(torch.int8), dim=1, stable=True)[:, :k]
    proposal = candidates.gather(1, order).masked_fill(~listed.gather(1, order), -1)
    if proposal.shape[1] < k:
        proposal = torch.cat([proposal, proposal.new_full((batch, k - proposal.shape[1]), -1)], 1)  # [B, K]
    safe = proposal.clamp(min=0)
    exists = (proposal >= 0) & torch.isfinite(log_q.gather(1, safe))  # a proposal the draft could have drawn
    lp_d = log_p.gather(1, safe).masked_fill(~exists, NEG_INF)  # [B, K]
    lq_d = log_q.gather(1, safe).masked_fill(~exists, NEG_INF)

    # rank[c] = the draw that proposes c (K: none); dummy column `width` absorbs the missing proposals
    slot = torch.where(exists, proposal, log_p.shape[1])
    rank = torch.full((batch, log_p.shape[1] + 1), k, dtype=torch.long, device=device)
    rank = rank.scatter(1, slot, draws.expand(batch, k))[:, :-1]  # [B, C]

    # log mass left for draw j = mass outside every proposal + mass of proposals j.. (a sum, no cancellation)
    def left(log_x: torch.Tensor, log_x_d: torch.Tensor) -> torch.Tensor:
        outside = torch.logsumexp(log_x.masked_fill(rank < k, NEG_INF), dim=1, keepdim=True)  # [B, 1]
        suffix = torch.logcumsumexp(log_x_d.flip(1), dim=1).flip(1)  # [B, K]
        return torch.logaddexp(outside, suffix)

    left_p, left_q = left(log_p, lp_d), left(log_q, lq_d)
    has_mass = torch.isfinite(left_p)
    log_ratio = torch.where(exists, (lp_d - left_p) - (lq_d - left_q), NEG_INF)  # log P_j(d_j) / Q_j(d_j)
    log_u = torch.log(torch.rand((batch, k), generator=generator, device=generator.device).to(device))
    accept = ~has_mass | (exists & (log_u < log_ratio))
    accepted = accept.long().cumprod(1).sum(1)  # [B] leading accepted draws
    first = accepted.clamp(max=k - 1)[:, None]  # j*, the first rejected draw (unused when all K are accepted)

    # draw j*: residual max(P_j* - Q_j*, 0) with d_<j* removed; Q_j* = 0 when j* has no proposal
    removed = rank < first  # [B, C]
    lp_j = (log_p - left_p.gather(1, first)).masked_fill(removed, NEG_INF)
    lq_j = (log_q - left_q.gather(1, first)).masked_fill(removed | ~exists.gather(1, first), NEG_INF)
    log_res = (lp_j.exp() - lq_j.exp()).clamp(min=0).log()
    empty = ~torch.isfinite(log_res).any(1, keepdim=True)  # P_j* <= Q_j* everywhere (rounding) or underflow
    log_res = torch.where(empty, lp_j, log_res)
    res_keys = log_res + _gumbel(tuple(log_res.shape), generator, device)
    pick = res_keys.argmax(1, keepdim=True)  # [B, 1]
    pick_alive = torch.isfinite(log_res.gather(1, pick))

    # draws after j*: successive sampling from P without everything chosen so far
    rest_keys = (log_p + _gumbel(tuple(log_p.shape), generator, device)).masked_fill(removed, NEG_INF)
    rest_keys = rest_keys.scatter(1, pick, NEG_INF)
    rest_keys, rest = rest_keys.topk(k, dim=1)  # [B, K]
    after = (draws - first - 1).clamp(min=0)  # [B, K] index into `rest` of draw j > j*

    chosen = torch.where(
        draws < accepted[:, None], safe, torch.where(draws == first, pick, rest.gather(1, after))
    )
    alive = torch.where(
        draws < accepted[:, None],
        torch.isfinite(lp_d),  # False for the placeholders accepted because no mass was left
        torch.where(draws == first, pick_alive, torch.isfinite(rest_keys.gather(1, after))),
    )
    chosen = chosen.clamp(max=width - 1)  # placeholders beyond the real continuations
    return chosen, alive & (chosen < width), accepted


# -- state ----------------------------------------------------------------------------------------------------------
@dataclass
class _Beams:
    """The K current beams after t generated tokens (round 1: the prompt alone, one beam)."""

    sequences: torch.Tensor  # [B, M, t] SID token ids
    scores: torch.Tensor  # [B, M] target cumulative log-prob; -inf: placeholder (fewer than K prefixes exist)
    nodes: torch.Tensor  # [B, M] trie nodes at depth t


@dataclass
class _View:
    """One model's view of the current beams."""

    cache: Any
    visible: torch.Tensor  # [B, M, C] bool over the C cache positions: prompt + the beam's fed ancestors
    pending: torch.Tensor  # [B, M, p] token ids not fed to this model yet (round 1: the prompt)
    position: torch.Tensor  # [B, M] position id of the first pending token


@dataclass
class _Level:
    """One depth of a round's token tree: level 0 = the current beams, level l = the l-th drafted step."""

    sequences: torch.Tensor  # [B, M, t + l]
    nodes: torch.Tensor  # [B, M] trie nodes (dead for placeholders)
    draft_scores: torch.Tensor  # [B, M] cumulative score the draft ranks / samples with
    position: torch.Tensor  # [B, M] position id of the next token after this node
    parent: torch.Tensor | None = None  # [B, M] index into the previous level
    codes: torch.Tensor | None = None  # [B, M] local code of this node's token
    draft_visible: torch.Tensor | None = None  # [B, M, C_d] once fed to the draft
    draft_log_probs: torch.Tensor | None = None  # [B, M, S] the draft's next-level log-probs (fed levels only)
    target_visible: torch.Tensor | None = None  # [B, M, C_t] after the verify call
    target_logits: torch.Tensor | None = None  # [B, M, V] the target's next-token logits at this node


class _Call:
    """Assembles the queries of one model call: blocks of chains of tokens, each chain attending to its beam's
    visible cache positions, to the earlier tokens of its own chain and to itself (tree attention)."""

    def __init__(self, cache_len: int, device: torch.device) -> None:
        self.width, self.device = cache_len, device
        self.ids: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []

    @property
    def num_queries(self) -> int:
        return sum(ids.shape[1] for ids in self.ids)

    def add(
        self, visible: torch.Tensor, tokens: torch.Tensor, start: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """visible ``[B, M, w <= width]``, tokens ``[B, M, p]`` (a chain per beam), start ``[B, M]`` position of
        each chain's first token. Returns the beams' visibility once the chain is fed ``[B, M, width']`` and the
        query index of each chain's last token ``[M]``."""
        batch, beams, length = tokens.shape
        visible = _widen(visible, self.width)
        eye = torch.eye(beams, dtype=torch.bool, device=self.device)
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        own = (eye[:, None, :, None] & causal[None, :, None, :]).reshape(beams, length, beams * length)  # [M, p, M*p]
        rows = torch.cat(
            [visible[:, :, None].expand(-1, -1, length, -1), own.expand(batch, -1, -1, -1)], dim=-1
        )  # [B, M, p, width + M*p]
        last = self.num_queries + torch.arange(beams, device=self.device) * length + length - 1
        self.ids.append(tokens.reshape(batch, beams * length))
        self.positions.append((start[:, :, None] + torch.arange(length, device=self.device)).reshape(batch, -1))
        self.rows.append(rows.reshape(batch, beams * length, -1))
        self.width += beams * length
        return rows[:, :, -1], last

    def run(self, model: DecoderLM, cache: Any) -> tuple[torch.Tensor, Any]:
        rows = torch.cat([_widen(r, self.width) for r in self.rows], dim=1)  # [B, q, width]
        return model(
            torch.cat(self.ids, 1), torch.cat(self.positions, 1), additive(rows[:, None], model.dtype), cache
        )


class _Timer:
    def __init__(self, stats: SpeculativeStats, device: torch.device) -> None:
        self.stats, self.cuda = stats, device.type == "cuda"

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:  # kernels are asynchronous: charge them to the phase that launched them
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            field = f"{name}_time_s"
            setattr(self.stats, field, getattr(self.stats, field) + time.perf_counter() - start)


# -- phases ---------------------------------------------------------------------------------------------------------
def _child(
    prev: _Level, scores: torch.Tensor, parent: torch.Tensor, codes: torch.Tensor, trie: ItemTrie, depth: int
) -> _Level:
    """The level reached from ``prev`` (whose nodes are at trie depth ``depth``) by (parent, code) ``[B, n]``."""
    alive = torch.isfinite(scores)
    nodes = trie.advance(depth, _take(prev.nodes, parent), codes)
    tokens = codes + trie.block(depth)[0]
    return _Level(
        sequences=torch.cat([_take(prev.sequences, parent), tokens[:, :, None]], dim=2),
        nodes=torch.where(alive, nodes, trie.dead_node(depth + 1)),
        draft_scores=scores,
        position=_take(prev.position, parent) + 1,
        parent=parent,
        codes=codes,
    )


def _draft_phase(
    draft: DecoderLM,
    view: _View,
    beams: _Beams,
    trie: ItemTrie,
    steps: int,
    width: int,
    mode: str,
    generator: torch.Generator | None,
    stats: SpeculativeStats,
) -> tuple[list[_Level], Any]:
    """d = ``steps`` steps of N = ``width`` beams on the draft from the current beams: d draft calls (pending tokens
    of the current beams, then drafted levels 1..d-1; level d is never fed). Returns the tree levels 0..d."""
    t = beams.sequences.shape[2]
    root = _Level(
        sequences=beams.sequences,
        nodes=beams.nodes,
        draft_scores=beams.scores,  # the draft continues from the target's exact prefix scores
        position=view.position + view.pending.shape[2],
    )
    levels, cache = [root], view.cache
    call = _Call(view.visible.shape[2], view.visible.device)
    root.draft_visible, last = call.add(view.visible, view.pending, view.position)
    for ell in range(1, steps + 1):
        prev = levels[-1]
        logits, cache = call.run(draft, cache)
        stats.draft_calls += 1
        stats.draft_tokens += call.num_queries
        prev.draft_log_probs = level_log_probs(logits[:, last], trie, t + ell - 1, prev.nodes)  # [B, M, S]
        if mode == "strict":
            scores, parent, codes = select_top_k(prev.draft_scores, prev.draft_log_probs, width)
        else:
            scores, parent, codes = sample_top_k(prev.draft_scores, prev.draft_log_probs, width, generator)
        level = _child(prev, scores, parent, codes, trie, t + ell - 1)
        levels.append(level)
        if ell < steps:  # feed level ell to get the next level's distribution
            call = _Call(call.width, view.visible.device)
            level.draft_visible, last = call.add(
                _take(prev.draft_visible, parent), level.sequences[:, :, -1:], _take(prev.position, parent)
            )
    return levels, cache


def _verify_phase(target: DecoderLM, view: _View, levels: list[_Level], stats: SpeculativeStats) -> Any:
    """ONE target call over the current beams' pending tokens and every drafted level, with tree attention
    (each token sees the prompt and its own ancestors) and position = parent position + 1."""
    call = _Call(view.visible.shape[2], view.visible.device)
    lasts = []
    levels[0].target_visible, last = call.add(view.visible, view.pending, view.position)
    lasts.append(last)
    for prev, level in zip(levels[:-1], levels[1:]):
        level.target_visible, last = call.add(
            _take(prev.target_visible, level.parent), level.sequences[:, :, -1:], _take(prev.position, level.parent)
        )
        lasts.append(last)
    logits, cache = call.run(target, view.cache)
    stats.target_calls += 1
    stats.target_tokens += call.num_queries
    for level, last in zip(levels, lasts):
        level.target_logits = logits[:, last]  # [B, M, V]
    return cache


@dataclass
class _Step:
    """The target's K beams at one depth of the accept phase, as (parent, code) over the accepted beams."""

    ref: torch.Tensor  # [B, K] parent index into the previous tree level
    codes: torch.Tensor  # [B, K]
    scores: torch.Tensor  # [B, K] target cumulative log-probs (-inf: placeholder)
    drafted: torch.Tensor  # [B, K] index of the same beam among the drafted level (meaningful when accepted)
    accepted: torch.Tensor  # [B] bool: all K are drafted beams


def _accept_phase(
    levels: list[_Level], trie: ItemTrie, num_beams: int, mode: str, generator: torch.Generator | None
) -> list[_Step]:
    """Depth by depth l = 1..d+1, assuming depths < l were accepted: the target's K beams at depth l (strict: its
    exact top-K; relaxed: ``relaxed_select``; relaxed_exact: ``relaxed_exact_select``) and whether they are all
    among the drafted level l. Later depths are discarded by the caller after the first rejection; computing them
    costs only [K, S] tensor work and saves a host sync per depth."""
    t = levels[0].sequences.shape[2]
    steps = len(levels) - 1
    batch, roots = levels[0].draft_scores.shape
    ref = torch.arange(roots, device=levels[0].nodes.device).expand(batch, roots)  # accepted beams at depth l - 1
    scores = levels[0].draft_scores  # target scores of the current beams
    out = []
    for ell in range(1, steps + 2):
        prev = levels[ell - 1]
        alive = torch.isfinite(scores)
        nodes = torch.where(alive, _take(prev.nodes, ref), trie.dead_node(t + ell - 1))
        log_p = level_log_probs(_take(prev.target_logits, ref), trie, t + ell - 1, nodes)  # [B, MA, S]
        size = log_p.shape[2]

        # drafted beams at depth l that continue an accepted beam, as flat (position in A, code) indices, in the
        # draft's order. Relaxed: the draft sampled them from all N parents by Gumbel-top-N; the subsequence that
        # continues A is successive sampling from Q restricted to A's continuations (the Gumbel argmax is
        # independent of the max, so where the stream stops says nothing about which item comes next).
        if ell <= steps:
            level = levels[ell]
            slot = torch.where(alive, ref, prev.nodes.shape[1])  # placeholders to a dummy column
            in_a = torch.full((batch, prev.nodes.shape[1] + 1), -1, dtype=torch.long, device=ref.device)
            in_a = in_a.scatter(1, slot, torch.arange(ref.shape[1], device=ref.device).expand_as(ref))[:, :-1]
            parent_in_a = in_a.gather(1, level.parent)  # [B, N]
            candidates = torch.where(
                (parent_in_a >= 0) & torch.isfinite(level.draft_scores), parent_in_a * size + level.codes, -1
            )
        else:
            candidates = torch.full((batch, 1), -1, dtype=torch.long, device=ref.device)

        if mode == "strict":
            new_scores, parent, codes = select_top_k(scores, log_p, num_beams)
            flat = parent * size + codes
            alive_new = torch.isfinite(new_scores)
            match = flat[:, :, None] == candidates[:, None, :]  # [B, K, N]
            accepted = (match.any(2) | ~alive_new).all(1)
        else:
            # Q: what the draft sampled from (its cumulative score of the parent + its level log-prob), restricted
            # to the continuations of the accepted beams and renormalised
            total = (scores[:, :, None] + log_p).reshape(batch, -1)  # [B, MA*S] target cumulative
            if ell <= steps:
                q = _take(prev.draft_scores, ref)[:, :, None] + _take(prev.draft_log_probs, ref)
                log_q = q.masked_fill(~alive[:, :, None], NEG_INF).reshape(batch, -1).log_softmax(1)
            else:
                log_q = torch.full_like(total, NEG_INF)
            select = relaxed_select if mode == "relaxed" else relaxed_exact_select
            flat, alive_new, taken = select(total.log_softmax(1), log_q, candidates, num_beams, generator)
            new_scores = total.gather(1, flat).masked_fill(~alive_new, NEG_INF)
            parent, codes = flat // size, flat % size
            match = flat[:, :, None] == candidates[:, None, :]
            accepted = taken == num_beams
        out.append(_Step(_take(ref, parent), codes, new_scores, match.long().argmax(2), accepted))
        ref, scores = out[-1].drafted, new_scores
    return out


def _prune(model: DecoderLM, cache: Any, visible: torch.Tensor, alive: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Keep only the cache positions some live beam sees; compact the visibilities ``[B, K, C]`` to them."""
    keep = (visible & alive[:, :, None]).any(1)[0].nonzero().squeeze(1)  # batch 1: one row of positions
    return model.gather_cache(cache, keep[None]), visible[:, :, keep]


# -- the engine -----------------------------------------------------------------------------------------------------
def _check_settings(
    trie: ItemTrie,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    num_beams: int,
    draft_beams: int,
    gamma: int,
    mode: str,
    generator: torch.Generator | None,
) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    check_beam_settings(trie, num_beams)
    if draft_beams < num_beams:
        raise ValueError(f"draft_beams (N={draft_beams}) must be >= num_beams (K={num_beams})")
    if not 1 <= gamma <= trie.num_levels - 1:
        raise ValueError(f"gamma={gamma} out of range: 1 <= gamma <= L - 1 = {trie.num_levels - 1}")
    if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask must both be [B, P]")
    if prompt_ids.shape[0] != 1:
        raise ValueError(f"speculative beam search needs batch size 1, got {prompt_ids.shape[0]} prompts")
    if not prompt_mask.any():
        raise ValueError("empty prompt")
    if mode != "strict" and generator is None:
        raise ValueError(f"{mode} mode samples: pass an explicit torch.Generator")


@torch.inference_mode()
def speculative_beam_search(
    target: DecoderLM,
    draft: DecoderLM,
    prompt_ids: torch.Tensor,  # [1, P] (left padding allowed)
    prompt_mask: torch.Tensor,  # [1, P] bool
    trie: ItemTrie,
    num_beams: int,  # K
    draft_beams: int = 40,  # N >= K
    gamma: int = 3,  # drafted steps per round, 1..L-1
    mode: str = "strict",  # "strict" | "relaxed" | "relaxed_exact"
    generator: torch.Generator | None = None,  # relaxed modes' randomness (draft sampling and verification)
) -> SpeculativeOutput:
    """Top-K items of one prompt by speculative beam search (see module docstring)."""
    _check_settings(trie, prompt_ids, prompt_mask, num_beams, draft_beams, gamma, mode, generator)
    start = time.perf_counter()
    stats = SpeculativeStats()
    timer = _Timer(stats, target.device)
    device = prompt_ids.device
    num_levels = trie.num_levels

    prompt = prompt_ids[:, prompt_mask[0]]  # [1, P'] padding dropped (batch 1)
    beams = _Beams(
        sequences=prompt.new_zeros(1, 1, 0),
        scores=torch.zeros(1, 1, device=device),
        nodes=torch.zeros(1, 1, dtype=torch.long, device=device),
    )
    # Round 1: one beam with empty caches whose pending chain is the prompt itself, so the first verify call is
    # also the target's prefill.
    empty = torch.zeros(1, 1, 0, dtype=torch.bool, device=device)
    first_position = torch.zeros(1, 1, dtype=torch.long, device=device)
    target_view = _View(target.new_cache(), empty, prompt[:, None], first_position)
    draft_view = _View(draft.new_cache(), empty, prompt[:, None], first_position)

    t = 0  # SID tokens generated so far
    while t < num_levels:
        steps = min(gamma, num_levels - t - 1)  # d: the target always produces the round's last token
        stats.rounds += 1
        stats.drafted_steps += steps
        with timer.phase("draft"):
            if steps > 0:
                levels, draft_cache = _draft_phase(
                    draft, draft_view, beams, trie, steps, draft_beams, mode, generator, stats
                )
            else:  # the last SID token: the target alone
                after = target_view.position + target_view.pending.shape[2]
                levels = [_Level(beams.sequences, beams.nodes, beams.scores, after)]
        with timer.phase("verify"):
            target_cache = _verify_phase(target, target_view, levels, stats)
        with timer.phase("accept"):
            out = _accept_phase(levels, trie, num_beams, mode, generator)
            if steps > 0:
                flags = torch.stack([s.accepted for s in out[:steps]], 1)  # [B, d]
                accepted = int(flags.long().cumprod(1).sum(1)[0])  # the round's one host sync (batch 1)
            else:
                accepted = 0
            stats.accepted_steps += accepted
            step = out[accepted]  # the target's beams at depth t + accepted + 1, from logits it already has
            base = levels[accepted]  # the level their parents are in
            new = _child(base, step.scores, step.ref, step.codes, trie, t + accepted)
            beams = _Beams(new.sequences, step.scores, new.nodes)
            t += accepted + 1
            if t < num_levels:  # prune both caches to the kept paths; the new token is pending for both
                alive = torch.isfinite(step.scores)
                new_tokens = beams.sequences[:, :, -1:]  # [B, K, 1]
                visible = _take(_widen(base.target_visible, levels[-1].target_visible.shape[2]), step.ref)
                target_cache, visible = _prune(target, target_cache, visible, alive)
                target_view = _View(target_cache, visible, new_tokens, _take(base.position, step.ref))

                if accepted < steps:  # the kept level was fed to the draft
                    fed, fed_ref, pending = base, step.ref, new_tokens
                else:  # level d was never fed to the draft: its token and the new one are pending
                    fed, fed_ref, pending = levels[steps - 1], _take(base.parent, step.ref), beams.sequences[:, :, -2:]
                draft_len = levels[steps - 1].draft_visible.shape[2]  # the draft cache after its last call
                visible = _take(_widen(fed.draft_visible, draft_len), fed_ref)
                draft_cache, visible = _prune(draft, draft_cache, visible, alive)
                draft_view = _View(draft_cache, visible, pending, _take(fed.position, fed_ref))

    order = beams.scores.argsort(dim=1, descending=True, stable=True)  # relaxed draws come unordered
    scores, sequences = beams.scores.gather(1, order), _take(beams.sequences, order)
    items, item_scores = expand_items(trie, beams.nodes.gather(1, order), scores, num_beams)
    phases = stats.draft_time_s + stats.verify_time_s + stats.accept_time_s
    stats.other_time_s = time.perf_counter() - start - phases
    return SpeculativeOutput(items, item_scores, sequences, scores, stats)


@torch.inference_mode()
def beam_sample(
    model: DecoderLM,
    prompt_ids: torch.Tensor,  # [B, P] left-padded
    prompt_mask: torch.Tensor,  # [B, P] bool
    trie: ItemTrie,
    num_beams: int,
    generator: torch.Generator,
) -> BeamSearchOutput:
    """Target-only beam sampling, the distribution relaxed speculative beam search approximates ("relaxed") or
    reproduces exactly ("relaxed_exact"): at each depth, K
    continuations drawn without replacement from P = softmax over the flattened [K x S] cumulative log-probs of the
    current beams' continuations (trie-masked). The final K beams are ranked by cumulative log-prob. L model calls."""
    return beam_search(model, prompt_ids, prompt_mask, trie, num_beams,
                       select=lambda scores, logp, k: sample_top_k(scores, logp, k, generator))
