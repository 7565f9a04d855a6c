"""Accuracy, diversity and efficiency metrics (torch only)."""

from atspeed_exp.metrics.diversity import (
    distinct_codes_per_list,
    distinct_items,
    diversity,
    gini_index,
    item_coverage,
    mean_popularity,
    mean_popularity_percentile,
    popularity_percentile,
    recommendation_counts,
)
from atspeed_exp.metrics.ranking import most_popular_lists, pad_ground_truth, recall_ndcg, recall_ndcg_per_user

__all__ = [
    "distinct_codes_per_list",
    "distinct_items",
    "diversity",
    "gini_index",
    "item_coverage",
    "mean_popularity",
    "mean_popularity_percentile",
    "most_popular_lists",
    "pad_ground_truth",
    "popularity_percentile",
    "recall_ndcg",
    "recall_ndcg_per_user",
    "recommendation_counts",
]
