"""The torchmetrics forms of the metrics equal the batch functions, and merging per-process states is exact."""

import pytest
import torch

from atspeed_exp.metrics import distinct_items, gini_index, item_coverage, mean_popularity, recall_ndcg
from atspeed_exp.metrics.streaming import ItemDiversity, RankingMetrics, SpeculativeCounters

NUM_ITEMS = 40


def random_lists(users: int = 37, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[U, K] lists with repeats and -1 padding, and [U, 6] ground truths of 0..6 items (-1 padded)."""
    gen = torch.Generator().manual_seed(seed)
    ranked = torch.randint(0, NUM_ITEMS, (users, k), generator=gen)
    ranked[torch.rand(users, k, generator=gen) < 0.1] = -1
    truth = torch.randint(0, NUM_ITEMS, (users, 6), generator=gen)
    sizes = torch.randint(0, 7, (users,), generator=gen)
    truth[torch.arange(6)[None, :] >= sizes[:, None]] = -1
    return ranked, truth


def updated(metric, *batches):
    for batch in batches:
        metric.update(*batch)
    return metric


def test_ranking_metrics_equal_recall_ndcg_over_batches():
    ranked, truth = random_lists()
    expected = recall_ndcg(ranked, truth, cutoffs=(1, 5, 10, 20))  # 20 > K: left out by both
    metric = updated(RankingMetrics(cutoffs=(1, 5, 10, 20)), (ranked[:10], truth[:10]), (ranked[10:], truth[10:]))
    got = metric.compute()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12), name


def test_ranking_metrics_refuse_a_cutoff_longer_than_some_lists():
    ranked, truth = random_lists()
    metric = updated(RankingMetrics(cutoffs=(5, 10)), (ranked, truth), (ranked[:, :5], truth))
    with pytest.raises(ValueError, match="cutoff 10"):
        metric.compute()


def test_item_diversity_equals_the_diversity_functions():
    ranked, _ = random_lists()
    popularity = torch.randint(0, 100, (NUM_ITEMS,))
    n = 5
    got = updated(ItemDiversity(NUM_ITEMS, n, popularity), (ranked[:20],), (ranked[20:],)).compute()
    assert got[f"distinct_items@{n}"] == distinct_items(ranked, n)
    assert got[f"coverage@{n}"] == pytest.approx(item_coverage(ranked, NUM_ITEMS, n))
    assert got[f"gini@{n}"] == pytest.approx(gini_index(ranked, NUM_ITEMS, n))
    assert got[f"mean_popularity@{n}"] == pytest.approx(mean_popularity(ranked, popularity, n))


def test_speculative_counters_give_the_ratio_of_sums():
    calls, drafted, accepted = torch.tensor([3, 4, 5]), torch.tensor([6, 0, 8]), torch.tensor([2, 0, 7])
    got = updated(SpeculativeCounters(), (calls[:1], drafted[:1], accepted[:1]),
                  (calls[1:], drafted[1:], accepted[1:])).compute()
    assert got["acceptance_rate"] == pytest.approx(9 / 14)
    assert got["target_calls_per_list"] == pytest.approx(4.0)
    assert got["accepted_steps_per_list"] == pytest.approx(3.0)
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' notice for an empty metric
        assert SpeculativeCounters().compute()["acceptance_rate"] == 0.0


def test_metrics_merged_from_two_halves_of_the_users_equal_one_over_all():
    ranked, truth = random_lists(users=50, seed=3)
    gen = torch.Generator().manual_seed(1)
    calls, drafted, accepted = (torch.randint(0, 9, (50,), generator=gen) for _ in range(3))

    def make():
        return [RankingMetrics(cutoffs=(5, 10)), ItemDiversity(NUM_ITEMS, 10), SpeculativeCounters()]

    def feed(metrics, rows):
        metrics[0].update(ranked[rows], truth[rows])
        metrics[1].update(ranked[rows])
        metrics[2].update(calls[rows], drafted[rows], accepted[rows])
        return metrics

    whole = feed(make(), slice(None))
    first, second = feed(make(), slice(0, 23)), feed(make(), slice(23, None))  # as two processes would hold them
    for merged, other, single in zip(first, second, whole):
        merged.merge_state(other)
        got, expected = merged.compute(), single.compute()
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name] == pytest.approx(expected[name], rel=1e-12), name
