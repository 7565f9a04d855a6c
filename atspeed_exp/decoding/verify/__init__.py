"""Verification rules of speculative beam search, one per file (torch only). Strict top-K verification lives in
the engine (``speculative._accept_phase``); the relaxed rules are registered here by mode name, and the engine looks
a mode up instead of branching on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from atspeed_exp.decoding.verify.dare import dare_select
from atspeed_exp.decoding.verify.relaxed import relaxed_select
from atspeed_exp.decoding.verify.relaxed_exact import relaxed_exact_select
from atspeed_exp.decoding.verify.relaxed_official import relaxed_official_select

Select = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class RelaxedRule:
    """How a relaxed mode verifies a drafted depth: ``select(log_p, log_q, candidates, K, generator, **extra)``
    (the convention of ``verify.common``), which Q it is given, whether the top-k warper applies, whether drafts
    and the target's own step are sampled, and what else ``select`` takes."""

    select: Select
    full_q: bool  # Q = the draft's full sampling distribution (else renormalised to the accepted beams' continuations)
    warped: bool  # both models' step log-probs go through the top-k warper (the engine's official_top_k)
    sampled: bool = True  # drafts are N draws and the target's own step K draws (else top-N / top-K, as strict)
    step_log_p: bool = False  # ``select`` also takes the target's step log-probs of the continuations (``step_log_p``)
    options: tuple[str, ...] = ()  # keyword settings ``select`` takes from the engine's ``verify_options``


RELAXED_RULES: dict[str, RelaxedRule] = {
    "relaxed": RelaxedRule(relaxed_select, full_q=False, warped=False),
    "relaxed_exact": RelaxedRule(relaxed_exact_select, full_q=False, warped=False),
    "relaxed_official": RelaxedRule(relaxed_official_select, full_q=True, warped=True),
    "dare": RelaxedRule(dare_select, full_q=False, warped=False, sampled=False, step_log_p=True,
                        options=("dare_top_k", "dare_threshold")),
}
VERIFY_OPTIONS = tuple(sorted({name for rule in RELAXED_RULES.values() for name in rule.options}))

__all__ = [
    "RELAXED_RULES", "RelaxedRule", "VERIFY_OPTIONS", "dare_select", "relaxed_exact_select",
    "relaxed_official_select", "relaxed_select",
]
