"""The retrieval drafter (``drafter: retrieval``): drafts looked up in pools of SID continuations built from the
training split, no draft model (after DARE/LASER, Xi et al., arXiv 2408.05676; docs/method.md section 6).

Pools. Every training interaction (user u, item i) passes through the trie nodes of i's SID prefixes; a pool counts,
for each prefix node and next code, the interactions of its users that continue the prefix with that code. There
is one *global* pool over all users and one pool per *collaborative group* of users, so a group's drafts follow what
users like its members interacted with. Each pool keeps the ``top_n`` most frequent continuations of each prefix;
the draft log-prob of a continuation is the log of its share of the prefix's interactions in the pool, so drafting
beams with it ranks by the pool's estimate of P(item | prefix).

Groups. SIDs (trie leaves) are embedded by a rank-``dim`` truncated SVD of the user x SID interaction matrix (rows
scaled to unit norm), a closed-form collaborative embedding: two SIDs are close when the same users interacted with
both, which is what a trained collaborative model such as LightGCN or matrix factorisation approximates, here
without training, deterministically for a seed and in seconds. A user is the normalised mean of their history's SID
embeddings; spherical k-means (cosine, k-means++ start) splits the users with at least ``min_history`` training
interactions into ``groups`` groups. Content codes alone (the SID's first level) would group users by what items
are, not by who consumes them together; co-occurrence counts without the SVD would make users with disjoint but
similar histories look unrelated.

Router. At decoding time a user's history is read off the prompt: every run of L tokens that walks the trie from the
root to a leaf is a history item (``ItemTrie.find_items``). Their mean embedding picks the nearest group centroid; a
user with fewer than ``min_history`` recognised items (a cold user) drafts from the global pool. A prefix the group's
pool never saw backs off to the global pool's row, and a prefix no training interaction reached to a uniform
distribution over the trie's allowed codes, so every live beam has a proper next-code distribution (Q for the relaxed
rules).

Drafting is tensor lookups only: the pools are stored as one CSR table over (pool, global trie node), and a drafted
depth gathers at most ``top_n`` entries per beam and scatters them into a ``[B, M, S]`` row of log-probs; the
engine's selection (top-N beam search, or N draws for the sampling rules) does the rest (``base.extend_level``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Any

import torch

from atspeed_exp.decoding.drafters.base import DraftSession, DraftSpec, Drafter, extend_level
from atspeed_exp.decoding.sampling import NEG_INF
from atspeed_exp.decoding.tree import Level, View
from atspeed_exp.decoding.trie import ItemTrie

FORMAT_VERSION = 1


def trie_signature(trie: ItemTrie) -> list[int]:
    """Nodes per depth and leaves: pools index global trie nodes, so they fit only a trie of the same items."""
    return [*trie.num_nodes, trie.num_leaves]


@dataclass
class RetrievalPools:
    """The pools of one dataset (see the module docstring). P = G + 1 pools: the G groups, then the global one."""

    signature: list[int]  # trie_signature of the trie they were built on
    leaf_embeddings: torch.Tensor  # [num_leaves + 1, dim] float; the last row (the dead leaf) is zero
    centroids: torch.Tensor  # [G, dim] float, unit norm (G may be 0: the global pool alone)
    offsets: torch.Tensor  # [P * num_global_nodes + 1] long: CSR row starts over (pool, global node)
    codes: torch.Tensor  # [E] long: local codes of the stored continuations, most frequent first per row
    log_probs: torch.Tensor  # [E] float: log of each continuation's share of its prefix's interactions
    group_sizes: torch.Tensor  # [G] long: users per group (build statistics)
    user_groups: torch.Tensor  # [U] long: each training user's group, in ``histories`` order (G: none)
    top_n: int
    min_history: int

    @property
    def num_groups(self) -> int:
        return int(self.centroids.shape[0])

    def to(self, device: torch.device | str) -> "RetrievalPools":
        for name in ("leaf_embeddings", "centroids", "offsets", "codes", "log_probs"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # -- persistence ---------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Tensors and plain numbers only (loadable with ``torch.load(weights_only=True)``)."""
        return {"format": FORMAT_VERSION, "signature": list(self.signature), "top_n": self.top_n,
                "min_history": self.min_history,
                **{name: getattr(self, name).cpu() for name in
                   ("leaf_embeddings", "centroids", "offsets", "codes", "log_probs", "group_sizes",
                    "user_groups")}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "RetrievalPools":
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"retrieval pools of format {state.get('format')!r}; this code reads {FORMAT_VERSION}")
        return cls(**{k: v for k, v in state.items() if k != "format"})

    def save(self, file: str | IO[bytes]) -> None:
        """``torch.save`` of ``state()`` to a path or an open binary file (the pipeline writes it atomically)."""
        torch.save(self.state(), file)

    @classmethod
    def load(cls, file: str | IO[bytes]) -> "RetrievalPools":
        return cls.from_state(torch.load(file, map_location="cpu", weights_only=True))

    # -- decoding ------------------------------------------------------------------------------------------------
    def route(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, trie: ItemTrie) -> torch.Tensor:
        """The pool of each prompt ``[B, P]`` (left-padded) -> ``[B]`` long: the nearest group's centroid to the mean
        embedding of the history items found in the prompt, or the global pool (G) for users showing fewer than
        ``min_history`` of them."""
        batch, width = prompt_ids.shape
        num_leaves = trie.num_leaves
        if width < trie.num_levels or self.num_groups == 0:
            return torch.full((batch,), self.num_groups, dtype=torch.long, device=prompt_ids.device)
        leaf = trie.find_items(prompt_ids, prompt_mask)  # [B, W]; dead leaf: not an item
        found = (leaf < num_leaves).sum(1)  # [B]
        user = self.leaf_embeddings[leaf].sum(1) / found.clamp(min=1)[:, None]  # [B, dim]
        group = torch.nn.functional.normalize(user, dim=1).matmul(self.centroids.T).argmax(1)
        return torch.where(found >= max(self.min_history, 1), group, self.num_groups)

    def next_log_probs(self, pool: torch.Tensor, nodes: torch.Tensor, trie: ItemTrie) -> torch.Tensor:
        """Draft log-probs ``[B, M, max_block]`` of the next code at global trie ``nodes`` ``[B, M]`` for users in
        ``pool`` ``[B]``: the group's stored continuations, else the global pool's, else uniform over the allowed
        codes; -inf elsewhere (dead nodes: everywhere)."""
        num_nodes = trie.global_allowed.shape[0]
        group_row = pool[:, None] * num_nodes + nodes  # [B, M]
        global_row = self.num_groups * num_nodes + nodes
        length = self.offsets[group_row + 1] - self.offsets[group_row]
        row = torch.where(length > 0, group_row, global_row)
        start = self.offsets[row]
        length = self.offsets[row + 1] - start
        slot = torch.arange(self.top_n, device=nodes.device)
        index = (start[:, :, None] + slot).clamp(max=self.codes.shape[0] - 1)  # [B, M, n]
        stored = slot < length[:, :, None]
        codes = torch.where(stored, self.codes[index], trie.max_block)  # missing entries to a spare column
        out = nodes.new_full((*nodes.shape, trie.max_block + 1), NEG_INF, dtype=self.log_probs.dtype)
        out = out.scatter(2, codes, self.log_probs[index])[:, :, :-1]
        allowed = trie.global_allowed[nodes]  # [B, M, S]
        uniform = -torch.log(allowed.sum(2, keepdim=True).clamp(min=1).to(out.dtype))
        return torch.where((length == 0)[:, :, None] & allowed, uniform, out)


