"""Item <-> SID token-id index of a dataset under one tokenizer.

Contract: ``item_ids`` (ascending) and ``item_token_ids`` are aligned row by row, ``item_token_ids[i, l]`` lies in
``level_blocks[l]``; a SID shared by several items (a collision) maps back to all of them in ascending item id, which
is the order a generated SID is expanded in (docs/method.md section 2). Token ids come from the tokenizer, never from offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from atspeed_exp.data.tokenizer import level_token_blocks
from atspeed_exp.data.types import RecDataset


@dataclass(frozen=True, repr=False)
class SIDIndex:
    """level_blocks: per level, its token id range [start, end).
    item_ids: [N] ascending item ids. item_token_ids: [N, L] each item's SID as token ids (row i <-> item_ids[i]).
    """

    level_blocks: list[tuple[int, int]]
    item_ids: torch.Tensor
    item_token_ids: torch.Tensor
    item_sids: dict[int, tuple[str, ...]]
    _row_of_item: dict[int, int]
    _items_of_sid: dict[tuple[int, ...], list[int]]

    @classmethod
    def build(cls, dataset: RecDataset, tokenizer: PreTrainedTokenizerBase) -> SIDIndex:
        """Look up every item's SID tokens in ``tokenizer``; ValueError naming the item and token if one is missing."""
        vocab = tokenizer.get_vocab()
        item_ids = sorted(dataset.item_sids)
        rows: list[list[int]] = []
        for item in item_ids:
            sid = dataset.item_sids[item]
            if len(sid) != dataset.num_levels:
                raise ValueError(f"item {item}: SID {sid} has {len(sid)} tokens, expected {dataset.num_levels}")
            row = []
            for level, token in enumerate(sid):
                if token not in vocab:
                    raise ValueError(f"item {item}: SID token {token!r} (level {level}) is not in the tokenizer")
                row.append(vocab[token])
            rows.append(row)
        level_blocks = level_token_blocks(tokenizer, dataset.level_tokens())

        items_of_sid: dict[tuple[int, ...], list[int]] = {}
        for item, row in zip(item_ids, rows):  # ascending items, so every list comes out ascending
            items_of_sid.setdefault(tuple(row), []).append(item)
        return cls(
            level_blocks=level_blocks,
            item_ids=torch.tensor(item_ids, dtype=torch.long),
            item_token_ids=torch.tensor(rows, dtype=torch.long).reshape(len(item_ids), dataset.num_levels),
            item_sids={item: tuple(dataset.item_sids[item]) for item in item_ids},
            _row_of_item={item: row for row, item in enumerate(item_ids)},
            _items_of_sid=items_of_sid,
        )

    def __repr__(self) -> str:
        return f"SIDIndex(num_items={self.num_items}, level_blocks={self.level_blocks})"

    @property
    def num_levels(self) -> int:
        return len(self.level_blocks)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def sid_of(self, item: int) -> tuple[str, ...]:
        """The item's SID token strings; KeyError for an unknown item."""
        return self.item_sids[int(item)]

    def token_ids_of(self, items: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """[n, L] token ids of ``items`` (any order, repeats allowed); KeyError for an unknown item."""
        rows = [self._row_of_item[int(item)] for item in items]
        return self.item_token_ids[torch.tensor(rows, dtype=torch.long)].reshape(len(rows), self.num_levels)

    def items_of_sid(self, token_ids: Sequence[int] | torch.Tensor) -> list[int]:
        """All items whose SID is ``token_ids`` ([L] ids), ascending; [] for a SID that is no item."""
        return list(self._items_of_sid.get(tuple(int(t) for t in token_ids), []))

    def collisions(self) -> dict[tuple[int, ...], list[int]]:
        """SIDs (as token ids) shared by more than one item -> those items, ascending."""
        return {sid: list(items) for sid, items in self._items_of_sid.items() if len(items) > 1}
