"""One set of numbers for any recommender's lists on a dataset's test users: Recall/NDCG at the cutoffs (the
project's ``recall_ndcg``) and list diversity at one n (``metrics.diversity``). The target's beam-search lists,
SASRec's and most-popular's all go through ``dataset_list_report``, so their rows compare like with like.

No framework imports: ``evaluation`` and ``pipeline`` can import this module (``baselines`` imports ``pipeline``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from atspeed_exp.data.atspeed_format import item_popularity
from atspeed_exp.data.types import RecDataset
from atspeed_exp.metrics import diversity, pad_ground_truth, recall_ndcg


def first_level_codes(dataset: RecDataset) -> torch.Tensor:
    """``[max_item_id + 1]`` long: an index of each item's level-0 SID token (its coarsest cluster); -1 for ids that
    are no item. Only equality between codes matters."""
    level0 = sorted({sid[0] for sid in dataset.item_sids.values()})
    index = {token: code for code, token in enumerate(level0)}
    codes = torch.full((max(dataset.item_sids) + 1,), -1, dtype=torch.long)
    for item, sid in dataset.item_sids.items():
        codes[item] = index[sid[0]]
    return codes


def list_report(
    lists: torch.Tensor,
    ground_truth: Sequence[Sequence[int]],
    popularity: torch.Tensor,
    cutoffs: Sequence[int] = (5, 10, 20),
    diversity_n: int = 10,
    num_items: int | None = None,
    first_codes: torch.Tensor | None = None,
) -> dict[str, float]:
    """Accuracy and diversity of one recommender's lists, the same keys for every recommender.

    Args:
        lists: ``[U, K]`` item ids, best first, -1 = none.
        ground_truth: U ragged lists of relevant items (users with none are left out of Recall/NDCG only).
        popularity: ``[num_item_ids]`` training interaction counts.
        cutoffs: n of Recall@n / NDCG@n (those > K are skipped).
        diversity_n: the top-n over which diversity is measured (skipped when > K).
        num_items: catalogue size for coverage and Gini (default ``popularity.numel()``).
        first_codes: ``[num_item_ids]`` level-0 SID code per item (``first_level_codes``), for
            ``first_codes_per_list``.

    Returns ``{"recall@n", "ndcg@n", "distinct_items@m", "coverage@m", "mean_popularity@m",
    "popularity_percentile@m", "gini@m"[, "first_codes_per_list@m"], "num_users"}``.
    """
    lists = lists.cpu()
    out = recall_ndcg(lists, pad_ground_truth(list(ground_truth)), tuple(cutoffs))
    if diversity_n <= lists.shape[1]:
        out.update(diversity(lists, popularity.cpu(), diversity_n, num_items=num_items,
                             first_codes=None if first_codes is None else first_codes.cpu()))
    out["num_users"] = float(lists.shape[0])
    return out


def dataset_list_report(dataset: RecDataset, lists: torch.Tensor, ground_truth: Sequence[Sequence[int]],
                        cutoffs: Sequence[int] = (5, 10, 20), diversity_n: int = 10) -> dict[str, float]:
    """``list_report`` with the dataset's training popularity, catalogue size and level-0 SID codes: what evaluation
    calls for any recommender's ``[U, K]`` lists of the dataset's test users."""
    return list_report(lists, ground_truth, torch.as_tensor(item_popularity(dataset), dtype=torch.long), cutoffs,
                       diversity_n, num_items=dataset.num_items, first_codes=first_level_codes(dataset))
