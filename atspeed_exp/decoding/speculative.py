"""Speculative beam search (docs/method.md section 6): a drafter (a draft model, retrieval pools, tri-gram counts:
``drafters/``) runs d = min(gamma, L - t - 1) steps ahead of the K current beams, the target scores every drafted
token of every depth in ONE call with tree attention, then accepts depth by depth and produces the next depth from
the logits it already has, so a round advances >= 1 token and a list costs 1..L target calls (1 when everything is
accepted: the first round's verify call also prefills the prompt).

Contract (B users per call, each with its own tree, acceptance and depth; see "Batches" below):
- ``mode="strict"``: the draft runs N-beam search; a depth is accepted iff the target's exact top-K continuations of
  the accepted beams are all drafted beams; the returned beams are exactly those of ``beam_search(target, ..., K)``
  for any draft (choices and order; scores up to float rounding of the tree forward).
- ``mode="relaxed"`` (docs/method.md section 6, ``verify/relaxed.py``): the draft samples N continuations without replacement
  per depth (beam sampling from its joint distribution Q over the (beam, token) continuations). At depth i, P and Q
  are the target's and the draft's joint distributions over the continuations of the K accepted beams (softmax of
  the flattened [K x S] cumulative log-probs, trie-masked; Q renormalised to these continuations). Each drafted
  candidate whose parent was accepted is accepted independently with probability min(1, P/Q); with >= K accepted
  the K with the highest P are kept and depth i+1 is verified; otherwise the accepted ones are kept, K - |accepted|
  are drawn without replacement from the residual max(P - Q, 0) (renormalised, accepted excluded; then from P if
  the residual runs out), and the round stops there. Only APPROXIMATELY distribution-preserving with respect to
  ``beam_sample(target, ..., K)``: with N > K candidates each accepted on its own, what the draft likes gets more
  chances to be accepted, and keeping the top-P K of the accepted ones (rather than a random K) sharpens the
  selection (Q == P with N > K turns sampling into "top K of N samples"). In exchange, a depth passes when ANY K
  of the N candidates are accepted, so acceptance stays high with large K.
- ``mode="relaxed_exact"`` (``verify/relaxed_exact.py``): the same drafts, verified as speculative sampling draw by
  draw (the first K candidates in draw order, residual only at the first rejection, later draws from P), so the
  returned set of K beams has EXACTLY the distribution of ``beam_sample(target, ..., K)`` for any draft. Kept as
  the lossless reference for the relaxed setting; its acceptance falls quickly with K (all of the first K draws
  must pass, in order).
- ``mode="relaxed_official"`` (``verify/relaxed_official.py``): the public AtSpeed code's form (Linxyhaha/AtSpeed,
  code/beamSD.py, ``verify`` with ``do_sample=True``). Like ``relaxed`` except that (a) Q of a candidate is its
  probability under the draft's FULL sampling distribution at that depth (over all its N beams' continuations),
  not renormalised to the accepted beams' continuations; (b) with >= K accepted a uniformly random K of them are
  kept; (c) transformers' top-k warper (``official_top_k``, default 50; None: off) acts on both models' step
  log-probs per beam row, so P and Q, the draft's sampling and the target's own draws use only each row's top-k
  codes. The module docstring of ``verify/relaxed_official.py`` lists the edge cases where it departs from the
  public code.
- ``mode="dare"`` (``verify/dare.py``): DARE's deterministic relaxed rule. The drafter drafts its top-N beams as in
  strict mode; a drafted continuation of an accepted beam passes when it is among the target's top-k continuations
  (``verify_options["dare_top_k"]``, k >= K, default 2K) and its target step probability is at least
  ``verify_options["dare_threshold"]``; a depth is accepted with >= K passes, keeping the K best by target score,
  otherwise the target's own top-K end the round. With k = K and threshold 0 it is strict verification.
- Fidelity, measured on the tests' enumerable setup (3 levels of 3/3/2 codes, K = 2, N = 3, gamma alternating 1
  and 2, a softened ToyLM target and a noisy draft whose own beam-sampling law is 0.41 away): total variation of
  the final K-set's law from the target's exact beam-sampling law over 20000 lists each (Monte-Carlo noise about
  0.007, bound 0.009), acceptance rate in brackets. ``beam_sample`` 0.007; relaxed_exact 0.007 (0.71), i.e. exact;
  relaxed 0.184 (0.88); relaxed_official without the warper 0.449 (0.80), further than the draft's own law: the
  random K of the accepted ignores P among them (N = 3 candidates often cover every continuation there, so a
  depth where all pass gives a uniform K-set), and the unrenormalised Q passes more candidates. With a top-2 warper
  (blocks of <= 3 codes leave the default 50 inert) relaxed_official is 0.042 from the equally warped target law
  (0.71), which is itself 0.028 from the unwarped one.
- The sampling modes (relaxed, relaxed_exact, relaxed_official) need an explicit ``torch.Generator``; lists are
  ranked by target cumulative log-prob.
- Drafters: ``draft`` is a ``drafters.Drafter`` or a draft model (``DecoderLM``, drafted by ``drafters.ModelDrafter``).
  The engine knows the contract only (``drafters/base.py``): each round the drafter's session gets the current beams
  and returns the drafted tree (``tree.Level``s), then hears which beams the target kept. How a depth is selected
  (top-N beam search in strict mode, N draws for the sampling rules) is the rule's, passed as a ``DraftSpec``, so
  strict verification is lossless and the relaxed rules see the Q they expect with every drafter.
- The target keeps ONE cache row per user holding the prompt and a token tree (a draft model does the same). A beam is
  a bool visibility vector over that row (prompt + its own fed ancestors), its pending (not yet fed) tokens and the
  position id of the first one; every call appends tokens whose mask rows come from those vectors (``tree.TreeCall``:
  the tree mask), so nothing is copied while drafting; after a round the caches are pruned with ``gather_cache`` to
  the kept beams' paths.

- ``verify_beams`` M (K <= M <= N): the target verifies only the draft's first M beams per depth (best first in
  strict mode, draw order in relaxed modes) among those whose parent it verifies: fewer tokens per verification call,
  still lossless in strict mode (a depth whose target top-K is not among them is simply rejected).
- ``scope``: level log-probs normalised over the full vocabulary ("vocab", the model's likelihood) or over the level's
  SID block ("level": the output projection covers that block only); logits are computed only for the rows that
  selection uses (each drafted node's last token), never for prompt rows. Strict SD equals beam search with the same
  scope.
- ``processors`` (``processors/``): score processors applied to the target's step log-probs in the verify call, at
  the same nodes and in the same way as beam search applies them, so strict SD equals beam search with the same
  processors. The drafter drafts from its own, unprocessed scores (lossless all the same; acceptance may drop).

Batches (ragged progress): user b is at depth t_b and drafts d_b = min(gamma, L - t_b - 1) steps; a round makes
D = max d_b draft-model calls and one target call for all users. Trie nodes live in one global id space that carries each
node's depth, so rows at different depths are gathered and masked by the same tensor ops; levels a user does not
need, dead beams and left padding are *void* tokens (fed, seen by nobody, not counted). Each round ends with ONE host
sync (accepted depths and the cache columns to keep); users that reach depth L leave the batch, and both caches are
pruned per user to the columns their live beams see (padded to the longest). Per-list counters: ``ListStats``.

Phases of a round: the drafter's ``draft`` -> ``_verified_levels`` (top-M) -> ``_verify_phase`` (tree mask + one target
call) -> ``_accept_phase``, then the drafter's ``advance`` and pruning. Beams are matched across draft and target by their full prefix (parent +
code), never by position.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from atspeed_exp.decoding.beam_search import (
    SCOPES,
    BeamSearchOutput,
    beam_search,
    check_beam_settings,
    expand_items,
    level_scores,
    select_top_k,
)
from atspeed_exp.decoding.drafters import DraftSpec, Drafter, ModelDrafter, RoundResult
from atspeed_exp.decoding.processors.base import ScoreProcessor, begin_all
from atspeed_exp.decoding.protocol import DecoderLM
from atspeed_exp.decoding.sampling import NEG_INF, sample_top_k, top_k_warp
from atspeed_exp.decoding.tree import (
    Level,
    TreeCall,
    View,
    child_level,
    depths_at,
    level_depth,
    pick,
    prune_cache,
    take_beams,
    uniform,
)
from atspeed_exp.decoding.trie import ItemTrie
from atspeed_exp.decoding.verify import (  # the rules, importable from here as before
    RELAXED_RULES,
    VERIFY_OPTIONS,
    dare_select,
    relaxed_exact_select,
    relaxed_official_select,
    relaxed_select,
)

MODES = ("strict", *RELAXED_RULES)


@dataclass
class SpeculativeStats:
    """Counters of one call (B lists). Calls and rounds count the batched forward calls made; steps and tokens are
    sums over the lists (per list: ``ListStats``). For B = 1 both are the list's own numbers."""

    target_calls: int = 0
    draft_calls: int = 0
    rounds: int = 0
    drafted_steps: int = 0  # sum over lists and rounds of d
    accepted_steps: int = 0  # drafted steps the target accepted
    target_tokens: int = 0  # real tokens fed to the target (prompt + verified tree; padding and void not counted)
    draft_tokens: int = 0
    draft_time_s: float = 0.0  # draft calls + draft selection + top-M pruning of the tree
    verify_time_s: float = 0.0  # tree mask + the target call + the target's level log-probs
    accept_time_s: float = 0.0  # acceptance, the target's own step, cache pruning, the round's host sync
    other_time_s: float = 0.0  # setup and item expansion

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_steps / self.drafted_steps if self.drafted_steps else float("nan")


