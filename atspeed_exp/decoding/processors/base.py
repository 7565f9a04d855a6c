"""The score-processor contract (docs/method.md section "Score processors"), torch only.

A processor rewrites the step scores every decoder ranks by: at each expanded trie node it maps the row's masked
step log-probs ``[B, M, S]`` (-inf where the trie forbids a code) to processed step scores of the same shape, given
the rows' global trie nodes ``[B, M]`` (a node carries its depth and stands for the row's SID prefix) and the user of
each row. Beam search, tree beam search and speculative beam search (the target's verification scores) call the
same processors at the same nodes through ``beam_search.level_scores``, so strict speculative decoding returns
exactly the processed beam search's lists. A processor must keep forbidden codes at -inf and must not make an
allowed one -inf (or the trie's items would no longer all be reachable).

``begin`` is called once per decoding call with the call's prompts (a processor that needs per-user state, such as
a collaborative model's item probabilities, builds it there); ``rows`` then names each row's user as an index into
that call's prompts (speculative decoding drops finished users from its working batch).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from atspeed_exp.decoding.trie import ItemTrie


class ScoreProcessor(ABC):
    """Maps masked step log-probs to processed step scores (see the module docstring)."""

    name: ClassVar[str]

    def begin(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, trie: ItemTrie) -> "ScoreProcessor":
        """The processor for one decoding call on ``prompt_ids`` ``[B, P]`` (left-padded, ``prompt_mask`` bool);
        a processor without per-user state returns itself."""
        return self

    @abstractmethod
    def __call__(
        self,
        log_probs: torch.Tensor,  # [B, M, S] masked step log-probs (-inf: forbidden, or a row that is not expanded)
        nodes: torch.Tensor,  # [B, M] global trie nodes of the rows (depth: trie.node_depth[nodes])
        trie: ItemTrie,
        rows: torch.Tensor,  # [B] long: each row's user, an index into the prompts given to ``begin``
    ) -> torch.Tensor:
        """Processed step scores ``[B, M, S]``."""


def begin_all(
    processors: Sequence[ScoreProcessor], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, trie: ItemTrie
) -> tuple[ScoreProcessor, ...]:
    """Each processor's instance for one decoding call."""
    return tuple(p.begin(prompt_ids, prompt_mask, trie) for p in processors)


def apply_processors(
    processors: Sequence[ScoreProcessor],
    log_probs: torch.Tensor,  # [B, M, S]
    nodes: torch.Tensor,  # [B, M]
    trie: ItemTrie,
    rows: torch.Tensor | None,  # [B] (None: row b is user b)
) -> torch.Tensor:
    """The processors applied in order (none: ``log_probs`` itself)."""
    if not processors:
        return log_probs
    if rows is None:
        rows = torch.arange(log_probs.shape[0], device=log_probs.device)
    for processor in processors:
        log_probs = processor(log_probs, nodes, trie, rows)
    return log_probs
