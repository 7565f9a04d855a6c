"""Accuracy and efficiency metrics (torch only)."""

from atspeed_exp.metrics.ranking import most_popular_lists, pad_ground_truth, recall_ndcg, recall_ndcg_per_user

__all__ = ["most_popular_lists", "pad_ground_truth", "recall_ndcg", "recall_ndcg_per_user"]