@dataclass
class ListStats:
    """Per-list counters of a batched call (one entry per prompt, in input order): the calls each list took part in
    (its rounds; its own drafted steps, not the batch's longest), and the real tokens of its rows."""

    target_calls: list[int]
    draft_calls: list[int]
    rounds: list[int]
    drafted_steps: list[int]
    accepted_steps: list[int]
    target_tokens: list[int]
    draft_tokens: list[int]


@dataclass
class SpeculativeOutput:
    items: torch.Tensor  # [B, K] long, SID collisions expanded (expand_items)
    scores: torch.Tensor  # [B, K] float: target cumulative log-prob of each item's SID
    sequences: torch.Tensor  # [B, K, L] long: the K beams' SID token ids, best first
    sequence_scores: torch.Tensor  # [B, K] float
    stats: SpeculativeStats
    lists: ListStats
    # with record_logits (strict mode): as BeamSearchOutput's, for teacher data made with a draft
    level_logits: list[torch.Tensor] | None = None  # per depth t: [B, K, S_t] raw level logits at each beam's prefix
    full_logsumexp: torch.Tensor | None = None  # [B, K, L] their normalisers


# -- state ----------------------------------------------------------------------------------------------------------
@dataclass
class _Beams:
    """The K current beams of each user after t_b generated tokens (round 1: the prompt alone, one beam)."""

    sequences: torch.Tensor  # [B, M, L] SID token ids (columns >= t_b unused)
    scores: torch.Tensor  # [B, M] target cumulative log-prob; -inf: placeholder (fewer than K prefixes exist)
    nodes: torch.Tensor  # [B, M] global trie nodes


