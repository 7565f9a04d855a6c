"""Plain data types shared by the data layer, the pipeline and the tests (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RecDataset:
    """One dataset in the AtSpeed on-disk format, loaded and validated.

    train/valid/test: user -> time-ordered item ids (every user is a key; valid/test lists may be empty).
    item_sids: item -> its SID as token strings, one per level, e.g. ("<a_47>", "<b_103>", "<c_234>", "<d_99>").
    """

    name: str
    root: Path
    train: dict[int, list[int]]
    valid: dict[int, list[int]]
    test: dict[int, list[int]]
    item_sids: dict[int, tuple[str, ...]]

    @property
    def num_levels(self) -> int:
        return len(next(iter(self.item_sids.values())))

    @property
    def num_items(self) -> int:
        return len(self.item_sids)

    def level_tokens(self) -> list[list[str]]:
        """Distinct SID tokens of each level, sorted by their numeric code (``<a_3>`` before ``<a_12>``)."""
        levels: list[set[str]] = [set() for _ in range(self.num_levels)]
        for sid in self.item_sids.values():
            for level, token in enumerate(sid):
                levels[level].add(token)
        return [sorted(tokens, key=_sid_token_sort_key) for tokens in levels]


def _sid_token_sort_key(token: str) -> tuple[str, int, str]:
    # "<a_47>" -> ("a", 47, ""); anything unparsable sorts by text after the numbered ones.
    body = token.strip("<>")
    prefix, _, number = body.rpartition("_")
    if number.isdigit():
        return (prefix, int(number), "")
    return (prefix, 1 << 30, body)


@dataclass(frozen=True)
class Example:
    """One recommendation example.

    history: the user's previous items (time order, at most ``max_history`` of the latest).
    target: the item to predict in training (train/valid: the next item; test: the first test item).
    ground_truth: every item that counts as a hit at evaluation (test: all of the user's test items).
    """

    user: int
    history: tuple[int, ...]
    target: int
    ground_truth: tuple[int, ...] = field(default=())
