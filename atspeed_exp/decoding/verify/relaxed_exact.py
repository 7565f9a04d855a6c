"""Exact relaxed sampling verification of one drafted depth (``mode="relaxed_exact"``): speculative sampling draw
by draw, so the K beams have exactly the law of the target's beam-sampling step for any draft."""

from __future__ import annotations

import torch

from atspeed_exp.decoding.sampling import NEG_INF, gumbel


def relaxed_exact_select(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    candidates: torch.Tensor,
    num_beams: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact relaxed sampling verification of one depth (``mode="relaxed_exact"``): K draws without replacement
    from P, using the draft's samples from Q as proposals, with exactly the distribution of successive sampling
    from P.

    log_p, log_q: ``[B, C]`` normalised log-probs (-inf: impossible) over the flattened (beam, code) continuations
    of the accepted beams, under the target (P) and the distribution the draft sampled from, restricted to these
    continuations (Q). candidates: ``[B, R]`` flat indices into C of the draft's samples in draw order (-1: none).

    Draw j proposes the j-th candidate d_j and accepts it with probability min(1, P_j(d_j) / Q_j(d_j)), where P_j and
    Q_j are P and Q with d_<j removed and renormalised: the conditionals of the j-th draw of both samplers, so each
    draw is one ordinary speculative-sampling step and its output has law P_j exactly. The first rejected draw j*
    takes one sample from the residual max(P_j* - Q_j*, 0) (renormalised; P_j* itself if there is no proposal or the
    residual is empty by rounding); the draws after j* come from P with everything chosen removed, because the
    remaining proposals no longer have the law of the draft's conditional given what was chosen.
    Unlike the literal scheme of docs/method.md section 6 (``relaxed_select``: every candidate accepted independently with min(1, P/Q) of
    the marginals, keep K, fill from one residual), which with N > K favours what the draft likes and is biased,
    this version is exact; the price is that only the first K draws can be accepted, in order, so its acceptance
    falls quickly with K.
    A draw with no mass left (fewer than K possible continuations) is a placeholder and counts as accepted.

    Returns (chosen ``[B, K]`` flat indices, alive ``[B, K]`` False for placeholders, accepted ``[B]`` number of
    leading draws taken from the draft; the depth is accepted iff it equals K).
    """
    batch, width = log_p.shape
    device = log_p.device
    k = num_beams
    if width < k:  # fewer continuations than draws: pad with impossible ones
        pad = log_p.new_full((batch, k - width), NEG_INF)
        log_p, log_q = torch.cat([log_p, pad], 1), torch.cat([log_q, pad], 1)
    draws = torch.arange(k, device=device)

    # d_j: the first K candidates in draw order (the rest never propose: the K draws stop at a rejection)
    listed = candidates >= 0
    order = torch.argsort((~listed).to(torch.int8), dim=1, stable=True)[:, :k]
    proposal = candidates.gather(1, order).masked_fill(~listed.gather(1, order), -1)
    if proposal.shape[1] < k:
        proposal = torch.cat([proposal, proposal.new_full((batch, k - proposal.shape[1]), -1)], 1)  # [B, K]
    safe = proposal.clamp(min=0)
    exists = (proposal >= 0) & torch.isfinite(log_q.gather(1, safe))  # a proposal the draft could have drawn
    lp_d = log_p.gather(1, safe).masked_fill(~exists, NEG_INF)  # [B, K]
    lq_d = log_q.gather(1, safe).masked_fill(~exists, NEG_INF)

    # rank[c] = the draw that proposes c (K: none); dummy column `width` absorbs the missing proposals
    slot = torch.where(exists, proposal, log_p.shape[1])
    rank = torch.full((batch, log_p.shape[1] + 1), k, dtype=torch.long, device=device)
    rank = rank.scatter(1, slot, draws.expand(batch, k))[:, :-1]  # [B, C]

    # log mass left for draw j = mass outside every proposal + mass of proposals j.. (a sum, no cancellation)
    def left(log_x: torch.Tensor, log_x_d: torch.Tensor) -> torch.Tensor:
        outside = torch.logsumexp(log_x.masked_fill(rank < k, NEG_INF), dim=1, keepdim=True)  # [B, 1]
        suffix = torch.logcumsumexp(log_x_d.flip(1), dim=1).flip(1)  # [B, K]
        return torch.logaddexp(outside, suffix)

    left_p, left_q = left(log_p, lp_d), left(log_q, lq_d)
    has_mass = torch.isfinite(left_p)
    log_ratio = torch.where(exists, (lp_d - left_p) - (lq_d - left_q), NEG_INF)  # log P_j(d_j) / Q_j(d_j)
    log_u = torch.log(torch.rand((batch, k), generator=generator, device=generator.device).to(device))
    accept = ~has_mass | (exists & (log_u < log_ratio))
    accepted = accept.long().cumprod(1).sum(1)  # [B] leading accepted draws
    first = accepted.clamp(max=k - 1)[:, None]  # j*, the first rejected draw (unused when all K are accepted)

    # draw j*: residual max(P_j* - Q_j*, 0) with d_<j* removed; Q_j* = 0 when j* has no proposal
    removed = rank < first  # [B, C]
    lp_j = (log_p - left_p.gather(1, first)).masked_fill(removed, NEG_INF)
    lq_j = (log_q - left_q.gather(1, first)).masked_fill(removed | ~exists.gather(1, first), NEG_INF)
    log_res = (lp_j.exp() - lq_j.exp()).clamp(min=0).log()
    empty = ~torch.isfinite(log_res).any(1, keepdim=True)  # P_j* <= Q_j* everywhere (rounding) or underflow
    log_res = torch.where(empty, lp_j, log_res)
    res_keys = log_res + gumbel(tuple(log_res.shape), generator, device)
    pick = res_keys.argmax(1, keepdim=True)  # [B, 1]
    pick_alive = torch.isfinite(log_res.gather(1, pick))

    # draws after j*: successive sampling from P without everything chosen so far
    rest_keys = (log_p + gumbel(tuple(log_p.shape), generator, device)).masked_fill(removed, NEG_INF)
    rest_keys = rest_keys.scatter(1, pick, NEG_INF)
    rest_keys, rest = rest_keys.topk(k, dim=1)  # [B, K]
    after = (draws - first - 1).clamp(min=0)  # [B, K] index into `rest` of draw j > j*

    chosen = torch.where(
        draws < accepted[:, None], safe, torch.where(draws == first, pick, rest.gather(1, after))
    )
    alive = torch.where(
        draws < accepted[:, None],
        torch.isfinite(lp_d),  # False for the placeholders accepted because no mass was left
        torch.where(draws == first, pick_alive, torch.isfinite(rest_keys.gather(1, after))),
    )
    chosen = chosen.clamp(max=width - 1)  # placeholders beyond the real continuations
    return chosen, alive & (chosen < width), accepted
