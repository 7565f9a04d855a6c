"""Draft-alignment objectives (docs/method.md section 5), torch only.

Contract. A batch is R *rows*; a row is one next-token position (one example x one teacher beam x one SID
position). Every loss takes

    draft_logits   [R, S]   the draft's logits (trainable)
    target_logits  [R, S]   the target's (teacher's) logits over the same S columns; a constant (detached)
    row_mask       [R]      bool, False for padding rows (fewer beams, missing teacher data)

Leading dimensions may be any shape ``[..., S]`` with ``row_mask [...]``; they are flattened to rows.

Columns a row may not use are ``-inf``. This expresses the "constrained" level-restricted softmax and the padding of
levels with different block sizes (e.g. 91/256/256/256 -> S = 256); the unconstrained variant passes full-vocabulary
logits with no ``-inf``. The *support* of a row is the set of columns that are ``-inf`` in neither tensor (a column
that is ``-inf`` in one is removed from both). q = softmax(draft / τ) and p = softmax(target / τ) are normalised over
the support.

A row counts iff ``row_mask`` is True and its support is non-empty; every loss is the mean of a per-row value over
the rows that count, and 0.0 (still attached to ``draft_logits``' graph) if none does. Rows that do not count are
replaced by zeros before any arithmetic, so whatever they hold (all ``-inf``, even NaN) never reaches the loss or
its gradient; a NaN in a row that counts is not hidden and propagates. Inside a row, 0 * log 0 = 0: terms of
columns outside the support are selected away with ``torch.where`` from already-finite values, so the backward pass
sees no NaN either. Half-precision logits are computed in float32, and the loss is returned in that dtype.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = [
    "ALIGNMENT_LOSSES",
    "atspeed_r_loss",
    "atspeed_s_loss",
    "get_alignment_loss",
    "kl_loss",
    "mixed_loss",
    "seqkd_loss",
    "tvd_loss",
]

TEMPERATURE_FORMS = ("power", "public")  # AtSpeed-S: τ as a power of the probabilities, or the public code's q / τ


# ---------------------------------------------------------------------------------------------------------------
# helpers: shapes, sanitising, masked mean
# ---------------------------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _rows(
    logits: torch.Tensor, row_mask: torch.Tensor, name: str = "draft_logits"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., S]`` logits and ``[...]`` mask -> ``[R, S]`` float logits and ``[R]`` bool mask."""
    if logits.dim() < 1:
        raise ValueError(f"{name} must have a column dimension, got shape {tuple(logits.shape)}")
    if tuple(row_mask.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"row_mask shape {tuple(row_mask.shape)} != {name} rows {tuple(logits.shape[:-1])}")
    num_cols = logits.shape[-1]
    return logits.reshape(-1, num_cols).to(_compute_dtype(logits)), row_mask.reshape(-1).bool()


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _sanitise(logits: torch.Tensor, support: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Rows that count keep their support and get -inf elsewhere; other rows become all zeros (finite, harmless)."""
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    return torch.where(support & real[:, None], logits, torch.where(real[:, None], neg_inf, zero))


def _paired_rows(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, row_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> sanitised draft ``[R, S]``, sanitised detached target ``[R, S]``, support ``[R, S]``, real ``[R]``."""
    if draft_logits.shape != target_logits.shape:
        raise ValueError(f"draft_logits {tuple(draft_logits.shape)} != target_logits {tuple(target_logits.shape)}")
    draft, real = _rows(draft_logits, row_mask)
    target = target_logits.detach().reshape(draft.shape).to(draft.dtype)
    support = ~torch.isneginf(draft) & ~torch.isneginf(target)  # [R, S]
    real = real & support.any(-1)
    return _sanitise(draft, support, real), _sanitise(target, support, real), support, real


def _masked_mean(per_row: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_row [R]`` over ``real [R]``; 0.0 (with a grad path) when no row is real."""
    total = torch.where(real, per_row, torch.zeros_like(per_row)).sum()
    return total / real.sum().clamp(min=1).to(per_row.dtype)


def _log_probs(logits: torch.Tensor, support: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (log-probs with 0 off the support, probs with 0 off the support), both ``[R, S]``, softmax(logits / τ)."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    logp = torch.where(support, logp, torch.zeros_like(logp))  # 0 * log 0 = 0, and no -inf reaches the backward
    prob = torch.where(support, logp.exp(), torch.zeros_like(logp))
    return logp, prob


# ---------------------------------------------------------------------------------------------------------------
# objectives
# ---------------------------------------------------------------------------------------------------------------


def kl_loss(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, row_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Forward KL (WordKD), mean over real rows:

        KL(p ‖ q) = Σ_c p_c (log p_c − log q_c),   p = softmax(target / τ),  q = softmax(draft / τ)

    over the row's support. No τ² rescaling is applied.

    draft_logits, target_logits: ``[R, S]``; row_mask: ``[R]`` bool. Returns a scalar.
    """
    _check_temperature(temperature)
    draft, target, support, real = _paired_rows(draft_logits, target_logits, row_mask)
    logq, _ = _log_probs(draft, support, temperature)
    logp, p = _log_probs(target, support, temperature)
    per_row = (p * (logp - logq)).sum(-1)  # [R]
    return _masked_mean(per_row, real)


def tvd_loss(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, row_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Total variation distance (TVD-KD), mean over real rows:

        TVD(p, q) = ½ Σ_c |p_c − q_c|,   p = softmax(target / τ),  q = softmax(draft / τ)

    over the row's support. In [0, 1].

    draft_logits, target_logits: ``[R, S]``; row_mask: ``[R]`` bool. Returns a scalar.
    """
    _check_temperature(temperature)
    draft, target, support, real = _paired_rows(draft_logits, target_logits, row_mask)
    _, q = _log_probs(draft, support, temperature)
    _, p = _log_probs(target, support, temperature)
    per_row = 0.5 * (p - q).abs().sum(-1)  # [R]
    return _masked_mean(per_row, real)


def seqkd_loss(draft_logits: torch.Tensor, labels: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """SeqKD: cross-entropy of the draft on hard labels (the target's beam tokens), mean over real rows:

        CE = −log q_{y},   q = softmax(draft) over the row's non ``-inf`` columns,  y = labels[row]

    draft_logits: ``[R, S]``; labels: ``[R]`` long column indices into S; row_mask: ``[R]`` bool. A row also does
    not count if its label is outside ``[0, S)`` (e.g. -100) or all its columns are ``-inf``. A counted row whose label
    points at a ``-inf`` column gives +inf: that is a data error and is not hidden. Returns a scalar.
    """
    draft, real = _rows(draft_logits, row_mask)
    labels = labels.reshape(-1).long()
    if labels.shape[0] != draft.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {draft.shape[0]} rows")
    support = ~torch.isneginf(draft)
    real = real & support.any(-1) & (labels >= 0) & (labels < draft.shape[-1])
    draft = _sanitise(draft, support, real)
    safe_labels = torch.where(real, labels, torch.zeros_like(labels))
    logq = torch.log_softmax(draft, dim=-1)
    per_row = -logq.gather(-1, safe_labels[:, None]).squeeze(-1)  # [R]
    return _masked_mean(per_row, real)


def atspeed_s_loss(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    row_mask: torch.Tensor,
    top_k: int,
    temperature: float = 1.0,
    density_weight: float = 1.0,
    temperature_form: str = "power",
) -> torch.Tensor:
    """AtSpeed-S (strict verification): top-K reverse KL plus a density regulariser, mean over real rows.

    Per row, let T be the draft's top-K columns of the support (K = ``top_k``, capped at the size of the support;
    missing slots are masked out), and k* ∈ T the draft's K-th (lowest-ranked) one. With the temperature τ on the
    *probabilities*,

        q̃_c = q_c^(1/τ) / Σ_{c'∈T} q_{c'}^(1/τ),   p̃_c = p_c^(1/τ) / Σ_{c'∈T} p_{c'}^(1/τ),   c ∈ T
        loss = Σ_{c∈T} q̃_c (log q̃_c − log p̃_c)  +  density_weight · sg(p̃_{k*}) · H(q̃)
        H(q̃) = −Σ_{c∈T} q̃_c log q̃_c

    where q, p are the draft's and target's softmax over the support and sg = stop-gradient: p̃_{k*} is a constant
    weight (it depends on the draft only through the non-differentiable top-K choice). Because q_c ∝ exp(draft_c),
    q̃ = softmax over T of draft / τ, so τ on the probabilities equals τ on the logits followed by a softmax over
    T only; that is how it is computed. T is chosen on the draft logits and does not depend on τ. With K >= the
    support size this is reverse KL(q_τ ‖ p_τ) over the whole row plus the density term.

    ``temperature_form="public"`` is the public AtSpeed code's form instead (Linxyhaha/AtSpeed, code/model.py,
    ``loss_strict`` with ``constrained_softmax``): τ divides the probabilities themselves before a softmax over T,

        q̃_c = exp(q_c / τ) / Σ_{c'∈T} exp(q_{c'} / τ),   p̃_c = exp(p_c / τ) / Σ_{c'∈T} exp(p_{c'} / τ)

    with the same loss on q̃, p̃. Since q_c ∈ [0, 1], τ = 1 makes q̃ nearly uniform over T (small gradients) and
    τ = 0.001 (the public scripts) nearly one-hot on the draft's argmax. The two forms differ at every τ.

    draft_logits, target_logits: ``[R, S]``; row_mask: ``[R]`` bool; top_k >= 1; temperature_form: ``power`` |
    ``public``. Returns a scalar.
    """
    _check_temperature(temperature)
    if int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if temperature_form not in TEMPERATURE_FORMS:
        raise ValueError(f"temperature_form must be one of {TEMPERATURE_FORMS}, got {temperature_form!r}")
    draft, target, _, real = _paired_rows(draft_logits, target_logits, row_mask)
    k = min(int(top_k), draft.shape[-1])
    draft_top, cols = draft.topk(k, dim=-1, sorted=True)  # [R, k], best first; -inf slots past the support
    target_top = target.gather(-1, cols)  # [R, k]
    slot = ~torch.isneginf(draft_top)  # [R, k]; non-real rows are all zeros, hence all True
    if temperature_form == "public":
        # probabilities over the whole support first; then the softmax over T below acts on probability / τ
        support = ~torch.isneginf(draft)
        neg_inf = torch.tensor(float("-inf"), dtype=draft.dtype, device=draft.device)
        draft_top = torch.where(slot, _log_probs(draft, support, 1.0)[1].gather(-1, cols), neg_inf)  # [R, k] q_c
        target_top = torch.where(slot, _log_probs(target, support, 1.0)[1].gather(-1, cols), neg_inf)  # p_c
    logq, q = _log_probs(draft_top, slot, temperature)  # renormalised over T with τ
    logp, _ = _log_probs(target_top, slot, temperature)
    reverse_kl = (q * (logq - logp)).sum(-1)  # [R]
    entropy = -(q * logq).sum(-1)  # [R]
    last = (slot.sum(-1) - 1).clamp(min=0)  # [R], index of the K-th slot
    p_kth = logp.gather(-1, last[:, None]).squeeze(-1).exp().detach()  # [R]
    per_row = reverse_kl + density_weight * p_kth * entropy
    return _masked_mean(per_row, real)


def atspeed_r_loss(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, row_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """AtSpeed-R (relaxed sampling verification), mean over real rows:

        TVD(q, p) = ½ Σ_c |q_c − p_c|,   q = softmax(draft / τ),  p = softmax(target / τ)

    over the row's (level-restricted) support, with τ on the logits. The formula is ``tvd_loss``'s; the objectives
    differ in their rows (teacher forcing on the target's beams here, on the ground truth for TVD-KD). The public
    scripts use τ = 0.001, which makes both sides nearly one-hot (loss ≈ 0 if the argmaxes agree, ≈ 1 if not).

    draft_logits, target_logits: ``[R, S]``; row_mask: ``[R]`` bool. Returns a scalar.
    """
    return tvd_loss(draft_logits, target_logits, row_mask, temperature=temperature)


def mixed_loss(ce: torch.Tensor | float, align: torch.Tensor | float, alpha: float) -> torch.Tensor | float:
    """Total draft loss ``(1 − alpha) · ce + alpha · align`` (alpha = 0.7 in the paper), with 0 <= alpha <= 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return (1.0 - alpha) * ce + alpha * align


ALIGNMENT_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "kl": kl_loss,
    "tvd": tvd_loss,
    "seqkd": seqkd_loss,
    "atspeed_s": atspeed_s_loss,
    "atspeed_r": atspeed_r_loss,
}


def get_alignment_loss(name: str) -> Callable[..., torch.Tensor]:
    """The alignment loss registered as ``name`` (one of ``ALIGNMENT_LOSSES``)."""
    try:
        return ALIGNMENT_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown alignment loss {name!r}; valid names: {', '.join(sorted(ALIGNMENT_LOSSES))}"
        ) from None
