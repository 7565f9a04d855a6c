"""Encoded splits kept on disk: read back equal to a fresh encoding, never reused for other examples, another prompt
format or another tokenizer, and a damaged file is encoded again and rewritten."""

from __future__ import annotations

import logging

import pytest

from atspeed_exp.data.recdata import RecData
from atspeed_exp.data.synthetic import write_synthetic_dataset
from atspeed_exp.data.tokenizer import save_tokenizer


@pytest.fixture
def root(tmp_path):
    return write_synthetic_dataset(tmp_path / "syn", num_users=40, num_items=50, seed=3)


def no_encoding(self, examples):
    raise AssertionError("the cached encodings should have been read")


def assert_same(a: RecData, b: RecData) -> None:
    assert a.splits.keys() == b.splits.keys()
    for split in a.splits:
        assert a.splits[split].prompts == b.splits[split].prompts, split
        assert a.splits[split].responses == b.splits[split].responses, split
        assert a.splits[split].examples == b.splits[split].examples, split


def test_a_second_build_reads_the_encodings_and_they_equal_a_fresh_encoding(root, tmp_path, monkeypatch):
    cache = tmp_path / "encoded"
    fresh = RecData.build(root, "synthetic", sliding_window=True)
    first = RecData.build(root, "synthetic", sliding_window=True, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == ["test.pt", "train.pt", "valid.pt"]
    monkeypatch.setattr(RecData, "encode", no_encoding)
    second = RecData.build(root, "synthetic", sliding_window=True, cache_dir=cache)
    assert_same(fresh, first)
    assert_same(fresh, second)


@pytest.mark.parametrize("change", [{"max_history": 3}, {"sliding_window": False}, {"prompt_format": "alpaca"}])
def test_other_examples_or_prompts_are_encoded_again(root, tmp_path, change):
    cache = tmp_path / "encoded"
    RecData.build(root, "synthetic", sliding_window=True, cache_dir=cache)
    settings = {"sliding_window": True, **change}
    assert_same(RecData.build(root, "synthetic", **settings),
                RecData.build(root, "synthetic", **settings, cache_dir=cache))


def test_another_tokenizer_is_not_given_the_cached_ids(root, tmp_path):
    """Same examples, a tokenizer whose ids differ (one more word before the SID tokens): encoded again."""
    cache = tmp_path / "encoded"
    data = RecData.build(root, "synthetic", cache_dir=cache)
    tokenizer = data.tokenizer
    tokenizer.add_tokens(["<unrelated>"])
    other_dir = tmp_path / "tok"
    save_tokenizer(tokenizer, other_dir)
    shifted = RecData.build(root, "synthetic", tokenizer_dir=other_dir, cache_dir=cache)
    assert_same(RecData.build(root, "synthetic", tokenizer_dir=other_dir), shifted)


def test_a_damaged_file_is_encoded_again_and_rewritten(root, tmp_path, caplog, monkeypatch):
    cache = tmp_path / "encoded"
    fresh = RecData.build(root, "synthetic", cache_dir=cache)
    (cache / "train.pt").write_bytes((cache / "train.pt").read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        again = RecData.build(root, "synthetic", cache_dir=cache)
    assert "train.pt is unreadable" in caplog.text
    assert_same(fresh, again)
    monkeypatch.setattr(RecData, "encode", no_encoding)
    assert_same(fresh, RecData.build(root, "synthetic", cache_dir=cache))  # rewritten whole


def test_a_reader_that_may_not_write_leaves_no_file(root, tmp_path):
    cache = tmp_path / "encoded"
    RecData.build(root, "synthetic", cache_dir=cache, write_cache=False)
    assert not cache.exists()
