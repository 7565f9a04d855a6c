"""The metrics of ``ranking.py`` and ``diversity.py`` and the speculative counters as ``torchmetrics.Metric``s:
updated batch by batch, merged across processes by torchmetrics (every state is a sum, so a merge is exact and
does not depend on how users are split), computed once at the end.

    metric = RankingMetrics(cutoffs=(5, 10, 20))
    metric.update(ranked, ground_truth)      # per batch: [B, K] lists, [B, G] -1 padded ground truth
    metric.compute()                         # {"recall@5": .., "ndcg@5": .., ...}, all processes' users

Under ``torch.distributed`` (e.g. a Lightning DDP run), ``compute`` all-reduces the states first; without it,
``merge_state`` adds another instance's states (what two processes would all-reduce).

Numbers equal the batch functions on all users at once: ``RankingMetrics`` = ``recall_ndcg``,
``ItemDiversity`` = ``distinct_items`` / ``item_coverage`` / ``gini_index`` / ``mean_popularity``. This module is
not imported by ``atspeed_exp.metrics`` because importing torchmetrics imports transformers when it is installed;
the metrics themselves depend on torch and torchmetrics only.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from atspeed_exp.metrics.diversity import recommendation_counts
from atspeed_exp.metrics.ranking import recall_ndcg_per_user


class RankingMetrics(Metric):
    """Mean Recall@n and NDCG@n over users with a non-empty ground truth (``ranking.py``'s conventions: repeated
    items count once, -1 is padding, IDCG over min(|G|, n) ranks). A cutoff longer than every list seen so far is
    left out of ``compute``, as ``recall_ndcg`` leaves it out; a cutoff longer than some lists but not others is
    an error (its mean would be over a subset of users).

    States (sum-reduced, float64): per cutoff the summed Recall and NDCG of the users, the users counted and the
    lists long enough for it."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, cutoffs: tuple[int, ...] = (5, 10, 20), **kwargs) -> None:
        super().__init__(**kwargs)
        self.cutoffs = tuple(int(n) for n in cutoffs)
        size = len(self.cutoffs)
        self.add_state("recall_sum", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ndcg_sum", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("users", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("lists", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ranked: torch.Tensor, ground_truth: torch.Tensor) -> None:
        """ranked: ``[B, K]`` item ids, best first (-1 = padding); ground_truth: ``[B, G]`` item ids (-1 padded)."""
        per_user = recall_ndcg_per_user(ranked.cpu(), ground_truth.cpu(), self.cutoffs)
        for i, n in enumerate(self.cutoffs):
            if f"recall@{n}" not in per_user:
                continue
            self.recall_sum[i] += per_user[f"recall@{n}"].sum().item()
            self.ndcg_sum[i] += per_user[f"ndcg@{n}"].sum().item()
            self.users[i] += per_user[f"recall@{n}"].numel()
            self.lists[i] += ranked.shape[0]

    def compute(self) -> dict[str, float]:
        longest = self.lists.max()
        out: dict[str, float] = {}
        for i, n in enumerate(self.cutoffs):
            if self.lists[i] == 0:
                continue
            if self.lists[i] != longest:
                raise ValueError(f"cutoff {n} is longer than some of the lists: its mean would cover only "
                                 f"{int(self.lists[i])} of {int(longest)} lists")
            users = self.users[i]
            out[f"recall@{n}"] = float(self.recall_sum[i] / users) if users else float("nan")
            out[f"ndcg@{n}"] = float(self.ndcg_sum[i] / users) if users else float("nan")
        return out


class ItemDiversity(Metric):
    """How varied the top-n lists of all users are (``diversity.py``): ``distinct_items@n`` (items in at least one
    top-n), ``coverage@n`` (that over the catalogue size M), ``gini@n`` and, with ``popularity``,
    ``mean_popularity@n``. State: rec(i), how often each of the M items is in some top-n (``[M]`` long,
    sum-reduced), from which all four follow; ids >= M are not counted.

    popularity: ``[M']`` training counts (M' >= M), for ``mean_popularity@n``."""

    full_state_update = False

    def __init__(self, num_items: int, n: int, popularity: torch.Tensor | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_items = int(num_items)
        self.n = int(n)
        self.popularity = None if popularity is None else popularity.detach().to(torch.float64).cpu()
        self.add_state("counts", torch.zeros(self.num_items, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, lists: torch.Tensor) -> None:
        """lists: ``[B, K]`` item ids, best first (-1 = padding)."""
        self.counts += recommendation_counts(lists, self.num_items, self.n).to(self.counts.device)

    def compute(self) -> dict[str, float]:
        counts = self.counts.cpu()
        n, total = self.n, counts.sum()
        distinct = int((counts > 0).sum())
        ascending = counts.sort().values.to(torch.float64)
        j = torch.arange(1, self.num_items + 1, dtype=torch.float64)
        gini = ((2 * j - self.num_items - 1) * ascending).sum() / (self.num_items * total) if total else torch.nan
        out = {f"distinct_items@{n}": float(distinct), f"coverage@{n}": distinct / self.num_items,
               f"gini@{n}": float(gini)}
        if self.popularity is not None:
            weighted = (counts.to(torch.float64) * self.popularity[: self.num_items]).sum()
            out[f"mean_popularity@{n}"] = float(weighted / total) if total else float("nan")
        return out


class SpeculativeCounters(Metric):
    """Target calls, drafted and accepted steps of speculative decoding, summed over lists:
    ``acceptance_rate`` = Σ accepted / Σ drafted (0 when nothing was drafted, as ``evaluation.py`` reports it),
    ``target_calls_per_list``, ``drafted_steps_per_list``, ``accepted_steps_per_list``.
    States: the four sums (float64, sum-reduced)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("target_calls", "drafted_steps", "accepted_steps", "lists"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, target_calls: torch.Tensor, drafted_steps: torch.Tensor, accepted_steps: torch.Tensor) -> None:
        """Per list: ``[B]`` target calls, drafted steps, accepted steps (``ListStats`` of ``evaluation.py``)."""
        target_calls, drafted_steps, accepted_steps = (torch.as_tensor(x) for x in (target_calls, drafted_steps,
                                                                                    accepted_steps))
        self.target_calls += target_calls.sum().item()
        self.drafted_steps += drafted_steps.sum().item()
        self.accepted_steps += accepted_steps.sum().item()
        self.lists += target_calls.numel()

    def compute(self) -> dict[str, float]:
        lists = self.lists.item()
        per_list = (lambda total: total.item() / lists if lists else float("nan"))
        drafted = self.drafted_steps.item()
        return {
            "acceptance_rate": self.accepted_steps.item() / drafted if drafted else 0.0,
            "target_calls_per_list": per_list(self.target_calls),
            "drafted_steps_per_list": per_list(self.drafted_steps),
            "accepted_steps_per_list": per_list(self.accepted_steps),
        }