class _Timer:
    def __init__(self, stats: SpeculativeStats, device: torch.device, profile: bool) -> None:
        self.stats, self.sync = stats, profile and device.type == "cuda"

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.sync:  # kernels are asynchronous: charge them to the phase that launched them
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            field = f"{name}_time_s"
            setattr(self.stats, field, getattr(self.stats, field) + time.perf_counter() - start)


def _verified_levels(levels: list[Level], trie: ItemTrie, t: torch.Tensor, limit: int) -> list[Level]:
    """Top-M verification: keep, per drafted depth, the first ``limit`` drafted beams (the draft's order: best first
    in strict mode, draw order in relaxed modes) among those whose parent was kept, so the verified tree stays closed
    under ancestors; the rest become dead placeholders and are never fed to the target."""
    if all(level.nodes.shape[1] <= limit for level in levels[1:]):
        return levels
    out = [levels[0]]
    kept_prev = torch.isfinite(levels[0].draft_scores)  # [B, M_0] over the previous FULL level
    position_prev = None  # full index -> kept index of the previous level
    for ell, level in enumerate(levels[1:], start=1):
        ok = torch.isfinite(level.draft_scores) & kept_prev.gather(1, level.parent)
        kept = ok & (ok.long().cumsum(1) <= limit)  # [B, N]
        order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :limit]  # kept first, draft order
        alive = kept.gather(1, order)
        parent = take_beams(level.parent, order)
        if position_prev is not None:
            parent = position_prev.gather(1, parent)
        dead = trie.global_dead[(t + ell).clamp(max=trie.num_levels + 1)][:, None]
        out.append(Level(
            sequences=take_beams(level.sequences, order),
            nodes=torch.where(alive, take_beams(level.nodes, order), dead),
            draft_scores=take_beams(level.draft_scores, order).masked_fill(~alive, NEG_INF),
            position=take_beams(level.position, order),
            token=take_beams(level.token, order),
            parent=parent.masked_fill(~alive, 0),
            codes=take_beams(level.codes, order),
            draft_visible=None if level.draft_visible is None else take_beams(level.draft_visible, order),
            draft_log_probs=None if level.draft_log_probs is None else take_beams(level.draft_log_probs, order),
            draft_log_norm=level.draft_log_norm,  # of the full level: Q stays the draft's sampling distribution
        ))
        batch, full = kept.shape
        slot = torch.where(alive, order, full)
        position_prev = torch.zeros(batch, full + 1, dtype=torch.long, device=order.device)
        position_prev = position_prev.scatter(1, slot, torch.arange(limit, device=order.device).expand(batch, -1))
        position_prev, kept_prev = position_prev[:, :full], kept
    return out


