"""Top-n accuracy of recommendation lists with multi-item ground truth (docs/method.md section 7), vectorised.

For a user with ground-truth set G and ranked list R:
    Recall@n = |R[:n] ∩ G| / |G|
    NDCG@n   = DCG@n / IDCG@n,  DCG@n = Σ_{j<n, R_j ∈ G} 1 / log2(j + 2),  IDCG@n = Σ_{j < min(|G|, n)} 1 / log2(j + 2)
Users with an empty G are excluded. An item repeated in R counts once (its first rank), and -1 entries in R are
padding that never hits.
"""

from __future__ import annotations

import torch


def pad_ground_truth(ground_truth: list[list[int]] | list[tuple[int, ...]]) -> torch.Tensor:
    """Ragged ground-truth lists -> ``[U, G_max]`` long, padded with -1."""
    width = max((len(g) for g in ground_truth), default=0)
    out = torch.full((len(ground_truth), max(width, 1)), -1, dtype=torch.long)
    for row, items in enumerate(ground_truth):
        if len(items):
            out[row, : len(items)] = torch.as_tensor(list(items), dtype=torch.long)
    return out


def hit_matrix(ranked: torch.Tensor, ground_truth: torch.Tensor) -> torch.Tensor:
    """Bool ``[U, K]``: ranked[u, j] is in G_u and is its first occurrence in the list.

    ranked: ``[U, K]`` item ids (-1 = padding); ground_truth: ``[U, G]`` item ids (-1 = padding).
    """
    in_truth = (ranked[:, :, None] == ground_truth[:, None, :]) & (ground_truth[:, None, :] >= 0)
    hits = in_truth.any(-1) & (ranked >= 0)
    # repeated items: only the first rank counts
    earlier_same = (ranked[:, :, None] == ranked[:, None, :]).tril(diagonal=-1).any(-1)
    return hits & ~earlier_same


def recall_ndcg(
    ranked: torch.Tensor, ground_truth: torch.Tensor, cutoffs: tuple[int, ...] = (5, 10, 20)
) -> dict[str, float]:
    """Mean Recall@n and NDCG@n over users with a non-empty ground truth, for each n <= K in ``cutoffs``.

    ranked: ``[U, K]``; ground_truth: ``[U, G]`` (-1 padded). Returns ``{"recall@n": .., "ndcg@n": ..}``.
    """
    per_user = recall_ndcg_per_user(ranked, ground_truth, cutoffs)
    return {name: float(values.mean()) if values.numel() else float("nan") for name, values in per_user.items()}


def recall_ndcg_per_user(
    ranked: torch.Tensor, ground_truth: torch.Tensor, cutoffs: tuple[int, ...] = (5, 10, 20)
) -> dict[str, torch.Tensor]:
    """Like ``recall_ndcg`` but returns the per-user values ``[U']`` (users with non-empty ground truth only)."""
    if ranked.shape[0] != ground_truth.shape[0]:
        raise ValueError(f"{ranked.shape[0]} ranked lists for {ground_truth.shape[0]} ground-truth lists")
    num_truth = (ground_truth >= 0).sum(-1)
    keep = num_truth > 0
    ranked, ground_truth, num_truth = ranked[keep], ground_truth[keep], num_truth[keep]
    hits = hit_matrix(ranked, ground_truth).double()  # [U, K]
    discounts = 1.0 / torch.log2(torch.arange(ranked.shape[1], dtype=torch.float64) + 2.0)  # [K]
    out: dict[str, torch.Tensor] = {}
    for n in cutoffs:
        if n > ranked.shape[1]:
            continue
        recall = hits[:, :n].sum(-1) / num_truth
        dcg = (hits[:, :n] * discounts[:n]).sum(-1)
        ideal_len = num_truth.clamp(max=n)
        ideal = torch.cumsum(discounts[:n], 0)[ideal_len - 1]
        out[f"recall@{n}"] = recall
        out[f"ndcg@{n}"] = dcg / ideal
    return out


def most_popular_lists(popularity: torch.Tensor, num_users: int, k: int) -> torch.Tensor:
    """The most-popular baseline: every user gets the ``k`` items with the most training interactions
    (ties broken by lower item id). popularity: ``[num_item_ids]`` counts. Returns ``[num_users, k]``."""
    ids = torch.arange(popularity.numel())
    # sort by count descending, then id ascending
    order = torch.argsort(ids, stable=True)
    order = order[torch.argsort(-popularity.to(torch.float64)[order], stable=True)]
    return order[:k].unsqueeze(0).expand(num_users, -1).clone()
