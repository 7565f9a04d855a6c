"""D3's debiasing of ghost tokens (Bao et al., "Decoding Matters", 2024) as a score processor, torch only.

A ghost token is one whose generation is (almost) certain: here a code the trie forces (its prefix has a single
child) and, optionally, a code whose step probability is at least ``threshold``. Such a token says nothing about
the user, yet under the model's likelihood it still costs log p < 0 (the model spreads some mass outside the trie's
single child), so items whose SIDs contain forced tokens are punished relative to items that branch at every level.
The processor takes ghost tokens out of the score: their step score is 0, every other step keeps its log-prob

    s(c | node) = 0                if c is allowed at node and (node has one allowed child or log p(c | node) >= log tau)
    s(c | node) = log p(c | node)  otherwise (forbidden codes stay -inf)

so an item's score is the sum of the log-probs of its informative tokens only. (D3 also drops the length
normalisation of beam search, which with ghost tokens amplifies items with long, near-certain continuations; beam
search here already ranks by the plain sum.)
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from atspeed_exp.decoding.processors.base import ScoreProcessor
from atspeed_exp.decoding.trie import ItemTrie


class GhostDebias(ScoreProcessor):
    """Step score 0 for ghost tokens (module docstring). ``threshold``: a probability in (0, 1], or None for
    trie-forced tokens only."""

    name: ClassVar[str] = "ghost_debias"

    def __init__(self, threshold: float | None = None) -> None:
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1] or None, got {threshold}")
        self.threshold = threshold

    def __call__(
        self, log_probs: torch.Tensor, nodes: torch.Tensor, trie: ItemTrie, rows: torch.Tensor
    ) -> torch.Tensor:
        allowed = trie.global_allowed[nodes]  # [B, M, S]
        ghost = allowed & (allowed.sum(-1, keepdim=True) == 1)
        if self.threshold is not None:
            ghost = ghost | (log_probs >= math.log(self.threshold))
        ghost = ghost & torch.isfinite(log_probs)  # rows the caller did not expand (other depths, dead) stay -inf
        return torch.where(ghost, torch.zeros_like(log_probs), log_probs)
