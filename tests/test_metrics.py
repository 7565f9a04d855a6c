import math

import pytest
import torch

from atspeed_exp.metrics import most_popular_lists, pad_ground_truth, recall_ndcg, recall_ndcg_per_user


def test_recall_ndcg_hand_computed_table():
    ranked = torch.tensor(
        [
            [1, 2, 3, 4, 5],  # G = {2, 5, 9}: hits at ranks 1 and 4 (0-based)
            [7, 8, 9, 10, 11],  # G = {7}: hit at rank 0
            [1, 1, 2, 3, -1],  # G = {1, 3}: repeated 1 counts once, padding never hits
            [4, 5, 6, 7, 8],  # G = {}: excluded
        ]
    )
    truth = pad_ground_truth([[2, 5, 9], [7], [1, 3], []])
    out = recall_ndcg_per_user(ranked, truth, cutoffs=(5,))
    assert out["recall@5"].tolist() == pytest.approx([2 / 3, 1.0, 1.0])
    ndcg_user0 = (1 / math.log2(3) + 1 / math.log2(6)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))  # 0.47762
    ndcg_user2 = (1 + 1 / math.log2(5)) / (1 + 1 / math.log2(3))  # 0.98162
    assert out["ndcg@5"].tolist() == pytest.approx([ndcg_user0, 1.0, ndcg_user2])
    assert ndcg_user0 == pytest.approx(0.47762, abs=1e-5)
    mean = recall_ndcg(ranked, truth, cutoffs=(5,))
    assert mean["recall@5"] == pytest.approx((2 / 3 + 2) / 3)


def test_recall_ndcg_cutoffs_and_ideal_length():
    ranked = torch.arange(20).unsqueeze(0)  # items 0..19
    truth = pad_ground_truth([[0, 12, 30]])
    out = recall_ndcg(ranked, truth, cutoffs=(5, 10, 20, 50))
    assert set(out) == {"recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20"}
    assert out["recall@5"] == pytest.approx(1 / 3)
    assert out["recall@10"] == pytest.approx(1 / 3)
    assert out["recall@20"] == pytest.approx(2 / 3)
    idcg3 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert out["ndcg@10"] == pytest.approx(1 / idcg3)
    assert out["ndcg@20"] == pytest.approx((1 + 1 / math.log2(14)) / idcg3)


def test_recall_ndcg_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match="^2 ranked lists for 1 ground-truth lists$"):
        recall_ndcg(torch.zeros(2, 5, dtype=torch.long), pad_ground_truth([[1, 2]]))


def test_most_popular_lists_ties_by_item_id():
    popularity = torch.tensor([3, 5, 5, 0, 9])
    lists = most_popular_lists(popularity, num_users=2, k=3)
    assert lists.tolist() == [[4, 1, 2], [4, 1, 2]]


def test_bootstrap_interval_matches_a_naive_resampling_loop():
    import random

    from atspeed_exp.metrics.bootstrap import bootstrap_interval

    values = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 2.0])
    low, high = bootstrap_interval(values, num_resamples=4000, seed=3)
    rng = random.Random(0)
    naive = sorted(sum(rng.choice(values.tolist()) for _ in values) / len(values) for _ in range(4000))
    assert low == pytest.approx(naive[int(0.025 * 4000)], abs=0.07)
    assert high == pytest.approx(naive[int(0.975 * 4000)], abs=0.07)
    assert low < float(values.mean()) < high
    # a ratio of sums: accepted / drafted steps
    accepted, drafted = torch.tensor([3, 0, 2, 3]), torch.tensor([3, 3, 3, 3])
    low, high = bootstrap_interval(accepted, drafted, num_resamples=500)
    assert 0.0 <= low <= 8 / 12 <= high <= 1.0
    assert bootstrap_interval(torch.tensor([2.0, 2.0, 2.0])) == (2.0, 2.0)
    assert all(x != x for x in bootstrap_interval(torch.tensor([])))  # nan for no users


def test_list_overlap_counts_shared_items_once_and_ignores_padding():
    from atspeed_exp.metrics.bootstrap import list_overlap

    lists = torch.tensor([[1, 2, 3, 4], [5, 6, -1, -1], [7, 7, 8, 9], [1, 2, -1, -1], [3, 4, 5, 6]])
    reference = torch.tensor([[4, 3, 2, 1], [6, 9, -1, -1], [7, 8, 8, 1], [2, 1, -1, -1], [-1, -1, -1, -1]])
    # identical lists with placeholders overlap fully; a repeated reference item counts once
    assert list_overlap(lists, reference).tolist() == [1.0, 0.5, 2 / 3, 1.0, 1.0]


