"""Sampling pieces shared by beam sampling, the relaxed drafts and the verification rules (torch only): Gumbel
noise, successive sampling over all beams' continuations, and the per-row top-k warper of the public AtSpeed code.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def gumbel(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise: -log E with E ~ Exp(1) (4 ops; -log(-log U) takes 6). Drawn on the generator's device
    and moved to ``device``."""
    exponential = torch.empty(shape, device=generator.device).exponential_(generator=generator)
    return -torch.log(exponential.clamp(min=torch.finfo(exponential.dtype).tiny)).to(device)


def sample_top_k(
    beam_scores: torch.Tensor, step_log_probs: torch.Tensor, num_samples: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``num_samples`` continuations drawn without replacement from softmax over all beams' continuations
    (Gumbel-top-k = successive sampling), in draw order; the sampling counterpart of ``select_top_k``.

    beam_scores: ``[B, M]``; step_log_probs: ``[B, M, S]``. Returns (true cumulative scores ``[B, n]``, parent beam
    ``[B, n]``, local code ``[B, n]``); -inf scores where fewer continuations exist.
    """
    batch, beams, size = step_log_probs.shape
    total = (beam_scores[:, :, None] + step_log_probs).reshape(batch, beams * size)  # [B, M*S]
    if total.shape[1] < num_samples:
        total = torch.cat([total, total.new_full((batch, num_samples - total.shape[1]), NEG_INF)], dim=1)
    keys = total + gumbel(tuple(total.shape), generator, total.device)
    flat = keys.topk(num_samples, dim=1).indices  # sorted by key: the draw order
    scores = total.gather(1, flat)
    flat = flat.clamp(max=beams * size - 1)
    return scores, flat // size, flat % size


def top_k_warp(step_log_probs: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """transformers' ``TopKLogitsWarper`` as the public AtSpeed code applies it: per beam row, on the STEP
    log-probs (after the trie mask, before the beam's cumulative score is added), every code scoring below the row's
    k-th best becomes -inf (ties with the k-th are kept; rows with <= k allowed codes are unchanged). Kept values
    are not renormalised.

    step_log_probs: ``[..., S]``; ``top_k`` None: no warper. Returns the same shape.
    """
    if top_k is None or top_k >= step_log_probs.shape[-1]:
        return step_log_probs
    kth = step_log_probs.topk(top_k, dim=-1).values[..., -1:]  # [..., 1]
    return step_log_probs.masked_fill(step_log_probs < kth, NEG_INF)
