"""Item trie over SID token ids, stored as dense per-level tables so that constraint lookups are tensor gathers.

A *node* at depth t stands for one distinct SID prefix of t tokens (depth 0: the root). For each depth t the trie
holds, over the local codes of level t (token id - the level block's start):
- ``allowed[t]``: Bool ``[num_nodes_t + 1, block_size_t]``: which next tokens extend the prefix to a valid item;
- ``child[t]``: Long ``[num_nodes_t + 1, block_size_t]``: the node reached at depth t + 1.
The last row of each table is a *dead* node (nothing allowed, children dead) so that beams that fell off the trie
(or were never valid) need no special case. Leaves (depth L) map to the items sharing that SID, ascending id,
padded with -1 (SID collisions: one SID, several items).

For batches whose users are at different depths (ragged speculative decoding), the same tables also exist in one
*global* node space: global id = ``offsets[depth] + local id``, so a node carries its depth. The global tables have
``max_block`` columns (codes past a level's block size are never allowed); depth L holds the leaves and the dead leaf,
and one extra *sink* node (depth L + 1) absorbs every step past the last level.
"""

from __future__ import annotations

import torch


class ItemTrie:
    def __init__(
        self,
        item_token_ids: torch.Tensor,  # [N, L] long: each item's SID as token ids
        item_ids: torch.Tensor,  # [N] long
        level_blocks: list[tuple[int, int]],  # per level the token id range [start, end)
    ) -> None:
        if item_token_ids.dim() != 2 or item_token_ids.shape[0] != item_ids.shape[0]:
            raise ValueError(
                f"item_token_ids must be [N, L] aligned with item_ids [N]; got {tuple(item_token_ids.shape)} "
                f"and {tuple(item_ids.shape)}"
            )
        num_items, num_levels = item_token_ids.shape
        if num_items == 0:
            raise ValueError("ItemTrie needs at least one item")
        if len(level_blocks) != num_levels:
            raise ValueError(f"{len(level_blocks)} level blocks for SIDs of {num_levels} tokens")
        self.level_blocks = [(int(s), int(e)) for s, e in level_blocks]
        self.num_levels = num_levels
        starts = torch.tensor([s for s, _ in self.level_blocks], dtype=torch.long)
        sizes = torch.tensor([e - s for s, e in self.level_blocks], dtype=torch.long)
        local = item_token_ids.long().cpu() - starts  # [N, L]
        out_of_block = (local < 0) | (local >= sizes)
        if out_of_block.any():
            row, level = out_of_block.nonzero()[0].tolist()
            raise ValueError(
                f"item {int(item_ids[row])}: token id {int(item_token_ids[row, level])} at level {level} is outside "
                f"that level's block {self.level_blocks[level]}"
            )

        self.allowed: list[torch.Tensor] = []
        self.child: list[torch.Tensor] = []
        self.num_nodes: list[int] = []
        node = torch.zeros(num_items, dtype=torch.long)  # every item starts at the root
        num_nodes = 1
        for level in range(num_levels):
            size = int(sizes[level])
            key = node * size + local[:, level]
            unique_keys, next_node = torch.unique(key, return_inverse=True)
            num_next = unique_keys.numel()
            allowed = torch.zeros(num_nodes + 1, size, dtype=torch.bool)
            allowed[node, local[:, level]] = True
            child = torch.full((num_nodes + 1, size), num_next, dtype=torch.long)  # default: the next dead node
            child[node, local[:, level]] = next_node
            self.allowed.append(allowed)
            self.child.append(child)
            self.num_nodes.append(num_nodes)
            node, num_nodes = next_node, num_next

        # Leaves: items per SID, ascending item id; the last row is the dead leaf.
        order = torch.argsort(item_ids.cpu(), stable=True)
        order = order[torch.argsort(node[order], stable=True)]  # by leaf, then by item id
        leaf_sorted = node[order]
        counts = torch.bincount(leaf_sorted, minlength=num_nodes)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(num_items) - first[leaf_sorted]  # position of the item within its leaf
        max_collide = int(counts.max())
        leaf_items = torch.full((num_nodes + 1, max_collide), -1, dtype=torch.long)
        leaf_items[leaf_sorted, rank] = item_ids.cpu().long()[order]
        self.leaf_items = leaf_items
        self.num_leaves = num_nodes
        self.num_items = num_items
        self._build_global()

    def _build_global(self) -> None:
        """The global node space (see module docstring)."""
        num_levels = self.num_levels
        rows = [n + 1 for n in self.num_nodes] + [self.num_leaves + 1, 1]  # depths 0..L, then the sink
        offsets = torch.tensor([0] + rows, dtype=torch.long).cumsum(0)  # [L + 3]
        self.offsets = offsets[:-1]  # [L + 2]: first global id of depth 0..L and of the sink
        total = int(offsets[-1])
        self.sink = total - 1
        self.max_block = max(e - s for s, e in self.level_blocks)
        allowed = torch.zeros(total, self.max_block, dtype=torch.bool)
        child = torch.full((total, self.max_block), self.sink, dtype=torch.long)
        depth_of = torch.full((total,), num_levels + 1, dtype=torch.long)
        for depth in range(num_levels):
            first, size = int(self.offsets[depth]), self.allowed[depth].shape[1]
            count = self.allowed[depth].shape[0]
            allowed[first : first + count, :size] = self.allowed[depth]
            # children are ids of depth + 1; codes past the block lead to the next depth's dead node
            child[first : first + count] = int(self.offsets[depth + 1]) + self.dead_node(depth + 1)
            child[first : first + count, :size] = self.child[depth] + int(self.offsets[depth + 1])
            depth_of[first : first + count] = depth
        depth_of[int(self.offsets[num_levels]) : self.sink] = num_levels
        self.global_allowed = allowed  # [G, max_block]
        self.global_child = child  # [G, max_block]
        self.node_depth = depth_of  # [G]
        dead = [int(self.offsets[d]) + self.dead_node(d) for d in range(num_levels + 1)] + [self.sink]
        self.global_dead = torch.tensor(dead, dtype=torch.long)  # [L + 2]: dead node of depth 0..L+1
        self.global_dead_ids = dead  # the same on the host: a beam-search step at a known depth reads no tensor
        self.depth_offsets = self.offsets.tolist()
        self.block_starts = torch.tensor([s for s, _ in self.level_blocks], dtype=torch.long)  # [L]

    # -- queries (all tensor gathers) ---------------------------------------------------------------------------
    def block(self, depth: int) -> tuple[int, int]:
        return self.level_blocks[depth]

    def dead_node(self, depth: int) -> int:
        return self.num_nodes[depth] if depth < self.num_levels else self.num_leaves

    def allowed_mask(self, depth: int, nodes: torch.Tensor) -> torch.Tensor:
        """Bool ``[*nodes.shape, block_size_depth]``: the level-``depth`` codes that continue each node."""
        return self.allowed[depth][nodes]

    def advance(self, depth: int, nodes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Nodes at depth + 1 reached from ``nodes`` (depth ``depth``) by local ``codes`` (same shape)."""
        return self.child[depth][nodes, codes]

    def find_items(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Where token sequences spell whole items: ``ids`` ``[B, P]`` with ``mask`` ``[B, P]`` (False: padding)
        -> ``[B, max(P - L + 1, 0)]`` the leaf id of the item spelled by the L real tokens starting at each position
        (a run that walks the trie from the root to a leaf), else the dead leaf (``num_leaves``). A prompt's history
        items are the windows that hit a leaf, in prompt order."""
        batch, width = ids.shape
        windows = max(width - self.num_levels + 1, 0)
        node = torch.zeros(batch, windows, dtype=torch.long, device=ids.device)  # the root, per window
        whole = torch.ones(batch, windows, dtype=torch.bool, device=ids.device)
        for level, (start, end) in enumerate(self.level_blocks):
            code = ids[:, level : level + windows] - start
            whole &= mask[:, level : level + windows] & (code >= 0) & (code < end - start)
            node = self.global_advance(node, code.clamp(0, self.max_block - 1))
        return torch.where(whole, self.global_leaves_to_local(node), self.num_leaves)

    def items_of_leaves(self, leaves: torch.Tensor) -> torch.Tensor:
        """``[*leaves.shape, max_collisions]`` item ids per leaf, -1 padded."""
        return self.leaf_items[leaves]

    # -- the global node space -----------------------------------------------------------------------------------
    def global_advance(self, nodes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Global nodes one level down from global ``nodes`` by local ``codes`` (any depth; past L: the sink)."""
        return self.global_child[nodes, codes]

    def global_leaves_to_local(self, nodes: torch.Tensor) -> torch.Tensor:
        """Leaf ids (for ``items_of_leaves``) of global depth-L nodes; anything else maps to the dead leaf."""
        local = nodes - self.depth_offsets[self.num_levels]
        return torch.where((local >= 0) & (local < self.num_leaves), local, self.num_leaves)

    def to(self, device: torch.device | str) -> "ItemTrie":
        self.allowed = [t.to(device) for t in self.allowed]
        self.child = [t.to(device) for t in self.child]
        self.leaf_items = self.leaf_items.to(device)
        for name in ("offsets", "global_allowed", "global_child", "node_depth", "global_dead", "block_starts"):
            setattr(self, name, getattr(self, name).to(device))
        return self
