"""The public AtSpeed code's relaxed sampling verification of one drafted depth (``mode="relaxed_official"``).

What the public code (Linxyhaha/AtSpeed, code/beamSD.py: ``one_step_beam_search`` and ``verify`` with
``do_sample=True``; code/beamSD/beamSD.py has the same rule) does, and how this project reproduces it:

- Warper: transformers' default top-k = 50 warper (``TopKLogitsWarper``, from the target's generation config)
  acts on both models, per beam row, on the STEP log-probs after log-softmax and the trie mask, before the beam's
  cumulative score is added (``sampling.top_k_warp``; ``official_top_k`` in the engine, None disables it).
- Draft: at each depth it samples N continuations without replacement (``torch.multinomial``, i.e. successive
  sampling) from Q = softmax of the flattened cumulative scores of ALL its N beams' continuations (depth 1: of the
  K current beams, whose cumulative scores are the target's).
- P: softmax of the flattened target cumulative scores of the accepted beams' continuations (warped).
- Q of a candidate is its probability under that full draft distribution, NOT renormalised to the continuations of
  the accepted beams, so Q sums to less than 1 over them once a depth has dropped some drafted beams.
- Every drafted candidate is accepted independently with probability min(1, P/Q) (P = 0 when its parent was not
  accepted). With >= K accepted, a uniformly random K of them become the beams and the next depth is checked;
  otherwise all accepted are kept, the other K - |accepted| are drawn without replacement from the residual
  max(P - Q, 0) with the accepted entries zeroed (renormalised), and the round ends. After the last drafted depth
  the target draws K from P. Final lists are sorted by cumulative target score.

Differences from the public code (edge cases it does not handle; the common path is the same):
- Residual with fewer non-zero entries than needed: ``torch.multinomial`` without replacement then returns
  zero-probability entries (accepted ones again, or continuations the trie forbids). Here the residual's support
  is taken whole and the rest drawn from P without everything chosen.
- Empty residual: at depth 1 the public code gives every (beam, vocabulary token) entry the smallest float, i.e.
  draws uniformly over the whole vocabulary (invalid items, repeated beams); at later depths its fill writes into a
  copy (advanced indexing) and ``torch.multinomial`` raises on the all-zero vector. Here: draws from P.
- Fewer than K continuations possible under P: the public code can never accept such a depth (it needs K accepted)
  and its draws include impossible ones; here the depth is accepted when all possible ones are, and the missing
  beams are placeholders (the engine's convention for every mode).
- The public acceptance test is ``u <= P/Q``, which passes a P = 0 candidate when u is exactly 0 (probability
  about 2**-24 per candidate); here ``u < P/Q`` never does. The random K of the accepted ones come from
  ``torch.randperm`` there and from Gumbel keys here (the same law).
- transformers keeps at least 2 codes per row in beam methods (``min_tokens_to_keep``), so a top-k of 1 keeps 2
  there; the inference script may also set a temperature (a temperature warper when it is not 1): this project
  assumes temperature 1.
"""

from __future__ import annotations

import torch

from atspeed_exp.decoding.verify.common import accept_each, keep_accepted_then_fill, pad_columns


def relaxed_official_select(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    candidates: torch.Tensor,
    num_beams: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The public AtSpeed code's relaxed verification of one depth (see the module docstring).

    log_p: ``[B, C]`` normalised log-probs (-inf: impossible) of the target over the flattened (accepted beam, code)
    continuations, after the top-k warper. log_q: ``[B, C]`` log-probs of the same continuations under the draft's
    FULL sampling distribution at this depth (over all its beams' continuations, warped), so exp(log_q) sums to <= 1.
    candidates: ``[B, R]`` flat indices into C of the draft's samples that continue an accepted beam (-1: none; a
    sample whose parent was not accepted has P = 0 and is never accepted, so it is simply left out).

    Every candidate is accepted independently with probability min(1, P/Q). With >= K accepted, a uniformly random
    K of them are kept; otherwise all accepted ones are kept and the rest are drawn without replacement from
    max(P - Q, 0) without the accepted ones, renormalised (then from P without everything chosen if the residual's
    support runs out or is empty). The depth counts as accepted when the accepted ones cover min(K, number of
    possible continuations).
    Returns (chosen ``[B, K]`` flat indices, alive ``[B, K]`` False for placeholders, accepted ``[B]``: K when the
    depth is accepted, else the number of accepted candidates (< K)), the convention of ``relaxed_select``.
    """
    width = log_p.shape[1]
    log_p, log_q = pad_columns(log_p, log_q, num_beams)
    accepted = accept_each(log_p, log_q, candidates, generator)
    return keep_accepted_then_fill(log_p, log_q, accepted, width, num_beams, generator, accepted_key=None)
