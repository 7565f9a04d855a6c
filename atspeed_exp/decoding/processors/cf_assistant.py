"""D3's text-free assistant (Bao et al., "Decoding Matters", 2024) as a score processor, torch only.

A collaborative model (for instance SASRec over item ids) gives each user a distribution over items
``p_CF(i | history)``. Over the item trie it induces a distribution over the next SID code at every prefix: the mass
of the items under the child over the mass under the node,

    p_CF(c | n) = sum_{i under child(n, c)} p_CF(i) / sum_{i under n} p_CF(i),

so that the product of the step probabilities along an item's SID is the mass of its SID (telescoping). The
processor mixes it with the LLM's step log-probs at every expanded node,

    s(c | n) = g * log p_LLM(c | n) + (1 - g) * log max(p_CF(c | n), eps)   (c allowed at n; forbidden codes: -inf)

``g = 1`` is the LLM alone, ``g = 0`` beam search over the collaborative model alone. ``eps`` floors the
collaborative step probability so that an allowed code never becomes -inf (an item the collaborative model gives no
mass, or a node without mass, stays reachable through the LLM's term); it only matters at nodes where the
collaborative mass is below ``eps`` of the parent's. (The public code ranks a child by the largest item probability
under it rather than the sum; the sum is the distribution the collaborative model itself implies over codes.)

The node masses are computed once per decoding call in ``begin``: item probabilities are summed onto the leaves
(SID collisions: a leaf holds the mass of all its items), then level by level onto the parents, with ``index_add``
over the trie's global node arrays (a loop over the L levels, none over items or nodes). Where the item
probabilities come from stays outside: ``source`` is a callable ``(prompt_ids, prompt_mask, trie) -> [B, I]`` (the
pipeline wraps a trained SASRec, reading each history off its prompt), or a fixed tensor ``[I]`` or ``[B, I]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch

from atspeed_exp.decoding.processors.base import ScoreProcessor
from atspeed_exp.decoding.trie import ItemTrie

ItemProbabilities = Callable[[torch.Tensor, torch.Tensor, ItemTrie], torch.Tensor]


def item_leaves(trie: ItemTrie, num_items: int) -> torch.Tensor:
    """Long ``[num_items]``: the leaf (local id) of each item id, the dead leaf for ids not in the trie."""
    items = trie.leaf_items[: trie.num_leaves]  # [num_leaves, C], -1 padded
    leaves = torch.arange(trie.num_leaves, device=items.device)[:, None].expand_as(items)
    known = items >= 0
    if known.any() and int(items[known].max()) >= num_items:
        raise ValueError(f"the trie holds item id {int(items[known].max())}, the item probabilities cover "
                         f"ids 0..{num_items - 1} only")
    out = torch.full((num_items,), trie.num_leaves, dtype=torch.long, device=items.device)
    out[items[known]] = leaves[known]
    return out


def node_mass(item_probs: torch.Tensor, trie: ItemTrie) -> torch.Tensor:
    """The collaborative mass under every global trie node: ``item_probs`` ``[B, I]`` (over item ids) ->
    ``[B, G]``; a node's mass is the sum of the probabilities of the items whose SID starts with its prefix (dead
    nodes and the sink: 0)."""
    batch = item_probs.shape[0]
    num_nodes = trie.global_allowed.shape[0]
    device = trie.global_allowed.device
    item_probs = item_probs.to(device=device, dtype=torch.float32)
    mass = torch.zeros(batch, num_nodes, device=device)
    leaf = item_leaves(trie, item_probs.shape[1]).to(device)  # [I]
    in_trie = leaf < trie.num_leaves
    mass.index_add_(1, trie.depth_offsets[trie.num_levels] + leaf[in_trie], item_probs[:, in_trie])
    for depth in range(trie.num_levels - 1, -1, -1):  # children's mass onto their parents, the leaves' level first
        first, count = trie.depth_offsets[depth], trie.num_nodes[depth]  # live nodes of this depth (not the dead one)
        parents = torch.arange(first, first + count, device=device)[:, None].expand(-1, trie.max_block)  # [n, S]
        allowed = trie.global_allowed[first : first + count]  # [n, S]
        children = trie.global_child[first : first + count][allowed]  # [E]
        mass.index_add_(1, parents[allowed], mass[:, children])
    return mass


def cf_step_log_probs(mass: torch.Tensor, nodes: torch.Tensor, trie: ItemTrie, epsilon: float,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
    """``log max(p_CF(c | node), epsilon)`` ``[B, M, S]`` at global ``nodes`` ``[B, M]`` from the node masses
    ``mass`` ``[U, G]`` of the users ``rows`` ``[B]`` (None: row b is user b); forbidden codes: whatever the floor
    gives, callers mask them. Only the entries needed are read (no [B, G] copy per step)."""
    if rows is None:
        rows = torch.arange(nodes.shape[0], device=nodes.device)
    children = trie.global_child[nodes]  # [B, M, S]
    child_mass = mass[rows[:, None, None], children]  # [B, M, S]
    parent_mass = mass[rows[:, None], nodes][..., None]  # [B, M, 1]
    ratio = child_mass / parent_mass.clamp_min(torch.finfo(mass.dtype).tiny)
    return ratio.clamp_min(epsilon).log()


class CFAssistant(ScoreProcessor):
    """``g * log p_LLM + (1 - g) * log max(p_CF, eps)`` per step (module docstring). ``weight``: g in [0, 1];
    ``source``: the item probabilities (a callable on the call's prompts, or a tensor ``[I]`` / ``[B, I]``);
    ``epsilon``: the floor of the collaborative step probability, in (0, 1)."""

    name: ClassVar[str] = "cf_assistant"

    def __init__(self, weight: float, source: ItemProbabilities | torch.Tensor, epsilon: float = 1e-8) -> None:
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
        self.weight = float(weight)
        self.source = source
        self.epsilon = float(epsilon)
        self.mass: torch.Tensor | None = None  # [B, G] once begun

    def begin(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, trie: ItemTrie) -> "CFAssistant":
        if isinstance(self.source, torch.Tensor):
            probs = self.source if self.source.dim() == 2 else self.source[None]
            if probs.shape[0] not in (1, prompt_ids.shape[0]):
                raise ValueError(f"item probabilities for {probs.shape[0]} users, the call has {prompt_ids.shape[0]}")
            probs = probs.expand(prompt_ids.shape[0], -1)
        else:
            probs = self.source(prompt_ids, prompt_mask, trie)  # [B, I]
        bound = CFAssistant(self.weight, self.source, self.epsilon)
        bound.mass = node_mass(probs, trie)
        return bound

    def __call__(
        self, log_probs: torch.Tensor, nodes: torch.Tensor, trie: ItemTrie, rows: torch.Tensor
    ) -> torch.Tensor:
        if self.mass is None:
            raise RuntimeError("CFAssistant used before begin(): it needs the call's prompts")
        cf = cf_step_log_probs(self.mass, nodes, trie, self.epsilon, rows)  # [B, M, S]
        mixed = self.weight * log_probs + (1.0 - self.weight) * cf
        # forbidden codes and rows the caller did not expand (other depths, dead) stay -inf
        return torch.where(torch.isfinite(log_probs), mixed, -math.inf)
