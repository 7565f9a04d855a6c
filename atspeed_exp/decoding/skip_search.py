"""Which sublayers the layer-skip drafter skips (``drafters/layer_skip.py``): a greedy search on validation prompts,
torch only.

Cost model. The time of one list is estimated in units of one target call:

    objective(S) = (T(S) + kept(S) x D(S)) / lists,    kept(S) = 1 - |S| / (2 x layers)

where T and D are the target calls and draft calls the lists took with skip set S (``ListStats``, per list: the
same at any batch size), and a draft call costs the share of the target's 2 x layers sublayers (attention and MLP
blocks) it runs. The embedding, final norm and output head, the tree bookkeeping and the batch's width are left out,
so a draft that skips everything is free and a draft that skips nothing costs a target call; on a real device the
cost of a call is not linear in the sublayers run, so this is the search's guide, not a timing (Draft & Verify,
arXiv 2309.08168, optimises the same kind of ratio with Bayesian optimisation).

Search. Starting from the empty set, each step measures every set that skips one more sublayer and moves to the best
one if it lowers the objective (ties: the first in an order shuffled by ``seed``); it stops when none does, or at
``max_skipped``. The set that skips every sublayer is measured as well and wins if it is lower still, so the result
is never above the empty set's or the full set's objective. Every measurement decodes the same prompts (the sampling
rules with a generator reseeded with ``seed`` for each), so the result is a function of the prompts and the settings.
A layer count of ``n`` costs at most (2n)(2n + 1)/2 + 1 measurements (37 at four layers).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import IO

import torch

from atspeed_exp.decoding.beam_search import left_pad
from atspeed_exp.decoding.drafters.layer_skip import LayerSkipDrafter, SkippableLM
from atspeed_exp.decoding.speculative import speculative_beam_search
from atspeed_exp.decoding.trie import ItemTrie

log = logging.getLogger(__name__)

SUBLAYERS = ("attention", "mlp")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Measure:
    """One skip set's figures on the search prompts (per list)."""

    skip_attention: tuple[int, ...]
    skip_mlp: tuple[int, ...]
    kept: float  # share of sublayers the draft runs
    target_calls: float  # T / lists
    draft_calls: float  # D / lists
    acceptance_rate: float  # accepted / drafted steps over all lists
    objective: float  # target_calls + kept x draft_calls


@dataclass
class SkipSearchResult:
    """The chosen set (its ``Measure``) and every measurement in the order made (``trace``; ``step``: the greedy
    step it belongs to, -1 for the full set)."""

    best: Measure
    trace: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def skip_attention(self) -> tuple[int, ...]:
        return self.best.skip_attention

    @property
    def skip_mlp(self) -> tuple[int, ...]:
        return self.best.skip_mlp

    def state(self) -> dict:
        return {"format": FORMAT_VERSION, "best": asdict(self.best), "trace": self.trace, "settings": self.settings}

    def save(self, file: IO[str]) -> None:
        json.dump(self.state(), file, indent=1)

    @classmethod
    def from_state(cls, state: dict) -> SkipSearchResult:
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"skip-search result of format {state.get('format')}, expected {FORMAT_VERSION}")
        best = state["best"]
        best = Measure(**{**best, "skip_attention": tuple(best["skip_attention"]),
                          "skip_mlp": tuple(best["skip_mlp"])})
        return cls(best, state["trace"], state["settings"])


def _row(step: int, measure: Measure) -> dict:
    """A trace entry as JSON keeps it (lists, not tuples)."""
    row = asdict(measure)
    return {"step": step, **row, "skip_attention": list(row["skip_attention"]), "skip_mlp": list(row["skip_mlp"])}


