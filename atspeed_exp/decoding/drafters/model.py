"""The draft-model drafter (``drafter: model``): a small language model runs the beam search ahead of the target
(AtSpeed, docs/method.md section 6, step 1).

The draft keeps ONE cache row per user holding the prompt and a token tree, like the target: a beam is a bool
visibility vector over that row (prompt + its own fed ancestors), its pending (not yet fed) tokens and the position
id of the first one. Each draft call feeds one level of the tree with tree attention (``tree.TreeCall``) and scores
the next level at its nodes, so a round of d_b drafted depths costs D = max d_b draft calls for the batch; a user's
level d_b is never fed (the target verifies it). After the round the session keeps the paths of the beams the target
kept: when every user accepted the same depth (always at B = 1) by a shortcut with a third of the ops, otherwise per
user; pending are the tokens the draft has not seen yet (the new beam's token, and the last drafted one when all
d_b depths were accepted).
"""

from __future__ import annotations

from typing import Any

import torch

from atspeed_exp.decoding.beam_search import level_scores
from atspeed_exp.decoding.drafters.base import DraftSession, DraftSpec, Drafter, RoundResult, extend_level
from atspeed_exp.decoding.protocol import DecoderLM
from atspeed_exp.decoding.tree import (
    Level,
    TreeCall,
    View,
    depths_at,
    pick,
    prune_cache,
    take_beams,
    uniform,
    widen,
)
from atspeed_exp.decoding.trie import ItemTrie


class ModelDrafter(Drafter):
    """Drafts with ``model`` (any ``DecoderLM`` sharing the target's tokenizer)."""

    name = "model"
    runs_model = True

    def __init__(self, model: DecoderLM) -> None:
        self.model = model

    def begin(self, first: View, trie: ItemTrie, scope: str) -> "ModelSession":
        return ModelSession(self.model, first, trie, scope)