def _verify_phase(
    target: DecoderLM,
    view: View,
    levels: list[Level],
    trie: ItemTrie,
    steps: torch.Tensor,
    host: list[tuple[int, int]],
    scope: str,
    target_tokens: torch.Tensor,
    record: bool = False,
    processors: Sequence[ScoreProcessor] = (),
    rows: torch.Tensor | None = None,
) -> Any:
    """ONE target call over the current beams' pending tokens and every drafted level, with tree attention
    (each token sees the prompt and its own ancestors) and position = parent position + 1; the target's
    next-level log-probs at every node, from the output projection of those rows only, after the score
    ``processors`` (``rows``: each working row's user)."""
    call = TreeCall(view.visible.shape[2], view.visible.device)
    lasts = []
    levels[0].target_visible, last = call.add(view.visible, view.pending, view.position, view.pending_valid)
    lasts.append(last)
    for ell, (prev, level) in enumerate(zip(levels[:-1], levels[1:]), start=1):
        fed = torch.isfinite(level.draft_scores) & (steps >= ell)[:, None]
        level.target_visible, last = call.add(
            take_beams(prev.target_visible, level.parent), level.token[:, :, None], take_beams(prev.position, level.parent),
            fed[:, :, None],
        )
        lasts.append(last)
    hidden, cache = call.hidden(target, view.cache)
    target_tokens += call.valid_counts()
    for ell, (level, last) in enumerate(zip(levels, lasts)):
        depths = depths_at(host, ell)
        level.target_log_probs, level.target_record = level_scores(
            target, hidden[:, last], trie, level.nodes, depths, scope, record, same_depth=len(host) == 1,
            processors=processors, rows=rows,
        )
    return cache


@dataclass
class _Step:
    """The target's K beams at one depth of the accept phase, as (parent, code) over the accepted beams."""

    ref: torch.Tensor  # [B, K] parent index into the previous tree level
    codes: torch.Tensor  # [B, K]
    scores: torch.Tensor  # [B, K] target cumulative log-probs (-inf: placeholder)
    accepted: torch.Tensor  # [B] bool: all K are drafted beams


def _accept_phase(
    levels: list[Level],
    steps: torch.Tensor,
    num_beams: int,
    mode: str,
    generator: torch.Generator | None,
    top_k: int | None = None,
    options: dict[str, Any] | None = None,
) -> list[_Step]:
    """Depth by depth l = 1..D+1, assuming depths < l were accepted: the target's K beams at depth l (strict: its
    exact top-K; a relaxed mode: the ``select`` of its rule in ``verify.RELAXED_RULES``, given ``options``) and
    whether they are all among the drafted level l (never for l > d_b). A ``warped`` rule's P uses the target's step
    log-probs after the top-k warper (``top_k``), the target's own last step included. Later depths are discarded
    per user after its first rejection; computing them costs only [K, S] tensor work and saves a host sync per
    depth."""
    rule = RELAXED_RULES.get(mode)  # None: strict
    num_steps = len(levels) - 1
    batch, roots = levels[0].draft_scores.shape
    device = levels[0].nodes.device
    ref = None  # accepted beams at depth l - 1 as indices into its level (None: all of level 0, in order)
    never = torch.zeros(batch, dtype=torch.bool, device=device)  # the target's own step past the drafted depths
    scores = levels[0].draft_scores  # target scores of the current beams (-inf: placeholders)
    out = []
    for ell in range(1, num_steps + 2):
        prev = levels[ell - 1]
        # [B, MA, S]; rows of placeholders need no masking: their -inf score makes every continuation -inf
        log_p = prev.target_log_probs if ref is None else take_beams(prev.target_log_probs, ref)
        if rule is not None and rule.warped:
            log_p = top_k_warp(log_p, top_k)
        size = log_p.shape[2]
        drafted = ell <= num_steps
        reached = (steps >= ell)[:, None] if drafted else None  # users whose round drafted depth l
        if rule is None:
            new_scores, parent, codes = select_top_k(scores, log_p, num_beams)
            parent_in_level = parent if ref is None else take_beams(ref, parent)
            if drafted:
                # the target's top-K against the drafted beams, both as (parent in level l - 1, code): a drafted
                # beam whose parent was not accepted matches nothing, since every target choice continues A
                level = levels[ell]
                drafted_flat = torch.where(torch.isfinite(level.draft_scores) & reached,
                                           level.parent * size + level.codes, -1)
                match = (parent_in_level * size + codes)[:, :, None] == drafted_flat[:, None, :]  # [B, K, N]
                accepted = (match.any(2) | (new_scores == NEG_INF)).all(1) & reached[:, 0]
                ref, scores = match.long().argmax(2), new_scores  # the accepted beams' places in level l
            out.append(_Step(parent_in_level, codes, new_scores, accepted if drafted else never))
            continue
        if ref is None:
            ref = torch.arange(roots, device=device).expand(batch, roots)
        if not drafted:
            # the target's own step past the drafted depths: with no candidate the sampling verifications reduce to
            # K draws without replacement from P, which is what beam sampling's step is (Gumbel-top-K); the others
            # to beam search's top-K
            if rule.sampled:
                new_scores, parent, codes = sample_top_k(scores, log_p, num_beams, generator)
            else:
                new_scores, parent, codes = select_top_k(scores, log_p, num_beams)
            out.append(_Step(take_beams(ref, parent), codes, new_scores, never))
            continue
        alive = torch.isfinite(scores)
        # drafted beams at depth l that continue an accepted beam, as flat (position in A, code) indices, in the
        # draft's order. Relaxed: the draft sampled them from all N parents by Gumbel-top-N; the subsequence
        # that continues A is successive sampling from Q restricted to A's continuations (the Gumbel argmax is
        # independent of the max, so where the stream stops says nothing about which item comes next).
        level = levels[ell]
        slot = torch.where(alive, ref, prev.nodes.shape[1])  # placeholders to a dummy column
        in_a = torch.full((batch, prev.nodes.shape[1] + 1), -1, dtype=torch.long, device=device)
        in_a = in_a.scatter(1, slot, torch.arange(ref.shape[1], device=device).expand_as(ref))[:, :-1]
        parent_in_a = in_a.gather(1, level.parent)  # [B, N]
        usable = (parent_in_a >= 0) & torch.isfinite(level.draft_scores) & reached
        candidates = torch.where(usable, parent_in_a * size + level.codes, -1)
        # Q: what the draft sampled from (its cumulative score of the parent + its level log-prob) at the
        # continuations of the accepted beams: renormalised to them, or (full_q) as they are in the draft's
        # distribution over all its beams' continuations
        total = (scores[:, :, None] + log_p).reshape(batch, -1)  # [B, MA*S] target cumulative
        q = take_beams(prev.draft_scores, ref)[:, :, None] + take_beams(prev.draft_log_probs, ref)
        q = q.masked_fill(~alive[:, :, None], NEG_INF).reshape(batch, -1)  # [B, MA*S]
        log_q = q - prev.draft_log_norm[:, None] if rule.full_q else q.log_softmax(1)
        log_q = torch.where(torch.isnan(log_q), NEG_INF, log_q)  # users with nothing drafted here
        extra = dict(options or {})
        if rule.step_log_p:
            extra["step_log_p"] = log_p.reshape(batch, -1)  # [B, MA*S], the order of ``total``
        flat, alive_new, taken = rule.select(total.log_softmax(1), log_q, candidates, num_beams, generator, **extra)
        new_scores = total.gather(1, flat).masked_fill(~alive_new, NEG_INF)
        parent, codes = flat // size, flat % size
        match = flat[:, :, None] == candidates[:, None, :]
        accepted = (taken == num_beams) & reached[:, 0]
        out.append(_Step(take_beams(ref, parent), codes, new_scores, accepted))
        ref, scores = match.long().argmax(2), new_scores  # the accepted beams' places in level l
    return out