class RetrievalDrafter(Drafter):
    """Drafts from ``pools`` (``build_retrieval_pools``); stateless across rounds but for each user's pool."""

    name = "retrieval"
    runs_model = False

    def __init__(self, pools: RetrievalPools) -> None:
        self.pools = pools

    def begin(self, first: View, trie: ItemTrie, scope: str) -> "RetrievalSession":
        if trie_signature(trie) != list(self.pools.signature):
            raise ValueError(f"retrieval pools built on another item catalogue (trie {list(self.pools.signature)}, "
                             f"this one {trie_signature(trie)}); rebuild them for this dataset")
        prompt_ids, prompt_mask = first.pending[:, 0], first.pending_valid[:, 0]  # [B, P]
        if self.pools.offsets.device != prompt_ids.device:
            self.pools.to(prompt_ids.device)
        return RetrievalSession(self.pools, self.pools.route(prompt_ids, prompt_mask, trie))


class RetrievalSession(DraftSession):
    def __init__(self, pools: RetrievalPools, pool: torch.Tensor) -> None:
        self.pools, self.pool = pools, pool  # [B] each user's pool

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
        for _ in range(max(d for _, d in host)):
            log_probs = self.pools.next_log_probs(self.pool, levels[-1].nodes, trie)
            levels.append(extend_level(levels, log_probs, trie, t, steps, host, spec))
        return levels, 0

    def keep_rows(self, index: torch.Tensor) -> None:
        self.pool = self.pool[index]


