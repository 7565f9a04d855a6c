"""DARE's relaxed verification for top-K beams (``mode="dare"``; after DARE/LASER, Xi et al., arXiv 2408.05676):
a drafted continuation passes when the target ranks it among its top-k continuations AND gives it at least a
threshold of probability; a depth passes when at least K drafted continuations pass. Deterministic (no sampling):
drafts are the drafter's top-N beams and the target's own step is its top-K, as in strict mode, which this rule
reduces to with k = K and threshold 0."""

from __future__ import annotations

import math

import torch

from atspeed_exp.decoding.sampling import NEG_INF


def dare_select(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    candidates: torch.Tensor,
    num_beams: int,
    generator: torch.Generator | None = None,
    *,
    step_log_p: torch.Tensor,
    dare_top_k: int | None = None,
    dare_threshold: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DARE's relaxed verification of one drafted depth.

    log_p: ``[B, C]`` the target's normalised log-probs (-inf: impossible) over the C flattened (accepted beam, code)
    continuations, i.e. the softmax of their cumulative log-probs, so its order is beam search's ranking.
    step_log_p: ``[B, C]`` the target's step log-prob log p(code | beam's prefix) of each continuation.
    candidates: ``[B, R]`` flat indices into C of the drafted continuations of accepted beams (-1: none).
    log_q and generator are unused (the rule's convention, ``verify.common``).

    With k = ``dare_top_k`` (None: 2K; must be >= K) and tau = ``dare_threshold`` in [0, 1], a candidate c passes iff
        log_p[c] >= the k-th largest log_p of the row (ties with the k-th pass)  and  exp(step_log_p[c]) >= tau
    and c is possible. The threshold is on the step probability (the token's probability under the target, as DARE
    thresholds tokens), not on log_p, whose values shrink as K beams share its mass. With need = min(K, number of
    possible continuations), the depth passes iff at least ``need`` candidates pass; the chosen beams are then the
    K passing ones with the highest log_p (placeholders past the passing ones). Otherwise the chosen beams are the
    target's own top-K (its beam-search step; the round ends there).

    Returns (chosen ``[B, K]`` flat indices, alive ``[B, K]`` False for placeholders, accepted ``[B]``: K when the
    depth passes, else the number of passing candidates (< K)), the convention of the other rules.
    """
    batch, width = log_p.shape
    k = 2 * num_beams if dare_top_k is None else dare_top_k
    if k < num_beams:
        raise ValueError(f"dare_top_k={k} must be >= K={num_beams} (a depth needs K passing continuations)")
    if not 0.0 <= dare_threshold <= 1.0:
        raise ValueError(f"dare_threshold={dare_threshold} must be a probability in [0, 1]")
    possible = torch.isfinite(log_p)
    kth = log_p.topk(min(k, width), dim=1).values[:, -1:]  # [B, 1]
    ok = possible & (log_p >= kth)
    if dare_threshold > 0:
        ok &= step_log_p >= math.log(dare_threshold)
    slot = torch.where(candidates >= 0, candidates, width)  # no candidate: a dummy column
    drafted = torch.zeros(batch, width + 1, dtype=torch.bool, device=log_p.device).scatter(1, slot, True)[:, :-1]
    passed = ok & drafted  # [B, C]
    count = passed.sum(1)
    need = possible.sum(1).clamp(max=num_beams)
    depth_passes = count >= need
    key = torch.where(depth_passes[:, None] & ~passed, NEG_INF, log_p)  # passing: the passing ones only
    if width < num_beams:  # fewer continuations than beams: pad with impossible ones
        key = torch.cat([key, key.new_full((batch, num_beams - width), NEG_INF)], 1)
    values, chosen = key.topk(num_beams, dim=1)
    alive = torch.isfinite(values) & (chosen < width)
    return chosen.clamp(max=width - 1), alive, torch.where(depth_passes, num_beams, count)
