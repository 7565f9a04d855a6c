"""Bootstrap confidence intervals over users (torch only), vectorised over resamples.

A per-list quantity (Recall@n, target calls, list overlap, ...) is summarised by its mean over users; a ratio such
as the acceptance rate (accepted / drafted steps, summed over users) by the ratio of sums. Its sampling uncertainty
is estimated by the percentile bootstrap: draw ``B`` resamples of the U users with replacement, recompute the
statistic on each, and report the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the B values.
"""

from __future__ import annotations

import torch


def bootstrap_interval(
    values: torch.Tensor,
    denominators: torch.Tensor | None = None,
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(values)`` or, with ``denominators``, of
    ``sum(values) / sum(denominators)``, resampling users.

    values, denominators: ``[U]`` per-user numbers (float or int). Returns (low, high); (nan, nan) for U = 0 and a
    resample whose denominators sum to 0 gives nan and is left out of the quantiles.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    values = values.reshape(-1).double()
    if denominators is not None:
        denominators = denominators.reshape(-1).double()
        if denominators.shape != values.shape:
            raise ValueError(f"denominators {tuple(denominators.shape)} != values {tuple(values.shape)}")
    users = values.numel()
    if users == 0:
        return float("nan"), float("nan")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(users, (num_resamples, users), generator=generator)  # [B, U]
    if denominators is None:
        stats = values[index].mean(1)  # [B]
    else:
        den = denominators[index].sum(1)
        stats = torch.where(den > 0, values[index].sum(1) / den.clamp(min=1e-300), torch.nan)
    stats = stats[~torch.isnan(stats)]
    if stats.numel() == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2
    low, high = torch.quantile(stats, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return float(low), float(high)


def list_overlap(lists: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per user |L ∩ R| / |R|: the share of the reference list's distinct items (e.g. the target's beam-search list)
    that ``lists`` also contains, ignoring order. lists, reference: ``[U, K]`` item ids (-1 = padding: never shared
    and not counted in |R|; a repeated item counts once). A user whose reference is empty gets 1. Returns ``[U]``
    float64."""
    if lists.shape != reference.shape:
        raise ValueError(f"lists {tuple(lists.shape)} != reference {tuple(reference.shape)}")
    first = ~(reference[:, :, None] == reference[:, None, :]).tril(diagonal=-1).any(-1)  # first occurrences in R
    counted = (reference >= 0) & first  # [U, K] the reference's distinct items
    shared = ((reference[:, :, None] == lists[:, None, :]).any(-1) & counted).sum(-1)
    size = counted.sum(-1)
    return torch.where(size > 0, shared.double() / size.clamp(min=1), torch.ones_like(shared, dtype=torch.float64))
