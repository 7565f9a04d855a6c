"""SIDIndex: item <-> SID token ids, collisions, errors; and the real Beauty data when it is present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from atspeed_exp.data.atspeed_format import load_atspeed_dataset  # noqa: E402
from atspeed_exp.data.prompts import PromptFormatter, encode_prompt  # noqa: E402
from atspeed_exp.data.sid_index import SIDIndex  # noqa: E402
from atspeed_exp.data.tokenizer import build_scratch_tokenizer, level_token_blocks  # noqa: E402
from atspeed_exp.data.types import RecDataset  # noqa: E402

from conftest import BEAUTY  # noqa: E402  (data/beauty, else shared/data/beauty beside the repository)

SIDS = {
    5: ("<a_1>", "<b_0>", "<c_2>", "<d_1>"),  # collides with item 2; listed first to check the ascending order
    0: ("<a_0>", "<b_0>", "<c_0>", "<d_0>"),
    1: ("<a_0>", "<b_1>", "<c_0>", "<d_1>"),
    2: ("<a_1>", "<b_0>", "<c_2>", "<d_1>"),
    3: ("<a_2>", "<b_1>", "<c_1>", "<d_0>"),
    4: ("<a_1>", "<b_1>", "<c_1>", "<d_1>"),
}


def small_dataset(item_sids: dict[int, tuple[str, ...]] = SIDS) -> RecDataset:
    return RecDataset(
        name="tiny",
        root=Path("."),
        train={0: [0, 1, 2], 1: [3, 4, 5]},
        valid={0: [3], 1: []},
        test={0: [4], 1: [0]},
        item_sids=dict(item_sids),
    )


@pytest.fixture(scope="module")
def index() -> SIDIndex:
    dataset = small_dataset()
    return SIDIndex.build(dataset, build_scratch_tokenizer(dataset.level_tokens(), []))


def test_sid_index_shapes_and_blocks(index: SIDIndex) -> None:
    assert index.num_levels == 4 and index.num_items == 6
    assert index.item_ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert index.item_ids.dtype == torch.long and index.item_token_ids.dtype == torch.long
    assert index.item_token_ids.shape == (6, 4)
    for level, (start, end) in enumerate(index.level_blocks):
        column = index.item_token_ids[:, level]
        assert bool(((column >= start) & (column < end)).all())
    assert [end - start for start, end in index.level_blocks] == [3, 2, 3, 2]


def test_sid_index_round_trips(index: SIDIndex) -> None:
    tokenizer = build_scratch_tokenizer(small_dataset().level_tokens(), [])
    token_ids = index.token_ids_of([4, 0, 4])
    assert token_ids.shape == (3, 4)
    assert torch.equal(token_ids[0], token_ids[2])
    for item in SIDS:
        row = index.token_ids_of([item])[0]
        assert tuple(tokenizer.convert_ids_to_tokens(row.tolist())) == index.sid_of(item) == SIDS[item]
        assert item in index.items_of_sid(row)
        assert torch.equal(index.item_token_ids[index.item_ids.tolist().index(item)], row)
    with pytest.raises(KeyError):
        index.token_ids_of([99])


def test_sid_index_collision_items_ascending(index: SIDIndex) -> None:
    collided = index.token_ids_of([5])[0]
    assert index.items_of_sid(collided) == [2, 5]
    assert index.items_of_sid(collided.tolist()) == [2, 5]  # tensor or list of ids
    assert index.collisions() == {tuple(collided.tolist()): [2, 5]}
    assert index.items_of_sid(index.token_ids_of([3])[0]) == [3]
    start = [start for start, _ in index.level_blocks]
    assert index.items_of_sid([start[0] + 2, start[1], start[2], start[3]]) == []  # a valid-looking SID of no item


def test_sid_index_unknown_token_names_item() -> None:
    tokenizer = build_scratch_tokenizer(small_dataset().level_tokens(), [])
    with pytest.raises(ValueError, match=r"item 6: SID token '<c_9>'"):
        SIDIndex.build(small_dataset({**SIDS, 6: ("<a_0>", "<b_0>", "<c_9>", "<d_0>")}), tokenizer)


@pytest.mark.skipif(not BEAUTY.is_dir(), reason="Beauty data not present")
def test_sid_index_beauty() -> None:
    dataset = load_atspeed_dataset(BEAUTY, "beauty")
    formatter = PromptFormatter("alpaca")
    tokenizer = build_scratch_tokenizer(dataset.level_tokens(), formatter.prompt_words())
    index = SIDIndex.build(dataset, tokenizer)

    assert [end - start for start, end in index.level_blocks] == [91, 256, 256, 256]
    assert index.level_blocks == level_token_blocks(tokenizer, dataset.level_tokens())
    assert index.item_token_ids.shape == (12035, 4)
    collisions = index.collisions()
    # "12 items share a full SID with another item": 9 SIDs hold 21 items, i.e. 12 items more than distinct SIDs.
    assert len(collisions) == 9 and sum(len(items) - 1 for items in collisions.values()) == 12
    assert all(items == sorted(items) for items in collisions.values())
    assert index.num_items - len({tuple(row) for row in index.item_token_ids.tolist()}) == 12

    user = next(u for u, items in dataset.train.items() if len(items) >= 21)
    history = [dataset.item_sids[i] for i in dataset.train[user][-21:-1]]
    assert tokenizer.unk_token_id not in encode_prompt(tokenizer, formatter, history)