# -- the engine -----------------------------------------------------------------------------------------------------
def _check_settings(
    trie: ItemTrie,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    num_beams: int,
    draft_beams: int,
    verify_beams: int,
    gamma: int,
    mode: str,
    generator: torch.Generator | None,
    scope: str,
) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    check_beam_settings(trie, num_beams)
    if draft_beams < num_beams:
        raise ValueError(f"draft_beams (N={draft_beams}) must be >= num_beams (K={num_beams})")
    if not num_beams <= verify_beams <= draft_beams:
        raise ValueError(f"verify_beams (M={verify_beams}) must satisfy K={num_beams} <= M <= N={draft_beams}")
    if not 1 <= gamma <= trie.num_levels - 1:
        raise ValueError(f"gamma={gamma} out of range: 1 <= gamma <= L - 1 = {trie.num_levels - 1}")
    if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask must both be [B, P]")
    if prompt_ids.shape[0] == 0:
        raise ValueError("no prompts given")
    lengths = prompt_mask.long().sum(1)
    if bool((lengths == 0).any()):
        raise ValueError(f"empty prompt at row {int((lengths == 0).nonzero()[0])}")
    if bool((prompt_mask.long().diff(dim=1) < 0).any()):
        raise ValueError("prompts must be left-padded (prompt_mask: False... then True...; see left_pad)")
    if mode != "strict" and RELAXED_RULES[mode].sampled and generator is None:
        raise ValueError(f"{mode} mode samples: pass an explicit torch.Generator")


