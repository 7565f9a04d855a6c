"""Semantic IDs by residual k-means with collision handling (atspeed_exp/data/sid_build.py)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from atspeed_exp.data.atspeed_format import load_atspeed_dataset
from atspeed_exp.data.prepare import PrepareSettings, prepare_dataset
from atspeed_exp.data.sid_build import (
    add_disambiguation_level,
    build_index,
    build_sids,
    kmeans,
    load_embeddings,
    reassign_last_level,
    sid_report,
)
from atspeed_exp.data.synthetic_raw import write_synthetic_reviews


def clustered(n_distinct: int = 20, copies: int = 3, dim: int = 6, seed: int = 0) -> torch.Tensor:
    """[n_distinct * copies, dim]: every vector repeated ``copies`` times, so k-means codes must collide."""
    base = torch.from_numpy(np.random.default_rng(seed).normal(size=(n_distinct, dim)))
    return base.repeat_interleave(copies, dim=0)


def naive_report(codes: torch.Tensor, sizes: list[int]) -> dict:
    sids = Counter(tuple(row) for row in codes.tolist())
    prefixes = Counter(tuple(row[:-1]) for row in codes.tolist())
    n = len(codes)
    return {
        "items": n,
        "levels": [{"codebook_size": s, "codes_used": len({row[lv] for row in codes.tolist()}),
                    "usage": len({row[lv] for row in codes.tolist()}) / s} for lv, s in enumerate(sizes)],
        "distinct_sids": len(sids),
        "collision_rate": (n - len(sids)) / n,
        "items_in_collisions": sum(c for c in sids.values() if c > 1),
        "max_items_per_sid": max(sids.values()),
        "mean_items_per_sid": n / len(sids),
        "max_items_per_prefix": max(prefixes.values()),
        "mean_items_per_prefix": n / len(prefixes),
    }


def test_kmeans_codes_respect_the_codebook_and_are_seeded():
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(200, 5)))
    centroids, codes = kmeans(x, 16, 50, torch.Generator().manual_seed(0))
    assert centroids.shape == (16, 5) and int(codes.max()) < 16 and int(codes.min()) >= 0
    assert torch.equal(codes, (torch.cdist(x, centroids) ** 2).argmin(dim=1))  # each point at its nearest centroid
    again = kmeans(x, 16, 50, torch.Generator().manual_seed(0))[1]
    assert torch.equal(codes, again)
    assert kmeans(x[:5], 16, 10, torch.Generator().manual_seed(0))[0].shape[0] == 5  # k <= N


def test_sid_report_matches_a_naive_count():
    codes = torch.tensor([[0, 1, 2], [0, 1, 2], [0, 1, 3], [1, 0, 0], [1, 0, 0], [1, 0, 0], [2, 2, 2]])
    assert sid_report(codes, [4, 4, 8]) == naive_report(codes, [4, 4, 8])
    _, report = build_sids(clustered(), [3, 64], "none", iters=20, seed=0)
    assert report["before"]["collision_rate"] == pytest.approx(40 / 60)  # 20 distinct vectors, 3 copies each


@pytest.mark.parametrize("sizes", [[3, 64], [2, 4, 64]])
def test_reassign_last_makes_the_index_collision_free(sizes):
    x = clustered()
    codes, report = build_sids(x, sizes, "reassign_last", iters=30, seed=0)
    plain, _ = build_sids(x, sizes, "none", iters=30, seed=0)
    assert report["before"]["collision_rate"] > 0 and report["after"]["collision_rate"] == 0.0
    assert report["after"] == naive_report(codes, sizes) and report["before"] == naive_report(plain, sizes)
    assert torch.equal(codes[:, :-1], plain[:, :-1])  # only the last level moves
    for level, size in enumerate(sizes):
        assert int(codes[:, level].max()) < size


def test_reassign_last_is_greedy_by_ascending_distance_and_leaves_clean_groups():
    centroids = torch.tensor([[0.0], [1.0], [10.0]], dtype=torch.float64)
    residual = torch.tensor([[0.1], [0.2], [0.3], [9.0], [0.9]], dtype=torch.float64)
    codes = torch.tensor([[0, 0], [0, 0], [0, 0], [1, 2], [1, 1]])  # prefix 1 has no collision
    new = reassign_last_level(codes, residual, centroids)
    # pairs by distance: (0,c0) .01, (1,c0) taken, (2,c0) taken, (2,c1) .49 -> item 2, then item 1 -> c2 (c1 full)
    assert new[:, 1].tolist() == [0, 2, 1, 2, 1]


def test_extra_level_numbers_items_inside_a_shared_code():
    codes = torch.tensor([[1, 2], [0, 0], [1, 2], [1, 2], [0, 1]])
    assert add_disambiguation_level(codes, 4)[:, 2].tolist() == [0, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="3 items share one code"):
        add_disambiguation_level(codes, 2)
    final, report = build_sids(clustered(), [4, 8], "extra_level", iters=20, seed=0)
    assert final.shape[1] == 3 and report["after"]["collision_rate"] == 0.0
    assert len(report["after"]["levels"]) == 3


def test_build_sids_is_deterministic_for_a_seed():
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(150, 8)))
    a, ra = build_sids(x, [8, 8, 8], seed=3, iters=30)
    b, rb = build_sids(x, [8, 8, 8], seed=3, iters=30)
    c, _ = build_sids(x, [8, 8, 8], seed=4, iters=30)
    assert torch.equal(a, b) and ra == rb and not torch.equal(a, c)


@pytest.fixture
def prepared(tmp_path):
    reviews = write_synthetic_reviews(tmp_path / "r.json")
    prepare_dataset(reviews, tmp_path / "syn", "syn", PrepareSettings(k_core=3))
    return tmp_path / "syn"


@pytest.mark.parametrize("collisions,levels", [("reassign_last", 4), ("extra_level", 4), ("none", 3)])
def test_written_index_loads_with_the_project_loader(prepared, collisions, levels):
    item_map = json.loads((prepared / "item_map.json").read_text())
    np.save(prepared.parent / "emb.npy", np.random.default_rng(0).normal(size=(len(item_map), 8)))
    sizes = [4, 8, 16] if collisions == "extra_level" else [4, 8, 16, 8][:levels]
    report = build_index(prepared, "syn", {"source": "file", "path": prepared.parent / "emb.npy"}, sizes,
                         collisions, iters=20, seed=0)
    dataset = load_atspeed_dataset(prepared, "syn")
    assert dataset.num_items == len(item_map) and dataset.num_levels == levels
    assert [len(t) for t in dataset.level_tokens()] == [lv["codes_used"] for lv in report["after"]["levels"]]
    sids = Counter(dataset.item_sids.values())
    assert (len(dataset.item_sids) - len(sids)) / len(dataset.item_sids) == report["after"]["collision_rate"]
    assert json.loads((prepared / "syn.LCRec-1e-3lr.report.json").read_text()) == json.loads(json.dumps(report))


def test_load_embeddings_maps_original_ids_and_names_missing_items(prepared, tmp_path):
    item_map = json.loads((prepared / "item_map.json").read_text())
    asins = sorted(item_map)[::-1] + ["B_NOT_IN_DATA"]
    matrix = np.arange(len(asins) * 2, dtype=np.float64).reshape(len(asins), 2)
    np.save(tmp_path / "e.npy", matrix)
    (tmp_path / "ids.txt").write_text("\n".join(asins) + "\n")
    items = sorted(item_map.values())
    got, facts = load_embeddings(items, "file", tmp_path / "e.npy", tmp_path / "ids.txt", "original",
                                 prepared / "item_map.json")
    row = {item_map[a]: r for r, a in enumerate(asins) if a in item_map}
    assert torch.equal(got, torch.from_numpy(matrix[[row[i] for i in items]]))
    assert facts["rows_not_in_dataset"] == 1
    with pytest.raises(ValueError, match="no embedding for 1 of"):
        load_embeddings(items + [10_000], "file", tmp_path / "e.npy", tmp_path / "ids.txt", "original",
                        prepared / "item_map.json")
    with pytest.raises(FileNotFoundError, match="needs the dataset's item_text.json"):
        load_embeddings(items, "text", tmp_path)


def test_load_embeddings_from_a_sasrec_stage(tmp_path):
    from atspeed_exp.models.sasrec import SASRec

    model = SASRec(num_items=30, hidden_size=8, num_blocks=1, num_heads=1, dropout=0.0, max_len=5)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    got, facts = load_embeddings([0, 5, 29], "sasrec", tmp_path)
    assert torch.equal(got, model.item_embedding.weight.detach()[[0, 5, 29]].double())
    assert facts["rows"] == 30 and facts["dim"] == 8
