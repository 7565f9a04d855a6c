"""Recommendation lists for many users, and their accuracy.

``generate_lists`` batches users by prompt length (less padding), runs the target-only beam search and returns
the lists in the users' original order. The target-only search is ``tree_beam_search`` (one cache row per user,
tree attention: the same lists as ``beam_search`` without cache copies, 1.2-2.9x faster on the CPU), the baseline
every speculative run is compared with. With ``sharded=True`` under torch.distributed, rank r decodes the batches
b with b % W == r of the batches one process would decode, and the ranks exchange their lists
(``atspeed_exp.distributed``), so every rank returns the one-process lists and counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from atspeed_exp import distributed
from atspeed_exp.decoding.beam_search import left_pad
from atspeed_exp.decoding.drafters import Drafter
from atspeed_exp.decoding.processors import CFAssistant, ScoreProcessor
from atspeed_exp.decoding.protocol import DecoderLM
from atspeed_exp.decoding.speculative import speculative_beam_search
from atspeed_exp.decoding.tree import tree_beam_search
from atspeed_exp.decoding.trie import ItemTrie
from atspeed_exp.metrics import pad_ground_truth, recall_ndcg, recall_ndcg_per_user
from atspeed_exp.metrics.bootstrap import bootstrap_interval, list_overlap
from atspeed_exp.progress import progress as bar


@dataclass
class GeneratedLists:
    items: torch.Tensor  # [U, K]
    scores: torch.Tensor  # [U, K]
    model_calls: int
    walltime_s: float
    # per list, in the users' order (speculative runs only): target calls, drafted and accepted steps
    target_calls: torch.Tensor | None = None  # [U] long
    drafted_steps: torch.Tensor | None = None  # [U] long
    accepted_steps: torch.Tensor | None = None  # [U] long


def generate_lists(
    model: DecoderLM,
    prompts: list[list[int]],
    trie: ItemTrie,
    num_beams: int,
    pad_id: int,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "beam search",
    draft: DecoderLM | Drafter | None = None,
    draft_beams: int = 40,
    gamma: int = 3,
    verify_beams: int | None = None,
    scope: str = "vocab",
    prune: bool = True,
    mode: str = "strict",
    generator: torch.Generator | None = None,
    official_top_k: int | None = 50,
    verify_options: Mapping[str, Any] | None = None,
    processors: Sequence[ScoreProcessor] = (),
    sharded: bool = False,
) -> GeneratedLists:
    """Top-K lists for every prompt, ``batch_size`` users per call: target-only beam search, or with ``draft`` (a
    draft model or any drafter) batched speculative beam search in ``mode`` (strict: the same lists, fewer target
    calls; the sampling modes need ``generator``; ``verify_options``: the relaxed rules' settings;
    ``processors``: score processors of the target's step scores, beam search and verification alike);
    ``model_calls`` counts target calls per list summed over the lists, and speculative runs also return each
    list's target calls, drafted and accepted steps.

    ``sharded``: split the batches over the torch.distributed ranks (module docstring); only for passes whose
    batches are independent (``order_independent``), since a rank does not see the batches before its own.
    ``walltime_s`` is then the slowest rank's."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[first : first + batch_size] for first in range(0, len(order), batch_size)]
    mine = distributed.my_units(len(batches)) if sharded else list(range(len(batches)))
    items = torch.full((len(prompts), num_beams), -1, dtype=torch.long)
    scores = torch.full((len(prompts), num_beams), float("-inf"))
    per_list = torch.zeros((3, len(prompts)), dtype=torch.long)  # target calls, drafted, accepted
    calls = 0
    start = time.perf_counter()
    for index in bar(mine, desc=desc, enabled=progress, unit="batch"):
        rows = batches[index]
        ids, mask = left_pad([torch.tensor(prompts[i], dtype=torch.long) for i in rows], pad_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        if draft is None:
            out = tree_beam_search(model, ids, mask, trie, num_beams, scope=scope, processors=processors)
            calls += out.model_calls * len(rows)
        else:
            out = speculative_beam_search(model, draft, ids, mask, trie, num_beams, draft_beams, gamma,
                                          verify_beams=verify_beams, scope=scope, prune=prune, mode=mode,
                                          generator=generator, official_top_k=official_top_k,
                                          verify_options=verify_options, processors=processors)
            calls += sum(out.lists.target_calls)
            per_list[:, rows] = torch.tensor([out.lists.target_calls, out.lists.drafted_steps,
                                              out.lists.accepted_steps], dtype=torch.long)
        items[rows] = out.items.cpu()
        scores[rows] = out.scores.cpu()
    elapsed = time.perf_counter() - start
    if sharded and distributed.rank_and_world()[1] > 1:
        done = [row for index in mine for row in batches[index]]
        parts = distributed.gather_objects((done, items[done], scores[done], per_list[:, done], calls, elapsed))
        for rows, part_items, part_scores, part_counts, _, _ in parts:
            items[rows], scores[rows], per_list[:, rows] = part_items, part_scores, part_counts
        calls = sum(part[4] for part in parts)
        elapsed = max(part[5] for part in parts)
    if draft is None:
        return GeneratedLists(items, scores, calls, elapsed)
    return GeneratedLists(items, scores, calls, elapsed, *per_list)


def fresh(draft: DecoderLM | Drafter) -> DecoderLM | Drafter:
    """A drafter that has learned nothing from earlier lists (``Drafter.fresh``; a draft model as it is): every
    pass of an evaluation (a mode at a K) starts from one, so no pass drafts from what another saw of its users."""
    return draft.fresh() if isinstance(draft, Drafter) else draft


def order_independent(mode: str, draft: DecoderLM | Drafter) -> bool:
    """Whether a speculative pass gives each batch the same lists and counts whichever batches ran before it: strict
    verification (the sampling rules draw from one generator across batches) with a drafter that learns nothing
    across calls. Only such passes are split over processes."""
    return mode == "strict" and not (isinstance(draft, Drafter) and draft.learns_across_calls)


def accuracy(items: torch.Tensor, ground_truth: list[tuple[int, ...]], cutoffs: tuple[int, ...]) -> dict[str, float]:
    return recall_ndcg(items, pad_ground_truth(ground_truth), cutoffs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_speculative(
    target: DecoderLM,
    draft: DecoderLM | Drafter,
    prompts: list[list[int]],
    ground_truth: list[tuple[int, ...]],
    trie: ItemTrie,
    modes: tuple[str, ...] = ("strict",),
    ks: tuple[int, ...] = (10,),
    draft_beams: int = 40,
    gamma: int = 3,
    cutoffs: tuple[int, ...] = (5, 10, 20),
    warmup: int = 2,
    seed: int = 0,
    progress: bool = True,
    prefix: str = "eval",
    verify_beams: int | None = None,
    scope: str = "vocab",
    batch_size: int | None = None,
    pad_id: int = 0,
    prune: bool = True,
    official_top_k: int | None = 50,
    verify_options: Mapping[str, Any] | None = None,
    processors: Sequence[ScoreProcessor] = (),
) -> dict[str, float]:
    """Speculative beam search with ``draft`` (a draft model or any drafter) against our best target-only beam search (``tree_beam_search``), user
    by user (batch 1, as the paper measures), in the same call on the same users, so the speedup compares like with
    like.

    For each K in ``ks`` and each mode, returns ``{prefix}/{mode}/k{K}/...``: ``acceptance_rate`` (accepted / drafted
    steps over all lists), ``target_calls_per_list``, ``draft_calls_per_list``, ``target_tokens_per_list``,
    ``draft_tokens_per_list``, ``walltime_s`` (mean per list), ``speedup`` (baseline total / SD total) and
    ``speedup_mean_ratio`` (mean of per-list ratios, the paper's form), ``recall@n``/``ndcg@n`` (n <= K); and for
    the baseline ``{prefix}/beam/k{K}/walltime_s``, ``recall@n``, ``ndcg@n``. The first ``warmup`` users are decoded
    once untimed (first-call allocations and kernel selection). ``verify_beams`` (M) and ``scope`` go to both
    decoders (``scope``) or SD (M); ``official_top_k`` to SD in mode relaxed_official (its top-k warper) and
    ``verify_options`` to the relaxed rules (dare_top_k, dare_threshold); ``processors`` (score processors) to
    beam search and SD's verification alike.

    With ``batch_size``: also the throughput of the same users decoded ``batch_size`` at a time, target-only beam
    search (``{prefix}/beam/k{K}/throughput_lists_per_s``) against batched strict SD
    (``{prefix}/strict/k{K}/throughput_lists_per_s``, ``throughput_speedup``, ``batched_mismatches``: lists that
    differ from beam search's, 0 unless something is broken).
    """
    device = target.device
    tensors = [torch.tensor(p, dtype=torch.long, device=device)[None] for p in prompts]
    masks = [torch.ones_like(t, dtype=torch.bool) for t in tensors]
    metrics: dict[str, float] = {}

    def decode(index: int, k: int, drafters: dict[str, DecoderLM | Drafter]) -> tuple[float, Any, dict[str, Any]]:
        """One user at K: beam search's time and lists, then each mode's (time, output)."""
        ids, mask = tensors[index], masks[index]
        _sync(device)
        start = time.perf_counter()
        base = tree_beam_search(target, ids, mask, trie, k, scope=scope, processors=processors)
        _sync(device)
        base_time = time.perf_counter() - start
        runs = {}
        for mode in modes:
            # on the decoding device: random numbers made where they are used need no host round trip
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
            start = time.perf_counter()
            out = speculative_beam_search(target, drafters[mode], ids, mask, trie, k, draft_beams=draft_beams,
                                          gamma=gamma, mode=mode, generator=generator,
                                          verify_beams=verify_beams, scope=scope, prune=prune,
                                          official_top_k=official_top_k, verify_options=verify_options,
                                          processors=processors)
            _sync(device)
            runs[mode] = (time.perf_counter() - start, out)
        return base_time, base, runs

    for k in ks:
        base_times: list[float] = []
        base_items: list[torch.Tensor] = []
        sd = {m: {"times": [], "items": [], "stats": []} for m in modes}
        warm = {mode: fresh(draft) for mode in modes}
        for index in range(min(warmup, len(prompts))):  # untimed and outside the progress count (measured users)
            decode(index, k, warm)
        drafters = {mode: fresh(draft) for mode in modes}  # the measured lists start from drafters that learned nothing
        for index in bar(range(len(prompts)), desc=f"speculative eval K={k}", enabled=progress, unit="user"):
            base_time, base, runs = decode(index, k, drafters)
            base_times.append(base_time)
            base_items.append(base.items[0].cpu())
            for mode, (elapsed, out) in runs.items():
                sd[mode]["times"].append(elapsed)
                sd[mode]["items"].append(out.items[0].cpu())
                sd[mode]["stats"].append(out.stats)
        ks_cutoffs = tuple(n for n in cutoffs if n <= k)
        base_total = sum(base_times)
        metrics[f"{prefix}/beam/k{k}/walltime_s"] = base_total / len(base_times)
        for name, value in accuracy(torch.stack(base_items), ground_truth, ks_cutoffs).items():
            metrics[f"{prefix}/beam/k{k}/{name}"] = value
        for mode in modes:
            stats, times = sd[mode]["stats"], sd[mode]["times"]
            key = f"{prefix}/{mode}/k{k}"
            drafted = sum(s.drafted_steps for s in stats)
            metrics[f"{key}/acceptance_rate"] = sum(s.accepted_steps for s in stats) / drafted if drafted else 0.0
            for field, name in (("target_calls", "target_calls_per_list"), ("draft_calls", "draft_calls_per_list"),
                                ("target_tokens", "target_tokens_per_list"), ("draft_tokens", "draft_tokens_per_list")):
                metrics[f"{key}/{name}"] = sum(getattr(s, field) for s in stats) / len(stats)
            for phase in ("draft", "verify", "accept", "other"):
                metrics[f"{key}/{phase}_time_s"] = sum(getattr(s, f"{phase}_time_s") for s in stats) / len(stats)
            metrics[f"{key}/walltime_s"] = sum(times) / len(times)
            metrics[f"{key}/speedup"] = base_total / sum(times)
            metrics[f"{key}/speedup_mean_ratio"] = sum(b / s for b, s in zip(base_times, times)) / len(times)
            for name, value in accuracy(torch.stack(sd[mode]["items"]), ground_truth, ks_cutoffs).items():
                metrics[f"{key}/{name}"] = value
        if batch_size and "strict" in modes:  # batched throughput is measured for strict SD only
            runs = {}
            for name, with_draft in (("beam", None), ("strict", fresh(draft))):
                _sync(device)
                runs[name] = generate_lists(target, prompts, trie, k, pad_id, batch_size, progress=False,
                                            draft=with_draft, draft_beams=draft_beams, gamma=gamma,
                                            verify_beams=verify_beams, scope=scope, prune=prune,
                                            processors=processors)
            for name, run in runs.items():
                metrics[f"{prefix}/{name}/k{k}/throughput_lists_per_s"] = len(prompts) / run.walltime_s
            metrics[f"{prefix}/strict/k{k}/throughput_speedup"] = runs["beam"].walltime_s / runs["strict"].walltime_s
            metrics[f"{prefix}/strict/k{k}/batched_target_calls_per_list"] = runs["strict"].model_calls / len(prompts)
            metrics[f"{prefix}/strict/k{k}/batched_mismatches"] = float(
                (runs["strict"].items != runs["beam"].items).any(1).sum())
    return metrics


def _with_interval(metrics: dict[str, float], key: str, values: torch.Tensor, denominators: torch.Tensor | None,
                   resamples: int, seed: int) -> None:
    """``key`` = the statistic over all users, ``key_lo95`` / ``key_hi95`` = its 95% bootstrap interval."""
    if denominators is None:
        metrics[key] = float(values.double().mean()) if values.numel() else float("nan")
    else:
        total = float(denominators.sum())
        metrics[key] = float(values.sum()) / total if total else float("nan")
    if resamples:
        metrics[f"{key}_lo95"], metrics[f"{key}_hi95"] = bootstrap_interval(values, denominators, resamples,
                                                                            seed=seed)


def evaluate_all_users(
    target: DecoderLM,
    draft: DecoderLM | Drafter,
    prompts: list[list[int]],
    ground_truth: list[tuple[int, ...]],
    trie: ItemTrie,
    pad_id: int,
    modes: tuple[str, ...] = ("strict",),
    ks: tuple[int, ...] = (10,),
    cutoffs: tuple[int, ...] = (5, 10, 20),
    batch_size: int = 64,
    draft_beams: int = 40,
    gamma: int = 3,
    verify_beams: int | None = None,
    scope: str = "vocab",
    prune: bool = True,
    seed: int = 0,
    resamples: int = 1000,
    progress: bool = True,
    prefix: str = "eval/all",
    official_top_k: int | None = 50,
    verify_options: Mapping[str, Any] | None = None,
    batch1_users: int = 0,
    processors: Sequence[ScoreProcessor] = (),
    beam_lists: Callable[[int, Callable[[], torch.Tensor]], torch.Tensor] | None = None,
    sharded: bool = False,
) -> dict[str, float]:
    """Hardware-independent figures on every given user, decoded ``batch_size`` users per call (the batched
    engine gives each list its own counts), with 95% bootstrap intervals over users (``resamples`` resamples;
    0 = none).

    For each K and the target-only beam search: ``{prefix}/beam/k{K}/recall@n``, ``ndcg@n`` (n <= K). For each
    speculative mode also ``target_calls_per_list``, ``acceptance_rate`` (accepted / drafted steps, summed over
    users), ``overlap`` (mean |SD list ∩ beam-search list| / K: 1 for strict verification), ``recall@n`` /
    ``ndcg@n`` and ``recall@n_change`` / ``ndcg@n_change`` (mean per-user difference to beam search: the accuracy a
    relaxed rule gives up or gains), and ``mismatches`` (lists that differ from beam search's as sets of items).
    Every figure carries ``_lo95`` / ``_hi95``. Relaxed modes draw from one generator seeded by ``seed``;
    ``official_top_k`` is relaxed_official's warper, ``verify_options`` the relaxed rules' settings, ``processors``
    the score processors of every decoder here.

    Batch invariance: a batched list can differ from the same user's batch-1 list where two items' scores tie to
    floating-point precision (padding changes the order of the sums). With ``batch1_users`` = n > 0 the first n
    users' target beam search is also run one user per call, and ``{prefix}/beam/k{K}/batch1_mismatches`` counts
    the users whose batched list differs from it (as an ordered list), out of ``{prefix}/beam/k{K}/batch1_users``.

    ``beam_lists(K, decode)``: where the target-only lists come from, e.g. a cache that calls ``decode()`` (the
    batched beam search here, items [U, K]) only when it holds no lists for these users at K.

    ``sharded``: under torch.distributed, the target-only passes and the ``order_independent`` speculative passes
    are split over the ranks by batch (``generate_lists``) and their lists gathered, so every rank computes the
    figures of one process from the same per-user lists and counts; the other passes (sampling rules, a drafter
    that learns across calls) and the batch-1 check run whole on every rank.
    """
    truth = pad_ground_truth(ground_truth)
    has_truth = (truth >= 0).any(1)  # users that count for accuracy
    metrics: dict[str, float] = {f"{prefix}/num_users": float(len(prompts))}
    for k in ks:
        ks_cutoffs = tuple(n for n in cutoffs if n <= k)
        settings = dict(batch_size=batch_size, progress=progress, scope=scope, processors=processors)

        def decode(k: int = k) -> torch.Tensor:
            return generate_lists(target, prompts, trie, k, pad_id, desc=f"all users beam K={k}", sharded=sharded,
                                  **settings).items

        beam_items = decode() if beam_lists is None else beam_lists(k, decode)  # [U, K]
        beam_acc = recall_ndcg_per_user(beam_items, truth, ks_cutoffs)
        for name, values in beam_acc.items():
            _with_interval(metrics, f"{prefix}/beam/k{k}/{name}", values, None, resamples, seed)
        if batch1_users > 0:
            single = generate_lists(target, prompts[:batch1_users], trie, k, pad_id, batch_size=1, progress=progress,
                                    desc=f"batch-1 beam K={k}", scope=scope, processors=processors)
            differ = (single.items != beam_items[: len(single.items)]).any(1)
            metrics[f"{prefix}/beam/k{k}/batch1_mismatches"] = float(differ.sum())
            metrics[f"{prefix}/beam/k{k}/batch1_users"] = float(len(single.items))
        for mode in modes:
            generator = torch.Generator(device=target.device).manual_seed(seed * 1_000_003 + k)
            run = generate_lists(target, prompts, trie, k, pad_id, desc=f"all users {mode} K={k}", draft=fresh(draft),
                                 draft_beams=draft_beams, gamma=gamma, verify_beams=verify_beams, prune=prune,
                                 mode=mode, generator=generator, official_top_k=official_top_k,
                                 verify_options=verify_options, sharded=sharded and order_independent(mode, draft),
                                 **settings)
            key = f"{prefix}/{mode}/k{k}"
            _with_interval(metrics, f"{key}/target_calls_per_list", run.target_calls, None, resamples, seed)
            _with_interval(metrics, f"{key}/acceptance_rate", run.accepted_steps, run.drafted_steps, resamples, seed)
            overlap = list_overlap(run.items, beam_items)
            _with_interval(metrics, f"{key}/overlap", overlap, None, resamples, seed)
            metrics[f"{key}/mismatches"] = float((overlap < 1).sum())
            acc = recall_ndcg_per_user(run.items, truth, ks_cutoffs)
            for name, values in acc.items():
                _with_interval(metrics, f"{key}/{name}", values, None, resamples, seed)
                _with_interval(metrics, f"{key}/{name}_change", values - beam_acc[name], None, resamples, seed)
        metrics[f"{prefix}/k{k}/users_with_truth"] = float(has_truth.sum())
    return metrics


def tune_cf_weight(
    model: DecoderLM,
    prompts: list[list[int]],
    ground_truth: list[tuple[int, ...]],
    trie: ItemTrie,
    source: Any,
    weights: Sequence[float],
    k: int,
    pad_id: int,
    batch_size: int = 64,
    scope: str = "vocab",
    epsilon: float = 1e-8,
) -> tuple[float, dict[float, float]]:
    """Recall@``k`` of beam search with the ``cf_assistant`` processor (``source``: its item probabilities) at each
    weight g of the grid ``weights``, on the given (validation) users; returns (the best g, {g: recall@k}). Ties go
    to the larger g (the LLM's own scores win unless the assistant helps)."""
    recall = {}
    for weight in weights:
        lists = generate_lists(model, prompts, trie, k, pad_id, batch_size=batch_size, progress=False, scope=scope,
                               processors=[CFAssistant(weight, source, epsilon)])
        recall[float(weight)] = accuracy(lists.items, ground_truth, (k,))[f"recall@{k}"]
    best = max(recall, key=lambda g: (recall[g], g))
    return best, recall