@torch.inference_mode()
def speculative_beam_search(
    target: DecoderLM,
    draft: DecoderLM | Drafter,  # a draft model (drafted by ``drafters.ModelDrafter``) or any drafter
    prompt_ids: torch.Tensor,  # [B, P] left-padded
    prompt_mask: torch.Tensor,  # [B, P] bool
    trie: ItemTrie,
    num_beams: int,  # K
    draft_beams: int = 40,  # N >= K
    gamma: int = 3,  # drafted steps per round, 1..L-1
    mode: str = "strict",  # one of MODES: "strict" | "relaxed" | "relaxed_exact" | "relaxed_official" | "dare"
    generator: torch.Generator | None = None,  # relaxed modes' randomness (draft sampling and verification)
    verify_beams: int | None = None,  # M, K <= M <= N: drafted beams per depth the target verifies (None: N)
    scope: str = "vocab",  # normaliser of level log-probs (beam_search.level_scores)
    profile: bool = False,  # on CUDA: synchronise at phase boundaries so the phase times are right
    prune: bool = True,  # drop cache columns no live beam sees after each round (False: keep them, masked)
    record_logits: bool = False,  # strict: also the target's level logits at each final beam's prefixes (teacher)
    official_top_k: int | None = 50,  # relaxed_official only: the per-row top-k warper of both models (None: off)
    verify_options: Mapping[str, Any] | None = None,  # settings of the relaxed rules (verify.VERIFY_OPTIONS), e.g.
    #                                                   dare_top_k, dare_threshold; each rule takes its own
    processors: Sequence[ScoreProcessor] = (),  # score processors of the target's step scores (processors/)
) -> SpeculativeOutput:
    """Top-K items of each of B prompts by speculative beam search (see module docstring)."""
    verify_beams = draft_beams if verify_beams is None else verify_beams
    if record_logits and mode != "strict":
        raise ValueError(f"record_logits needs mode='strict' (the target's own beams), got mode={mode!r}")
    _check_settings(trie, prompt_ids, prompt_mask, num_beams, draft_beams, verify_beams, gamma, mode, generator, scope)
    if official_top_k is not None and official_top_k < 1:
        raise ValueError(f"official_top_k must be >= 1 or None (no warper), got {official_top_k}")
    unknown = sorted(set(verify_options or {}) - set(VERIFY_OPTIONS))
    if unknown:
        raise ValueError(f"unknown verify_options {unknown}; expected some of {list(VERIFY_OPTIONS)}")
    start = time.perf_counter()
    stats = SpeculativeStats()
    timer = _Timer(stats, target.device, profile)
    device = prompt_ids.device
    num_levels = trie.num_levels
    batch, prompt_width = prompt_ids.shape

    drafter = draft if isinstance(draft, Drafter) else ModelDrafter(draft)
    processors = begin_all(processors, prompt_ids, prompt_mask, trie)
    rule = RELAXED_RULES.get(mode)  # None: strict
    options = {name: value for name, value in (verify_options or {}).items() if rule and name in rule.options}
    spec = DraftSpec(draft_beams, sample=rule is not None and rule.sampled, generator=generator,
                     top_k=official_top_k if rule is not None and rule.warped else None,
                     full_q=rule is not None and rule.full_q)

    # per list, by original row: host counters (known after each round's sync) and device token counters
    rounds = torch.zeros(batch, dtype=torch.long)  # = target calls per list
    drafted = torch.zeros(batch, dtype=torch.long)  # = draft-model calls per list when the drafter runs a model
    accepted_steps = torch.zeros(batch, dtype=torch.long)
    target_tokens = torch.zeros(batch, dtype=torch.long, device=device)
    draft_tokens = torch.zeros(batch, dtype=torch.long, device=device)
    final_scores = torch.full((batch, num_beams), NEG_INF, device=device)
    final_nodes = torch.full((batch, num_beams), int(trie.global_dead[num_levels]), dtype=torch.long, device=device)
    final_sequences = torch.zeros(batch, num_beams, num_levels, dtype=torch.long, device=device)
    if record_logits:  # per current beam: the target's raw level logits and normaliser at its prefix of each depth
        history = (torch.full((batch, 1, num_levels, trie.max_block), NEG_INF, device=device),
                   torch.zeros(batch, 1, num_levels, device=device))
        final_history = (torch.full((batch, num_beams, num_levels, trie.max_block), NEG_INF, device=device),
                         torch.zeros(batch, num_beams, num_levels, device=device))

    beams = _Beams(
        sequences=prompt_ids.new_zeros(batch, 1, num_levels),
        scores=torch.zeros(batch, 1, device=device),
        nodes=torch.zeros(batch, 1, dtype=torch.long, device=device),
    )
    # Round 1: one beam per user with an empty cache whose pending chain is the (left-padded) prompt, so the first
    # verify call is also the target's prefill.
    target_view = View.round_one(prompt_ids, prompt_mask, target.new_cache())
    session = drafter.begin(replace(target_view, cache=None), trie, scope)

    # host (CPU) state of the working batch: no per-user Python, and no device sync to read it
    rows = torch.arange(batch)  # original row of each row of the working batch
    host_t = torch.zeros(batch, dtype=torch.long)  # SID tokens generated so far, per working row
    while True:
        host_steps = (num_levels - host_t - 1).clamp(max=gamma)  # d_b: the target always makes the last token
        # the round's distinct (t_b, d_b): d_b is a function of t_b, so at most L pairs
        host = [(depth, min(gamma, num_levels - depth - 1)) for depth in torch.unique(host_t).tolist()]
        num_steps = max(steps for _, steps in host)
        t, steps, row_index = host_t.to(device), host_steps.to(device), rows.to(device)
        work_target_tokens = torch.zeros(len(rows), dtype=torch.long, device=device)
        work_draft_tokens = torch.zeros(len(rows), dtype=torch.long, device=device)
        stats.rounds += 1
        root = Level(beams.sequences, beams.nodes, beams.scores, target_view.position + target_view.pending.shape[2])
        with timer.phase("draft"):
            if num_steps > 0:
                levels, calls = session.draft(root, trie, t, steps, host, spec, work_draft_tokens)
                stats.draft_calls += calls
                levels = _verified_levels(levels, trie, t, verify_beams)
            else:  # the last SID token of every user: the target alone
                levels = [root]
        with timer.phase("verify"):
            target_cache = _verify_phase(
                target, target_view, levels, trie, steps, host, scope, work_target_tokens,
                record_logits, processors, row_index,
            )
            stats.target_calls += 1
        with timer.phase("accept"):
            out = _accept_phase(levels, steps, num_beams, mode, generator, official_top_k, options)
            if num_steps > 0:
                flags = torch.stack([s.accepted for s in out[:num_steps]], 1)  # [B, D]
                accepted = flags.long().cumprod(1).sum(1)  # [B] leading accepted depths
                host_accepted = accepted.cpu()  # the round's one host sync: the next round's shape depends on it
            else:
                accepted = torch.zeros(len(rows), dtype=torch.long, device=device)
                host_accepted = torch.zeros(len(rows), dtype=torch.long)
            # the target's beams at depth t + accepted + 1, from logits it already has
            same = uniform(host_accepted.tolist())
            ref = pick([s.ref for s in out], accepted, same)
            codes = pick([s.codes for s in out], accepted, same)
            new_scores = pick([s.scores for s in out], accepted, same)
            base = Level(  # the level their parents are in
                sequences=pick([lv.sequences for lv in levels], accepted, same),
                nodes=pick([lv.nodes for lv in levels], accepted, same),
                draft_scores=new_scores,
                position=pick([lv.position for lv in levels], accepted, same),
            )
            depth = level_depth(host, same) if same is not None else None
            new = child_level(base, new_scores, ref, codes, trie, t + accepted if depth is None else depth)
            alive = torch.isfinite(new_scores)
            if record_logits:
                history = _extend_history(history, levels, ref, accepted, t, num_steps)
            target_visible = take_beams(pick([lv.target_visible for lv in levels], accepted, same), ref)
            keep_target = (target_visible & alive[:, :, None]).any(1)  # [B, C_t] columns a live beam sees
            session.advance(RoundResult(levels, new, ref, alive, accepted, host_accepted, steps, host_steps, t, host,
                                        same, depth, num_steps))

            # bookkeeping per list; lists that reached depth L leave the working batch
            target_tokens.index_add_(0, row_index, work_target_tokens)
            draft_tokens.index_add_(0, row_index, work_draft_tokens)
            rounds.index_add_(0, rows, torch.ones_like(rows))
            drafted.index_add_(0, rows, host_steps)
            accepted_steps.index_add_(0, rows, host_accepted)
            host_t = host_t + host_accepted + 1
            finished = host_t >= num_levels
            if bool(finished.any()):
                index = finished.nonzero().squeeze(1).to(device)
                original = row_index[index]
                final_scores[original] = new_scores[index]
                final_nodes[original] = new.nodes[index]
                final_sequences[original] = new.sequences[index]
                if record_logits:
                    final_history[0][original] = history[0][index]
                    final_history[1][original] = history[1][index]
            if bool(finished.all()):
                break
            stay = (~finished).nonzero().squeeze(1)
            if bool(finished.any()):  # shrink the working batch
                index = stay.to(device)
                target_cache = target.reorder_cache(target_cache, index)
                session.keep_rows(index)
                new = Level(new.sequences[index], new.nodes[index], new.draft_scores[index], new.position[index],
                             token=new.token[index])
                alive, new_scores, base_position = alive[index], new_scores[index], take_beams(base.position, ref)[index]
                target_visible, keep_target = target_visible[index], keep_target[index]
                if record_logits:
                    history = (history[0][index], history[1][index])
            else:
                base_position = take_beams(base.position, ref)
            rows, host_t = rows[stay], host_t[stay]
            beams = _Beams(new.sequences, new_scores, new.nodes)

            # prune both caches to the columns some live beam sees. Their number is bounded on the host without a
            # sync: the prompt's columns plus K paths of t - 1 fed tokens; users keeping fewer are padded with
            # columns nobody sees. Without pruning, rejected branches stay in the caches, hidden by the masks:
            # later calls attend over more columns, but a round saves a gather per layer.
            if prune:
                bound = prompt_width + num_beams * (int(host_t.max()) - 1)
                target_cache, target_visible = prune_cache(target, target_cache, target_visible, keep_target,
                                                           min(bound, target_visible.shape[2]))
                session.prune(bound)
            target_view = View(target_cache, target_visible, new.token[:, :, None], alive[:, :, None], base_position)

    order = final_scores.argsort(dim=1, descending=True, stable=True)  # relaxed draws come unordered
    scores, sequences = final_scores.gather(1, order), take_beams(final_sequences, order)
    leaves = trie.global_leaves_to_local(final_nodes.gather(1, order))
    items, item_scores = expand_items(trie, leaves, scores, num_beams)
    lists = ListStats(
        target_calls=rounds.tolist(), draft_calls=drafted.tolist() if drafter.runs_model else [0] * batch,
        rounds=rounds.tolist(),
        drafted_steps=drafted.tolist(), accepted_steps=accepted_steps.tolist(),
        target_tokens=target_tokens.cpu().tolist(), draft_tokens=draft_tokens.cpu().tolist(),
    )
    output = SpeculativeOutput(items, item_scores, sequences, scores, stats, lists)
    if record_logits:
        raw, norm = take_beams(final_history[0], order), take_beams(final_history[1], order)
        output.level_logits = [raw[:, :, d, : e - s] for d, (s, e) in enumerate(trie.level_blocks)]
        output.full_logsumexp = norm
    stats.drafted_steps, stats.accepted_steps = sum(lists.drafted_steps), sum(lists.accepted_steps)
    stats.target_tokens, stats.draft_tokens = sum(lists.target_tokens), sum(lists.draft_tokens)
    phases = stats.draft_time_s + stats.verify_time_s + stats.accept_time_s
    stats.other_time_s = time.perf_counter() - start - phases
    return output


