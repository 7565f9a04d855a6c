"""The synthetic dataset generator: determinism, format, and the statistics it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from atspeed_exp.data.atspeed_format import build_examples, item_popularity, load_atspeed_dataset, sid_to_items
from atspeed_exp.data.synthetic import META_FILE, ensure_synthetic_dataset, write_synthetic_dataset
from atspeed_exp.data.types import RecDataset

FILES = ["training_dict.npy", "validation_dict.npy", "testing_dict.npy", "synthetic.LCRec-1e-3lr.json"]


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory: pytest.TempPathFactory) -> RecDataset:
    root = write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))
    return load_atspeed_dataset(root, "synthetic")


def _bytes(root: Path) -> dict[str, bytes]:
    return {f: (root / f).read_bytes() for f in FILES}


def test_write_synthetic_dataset_is_deterministic(tmp_path: Path) -> None:
    a = write_synthetic_dataset(tmp_path / "a", seed=7)
    b = write_synthetic_dataset(tmp_path / "b", seed=7)
    c = write_synthetic_dataset(tmp_path / "c", seed=8)
    assert _bytes(a) == _bytes(b)
    assert _bytes(a)["training_dict.npy"] != _bytes(c)["training_dict.npy"]


def test_write_synthetic_dataset_leaves_no_temp_files(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path, num_users=20, num_items=40)
    assert sorted(p.name for p in root.iterdir()) == sorted(FILES + [META_FILE])


def test_write_synthetic_dataset_loads_with_requested_sizes(default_dataset: RecDataset) -> None:
    ds = default_dataset
    assert len(ds.train) == 600 and ds.num_items == 300 and ds.num_levels == 4
    # Level l uses letter a, b, c, d and at most codes_per_level[l] codes.
    for level, (letter, codes) in enumerate(zip("abcd", (16, 8, 8, 8))):
        tokens = ds.level_tokens()[level]
        assert all(t.startswith(f"<{letter}_") for t in tokens) and len(tokens) <= codes


@pytest.mark.parametrize("num_collisions", [0, 3, 10])
def test_write_synthetic_dataset_has_exact_collisions(tmp_path: Path, num_collisions: int) -> None:
    root = write_synthetic_dataset(tmp_path, num_users=30, num_items=80, num_collisions=num_collisions)
    ds = load_atspeed_dataset(root, "synthetic")
    assert ds.num_items - len(sid_to_items(ds)) == num_collisions


def test_write_synthetic_dataset_sids_are_hierarchical(default_dataset: RecDataset) -> None:
    # Clusters of uneven size: the level-a codes are not all equally used, and a prefix is shared by many items.
    sizes = Counter(sid[0] for sid in default_dataset.item_sids.values())
    assert max(sizes.values()) >= 2 * min(sizes.values())
    assert len({sid[:2] for sid in default_dataset.item_sids.values()}) < default_dataset.num_items / 2


def test_write_synthetic_dataset_popularity_is_long_tailed(default_dataset: RecDataset) -> None:
    counts = np.sort(item_popularity(default_dataset))[::-1]
    top_decile_share = counts[: len(counts) // 10].sum() / counts.sum()
    assert top_decile_share > 0.3


def test_write_synthetic_dataset_time_split_is_roughly_8_1_1(default_dataset: RecDataset) -> None:
    ds = default_dataset
    sizes = np.array([sum(map(len, s.values())) for s in (ds.train, ds.valid, ds.test)], dtype=float)
    np.testing.assert_allclose(sizes / sizes.sum(), [0.8, 0.1, 0.1], atol=0.02)
    assert min(len(seq) for seq in ds.train.values()) >= 2
    # A global time split leaves many users without valid or test items.
    assert 0 < sum(1 for v in ds.valid.values() if v) < len(ds.valid)
    assert 0 < sum(1 for t in ds.test.values() if t) < len(ds.test)
    assert any(not ds.valid[u] and not ds.test[u] for u in ds.train)


def test_write_synthetic_dataset_sequences_have_bounded_length_without_repeats(default_dataset: RecDataset) -> None:
    ds = default_dataset
    for user in ds.train:
        seq = ds.train[user] + ds.valid[user] + ds.test[user]
        assert 5 <= len(seq) <= 25 and len(set(seq)) == len(seq)


def test_write_synthetic_dataset_next_item_is_learnable(default_dataset: RecDataset) -> None:
    # A last-item transition count table fitted on train must beat most-popular clearly on the valid targets:
    # the signal a sequence model is meant to learn is there.
    ds = default_dataset
    transitions: dict[int, Counter[int]] = defaultdict(Counter)
    for seq in ds.train.values():
        for a, b in zip(seq, seq[1:]):
            transitions[a][b] += 1
    top10 = list(np.argsort(-item_popularity(ds), kind="stable")[:10])
    examples = build_examples(ds, "valid")
    pop_hits = np.mean([e.target in top10 for e in examples])
    markov_hits = np.mean([e.target in [i for i, _ in transitions[e.history[-1]].most_common(10)] for e in examples])
    assert markov_hits > pop_hits + 0.2


def test_ensure_synthetic_dataset_reuses_then_regenerates(tmp_path: Path) -> None:
    root = ensure_synthetic_dataset(tmp_path, "synthetic", num_users=20, num_items=40)
    meta = json.loads((root / META_FILE).read_text())
    assert meta["num_users"] == 20 and meta["codes_per_level"] == [16, 8, 8, 8]
    # Files are written by os.replace, so a rewrite would give them a new inode.
    inode = (root / FILES[0]).stat().st_ino
    ensure_synthetic_dataset(tmp_path, "synthetic", num_users=20, num_items=40)
    assert (root / FILES[0]).stat().st_ino == inode
    ensure_synthetic_dataset(tmp_path, "synthetic", num_users=25, num_items=40)
    assert len(load_atspeed_dataset(root, "synthetic").train) == 25


def test_ensure_synthetic_dataset_rewrites_missing_files(tmp_path: Path) -> None:
    root = ensure_synthetic_dataset(tmp_path, "synthetic", num_users=20, num_items=40)
    (root / FILES[1]).unlink()
    ensure_synthetic_dataset(tmp_path, "synthetic", num_users=20, num_items=40)
    assert (root / FILES[1]).is_file()


def test_write_synthetic_dataset_rejects_impossible_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distinct SIDs"):
        write_synthetic_dataset(tmp_path, num_items=100, codes_per_level=(4, 4))
    with pytest.raises(ValueError, match="num_collisions"):
        write_synthetic_dataset(tmp_path, num_items=40, num_collisions=30)


def test_synthetic_cli_writes_dataset(tmp_path: Path) -> None:
    root = tmp_path / "cli"
    cmd = [sys.executable, "-m", "atspeed_exp.data.synthetic", "--root", str(root), "--num-users", "20"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    assert len(load_atspeed_dataset(root, "synthetic").train) == 20