def test_ndcg_ideal_dcg_stops_at_the_cutoff_when_the_ground_truth_is_larger():
    """|G| = 3 > n = 2 with K = 5: IDCG@2 sums min(|G|, n) = 2 terms, so two hits at ranks 0 and 1 give 1.0."""
    ranked = torch.tensor([[10, 11, 12, 13, 14]])
    truth = pad_ground_truth([[10, 11, 12]])
    out = recall_ndcg(ranked, truth, cutoffs=(2, 5))
    assert out["ndcg@2"] == pytest.approx(1.0)
    assert out["recall@2"] == pytest.approx(2 / 3)
    assert out["ndcg@5"] == pytest.approx(1.0)


def test_pad_ground_truth_pads_with_minus_one_and_keeps_at_least_one_column():
    assert pad_ground_truth([[4, 2], [7], []]).tolist() == [[4, 2], [7, -1], [-1, -1]]
    assert pad_ground_truth([[7]]).tolist() == [[7]]
    assert pad_ground_truth([[], []]).tolist() == [[-1], [-1]]
    empty = pad_ground_truth([])
    assert empty.shape == (0, 1) and empty.dtype == torch.long


def test_recall_ndcg_without_any_ground_truth_is_nan():
    out = recall_ndcg(torch.tensor([[1, 2, 3]]), pad_ground_truth([[]]), cutoffs=(2,))
    assert set(out) == {"recall@2", "ndcg@2"}
    assert all(math.isnan(v) for v in out.values())


def test_recall_ndcg_skips_only_the_cutoffs_longer_than_the_lists():
    ranked = torch.arange(10).unsqueeze(0)
    out = recall_ndcg(ranked, pad_ground_truth([[3]]), cutoffs=(50, 5, 20, 10))
    assert set(out) == {"recall@5", "ndcg@5", "recall@10", "ndcg@10"}


def naive_recall_ndcg(ranked: list[list[int]], truth: list[list[int]], n: int) -> tuple[list[float], list[float]]:
    """The docstring's formulas, one user at a time, in Python floats."""
    recalls, ndcgs = [], []
    for items, g in zip(ranked, truth):
        if not g:
            continue
        seen, hits = set(), []
        for j, item in enumerate(items[:n]):
            if item >= 0 and item in g and item not in seen:
                hits.append(j)
            seen.add(item)
        dcg = sum(1 / math.log2(j + 2) for j in hits)
        idcg = sum(1 / math.log2(j + 2) for j in range(min(len(g), n)))
        recalls.append(len(hits) / len(set(g)))
        ndcgs.append(dcg / idcg)
    return recalls, ndcgs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_ndcg_per_user_matches_naive_formula_to_double_precision(seed):
    gen = torch.Generator().manual_seed(seed)
    ranked = torch.randint(-1, 30, (40, 20), generator=gen)  # repeats and padding included
    truth = [torch.randperm(30, generator=gen)[: int(torch.randint(0, 6, (1,), generator=gen))].tolist() for _ in range(40)]
    out = recall_ndcg_per_user(ranked, pad_ground_truth(truth), cutoffs=(5, 20))
    for n in (5, 20):
        recalls, ndcgs = naive_recall_ndcg(ranked.tolist(), truth, n)
        assert out[f"recall@{n}"].tolist() == pytest.approx(recalls, rel=1e-12, abs=0)
        assert out[f"ndcg@{n}"].tolist() == pytest.approx(ndcgs, rel=1e-12, abs=1e-15)


def test_most_popular_lists_match_a_naive_sort_with_many_ties():
    gen = torch.Generator().manual_seed(0)
    popularity = torch.randint(0, 3, (60,), generator=gen)
    naive = sorted(range(60), key=lambda item: (-int(popularity[item]), item))[:25]
    assert most_popular_lists(popularity, num_users=1, k=25).tolist() == [naive]
    # counts of any dtype: an unsigned one must not wrap around when negated
    for dtype in (torch.uint8, torch.int32, torch.float32):
        assert most_popular_lists(popularity.to(dtype), num_users=1, k=25).tolist() == [naive], dtype