def _extend_history(
    history: tuple[torch.Tensor, torch.Tensor],
    levels: list[Level],
    ref: torch.Tensor,
    accepted: torch.Tensor,
    t: torch.Tensor,
    num_steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new beams' records: their root ancestor's history, plus the records of their ancestors at levels
    0..accepted_b of this round (depths t_b..t_b + accepted_b), found by following parent pointers down from
    ``ref`` (the new beams' parents in level accepted_b)."""
    raw_history, norm_history = history
    num_levels = raw_history.shape[2]
    ancestors: list[torch.Tensor] = [ref] * (num_steps + 1)  # per level l: index of the ancestor (users with a_b >= l)
    cur = ref
    for ell in range(num_steps - 1, -1, -1):
        below = levels[ell + 1].parent
        stepped = take_beams(below, cur.clamp(max=below.shape[1] - 1))
        cur = torch.where((accepted > ell)[:, None], stepped, ref)
        ancestors[ell] = cur
    raw = take_beams(raw_history, ancestors[0].clamp(max=raw_history.shape[1] - 1))  # [B, K, L, S]
    norm = take_beams(norm_history, ancestors[0].clamp(max=norm_history.shape[1] - 1))
    columns = torch.arange(num_levels, device=ref.device)
    for ell in range(num_steps + 1):
        level_raw, level_norm = levels[ell].target_record
        index = ancestors[ell].clamp(max=level_raw.shape[1] - 1)
        here = ((accepted >= ell)[:, None] & (columns == (t + ell)[:, None]))[:, None, :]  # [B, 1, L]
        raw = torch.where(here[..., None], take_beams(level_raw, index)[:, :, None, :], raw)
        norm = torch.where(here, take_beams(level_norm, index)[:, :, None], norm)
    return raw, norm


def beam_sample(
    model: DecoderLM,
    prompt_ids: torch.Tensor,  # [B, P] left-padded
    prompt_mask: torch.Tensor,  # [B, P] bool
    trie: ItemTrie,
    num_beams: int,
    generator: torch.Generator,
    processors: Sequence[ScoreProcessor] = (),
) -> BeamSearchOutput:
    """Target-only beam sampling, the distribution relaxed speculative beam search approximates ("relaxed";
    "relaxed_official" with ``official_top_k=None``) or reproduces exactly ("relaxed_exact"): at each depth, K
    continuations drawn without replacement from P = softmax over the flattened [K x S] cumulative log-probs of the
    current beams' continuations (trie-masked). The final K beams are ranked by cumulative log-prob. L model calls."""
    return beam_search(model, prompt_ids, prompt_mask, trie, num_beams,
                       select=lambda scores, logp, k: sample_top_k(scores, logp, k, generator), processors=processors)