# -- building ------------------------------------------------------------------------------------------------------
def build_retrieval_pools(
    histories: list[torch.Tensor],
    trie: ItemTrie,
    groups: int = 8,
    top_n: int = 40,
    dim: int = 32,
    min_history: int = 1,
    iterations: int = 25,
    seed: int = 0,
) -> RetrievalPools:
    """The pools of a training split (module docstring), a pure function of its arguments.

    histories: per user, the SIDs of their training items as token ids ``[n_u, L]`` (time order; items whose SID is
    not in ``trie`` are ignored). groups: G, collaborative groups (fewer when fewer users qualify; 0: the global
    pool only). top_n: continuations kept per prefix and pool. dim: rank of the SID embedding. min_history: training
    interactions a user needs to join a group (and recognised history items a prompt needs to be routed to one).
    iterations: k-means iterations. seed: the SVD's and k-means' randomness.
    """
    if top_n < 1 or dim < 1 or groups < 0 or iterations < 0:
        raise ValueError(f"need top_n >= 1, dim >= 1, groups >= 0, iterations >= 0; got top_n={top_n}, dim={dim}, "
                         f"groups={groups}, iterations={iterations}")
    num_levels, num_leaves = trie.num_levels, trie.num_leaves
    trie = _cpu_trie_view(trie)
    lengths = torch.tensor([h.shape[0] for h in histories], dtype=torch.long)
    tokens = torch.cat([h.reshape(-1, num_levels).long().cpu() for h in histories]) if histories else \
        torch.zeros(0, num_levels, dtype=torch.long)
    user = torch.repeat_interleave(torch.arange(len(histories)), lengths)  # [T]
    path = [torch.zeros(tokens.shape[0], dtype=torch.long)]  # global nodes of each interaction's prefixes
    codes = []
    known = torch.ones(tokens.shape[0], dtype=torch.bool)
    for level, (start, end) in enumerate(trie.level_blocks):
        code = tokens[:, level] - start
        known &= (code >= 0) & (code < end - start)
        codes.append(code.clamp(0, trie.max_block - 1))
        path.append(trie.global_advance(path[-1], codes[-1]))
    leaf = trie.global_leaves_to_local(path[-1])
    known &= leaf < num_leaves
    if not bool(known.any()):
        raise ValueError("no training interaction has a SID of this item catalogue: nothing to build pools from")
    user, leaf = user[known], leaf[known]
    path, codes = [p[known] for p in path], [c[known] for c in codes]
    num_users = len(histories)
    counts = torch.bincount(user, minlength=num_users)  # known interactions per user

    generator = torch.Generator().manual_seed(seed)
    leaf_embeddings = _sid_embeddings(user, leaf, counts, num_users, num_leaves, dim, seed)
    user_vectors = torch.zeros(num_users, leaf_embeddings.shape[1]).index_add_(0, user, leaf_embeddings[leaf])
    user_vectors = torch.nn.functional.normalize(user_vectors / counts.clamp(min=1)[:, None], dim=1)
    eligible = (counts >= max(min_history, 1)).nonzero().squeeze(1)
    groups = min(groups, int(eligible.numel()))
    group_of_user = torch.full((num_users,), groups, dtype=torch.long)  # G: the global pool alone
    centroids = torch.zeros(0, leaf_embeddings.shape[1])
    if groups > 0:
        centroids, assign = _spherical_kmeans(user_vectors[eligible], groups, iterations, generator)
        group_of_user[eligible] = assign
    group_sizes = torch.bincount(group_of_user[group_of_user < groups], minlength=groups)

    # counts per (pool, global node, code): each interaction counts in its user's group pool and in the global pool
    num_nodes, width = trie.global_allowed.shape
    pool = group_of_user[user]
    keys = []
    for level in range(num_levels):
        cell = path[level] * width + codes[level]  # [T']
        grouped = pool < groups
        keys.append((pool[grouped] * num_nodes) * width + cell[grouped])
        keys.append((groups * num_nodes) * width + cell)
    key, count = torch.unique(torch.cat(keys), return_counts=True)  # sorted by (pool, node, code)
    row, code = key // width, key % width
    total = torch.zeros((groups + 1) * num_nodes, dtype=torch.long).index_add_(0, row, count)
    order = torch.argsort(-count, stable=True)  # most frequent first, ties by code
    order = order[torch.argsort(row[order], stable=True)]  # then grouped by row
    row, code, count = row[order], code[order], count[order]
    first = torch.searchsorted(row, row, side="left")  # each entry's row start
    kept = torch.arange(row.numel()) - first < top_n
    row, code, count = row[kept], code[kept], count[kept]
    log_probs = torch.log(count.double() / total[row].double()).float()
    per_row = torch.bincount(row, minlength=(groups + 1) * num_nodes)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), per_row.cumsum(0)])
    leaf_embeddings = torch.cat([leaf_embeddings, leaf_embeddings.new_zeros(1, leaf_embeddings.shape[1])])
    return RetrievalPools(signature=trie_signature(trie), leaf_embeddings=leaf_embeddings, centroids=centroids,
                          offsets=offsets, codes=code, log_probs=log_probs, group_sizes=group_sizes,
                          user_groups=group_of_user, top_n=top_n, min_history=min_history)