def measure_skip_set(
    target: SkippableLM,
    skip: frozenset[tuple[str, int]],  # (sublayer kind: "attention" | "mlp", layer index)
    prompts: list[torch.Tensor],  # per list [P_b] token ids
    trie: ItemTrie,
    pad_id: int,
    num_beams: int,  # K
    draft_beams: int,  # N
    gamma: int,
    mode: str = "strict",
    seed: int = 0,
    batch_size: int = 16,
    scope: str = "vocab",
) -> Measure:
    """The cost model's figures for skip set ``skip`` (module docstring)."""
    drafter = LayerSkipDrafter(target, [i for kind, i in skip if kind == "attention"],
                               [i for kind, i in skip if kind == "mlp"])
    generator = torch.Generator(device=target.device).manual_seed(seed) if mode != "strict" else None
    target_calls = draft_calls = drafted = accepted = 0
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start:start + batch_size], pad_id=pad_id)
        out = speculative_beam_search(target, drafter, ids.to(target.device), mask.to(target.device), trie, num_beams,
                                      draft_beams, gamma, mode=mode, generator=generator, scope=scope)
        target_calls += sum(out.lists.target_calls)
        draft_calls += sum(out.lists.draft_calls)
        drafted += sum(out.lists.drafted_steps)
        accepted += sum(out.lists.accepted_steps)
    lists, kept = len(prompts), drafter.kept_fraction
    return Measure(drafter.skip_attention, drafter.skip_mlp, kept, target_calls / lists, draft_calls / lists,
                   accepted / drafted if drafted else float("nan"),
                   (target_calls + kept * draft_calls) / lists)


def search_skip_set(
    target: SkippableLM,
    prompts: list[torch.Tensor],
    trie: ItemTrie,
    pad_id: int,
    num_beams: int,
    draft_beams: int,
    gamma: int,
    mode: str = "strict",
    seed: int = 0,
    max_skipped: int | None = None,  # most sublayers skipped by the greedy steps (None: up to all but one)
    batch_size: int = 16,
    scope: str = "vocab",
) -> SkipSearchResult:
    """Greedy skip-set search minimising the estimated time per list (module docstring)."""
    if not prompts:
        raise ValueError("the skip-set search needs at least one prompt")
    settings = {"num_beams": num_beams, "draft_beams": draft_beams, "gamma": gamma, "mode": mode, "seed": seed,
                "max_skipped": max_skipped, "scope": scope, "prompts": len(prompts)}

    every = [(kind, i) for kind in SUBLAYERS for i in range(target.num_layers)]
    bound = len(every) * (len(every) + 1) // 2 + 1  # measurements at most (module docstring)
    done, start = [0], time.perf_counter()

    def run(skip: frozenset[tuple[str, int]]) -> Measure:
        measure = measure_skip_set(target, skip, prompts, trie, pad_id, num_beams, draft_beams, gamma, mode, seed,
                                   batch_size, scope)
        done[0] += 1
        log.info("skip-set search: measurement %d (at most %d, %.0fs so far): skip attention %s, mlp %s -> "
                 "objective %.3f (target calls %.2f, draft calls %.2f, acceptance %.3f)", done[0], bound,
                 time.perf_counter() - start, list(measure.skip_attention), list(measure.skip_mlp),
                 measure.objective, measure.target_calls, measure.draft_calls, measure.acceptance_rate)
        return measure

    order = [every[i] for i in torch.randperm(len(every), generator=torch.Generator().manual_seed(seed)).tolist()]
    limit = len(every) - 1 if max_skipped is None else min(max_skipped, len(every) - 1)
    current: frozenset[tuple[str, int]] = frozenset()
    best = run(current)
    trace = [_row(0, best)]
    step = 0
    while len(current) < limit:
        step += 1
        candidates = [(run(current | {sub}), current | {sub}) for sub in order if sub not in current]
        trace += [_row(step, measure) for measure, _ in candidates]
        measure, chosen = min(candidates, key=lambda pair: pair[0].objective)  # min keeps the first of equals
        if measure.objective >= best.objective:
            break
        best, current = measure, chosen
    full = run(frozenset(every))
    trace.append(_row(-1, full))
    if full.objective < best.objective:
        best = full
    return SkipSearchResult(best, trace, settings)
