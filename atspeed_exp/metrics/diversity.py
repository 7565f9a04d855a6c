"""How varied and how popular recommendation lists are, over all users' top-n, vectorised.

Inputs: ``lists`` ``[U, K]`` long item ids, best first, -1 = no item (padding, ignored everywhere); ``n`` <= K takes
the top-n of each list. Item ids index ``popularity`` / ``first_codes`` (``[num_item_ids]``), and ``num_items`` is
the catalogue size M (every item that could be recommended).

Notation: R = the multiset of all valid entries of all users' top-n; rec(i) = how often item i occurs in R.
"""

from __future__ import annotations

import torch


def _top(lists: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-n ids ``[U, n']``, bool valid mask ``[U, n']``) with n' = min(n, K)."""
    top = lists[:, :n]
    return top, top >= 0


def recommendation_counts(lists: torch.Tensor, num_items: int, n: int) -> torch.Tensor:
    """rec(i) for every item: ``[num_items]`` long, how many times item i is in some user's top-n."""
    top, valid = _top(lists, n)
    return torch.bincount(top[valid], minlength=num_items)[:num_items]


def distinct_items(lists: torch.Tensor, n: int) -> int:
    """|{i : rec(i) > 0}|: the number of distinct items over all users' top-n."""
    top, valid = _top(lists, n)
    return int(top[valid].unique().numel())


def item_coverage(lists: torch.Tensor, num_items: int, n: int) -> float:
    """Coverage@n = |{i : rec(i) > 0}| / M: the share of the catalogue that reaches at least one top-n."""
    return distinct_items(lists, n) / num_items


def mean_popularity(lists: torch.Tensor, popularity: torch.Tensor, n: int) -> float:
    """MeanPop@n = (1 / |R|) Σ_{i ∈ R} pop(i): the mean training count of the recommended items (each entry of
    each list counts once); nan when there is none. popularity: ``[num_item_ids]`` training counts."""
    top, valid = _top(lists, n)
    counts = popularity.to(torch.float64)[top[valid]]
    return float(counts.mean()) if counts.numel() else float("nan")


def popularity_percentile(popularity: torch.Tensor) -> torch.Tensor:
    """Mid-rank percentile of each item's training count among all M items of ``popularity``:
    pct(i) = (|{j : pop(j) < pop(i)}| + ½ |{j : pop(j) = pop(i)}|) / M, in (0, 1); ``[M]`` float64. Items with equal
    counts share one value, so the never-seen tail sits at half its own share, not at 0."""
    pop = popularity.to(torch.float64)
    ordered = pop.sort().values
    below = torch.searchsorted(ordered, pop, right=False)  # |{j : pop(j) < pop(i)}|
    at_or_below = torch.searchsorted(ordered, pop, right=True)  # |{j : pop(j) <= pop(i)}|
    return (below + at_or_below).to(torch.float64) / (2 * pop.numel())


def mean_popularity_percentile(lists: torch.Tensor, popularity: torch.Tensor, n: int) -> float:
    """MeanPopPct@n = (1 / |R|) Σ_{i ∈ R} pct(i) with ``popularity_percentile``'s pct: 0.5 is the popularity of a
    typical catalogue item, near 1 recommends only the head; comparable across datasets. nan for no entries."""
    top, valid = _top(lists, n)
    pct = popularity_percentile(popularity)[top[valid]]
    return float(pct.mean()) if pct.numel() else float("nan")


def gini_index(lists: torch.Tensor, num_items: int, n: int) -> float:
    """Gini@n of how often each of the M items is recommended: with rec sorted ascending, rec_(1) <= ... <= rec_(M),
    Gini = Σ_{j=1..M} (2j - M - 1) rec_(j) / (M Σ_j rec_(j)). 0 when every item is recommended equally often,
    (M - 1) / M when one item takes every slot; nan when nothing is recommended."""
    counts = recommendation_counts(lists, num_items, n).sort().values.to(torch.float64)  # [M] ascending
    total = counts.sum()
    if total == 0:
        return float("nan")
    j = torch.arange(1, num_items + 1, dtype=torch.float64)
    return float(((2 * j - num_items - 1) * counts).sum() / (num_items * total))


def distinct_codes_per_list(lists: torch.Tensor, first_codes: torch.Tensor, n: int) -> torch.Tensor:
    """Per user, |{code(i) : i in the user's top-n}|: how many distinct first-level SID codes (coarse clusters) one
    list spans. first_codes: ``[num_item_ids]`` long, the level-0 code of each item. Returns ``[U]`` long."""
    top, valid = _top(lists, n)
    codes = torch.where(valid, first_codes[top.clamp(min=0)], torch.full_like(top, -1))  # [U, n']
    ordered = codes.sort(dim=-1).values
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]  # first of each run of equal codes
    return (new & (ordered >= 0)).sum(-1)


def diversity(lists: torch.Tensor, popularity: torch.Tensor, n: int, num_items: int | None = None,
              first_codes: torch.Tensor | None = None) -> dict[str, float]:
    """All of the above at cutoff n, named ``{metric}@{n}``: ``distinct_items``, ``coverage``, ``mean_popularity``,
    ``popularity_percentile``, ``gini``, and with ``first_codes`` ``first_codes_per_list`` (mean over users).
    num_items defaults to ``popularity.numel()``."""
    num_items = popularity.numel() if num_items is None else num_items
    out = {
        f"distinct_items@{n}": float(distinct_items(lists, n)),
        f"coverage@{n}": item_coverage(lists, num_items, n),
        f"mean_popularity@{n}": mean_popularity(lists, popularity, n),
        f"popularity_percentile@{n}": mean_popularity_percentile(lists, popularity, n),
        f"gini@{n}": gini_index(lists, num_items, n),
    }
    if first_codes is not None:
        out[f"first_codes_per_list@{n}"] = float(distinct_codes_per_list(lists, first_codes, n).double().mean())
    return out