class ModelSession(DraftSession):
    """The draft model's view of the current beams of one engine call (see the module docstring)."""

    def __init__(self, model: DecoderLM, first: View, trie: ItemTrie, scope: str) -> None:
        self.model, self.trie, self.scope = model, trie, scope
        # round 1: one beam per user with an empty cache whose pending chain is the (left-padded) prompt
        self.cache: Any = model.new_cache()
        self.visible = first.visible  # [B, M, C] bool over the cache columns
        self.pending = first.pending  # [B, M, p] token ids not fed yet
        self.pending_valid = first.pending_valid  # [B, M, p] False for void slots
        self.position = first.position  # [B, M] position id of the first pending slot
        self.keep: torch.Tensor | None = None  # [B, C] cache columns a live beam sees (after ``advance``)

    def draft(
        self,
        root: Level,
        trie: ItemTrie,
        t: torch.Tensor,
        steps: torch.Tensor,
        host: list[tuple[int, int]],
        spec: DraftSpec,
        tokens: torch.Tensor,
    ) -> tuple[list[Level], int]:
        """D draft calls: the pending tokens of the current beams, then drafted levels 1..D-1."""
        model, device = self.model, self.visible.device
        num_steps = max(steps for _, steps in host)
        levels, cache = [root], self.cache
        call = TreeCall(self.visible.shape[2], device)
        root.draft_visible, last = call.add(
            self.visible, self.pending, self.position, self.pending_valid & (steps >= 1)[:, None, None]
        )
        for ell in range(1, num_steps + 1):
            prev = levels[-1]
            hidden, cache = call.hidden(model, cache)
            tokens += call.valid_counts()
            depths = depths_at(host, ell, offset=-1)  # level ell - 1's nodes, for users drafting level ell
            log_probs, _ = level_scores(model, hidden[:, last], trie, prev.nodes, depths, self.scope,
                                        same_depth=len(host) == 1)
            level = extend_level(levels, log_probs, trie, t, steps, host, spec)
            levels.append(level)
            if ell < num_steps:  # feed level ell to get the next level's distribution
                call = TreeCall(call.width, device)
                fed = torch.isfinite(level.draft_scores) & (steps > ell)[:, None]
                level.draft_visible, last = call.add(
                    take_beams(prev.draft_visible, level.parent), level.token[:, :, None],
                    take_beams(prev.position, level.parent), fed[:, :, None],
                )
        self.cache = cache
        return levels, num_steps

    def advance(self, result: RoundResult) -> None:
        if result.num_steps == 0:  # the round of the last SID token: every user finishes
            return
        if result.depth is not None:  # every user at the same depth, same acceptance (B = 1)
            self.visible, self.keep, self.pending, self.pending_valid, self.position = _uniform_view(
                result.levels, result.ref, result.new, result.alive, result.same, result.host[0][1], result.depth,
                self.trie.num_levels,
            )
            return
        # accepted < d_b: the kept level was fed to the draft; only the new token is pending.
        # accepted == d_b: level d_b was never fed, so its token and the new one are pending.
        levels, ref, alive, accepted, steps = result.levels, result.ref, result.alive, result.accepted, result.steps
        num_steps, num_levels, num_beams = result.num_steps, self.trie.num_levels, ref.shape[1]
        short = accepted < steps  # [B]
        host_fed = torch.where(result.host_accepted < result.host_steps, result.host_accepted,
                               (result.host_steps - 1).clamp(min=0))
        fed_index = torch.where(short, accepted, steps - 1).clamp(min=0)
        parents = pick([lv.parent if lv.parent is not None else torch.zeros_like(lv.nodes)
                        for lv in levels], accepted, result.same)
        fed_ref = torch.where(short[:, None], ref, take_beams(parents, ref))
        same_fed = uniform(host_fed.tolist())
        fed_visible = pick([lv.draft_visible for lv in levels[:num_steps]], fed_index, same_fed)
        fed_position = pick([lv.position for lv in levels[:num_steps]], fed_index, same_fed)
        self.visible = take_beams(fed_visible, fed_ref)
        self.keep = (self.visible & alive[:, :, None]).any(1)
        new_t = result.t + accepted + 1
        columns = torch.stack([(new_t - 2).clamp(min=0), new_t - 1], 1).clamp(max=num_levels - 1)  # [B, 2]
        self.pending = result.new.sequences.gather(2, columns[:, None, :].expand(-1, num_beams, -1))  # [B, K, 2]
        self.pending_valid = torch.stack([~short[:, None].expand_as(alive), alive], 2) & alive[:, :, None]
        self.position = take_beams(fed_position, fed_ref) - short[:, None].long()

    def keep_rows(self, index: torch.Tensor) -> None:
        self.cache = self.model.reorder_cache(self.cache, index)
        self.visible, self.keep = self.visible[index], self.keep[index]
        self.pending, self.pending_valid = self.pending[index], self.pending_valid[index]
        self.position = self.position[index]

    def prune(self, bound: int) -> None:
        self.cache, self.visible = prune_cache(self.model, self.cache, self.visible, self.keep,
                                               min(bound, self.visible.shape[2]))


def _uniform_view(
    levels: list[Level],
    ref: torch.Tensor,
    new: Level,
    alive: torch.Tensor,
    accepted: int,
    steps: int,
    depth: int,
    num_levels: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The draft's view of the new beams when every user accepted ``accepted`` of ``steps`` drafted depths and the
    new beams' parents are at trie depth ``depth`` (the general case, per user, is ``ModelSession.advance``; same
    result, a third of the ops). Returns (visible, columns some live beam sees, pending tokens, their validity,
    position of the first pending one)."""
    short = accepted < steps  # the kept level was fed to the draft: only the new token is pending
    fed = accepted if short else steps - 1  # else level d was never fed: its token and the new one are pending
    fed_ref = ref if short else take_beams(levels[accepted].parent, ref)
    widest = max(level.draft_visible.shape[2] for level in levels[:steps])
    visible = take_beams(widen(levels[fed].draft_visible, widest), fed_ref)
    keep = (visible & alive[:, :, None]).any(1)
    columns = [min(max(depth - 1, 0), num_levels - 1), min(depth, num_levels - 1)]  # tokens at depths d - 1, d
    pending = new.sequences[:, :, columns]  # [B, K, 2]
    pending_valid = torch.stack([alive & (not short), alive], 2)
    position = take_beams(levels[fed].position, fed_ref) - int(short)
    return visible, keep, pending, pending_valid, position
