import pytest
import torch

from atspeed_exp.metrics import (
    distinct_codes_per_list,
    distinct_items,
    diversity,
    gini_index,
    item_coverage,
    mean_popularity,
    mean_popularity_percentile,
    popularity_percentile,
)

# 6 items; training counts per item; level-0 SID code per item
POPULARITY = torch.tensor([10, 5, 5, 0, 1, 2])
FIRST_CODES = torch.tensor([7, 1, 4, 2, 3, 3])
LISTS = torch.tensor([
    [0, 1, 2],
    [0, 3, -1],  # -1: no item
    [0, 1, 4],
])


def test_diversity_hand_computed_table_top3():
    # R (top-3, valid entries) = 0 1 2 | 0 3 | 0 1 4: 8 entries, items {0,1,2,3,4}; item 5 never recommended
    assert distinct_items(LISTS, 3) == 5
    assert item_coverage(LISTS, 6, 3) == pytest.approx(5 / 6)
    assert mean_popularity(LISTS, POPULARITY, 3) == pytest.approx((10 + 5 + 5 + 10 + 0 + 10 + 5 + 1) / 8)  # 5.75
    # rec counts sorted: [0, 1, 1, 1, 2, 3]; weights 2j - M - 1 = -5 -3 -1 1 3 5 -> 18 / (6 * 8)
    assert gini_index(LISTS, 6, 3) == pytest.approx(0.375)
    # codes per list: {7, 1, 4}, {7, 2}, {7, 1, 3}
    assert distinct_codes_per_list(LISTS, FIRST_CODES, 3).tolist() == [3, 2, 3]


def test_diversity_hand_computed_table_top2():
    # R (top-2) = 0 1 | 0 3 | 0 1: items {0, 1, 3}
    out = diversity(LISTS, POPULARITY, 2, first_codes=FIRST_CODES)
    assert out["distinct_items@2"] == 3
    assert out["coverage@2"] == pytest.approx(0.5)
    assert out["mean_popularity@2"] == pytest.approx(40 / 6)
    # rec counts sorted [0, 0, 0, 1, 2, 3], total 6: (0 + 0 + 0 + 1*1 + 2*3 + 3*5) / 36
    assert out["gini@2"] == pytest.approx(22 / 36)
    assert out["first_codes_per_list@2"] == pytest.approx(2.0)


def test_popularity_percentile_mid_rank_table():
    # sorted counts [0, 1, 2, 5, 5, 10]: (#below + #equal / 2) / 6
    expected = [5.5 / 6, 4 / 6, 4 / 6, 0.5 / 6, 1.5 / 6, 2.5 / 6]
    assert popularity_percentile(POPULARITY).tolist() == pytest.approx(expected)
    entries = [0, 1, 2, 0, 3, 0, 1, 4]
    assert mean_popularity_percentile(LISTS, POPULARITY, 3) == pytest.approx(
        sum(expected[i] for i in entries) / len(entries))


def test_gini_index_extremes():
    uniform = torch.arange(6).view(3, 2)  # every item once
    assert gini_index(uniform, 6, 2) == pytest.approx(0.0)
    one_item = torch.zeros(4, 3, dtype=torch.long)  # item 0 in every slot
    assert gini_index(one_item, 6, 3) == pytest.approx(5 / 6)
    assert torch.isnan(torch.tensor(gini_index(torch.full((2, 3), -1), 6, 3)))


def _naive(lists, popularity, codes, num_items, n):
    entries = [i for row in lists.tolist() for i in row[:n] if i >= 0]
    rec = [entries.count(i) for i in range(num_items)]
    ordered = sorted(rec)
    gini = sum((2 * j - num_items - 1) * c for j, c in enumerate(ordered, start=1)) / (num_items * sum(rec))
    pop = popularity.tolist()
    pct = [(sum(q < p for q in pop) + 0.5 * sum(q == p for q in pop)) / len(pop) for p in pop]
    return {
        f"distinct_items@{n}": len(set(entries)),
        f"coverage@{n}": len(set(entries)) / num_items,
        f"mean_popularity@{n}": sum(pop[i] for i in entries) / len(entries),
        f"popularity_percentile@{n}": sum(pct[i] for i in entries) / len(entries),
        f"gini@{n}": gini,
        f"first_codes_per_list@{n}": sum(len({codes[i] for i in row[:n] if i >= 0}) for row in lists.tolist())
        / lists.shape[0],
    }


@pytest.mark.parametrize("seed", range(5))
def test_diversity_matches_naive_python(seed):
    gen = torch.Generator().manual_seed(seed)
    num_items, n = 40, 7
    lists = torch.randint(0, num_items, (25, 10), generator=gen)  # repeats across and within lists
    lists[torch.rand(25, 10, generator=gen) < 0.15] = -1
    lists[0, 0] = 3  # at least one valid entry
    popularity = torch.randint(0, 6, (num_items,), generator=gen)  # many ties
    codes = torch.randint(0, 5, (num_items,), generator=gen)
    got = diversity(lists, popularity, n, first_codes=codes)
    expected = _naive(lists, popularity, codes.tolist(), num_items, n)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