def _cpu_trie_view(trie: ItemTrie) -> ItemTrie:
    """The trie's tables on the CPU (building runs there); the trie itself is left where it is."""
    if trie.global_allowed.device.type == "cpu":
        return trie
    view = object.__new__(ItemTrie)
    view.__dict__.update(trie.__dict__)
    return view.to("cpu")


def _sid_embeddings(user: torch.Tensor, leaf: torch.Tensor, counts: torch.Tensor, num_users: int, num_leaves: int,
                    dim: int, seed: int) -> torch.Tensor:
    """``[num_leaves, r]`` SID embeddings: the right singular vectors of the user x SID matrix X scaled by their
    singular values (X_us = interactions of u with s / sqrt(interactions of u), so every user row has unit norm
    when its interactions are distinct), rank r = min(dim, users, SIDs)."""
    rank = min(dim, num_users, num_leaves)
    values = counts[user].double().rsqrt()
    matrix = torch.sparse_coo_tensor(torch.stack([user, leaf]), values, (num_users, num_leaves),
                                     check_invariants=True).coalesce()
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws its random projection from the global generator
        torch.manual_seed(seed)
        _, singular, v = torch.svd_lowrank(matrix, q=rank, niter=4)
    v = v * torch.sign(v.sum(0, keepdim=True) + 1e-12)  # a deterministic sign per component
    return (v * singular).float()


def _spherical_kmeans(
    x: torch.Tensor, k: int, iterations: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on unit vectors ``[U, d]`` by cosine similarity, k-means++ start; returns (centroids ``[k, d]``,
    assignment ``[U]``). An emptied cluster keeps its centroid."""
    first = int(torch.randint(x.shape[0], (1,), generator=generator))
    centroids = x[first : first + 1]
    distance = (1 - x @ centroids.T).clamp(min=0).squeeze(1)
    for _ in range(1, k):
        weights = distance.square()
        if float(weights.sum()) <= 0:  # every user sits on a centroid: any other one will do
            weights = torch.ones_like(weights)
        pick = int(torch.multinomial(weights.double(), 1, generator=generator))
        centroids = torch.cat([centroids, x[pick : pick + 1]])
        distance = torch.minimum(distance, (1 - x @ x[pick]).clamp(min=0))
    assign = (x @ centroids.T).argmax(1)
    for _ in range(iterations):
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        size = torch.bincount(assign, minlength=k)
        centroids = torch.where((size > 0)[:, None], torch.nn.functional.normalize(sums, dim=1), centroids)
        new = (x @ centroids.T).argmax(1)
        if torch.equal(new, assign):
            break
        assign = new
    return centroids, assign
