"""Pieces shared by the relaxed verification rules of one drafted depth (torch only).

Convention of every rule: ``log_p``, ``log_q`` ``[B, C]`` log-probs (-inf: impossible) over the C flattened
(accepted beam, code) continuations, under the target (P) and the draft's sampling distribution (Q, as the rule
defines it); ``candidates`` ``[B, R]`` flat indices into C of the draft's samples (-1: none). A rule returns
(chosen ``[B, K]`` flat indices, alive ``[B, K]`` False for placeholders, accepted ``[B]``: K when the depth is
accepted, else how many of the chosen beams came from the draft).
"""

from __future__ import annotations

import torch

from atspeed_exp.decoding.sampling import NEG_INF, gumbel


def pad_columns(log_p: torch.Tensor, log_q: torch.Tensor, num_beams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fewer continuations than beams: pad both ``[B, C]`` with impossible ones up to ``num_beams`` columns."""
    batch, width = log_p.shape
    if width >= num_beams:
        return log_p, log_q
    pad = log_p.new_full((batch, num_beams - width), NEG_INF)
    return torch.cat([log_p, pad], 1), torch.cat([log_q, pad], 1)


def accept_each(
    log_p: torch.Tensor, log_q: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Every candidate c the draft could have drawn (Q(c) > 0) is accepted on its own with probability
    min(1, P(c) / Q(c)): one uniform per candidate slot ``[B, R]``. Returns the accepted continuations as a mask
    ``[B, C]`` (P(c) = 0: never; duplicated candidates are harmless)."""
    batch, columns = log_p.shape
    safe = candidates.clamp(min=0)
    lp_c, lq_c = log_p.gather(1, safe), log_q.gather(1, safe)  # [B, R]
    exists = (candidates >= 0) & torch.isfinite(lq_c)
    uniform = torch.rand(tuple(candidates.shape), generator=generator, device=generator.device)
    accept_c = exists & (torch.log(uniform.to(log_p.device)) < lp_c - lq_c)
    slot = torch.where(accept_c, safe, columns)  # rejected ones to a dummy column
    accepted = torch.zeros(batch, columns + 1, dtype=torch.bool, device=log_p.device)
    return accepted.scatter(1, slot, True)[:, :-1]


def log_residual(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """log max(P - Q, 0) ``[B, C]`` without cancellation or underflow: log P + log(1 - Q / P) where Q < P."""
    positive = torch.isfinite(log_p) & (log_q < log_p)
    return torch.where(
        positive, log_p + torch.log(-torch.expm1(torch.where(positive, log_q - log_p, -1.0))), NEG_INF
    )


def keep_accepted_then_fill(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    accepted: torch.Tensor,
    width: int,
    num_beams: int,
    generator: torch.Generator,
    accepted_key: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K beams of a depth from the accepted continuations ``accepted`` ``[B, C]``: with >= K accepted, the K
    first by ``accepted_key`` ``[B, C]`` (None: a uniformly random K of them); otherwise all of them, then draws
    without replacement from the residual max(P - Q, 0) with the accepted ones removed (renormalised), then, once
    the residual's support is used up (Q >= P elsewhere, or Q == P), from P without everything chosen. Continuations
    impossible under P are placeholders. One sort by (tier, key) does it: tier 0 accepted, 1 residual (key log
    residual + Gumbel), 2 possible under P (key log P + Gumbel), 3 impossible. ``width``: the real number of
    continuations (``log_p`` may be padded past it). Returns the rule convention (see the module docstring); the
    depth counts as accepted when the accepted ones cover min(K, number of possible continuations)."""
    batch, columns = log_p.shape
    count = accepted.sum(1)  # [B]
    possible = torch.isfinite(log_p)
    need = possible.sum(1).clamp(max=num_beams)
    log_res = log_residual(log_p, log_q)
    residual = torch.isfinite(log_res) & ~accepted
    tier = torch.where(accepted, 0, torch.where(residual, 1, torch.where(possible, 2, 3)))  # [B, C]
    noise = gumbel((batch, columns), generator, log_p.device)
    first = noise if accepted_key is None else accepted_key  # iid noise: a uniformly random order
    key = torch.where(
        accepted, first, torch.where(residual, log_res + noise, torch.where(possible, log_p + noise, 0.0))
    )
    order = key.argsort(dim=1, descending=True, stable=True)
    order = order.gather(1, tier.gather(1, order).argsort(dim=1, stable=True))[:, :num_beams]  # by tier, then key
    alive = possible.gather(1, order) & (order < width)
    chosen = order.clamp(max=width - 1)  # placeholders beyond the real continuations
    return chosen, alive, torch.where(count >= need, num_beams, count)
