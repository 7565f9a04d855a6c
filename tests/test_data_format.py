"""Loading and validating the AtSpeed format, and building examples from it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from atspeed_exp.data.atspeed_format import (
    DataFormatError,
    build_examples,
    item_popularity,
    load_atspeed_dataset,
    sid_to_items,
)
from atspeed_exp.data.recdata import RecData
from atspeed_exp.data.synthetic import write_synthetic_dataset
from atspeed_exp.data.types import Example

from conftest import BEAUTY  # noqa: E402  (data/beauty, else shared/data/beauty beside the repository)
NAME = "toy"
INDEX = f"{NAME}.LCRec-1e-3lr.json"

# Six items with 3-level SIDs; items 4 and 5 collide.
TOY_INDEX = {
    "0": ["<a_0>", "<b_0>", "<c_0>"],
    "1": ["<a_0>", "<b_0>", "<c_1>"],
    "2": ["<a_0>", "<b_1>", "<c_0>"],
    "3": ["<a_1>", "<b_0>", "<c_0>"],
    "4": ["<a_1>", "<b_2>", "<c_7>"],
    "5": ["<a_1>", "<b_2>", "<c_7>"],
}
# User 3 appears only in the test split (lenient: missing keys are empty lists) and has no history.
TOY_TRAIN = {0: [0, 1, 2, 3], 1: [4], 2: [1, 2]}
TOY_VALID = {0: [4], 1: [], 2: [5, 0]}
TOY_TEST = {0: [5, 5, 2], 1: [2], 2: [], 3: [1]}


def _write(
    root: Path,
    train: object = None,
    valid: object = None,
    test: object = None,
    index: object = None,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for file_name, data in (
        ("training_dict.npy", TOY_TRAIN if train is None else train),
        ("validation_dict.npy", TOY_VALID if valid is None else valid),
        ("testing_dict.npy", TOY_TEST if test is None else test),
    ):
        np.save(root / file_name, np.asarray(data, dtype=object) if isinstance(data, dict) else data)
    (root / INDEX).write_text(json.dumps(TOY_INDEX if index is None else index))
    return root


def _error(root: Path) -> str:
    with pytest.raises(DataFormatError) as info:
        load_atspeed_dataset(root, NAME)
    return str(info.value)


def test_load_atspeed_dataset_reads_toy_files(tmp_path: Path) -> None:
    ds = load_atspeed_dataset(_write(tmp_path), NAME)
    assert ds.name == NAME and ds.root == tmp_path
    # Every split has every user, in sorted order; missing keys read as empty lists.
    assert list(ds.train) == list(ds.valid) == list(ds.test) == [0, 1, 2, 3]
    assert ds.train == {**TOY_TRAIN, 3: []}
    assert ds.valid == {**TOY_VALID, 3: []}
    assert ds.test == TOY_TEST
    assert ds.item_sids[4] == ("<a_1>", "<b_2>", "<c_7>")
    assert ds.num_levels == 3 and ds.num_items == 6
    assert all(type(i) is int for seq in ds.train.values() for i in seq)


def test_load_atspeed_dataset_reads_synthetic_data(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "syn", num_users=50, num_items=60, seed=3)
    ds = load_atspeed_dataset(root, "synthetic")
    assert len(ds.train) == 50 and ds.num_items == 60 and ds.num_levels == 4


def test_load_atspeed_dataset_accepts_explicit_index_file(tmp_path: Path) -> None:
    _write(tmp_path)
    (tmp_path / INDEX).rename(tmp_path / "other.json")
    assert load_atspeed_dataset(tmp_path, NAME, index_file="other.json").num_items == 6


def test_load_atspeed_dataset_accepts_numpy_ints(tmp_path: Path) -> None:
    train = {np.int64(u): [np.int32(i) for i in seq] for u, seq in TOY_TRAIN.items()}
    ds = load_atspeed_dataset(_write(tmp_path, train=train), NAME)
    assert ds.train[0] == [0, 1, 2, 3] and all(type(u) is int for u in ds.train)


def test_load_atspeed_dataset_missing_root_names_it(tmp_path: Path) -> None:
    assert str(tmp_path / "nowhere") in _error(tmp_path / "nowhere")


@pytest.mark.parametrize("file_name", ["training_dict.npy", "validation_dict.npy", "testing_dict.npy", INDEX])
def test_load_atspeed_dataset_missing_file_names_it(tmp_path: Path, file_name: str) -> None:
    _write(tmp_path)
    (tmp_path / file_name).unlink()
    assert str(tmp_path / file_name) in _error(tmp_path)


def test_load_atspeed_dataset_malformed_json_gives_position(tmp_path: Path) -> None:
    _write(tmp_path)
    (tmp_path / INDEX).write_text('{"0": ["<a_0>", "<b_0>"],\n "1": ["<a_1>" "<b_1>"]}')
    message = _error(tmp_path)
    assert str(tmp_path / INDEX) in message and "line 2, column" in message


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        ([["<a_0>"]], "non-empty JSON object"),
        ({"x7": ["<a_0>", "<b_0>", "<c_0>"]}, "'x7'"),
        ({**TOY_INDEX, "6": "<a_0><b_0><c_0>"}, "item '6'"),
        ({**TOY_INDEX, "6": ["<a_0>", "<b_0>"]}, "item '6'"),  # wrong length
        ({**TOY_INDEX, "6": ["<a_0>", "<b_0>", "<c_0>", "<d_0>"]}, "expected 3"),
        ({**TOY_INDEX, "6": ["<a_0>", "b_0", "<c_0>"]}, "'b_0'"),  # not <x_N>
        ({**TOY_INDEX, "6": ["<a_0>", "<b_x>", "<c_0>"]}, "'<b_x>'"),
        ({**TOY_INDEX, "6": ["<a_0>", "<e_3>", "<c_0>"]}, "item '6'"),  # level 1 mixes letters b and e
        ({**TOY_INDEX, "6": ["<a_0>", "<a_3>", "<c_0>"]}, "expected 'b'"),  # letter a on two levels
        ({"0": ["<a_0>", "<a_1>", "<c_0>"], **{k: v for k, v in TOY_INDEX.items() if k != "0"}}, "letter 'a'"),
    ],
)
def test_load_atspeed_dataset_bad_index_names_key(tmp_path: Path, index: object, expected: str) -> None:
    message = _error(_write(tmp_path, index=index))
    assert str(tmp_path / INDEX) in message and expected in message


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        ([1, 2, 3], "0-d object array"),
        (np.arange(4), "0-d object array"),
        (np.asarray([{0: [1]}], dtype=object), "0-d object array"),
        (np.asarray("text", dtype=object), "got a str"),
        ({"0": [0, 1]}, "user key '0'"),
        ({0: 5}, "user 0: value is a int"),
        ({0: [0, "1"]}, "user 0: element 1 is '1'"),
        ({0: [0, True]}, "user 0: element 1 is True"),
    ],
)
def test_load_atspeed_dataset_bad_split_names_key(tmp_path: Path, train: object, expected: str) -> None:
    message = _error(_write(tmp_path, train=train))
    assert str(tmp_path / "training_dict.npy") in message and expected in message


def test_load_atspeed_dataset_unreadable_npy_names_file(tmp_path: Path) -> None:
    _write(tmp_path)
    (tmp_path / "testing_dict.npy").write_bytes(b"not a numpy file")
    assert str(tmp_path / "testing_dict.npy") in _error(tmp_path)


def test_load_atspeed_dataset_unknown_item_names_user_and_item(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, valid={**TOY_VALID, 2: [5, 99]}))
    assert str(tmp_path / "validation_dict.npy") in message
    assert "user 2: item 99" in message and str(tmp_path / INDEX) in message


@pytest.mark.parametrize(
    ("split", "file_name"),
    [("train", "training_dict.npy"), ("valid", "validation_dict.npy"), ("test", "testing_dict.npy")],
)
def test_load_atspeed_dataset_empty_split_names_file(tmp_path: Path, split: str, file_name: str) -> None:
    empty = {0: [], 1: []}
    message = _error(_write(tmp_path, **{split: empty}))
    assert str(tmp_path / file_name) in message


def test_build_examples_train_takes_last_item(tmp_path: Path) -> None:
    ds = load_atspeed_dataset(_write(tmp_path), NAME)
    assert build_examples(ds, "train") == [
        Example(user=0, history=(0, 1, 2), target=3, ground_truth=(3,)),
        Example(user=2, history=(1,), target=2, ground_truth=(2,)),
    ]
    assert [e.history for e in build_examples(ds, "train", max_history=2)] == [(1, 2), (1,)]


def test_build_examples_train_sliding_window_uses_every_prefix(tmp_path: Path) -> None:
    ds = load_atspeed_dataset(_write(tmp_path), NAME)
    examples = build_examples(ds, "train", max_history=2, sliding_window=True)
    assert [(e.user, e.history, e.target) for e in examples] == [
        (0, (0,), 1),
        (0, (0, 1), 2),
        (0, (1, 2), 3),
        (2, (1,), 2),
    ]


def test_build_examples_valid_uses_first_valid_item(tmp_path: Path) -> None:
    ds = load_atspeed_dataset(_write(tmp_path), NAME)
    assert build_examples(ds, "valid") == [
        Example(user=0, history=(0, 1, 2, 3), target=4, ground_truth=(4,)),
        Example(user=2, history=(1, 2), target=5, ground_truth=(5,)),
    ]
    assert build_examples(ds, "valid", max_history=3)[0].history == (1, 2, 3)


def test_build_examples_test_keeps_all_test_items(tmp_path: Path) -> None:
    ds = load_atspeed_dataset(_write(tmp_path), NAME)
    # User 3 has test items but no history: skipped.
    assert build_examples(ds, "test") == [
        Example(user=0, history=(0, 1, 2, 3, 4), target=5, ground_truth=(5, 2)),
        Example(user=1, history=(4,), target=2, ground_truth=(2,)),
    ]
    assert build_examples(ds, "test", max_history=2)[0].history == (3, 4)


def test_build_examples_unknown_split_is_named(tmp_path: Path) -> None:
    ds = load_atspeed_dataset(_write(tmp_path), NAME)
    with pytest.raises(ValueError, match="'validation'"):
        build_examples(ds, "validation")
    with pytest.raises(ValueError, match="max_history"):
        build_examples(ds, "train", max_history=0)


def test_item_popularity_counts_training_interactions(tmp_path: Path) -> None:
    ds = load_atspeed_dataset(_write(tmp_path), NAME)
    np.testing.assert_array_equal(item_popularity(ds), [1, 2, 2, 1, 1, 0])


def test_sid_to_items_groups_collisions(tmp_path: Path) -> None:
    ds = load_atspeed_dataset(_write(tmp_path), NAME)
    mapping = sid_to_items(ds)
    assert len(mapping) == 5
    assert mapping[("<a_1>", "<b_2>", "<c_7>")] == [4, 5]


@pytest.mark.skipif(not BEAUTY.is_dir(), reason=f"real data not at {BEAUTY}")
def test_load_atspeed_dataset_reads_beauty() -> None:
    ds = load_atspeed_dataset(BEAUTY, "beauty")
    assert len(ds.train) == 19_383 and ds.num_items == 12_035
    assert [sum(map(len, s.values())) for s in (ds.train, ds.valid, ds.test)] == [122_241, 9_316, 7_313]
    assert ds.num_items - len(sid_to_items(ds)) == 12
    assert [len(tokens) for tokens in ds.level_tokens()] == [91, 256, 256, 256]
    assert len(build_examples(ds, "test")) == 3_553
    assert item_popularity(ds).sum() == 122_241


def test_target_batches_label_the_response_only(tmp_path):
    """The batches the target stage trains on: labels are -100 on the prompt and padding, and equal the input ids
    on the response (SIDs + EOS), row by row."""
    from atspeed_exp.data.datamodule import TargetDataModule
    from atspeed_exp.data.recdata import RecData
    from atspeed_exp.data.synthetic import write_synthetic_dataset

    data = RecData.build(write_synthetic_dataset(tmp_path / "syn", num_users=30, num_items=40, seed=2), "synthetic",
                         splits=("train", "valid"))
    split = data.splits["train"]
    length_of = {tuple(p + r): (len(p), len(r)) for p, r in zip(split.prompts, split.responses)}
    batch = next(iter(TargetDataModule(data, batch_size=8).train_dataloader()))
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        real = int(mask.sum())
        prompt_len, response_len = length_of[tuple(ids[:real].tolist())]
        assert (labels[:prompt_len] == -100).all() and (labels[real:] == -100).all()
        assert labels[prompt_len:real].tolist() == ids[prompt_len:real].tolist()
        assert response_len == real - prompt_len == data.trie().num_levels + 1  # 4 SIDs + EOS


class _RunsCode:
    """Pickled as a call of os.mkdir: what a hostile split file could do on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def test_load_atspeed_dataset_refuses_a_split_whose_pickle_runs_code(tmp_path: Path) -> None:
    root = _write(tmp_path / "data")
    marker = tmp_path / "ran"
    np.save(root / "training_dict.npy", np.asarray(_RunsCode(marker), dtype=object), allow_pickle=True)
    message = _error(root)
    assert not marker.exists()  # refused before the call
    assert str(root / "training_dict.npy") in message and "refused" in message and "mkdir" in message


