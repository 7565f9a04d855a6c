"""The project's relaxed sampling verification of one drafted depth (``mode="relaxed"``): independent min(1, P/Q)
acceptance with Q renormalised to the accepted beams' continuations, the top-P K kept when more are accepted."""

from __future__ import annotations

import torch

from atspeed_exp.decoding.verify.common import accept_each, keep_accepted_then_fill, pad_columns


def relaxed_select(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    candidates: torch.Tensor,
    num_beams: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """docs/method.md section 6 relaxed sampling verification of one depth (``mode="relaxed"``).

    log_p, log_q: ``[B, C]`` normalised log-probs (-inf: impossible) over the flattened (beam, code) continuations
    of the accepted beams, under the target (P) and the distribution the draft sampled from, restricted to these
    continuations (Q). candidates: ``[B, R]`` flat indices into C of the draft's samples (-1: none; order unused).

    Every candidate c is accepted independently with probability min(1, P(c) / Q(c)) (one uniform each). If at least
    K are accepted, the K accepted ones with the highest P are kept: all of them are continuations the target
    accepts, and the top of them by P is what the target's own beam search would prefer among them (ties need
    equal float log-probs, which do not happen in practice; they go to the lower index). Otherwise all accepted
    candidates are kept and the K - |accepted| others are drawn without replacement (Gumbel-top-k) from the
    residual max(P - Q, 0), renormalised, accepted ones excluded; if the residual has fewer non-zero entries than
    needed (Q >= P everywhere else, or Q == P: empty), the rest are drawn without replacement from P excluding
    everything chosen. With no candidate at all (Q = 0) this is plain successive sampling of K from P, the target's
    beam-sampling step. Not exactly distribution-preserving (see speculative.py's module docstring;
    ``relaxed_exact_select`` is).

    The depth counts as accepted when the accepted candidates cover min(K, number of possible continuations):
    with fewer than K possible continuations, accepting all of them leaves only placeholders to add.
    Returns (chosen ``[B, K]`` flat indices, alive ``[B, K]`` False for placeholders, accepted ``[B]``: K when the
    depth is accepted, else the number of accepted candidates (< K)), the convention of ``relaxed_exact_select``.
    """
    width = log_p.shape[1]
    log_p, log_q = pad_columns(log_p, log_q, num_beams)
    accepted = accept_each(log_p, log_q, candidates, generator)
    return keep_accepted_then_fill(log_p, log_q, accepted, width, num_beams, generator, accepted_key=log_p)
