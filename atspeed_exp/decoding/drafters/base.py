"""The drafter contract of speculative beam search (docs/method.md section 6, step 1), torch only.

A ``Drafter`` is built once (around a draft model, a retrieval pool, ...) and serves many calls. For each call of
the engine it opens a ``DraftSession`` on the call's prompts; every round the session gets the current beams of each
user (``root``: token prefixes, trie nodes, cumulative target scores, positions; t_b tokens generated, d_b steps to
draft) and returns the drafted tree for up to gamma depths as ``tree.Level``s: per node its parent's index in the
level before, its code, its cumulative draft score, and at each expanded node the drafter's next-level log-probs
(Q's rows, which the relaxed rules need). After the target has verified the tree the engine tells the session which
beams were kept (``advance``), which users left the batch (``keep_rows``) and when caches may shrink (``prune``);
a drafter without state across rounds ignores all three. A drafter that learns from the target's outputs across
calls (the tri-gram drafter's online counts) gives, with ``fresh``, a copy that has learned nothing yet, so each
pass of an evaluation starts from the same state; other drafters return themselves.

The engine never asks which drafter runs. How a drafted depth is selected depends on the verification rule, not on
the drafter: ``DraftSpec`` carries it (top-N beam search, or N draws without replacement for the sampling rules,
with or without the top-k warper), and ``extend_level`` applies it to any drafter's log-probs, so every drafter
drafts the way each rule expects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from atspeed_exp.decoding.beam_search import select_top_k
from atspeed_exp.decoding.sampling import sample_top_k, top_k_warp
from atspeed_exp.decoding.tree import Level, View, child_level, level_depth
from atspeed_exp.decoding.trie import ItemTrie


@dataclass(frozen=True)
class DraftSpec:
    """How to select the drafted beams of a depth, fixed for one engine call by its verification rule."""

    width: int  # N: drafted beams per depth
    sample: bool  # draw N continuations without replacement (sampling rules) instead of taking the top N
    generator: torch.Generator | None = None  # the draws' randomness (sample only)
    top_k: int | None = None  # per-row top-k warper on the step log-probs before selection (None: none)
    full_q: bool = False  # record each level's sampling normaliser (``Level.draft_log_norm``) for the rule's Q


@dataclass
class RoundResult:
    """What the accept phase kept in one round, for sessions that carry state from round to round. Shapes are over
    the working batch before users that finished leave it."""

    levels: list[Level]  # the verified tree of the round (level 0: the beams it started from)
    new: Level  # the new beams (one per target beam: K), children of level ``accepted_b`` of the tree
    ref: torch.Tensor  # [B, K] each new beam's parent in level accepted_b
    alive: torch.Tensor  # [B, K] False for placeholders (fewer than K prefixes exist)
    accepted: torch.Tensor  # [B] accepted drafted depths of each user
    host_accepted: torch.Tensor  # [B] the same, on the host
    steps: torch.Tensor  # [B] d_b, drafted depths of each user this round
    host_steps: torch.Tensor  # [B] the same, on the host
    t: torch.Tensor  # [B] t_b, SID tokens generated before the round
    host: list[tuple[int, int]]  # the round's distinct (t_b, d_b) pairs, read on the host
    same: int | None  # the accepted depth when every user accepted the same number (always at B = 1), else None
    depth: int | None  # trie depth of the new beams' parents when every user is at the same one, else None
    num_steps: int  # D = max d_b


class DraftSession(ABC):
    """One engine call's drafting state (e.g. a draft model's cache); see the module docstring."""

    @abstractmethod
    def draft(
        self,
        root: Level,
        trie: ItemTrie,
        t: torch.Tensor,  # [B] t_b
        steps: torch.Tensor,  # [B] d_b (0: the user drafts nothing this round)
        host: list[tuple[int, int]],  # the round's distinct (t_b, d_b) pairs
        spec: DraftSpec,
        tokens: torch.Tensor,  # [B] long: add the tokens this round feeds to a draft model per user (in place)
    ) -> tuple[list[Level], int]:
        """The tree levels 0..D (D = max d_b; level 0 is ``root`` with its draft fields filled) and the number of
        draft-model calls made (0 for a drafter that runs no model). A user's level l > d_b is void: its nodes dead,
        its scores -inf."""

    def advance(self, result: RoundResult) -> None:
        """The round's outcome, before finished users leave the batch."""

    def keep_rows(self, index: torch.Tensor) -> None:
        """Only rows ``index`` ``[B']`` of the working batch go on."""

    def prune(self, bound: int) -> None:
        """Drop cache columns no live beam sees (``bound``: an upper bound on the columns any user keeps)."""


class Drafter(ABC):
    """A source of drafts for speculative beam search (see the module docstring)."""

    name: ClassVar[str]
    runs_model: ClassVar[bool]  # its draft calls are forward calls of a model (per-list draft calls are counted)

    @abstractmethod
    def begin(self, first: View, trie: ItemTrie, scope: str) -> DraftSession:
        """A session for one engine call. ``first``: the round-1 beams, one per user, whose pending chain is the
        user's left-padded prompt (``first.pending`` ``[B, 1, P]`` token ids, ``first.pending_valid`` its mask,
        ``first.position`` ``[B, 1]`` the first slot's position, ``first.visible`` ``[B, 1, 0]``; no cache).
        ``scope`` is the normaliser of level log-probs (``beam_search.level_scores``)."""

    def fresh(self) -> "Drafter":
        """This drafter without what it learned from earlier calls (the same object when it learns nothing)."""
        return self

    @property
    def learns_across_calls(self) -> bool:
        """True when a call's drafts depend on the calls before it (then a pass over users cannot be split into
        independent parts, e.g. over processes)."""
        return False


def extend_level(
    levels: list[Level],
    log_probs: torch.Tensor,  # [B, M, S] the drafter's next-level log-probs at the last level's nodes (-inf: none)
    trie: ItemTrie,
    t: torch.Tensor,
    steps: torch.Tensor,
    host: list[tuple[int, int]],
    spec: DraftSpec,
    select: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> Level:
    """The next drafted level below ``levels[-1]`` (level ell - 1) from the drafter's log-probs at its nodes: the
    top N continuations by cumulative draft score (``select_top_k``, or the drafter's own ``select`` with the same
    arguments and returns, which may rank them another way), or N draws without replacement from the softmax of all
    of them (``sample_top_k``) after the top-k warper when ``spec`` asks for it. Stores the (warped) log-probs on
    the parent level as Q's rows and, with ``full_q``, their sampling normaliser; users with d_b < ell get a void
    level."""
    prev, ell = levels[-1], len(levels)
    prev.draft_log_probs = log_probs
    if not spec.sample:
        scores, parent, codes = (select or select_top_k)(prev.draft_scores, prev.draft_log_probs, spec.width)
    else:
        if spec.top_k is not None:
            prev.draft_log_probs = top_k_warp(prev.draft_log_probs, spec.top_k)
        if spec.full_q:  # [B]: what the draft samples from is exp(score + step log-prob - norm) over all rows
            total = prev.draft_scores[:, :, None] + prev.draft_log_probs
            prev.draft_log_norm = torch.logsumexp(total.flatten(1), dim=1)
        scores, parent, codes = sample_top_k(prev.draft_scores, prev.draft_log_probs, spec.width, spec.generator)
    depth = level_depth(host, ell - 1)
    return child_level(prev, scores, parent, codes, trie, t + ell - 1 if depth is None else depth, valid=steps >= ell)
