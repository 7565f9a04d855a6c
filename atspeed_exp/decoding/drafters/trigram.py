"""The tri-gram drafter (``drafter: trigram``): drafts from counts of SID-token tri-grams, no draft model, adapted
online to the target's outputs, with an optional PUCT-shaped draft tree (after ADED, Liu et al., arXiv 2407.12021;
docs/method.md section 6).

Counts. A user's training items, each as its L SID codes, form one token stream (item after item, in time order).
The context of the code at trie depth d (level d of an item) is the two tokens before it in that stream: the item's
own codes at depths d - 2 and d - 1 when d >= 2, and across the item boundary otherwise (d = 1: the previous item's
last code and the item's first; d = 0: the previous item's last two codes). Three tables count the training streams:
tri-grams n3(d, a, b, c) (context a, b, next code c), bi-grams n2(d, b, c) and uni-grams n1(d, c), all over local
codes. At decoding time a beam's context comes from its own codes and, at depths 0 and 1, from the last item of the
user's history, read off the prompt (``ItemTrie.find_items``: the last run of L prompt tokens that spells a catalogue
item). A prompt that shows no item has no context there: its first codes back off to the lower orders.

Estimate. Over the codes A the trie allows at the beam's node, each order is smoothed towards the one below
(interpolated back-off: a Dirichlet prior of weight alpha = ``smoothing`` on the lower order):

    p0(c) = 1 / |A|
    pk(c) = (nk(c) + alpha * p(k-1)(c)) / (sum over c' in A of nk(c') + alpha)   if that sum > 0, else p(k-1)(c)

for k = 1, 2, 3 (uni-, bi-, tri-gram) and c in A; the draft log-prob of c is log p3(c) (-inf outside A). With
alpha = 0 it is pure back-off: the highest order that saw an allowed code decides, and codes it never saw are not
drafted.

Tables: dense, indexed by context, not hashed. The tri-gram contexts of SIDs are few (L * S^2 for L levels of S
codes: 262,144 for 4 levels of 256), so ``context_rows`` maps every context id (d * S + a) * S + b directly to a
row of ``trigram`` (or -1): one gather, no collisions, no probing. A full [L * S^2, S] table would hold 67M cells for
those sizes, so count rows exist only for contexts that were seen; bi- and uni-grams are dense ([L, S, S], [L, S]).
A drafted depth costs a few gathers over the ``[B, M]`` beams and ``[B, M, S]`` arithmetic, no Python per beam.

Online adaptation (``adapt``). After each round the target's new beams show what it chose: every trie node the round
added to their paths (depths t_b .. t_b + a_b; one count per distinct node and user) adds ``update_weight`` to its
tri-, bi- and uni-gram cells. The additions go to a second table of the same form (the built counts are never
modified) that the estimate adds to the built one. ``none``: no updates. ``call``: the additions last one engine call
and its users share them (at batch 1 they change nothing: every later round of a list drafts deeper levels than any
earlier round wrote). ``evaluation``: they last across calls, until ``fresh()`` gives a drafter that has learned
nothing (the evaluation starts each pass with one, so no pass sees the lists of another).

Draft tree (``tree``). ``beam``: the top N continuations by cumulative draft log-prob, as beam search. ``puct``: the
N expansions of a depth are allocated among its parents by a PUCT score, MCTS's selection rule with the tri-gram as
the policy prior. A parent j (a beam of the level above) adds its children in the order of its tri-gram
probabilities; when r of them are drafted (r: j's visit count), its next one scores

    U(j, r) = Q_d(r) + c * P(j, r) * sqrt(N) / (1 + r)

with P(j, r) the candidate's prior, its path probability under the drafter (j's cumulative draft log-prob plus the
child's log-prob, exponentiated and normalised over all candidates of the depth); Q_d(r) the value, the recent
acceptance rate of rank-r children at trie depth d (hits / drafted, both decayed by ``value_decay`` every round; a
drafted node is a hit when it lies on a path the target kept: one of its new beams or their ancestors; 0 before any
statistics, and always with ``adapt=none``, which learns nothing); N the budget, standing for the visits of the
depth's root (all N expansions); c = ``puct_c``. Expanding one child at a time, each time the parent with the highest
U (ties: the lower parent index), drafts the same N nodes, in the same order, as ranking every candidate by the
running minimum of U over its parent's ranks (each parent's list made non-increasing; ties by parent, then rank) and
keeping the first N: ``puct_select`` computes that in tensor ops, the sequential loop is in the tests. The drafted
beams keep their draft log-probs as scores (the next depth's priors) and are ordered by U, the order top-M
verification keeps. The sampling rules (``relaxed*``) draw N continuations as they do with every drafter; ``puct``
shapes the tree of ``strict`` and ``dare``, and strict verification stays lossless whatever the tree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import IO, Any

import torch

from atspeed_exp.decoding.drafters.base import DraftSession, DraftSpec, Drafter, RoundResult, extend_level
from atspeed_exp.decoding.drafters.retrieval import trie_signature
from atspeed_exp.decoding.sampling import NEG_INF
from atspeed_exp.decoding.tree import Level, View, take_beams
from atspeed_exp.decoding.trie import ItemTrie

FORMAT_VERSION = 1
ADAPT_SCOPES = ("none", "call", "evaluation")
TREES = ("beam", "puct")


@dataclass
class TrigramCounts:
    """Tri-, bi- and uni-gram counts over SID codes (module docstring): the built table, and the form the online
    additions take. L levels, S = the trie's ``max_block`` codes per level, R allocated tri-gram rows."""

    signature: list[int]  # trie_signature of the catalogue they count
    context_rows: torch.Tensor  # [L * S * S] long: tri-gram row of context (d * S + a) * S + b, -1: none
    trigram: torch.Tensor  # [R, S] float: n3 (rows past ``used``: room for contexts added later)
    bigram: torch.Tensor  # [L, S, S] float: n2 over (d, b, c)
    unigram: torch.Tensor  # [L, S] float: n1 over (d, c)
    used: int  # tri-gram rows in use

    @classmethod
    def empty(cls, signature: list[int], num_levels: int, width: int, device: torch.device | str = "cpu",
              rows: int = 1) -> "TrigramCounts":
        return cls(list(signature), torch.full((num_levels * width * width,), -1, dtype=torch.long, device=device),
                   torch.zeros(max(rows, 1), width, device=device),
                   torch.zeros(num_levels, width, width, device=device), torch.zeros(num_levels, width, device=device),
                   0)

    @property
    def num_levels(self) -> int:
        return int(self.unigram.shape[0])

    @property
    def width(self) -> int:
        return int(self.unigram.shape[1])

    def to(self, device: torch.device | str) -> "TrigramCounts":
        for name in ("context_rows", "trigram", "bigram", "unigram"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # -- counting ------------------------------------------------------------------------------------------------
    def add(self, depth: torch.Tensor, before: torch.Tensor, code: torch.Tensor, weight: torch.Tensor) -> None:
        """Count ``weight`` ``[E]`` for each next ``code`` ``[E]`` (local) at trie ``depth`` ``[E]`` after the two
        tokens ``before`` ``[E, 2]`` (local codes at depths d - 2 and d - 1 of the stream; -1: unknown, which skips
        the orders that need it). Contexts seen for the first time get rows (the table grows as needed)."""
        width = self.width
        has1 = before[:, 1] >= 0
        has2 = has1 & (before[:, 0] >= 0)
        b = before[:, 1].clamp(min=0)
        weight = weight.to(self.unigram.dtype)
        self.unigram.view(-1).index_add_(0, depth * width + code, weight)
        self.bigram.view(-1).index_add_(0, (depth * width + b) * width + code, weight * has1)
        context = (depth * width + before[:, 0].clamp(min=0)) * width + b  # [E]
        row = self.context_rows[context]
        new = torch.unique(context[has2 & (row < 0)])  # ascending: rows in context order
        if new.numel():
            need = self.used + new.numel()
            if need > self.trigram.shape[0]:
                extra = max(need, 2 * self.trigram.shape[0]) - self.trigram.shape[0]
                self.trigram = torch.cat([self.trigram, self.trigram.new_zeros(extra, width)])
            self.context_rows[new] = torch.arange(self.used, need, device=new.device)
            self.used = need
            row = self.context_rows[context]
        self.trigram.view(-1).index_add_(0, row.clamp(min=0) * width + code, weight * has2)

    def lookup(self, depth: torch.Tensor, before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Counts ``(n3, n2, n1)``, each ``[..., S]``, of the next code at ``depth`` ``[...]`` after ``before``
        ``[..., 2]`` (as in ``add``; rows of an unknown or unseen context are zero)."""
        width = self.width
        has1 = before[..., 1] >= 0
        b = before[..., 1].clamp(min=0)
        row = self.context_rows[(depth * width + before[..., 0].clamp(min=0)) * width + b]
        has3 = has1 & (before[..., 0] >= 0) & (row >= 0)
        n3 = self.trigram[row.clamp(min=0)] * has3[..., None]
        n2 = self.bigram[depth, b] * has1[..., None]
        return n3, n2, self.unigram[depth]

    # -- persistence ---------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Tensors and plain numbers only (``torch.load(weights_only=True)``); the tri-grams as sorted sparse
        entries (key (context * S + code), count), so the file holds what was counted, not the empty cells."""
        width = self.width
        seen = (self.context_rows >= 0).nonzero().squeeze(1)
        context_of_row = torch.empty(self.used, dtype=torch.long, device=seen.device)
        context_of_row[self.context_rows[seen]] = seen
        row, code = self.trigram[: self.used].nonzero(as_tuple=True)
        keys = context_of_row[row] * width + code
        counts = self.trigram[row, code]
        order = keys.argsort()
        return {"format": FORMAT_VERSION, "signature": list(self.signature), "num_levels": self.num_levels,
                "width": width, "trigram_keys": keys[order].cpu(), "trigram_counts": counts[order].cpu(),
                "bigram": self.bigram.cpu(), "unigram": self.unigram.cpu()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "TrigramCounts":
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"tri-gram counts of format {state.get('format')!r}; this code reads {FORMAT_VERSION}")
        width, keys = int(state["width"]), state["trigram_keys"]
        contexts, row = torch.unique(keys // width, return_inverse=True)
        counts = cls.empty(state["signature"], int(state["num_levels"]), width, rows=contexts.numel())
        counts.context_rows[contexts] = torch.arange(contexts.numel())
        counts.trigram[row, keys % width] = state["trigram_counts"].to(counts.trigram.dtype)
        counts.bigram.copy_(state["bigram"])
        counts.unigram.copy_(state["unigram"])
        counts.used = contexts.numel()
        return counts

    def save(self, file: str | IO[bytes]) -> None:
        """``torch.save`` of ``state()`` to a path or an open binary file (the pipeline writes it atomically)."""
        torch.save(self.state(), file)

    @classmethod
    def load(cls, file: str | IO[bytes]) -> "TrigramCounts":
        return cls.from_state(torch.load(file, map_location="cpu", weights_only=True))


def build_trigram_counts(histories: list[torch.Tensor], trie: ItemTrie) -> TrigramCounts:
    """The counts of a training split (module docstring), a pure function of its arguments.

    histories: per user, the SIDs of their training items as token ids ``[n_u, L]``, in time order. An item whose
    SID is not in ``trie`` is not counted, nor is any n-gram whose context reaches into it.
    """
    num_levels, width = trie.num_levels, trie.max_block
    if num_levels < 2:
        raise ValueError("the tri-gram drafter needs SIDs of at least 2 tokens")
    starts = torch.tensor([s for s, _ in trie.level_blocks], dtype=torch.long)
    lengths = torch.tensor([h.shape[0] for h in histories], dtype=torch.long)
    tokens = torch.cat([h.reshape(-1, num_levels).long().cpu() for h in histories]) if histories else \
        torch.zeros(0, num_levels, dtype=torch.long)
    codes = tokens - starts  # [T, L] local
    sizes = torch.tensor([e - s for s, e in trie.level_blocks], dtype=torch.long)
    known = ((codes >= 0) & (codes < sizes)).all(1)
    node = torch.zeros(tokens.shape[0], dtype=torch.long)
    for level in range(num_levels):
        node = trie.global_advance(node, codes[:, level].clamp(0, width - 1))
    known &= trie.global_leaves_to_local(node) < trie.num_leaves
    if not bool(known.any()):
        raise ValueError("no training interaction has a SID of this item catalogue: nothing to count")
    # one stream of T * L tokens; position i's context is i - 2, i - 1 within the same user's stream
    stream = codes.clamp(min=0).reshape(-1)
    ok = known.repeat_interleave(num_levels)
    depth = torch.arange(num_levels).repeat(tokens.shape[0])
    first = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths) * num_levels  # user's first token
    position = torch.arange(stream.numel()) - first.repeat_interleave(num_levels)
    before = []
    for back in (2, 1):
        shifted = torch.cat([stream.new_full((back,), -1), stream[:-back]])
        valid = torch.cat([ok.new_zeros(back), ok[:-back]]) & (position >= back)
        before.append(torch.where(valid, shifted, -1))
    before = torch.stack(before, 1)  # [T * L, 2]
    counts = TrigramCounts.empty(trie_signature(trie), num_levels, width)
    counts.add(depth[ok], before[ok], stream[ok], torch.ones(int(ok.sum())))
    return counts


def smoothed_log_probs(
    n3: torch.Tensor, n2: torch.Tensor, n1: torch.Tensor, allowed: torch.Tensor, smoothing: float
) -> torch.Tensor:
    """Draft log-probs ``[..., S]`` from the counts of each order (``[..., S]``) over the ``allowed`` codes (bool
    ``[..., S]``): the interpolated back-off of the module docstring; -inf outside ``allowed``."""
    mask = allowed.to(n1.dtype)
    p = mask / mask.sum(-1, keepdim=True).clamp(min=1)  # p0: uniform over the allowed codes
    for n in (n1, n2, n3):
        n = n * mask
        total = n.sum(-1, keepdim=True)
        p = torch.where(total > 0, (n + smoothing * p) / (total + smoothing), p)
    return torch.where(allowed, p.log(), NEG_INF)


def history_context(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, trie: ItemTrie) -> torch.Tensor:
    """``[B, 2]`` local codes at levels L - 2 and L - 1 of the last item in each (left-padded) prompt ``[B, P]``,
    the context of the first codes of the next item; -1 where a prompt spells no catalogue item."""
    batch, width = prompt_ids.shape
    num_levels = trie.num_levels
    if width < num_levels:
        return prompt_ids.new_full((batch, 2), -1)
    found = trie.find_items(prompt_ids, prompt_mask) < trie.num_leaves  # [B, W]
    window = torch.arange(found.shape[1], device=prompt_ids.device)
    last = torch.where(found, window, -1).max(1).values  # [B] start of the last item, -1: none
    columns = (last[:, None] + torch.arange(num_levels - 2, num_levels, device=prompt_ids.device)).clamp(min=0)
    codes = prompt_ids.gather(1, columns) - trie.block_starts[num_levels - 2 :]
    return torch.where((last >= 0)[:, None], codes, -1)


def puct_select(
    beam_scores: torch.Tensor,  # [B, M] cumulative draft log-probs of the parents (-inf: dead)
    step_log_probs: torch.Tensor,  # [B, M, S] the drafter's next-code log-probs at each parent
    num_beams: int,  # N
    value: torch.Tensor,  # [B, S] Q_d(r) of each user's depth, by rank r within the parent
    c: float,  # the exploration constant
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The N drafted continuations of the PUCT allocation (module docstring), as ``select_top_k`` returns them:
    (cumulative draft log-probs ``[B, N]``, parent ``[B, N]``, local code ``[B, N]``), in the order of U; missing
    candidates come back as -inf."""
    batch, beams, size = step_log_probs.shape
    log_p, order = step_log_probs.sort(dim=2, descending=True, stable=True)  # each parent's children, likeliest first
    total = (beam_scores[:, :, None] + log_p).reshape(batch, beams * size)  # [B, M*S] parent-major, rank order
    live = torch.isfinite(total)
    prior = torch.where(live, torch.softmax(total, dim=1), 0.0).reshape(batch, beams, size)  # P(j, r)
    rank = torch.arange(size, device=total.device)
    score = value[:, None, :size] + c * math.sqrt(num_beams) * prior / (1 + rank)  # U(j, r): [B, M, S]
    score = torch.where(live.reshape(batch, beams, size), score, NEG_INF).cummin(dim=2).values.reshape(batch, -1)
    if score.shape[1] < num_beams:  # fewer candidates than beams: pad with impossible ones
        score = torch.cat([score, score.new_full((batch, num_beams - score.shape[1]), NEG_INF)], dim=1)
    chosen = score.argsort(dim=1, descending=True, stable=True)[:, :num_beams]  # ties: lower parent, then rank
    alive = torch.isfinite(score.gather(1, chosen))
    chosen = chosen.clamp(max=beams * size - 1)
    scores = torch.where(alive, total.gather(1, chosen), NEG_INF)
    return scores, chosen // size, order.reshape(batch, -1).gather(1, chosen)


class _Learned:
    """What the drafter learned from the target's outputs: count additions (the form of the built counts) and the
    PUCT value's acceptance statistics by (trie depth, rank within the parent)."""

    def __init__(self, counts: TrigramCounts) -> None:
        device = counts.unigram.device
        self.counts = TrigramCounts.empty(counts.signature, counts.num_levels, counts.width, device)
        self.hits = torch.zeros(counts.num_levels, counts.width, device=device)
        self.drafted = torch.zeros(counts.num_levels, counts.width, device=device)

    def value(self) -> torch.Tensor:
        """``[L, S]`` Q_d(r): decayed hits / decayed drafted nodes (0 where none was drafted)."""
        return torch.where(self.drafted > 0, self.hits / self.drafted.clamp(min=1e-12), 0.0)


class TrigramDrafter(Drafter):
    """Drafts from tri-gram ``counts`` (``build_trigram_counts``); see the module docstring for the settings."""

    name = "trigram"
    runs_model = False

    def __init__(
        self,
        counts: TrigramCounts,
        smoothing: float = 1.0,
        adapt: str = "evaluation",
        update_weight: float = 1.0,
        tree: str = "beam",
        puct_c: float = 1.0,
        value_decay: float = 0.9,
    ) -> None:
        if adapt not in ADAPT_SCOPES or tree not in TREES:
            raise ValueError(f"adapt must be one of {ADAPT_SCOPES} and tree one of {TREES}; got {adapt!r}, {tree!r}")
        if smoothing < 0 or update_weight <= 0 or puct_c < 0 or not 0 <= value_decay <= 1:
            raise ValueError(f"need smoothing >= 0, update_weight > 0, puct_c >= 0, 0 <= value_decay <= 1; got "
                             f"{smoothing}, {update_weight}, {puct_c}, {value_decay}")
        self.counts = counts
        self.settings = dict(smoothing=smoothing, adapt=adapt, update_weight=update_weight, tree=tree,
                             puct_c=puct_c, value_decay=value_decay)
        self.learned: _Learned | None = None  # adapt=evaluation: what earlier calls learned

    def fresh(self) -> "TrigramDrafter":
        """The same counts and settings, nothing learned yet (the counts are shared, never modified)."""
        return TrigramDrafter(self.counts, **self.settings)

    @property
    def learns_across_calls(self) -> bool:
        return self.settings["adapt"] == "evaluation"

    def begin(self, first: View, trie: ItemTrie, scope: str) -> "TrigramSession":
        if trie_signature(trie) != list(self.counts.signature):
            raise ValueError(f"tri-gram counts built on another item catalogue (trie {list(self.counts.signature)}, "
                             f"this one {trie_signature(trie)}); rebuild them for this dataset")
        prompt_ids, prompt_mask = first.pending[:, 0], first.pending_valid[:, 0]  # [B, P]
        if self.counts.unigram.device != prompt_ids.device:
            self.counts.to(prompt_ids.device)
        adapt = self.settings["adapt"]
        if adapt == "evaluation":
            if self.learned is None or self.learned.hits.device != prompt_ids.device:
                self.learned = _Learned(self.counts)
            learned = self.learned
        else:
            learned = _Learned(self.counts) if adapt == "call" else None
        return TrigramSession(self.counts, learned, history_context(prompt_ids, prompt_mask, trie), trie,
                              **{k: v for k, v in self.settings.items() if k != "adapt"})


class TrigramSession(DraftSession):
    def __init__(self, counts: TrigramCounts, learned: _Learned | None, history: torch.Tensor, trie: ItemTrie,
                 smoothing: float, update_weight: float, tree: str, puct_c: float, value_decay: float) -> None:
        self.counts, self.learned, self.trie = counts, learned, trie
        self.history = history  # [B, 2] the last history item's last two codes (-1: none)
        self.smoothing, self.update_weight, self.tree = smoothing, update_weight, tree
        self.puct_c, self.value_decay = puct_c, value_decay

    def next_log_probs(self, level: Level) -> torch.Tensor:
        """The draft log-probs ``[B, M, S]`` of the next code at each node of ``level``."""
        trie, nodes = self.trie, level.nodes
        batch, beams = nodes.shape
        depth = trie.node_depth[nodes].clamp(max=trie.num_levels - 1)  # [B, M] (the sink: nothing is allowed)
        codes = level.sequences - trie.block_starts  # [B, M, L] local (columns >= depth unused)
        stream = torch.cat([self.history[:, None, :].expand(batch, beams, 2), codes], dim=2)  # [B, M, 2 + L]
        before = stream.gather(2, torch.stack([depth, depth + 1], dim=2))  # [B, M, 2]: codes at depths d-2, d-1
        before = torch.where(before >= 0, before.clamp(max=self.counts.width - 1), -1)
        n3, n2, n1 = self.counts.lookup(depth, before)
        if self.learned is not None:
            m3, m2, m1 = self.learned.counts.lookup(depth, before)
            n3, n2, n1 = n3 + m3, n2 + m2, n1 + m1
        return smoothed_log_probs(n3, n2, n1, trie.global_allowed[nodes], self.smoothing)

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
        levels = [root]
        value = self.learned.value() if self.learned is not None and self.tree == "puct" else None
        for ell in range(1, max(d for _, d in host) + 1):
            log_probs = self.next_log_probs(levels[-1])
            select = None
            if self.tree == "puct" and not spec.sample:
                depth = (t + ell - 1).clamp(max=trie.num_levels - 1)  # [B] trie depth of the parents
                rows = value[depth] if value is not None else log_probs.new_zeros(len(t), trie.max_block)

                def select(scores, log_p, width, rows=rows):
                    return puct_select(scores, log_p, width, rows, self.puct_c)
            levels.append(extend_level(levels, log_probs, trie, t, steps, host, spec, select))
        return levels, 0

    def advance(self, result: RoundResult) -> None:
        if self.learned is None:
            return
        self._count_outputs(result)
        if self.tree == "puct" and result.num_steps > 0:
            self._count_acceptance(result)

    def _count_outputs(self, result: RoundResult) -> None:
        """Add the round's outputs to the learned counts: the trie nodes at depths t_b .. t_b + a_b on the new
        beams' paths, each distinct (user, node) once."""
        trie = self.trie
        num_levels = trie.num_levels
        codes = result.new.sequences - trie.block_starts  # [B, K, L]
        batch, beams, _ = codes.shape
        depth = torch.arange(num_levels, device=codes.device)
        made = (depth >= result.t[:, None]) & (depth <= (result.t + result.accepted)[:, None])  # [B, L]
        made = made[:, None, :] & result.alive[:, :, None]  # [B, K, L]
        # a node at depth d + 1 is the prefix of codes 0..d: rows (user, d, prefix with later columns -1)
        prefix = torch.where(depth[None, :] <= depth[:, None], codes[:, :, None, :], -1)  # [B, K, L (d), L]
        user = torch.arange(batch, device=codes.device)[:, None, None].expand(batch, beams, num_levels)
        key = torch.cat([user[..., None], depth.expand(batch, beams, -1)[..., None], prefix], dim=3)
        key = torch.unique(key[made], dim=0)  # [E, 2 + L]
        if key.shape[0] == 0:
            return
        user, d, prefix = key[:, 0], key[:, 1], key[:, 2:]
        stream = torch.cat([self.history[user], prefix], dim=1)  # [E, 2 + L]
        before = stream.gather(1, torch.stack([d, d + 1], dim=1))
        code = prefix.gather(1, d[:, None]).squeeze(1)
        weight = torch.full((key.shape[0],), self.update_weight, device=key.device)
        self.learned.counts.add(d, torch.where(before >= 0, before, -1), code, weight)

    def _count_acceptance(self, result: RoundResult) -> None:
        """Decay the acceptance statistics, then count this round's drafted nodes the target examined (levels 1 ..
        min(a_b + 1, d_b)) by (trie depth, rank within the parent), and those on a kept path as hits."""
        levels, ref, alive, accepted = result.levels, result.ref, result.alive, result.accepted
        batch, size = ref.shape[0], self.trie.max_block
        examined_to = torch.minimum(accepted + 1, result.steps)  # [B]
        new_codes = result.new.codes  # [B, K] local codes of the new beams, children of ``ref``
        cells, hits, drafted = [], [], []
        cur = ref
        for ell in range(result.num_steps, 0, -1):
            level, parent_level = levels[ell], levels[ell - 1]
            width = level.nodes.shape[1]
            cur = torch.where((accepted == ell)[:, None], ref, cur)  # users whose new beams' parents are here
            index = cur.clamp(0, width - 1)
            on_path = (accepted >= ell)[:, None] & alive
            hit = torch.zeros(batch, width + 1, dtype=torch.bool, device=ref.device)
            hit = hit.scatter(1, torch.where(on_path, index, width), True)[:, :width]
            # the first level past the accepted ones: the drafted nodes that are new beams
            is_new = ((level.parent[:, :, None] == ref[:, None, :]) & (level.codes[:, :, None] == new_codes[:, None, :])
                      & alive[:, None, :]).any(2)
            hit |= is_new & (accepted == ell - 1)[:, None]
            rows = take_beams(parent_level.draft_log_probs, level.parent)  # [B, width, S]
            own = rows.gather(2, level.codes[:, :, None].clamp(max=size - 1))
            ahead = (rows > own) | ((rows == own) & (torch.arange(size, device=ref.device) < level.codes[:, :, None]))
            rank = ahead.sum(2)  # [B, width]: the position in the parent's likeliest-first order
            depth = (result.t + ell - 1).clamp(max=self.trie.num_levels - 1)[:, None].expand(-1, width)
            examined = torch.isfinite(level.draft_scores) & (examined_to >= ell)[:, None]
            cells.append((depth * size + rank).reshape(-1))
            hits.append((hit & examined).reshape(-1))
            drafted.append(examined.reshape(-1))
            cur = take_beams(level.parent, index)
        cell = torch.cat(cells)
        learned, decay = self.learned, self.value_decay
        learned.hits.mul_(decay).view(-1).index_add_(0, cell, torch.cat(hits).to(learned.hits.dtype))
        learned.drafted.mul_(decay).view(-1).index_add_(0, cell, torch.cat(drafted).to(learned.drafted.dtype))

    def keep_rows(self, index: torch.Tensor) -> None:
        self.history = self.history[index]