def test_build_examples_logs_the_users_dropped_and_why(tmp_path: Path, caplog) -> None:
    dataset = load_atspeed_dataset(_write(tmp_path), NAME)
    with caplog.at_level(logging.INFO, logger="atspeed_exp.data.atspeed_format"):
        for split in ("train", "valid", "test"):
            build_examples(dataset, split)
    assert "toy/train: 2 examples from 2 of 4 users; dropped 2 users with fewer than 2 training items" in caplog.text
    assert "toy/valid: 2 examples from 2 of 4 users; dropped 2 users with no validation items" in caplog.text
    assert ("toy/test: 2 examples from 2 of 4 users; dropped 1 users with no test items, 1 users with test items "
            "but no training or validation history") in caplog.text


def test_recdata_warns_when_training_examples_are_few(tmp_path: Path, caplog) -> None:
    root = _write(tmp_path, train={0: [0, 1]}, valid={0: [2]}, test={0: [3]})
    with caplog.at_level(logging.WARNING, logger="atspeed_exp.data.recdata"):
        data = RecData.build(root, NAME, sliding_window=False)
    assert len(data.splits["train"]) == 1
    assert f"{root}: dataset 'toy' gives only 1 training examples (fewer than 100)" in caplog.text


def test_recdata_refuses_a_split_without_examples(tmp_path: Path) -> None:
    root = _write(tmp_path, train={0: [0], 1: [1]}, valid={0: [2]}, test={1: [3]})
    with pytest.raises(DataFormatError, match=f"{root}: dataset 'toy' gives no train examples"):
        RecData.build(root, NAME, sliding_window=False)
