"""Recommendation lists for many users, and their accuracy.

``generate_lists`` batches users by prompt length (less padding), runs the target-only beam search and returns
the lists in the users' original order. It is the baseline every speculative run is compared with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from atspeed_exp.decoding.beam_search import beam_search, left_pad
from atspeed_exp.decoding.protocol import DecoderLM
from atspeed_exp.decoding.trie import ItemTrie
from atspeed_exp.metrics import most_popular_lists, pad_ground_truth, recall_ndcg


@dataclass
class GeneratedLists:
    items: torch.Tensor  # [U, K]
    scores: torch.Tensor  # [U, K]
    model_calls: int
    walltime_s: float


def generate_lists(
    model: DecoderLM,
    prompts: list[list[int]],
    trie: ItemTrie,
    num_beams: int,
    pad_id: int,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "beam search",
) -> GeneratedLists:
    """Target-only beam search for every prompt, ``batch_size`` users per call."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    items = torch.full((len(prompts), num_beams), -1, dtype=torch.long)
    scores = torch.full((len(prompts), num_beams), float("-inf"))
    calls = 0
    start = time.perf_counter()
    for first in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
        rows = order[first : first + batch_size]
        ids, mask = left_pad([torch.tensor(prompts[i], dtype=torch.long) for i in rows], pad_id)
        out = beam_search(model, ids.to(model.device), mask.to(model.device), trie, num_beams)
        items[rows] = out.items.cpu()
        scores[rows] = out.scores.cpu()
        calls += out.model_calls
    return GeneratedLists(items, scores, calls, time.perf_counter() - start)


def accuracy(items: torch.Tensor, ground_truth: list[tuple[int, ...]], cutoffs: tuple[int, ...]) -> dict[str, float]:
    return recall_ndcg(items, pad_ground_truth(ground_truth), cutoffs)


def most_popular_accuracy(
    popularity: torch.Tensor, ground_truth: list[tuple[int, ...]], cutoffs: tuple[int, ...]
) -> dict[str, float]:
    lists = most_popular_lists(popularity, len(ground_truth), max(cutoffs))
    return accuracy(lists, ground_truth, cutoffs)
