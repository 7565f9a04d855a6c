"""Alignment losses against naive float64 references (explicit loops over rows and columns), plus masking,
temperature and gradient-safety properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atspeed_exp.losses import (
    ALIGNMENT_LOSSES,
    atspeed_r_loss,
    atspeed_s_loss,
    get_alignment_loss,
    kl_loss,
    mixed_loss,
    seqkd_loss,
    tvd_loss,
)

NEG_INF = float("-inf")
ATOL = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------


def make_batch(
    seed: int, rows: int = 12, cols: int = 9, scale: float = 3.0, masked_fully_neg_inf: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``draft [R, S]``, ``target [R, S]``, ``row_mask [R]``: real rows have 1..S finite columns (same -inf
    pattern in both tensors); masked rows hold random values, and some are entirely -inf."""
    gen = torch.Generator().manual_seed(seed)
    draft = torch.randn(rows, cols, generator=gen) * scale
    target = torch.randn(rows, cols, generator=gen) * scale
    row_mask = torch.rand(rows, generator=gen) < 0.75
    row_mask[:3] = True
    row_mask[-1] = False
    for r in range(rows):
        n_finite = int(torch.randint(1, cols + 1, (1,), generator=gen))
        if r == 1:
            n_finite = 1  # always one real row with a single usable column
        if r == 2:
            n_finite = cols
        banned = torch.randperm(cols, generator=gen)[: cols - n_finite]
        draft[r, banned] = NEG_INF
        target[r, banned] = NEG_INF
        if masked_fully_neg_inf and not row_mask[r] and r % 2 == 1:
            draft[r] = NEG_INF
            target[r] = NEG_INF
    if masked_fully_neg_inf:
        draft[-1] = NEG_INF
        target[-1] = NEG_INF
    return draft, target, row_mask


def make_labels(seed: int, draft: torch.Tensor) -> torch.Tensor:
    """A random finite column per row (0 for all -inf rows)."""
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.zeros(draft.shape[0], dtype=torch.long)
    for r in range(draft.shape[0]):
        finite = torch.nonzero(torch.isfinite(draft[r])).flatten()
        if len(finite):
            labels[r] = finite[int(torch.randint(len(finite), (1,), generator=gen))]
    return labels


# ---------------------------------------------------------------------------------------------------------------
# naive references: Python floats, one row and one column at a time
# ---------------------------------------------------------------------------------------------------------------


def _logsumexp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _support(draft_row: list[float], target_row: list[float]) -> list[int]:
    return [c for c in range(len(draft_row)) if draft_row[c] != NEG_INF and target_row[c] != NEG_INF]


def _log_softmax(row: list[float], cols: list[int], tau: float = 1.0) -> dict[int, float]:
    lse = _logsumexp([row[c] / tau for c in cols])
    return {c: row[c] / tau - lse for c in cols}


def _mean_over_real(draft: torch.Tensor, target: torch.Tensor, row_mask: torch.Tensor, per_row) -> float:
    values = []
    for r in range(draft.shape[0]):
        d, t = draft[r].double().tolist(), target[r].double().tolist()
        cols = _support(d, t)
        if bool(row_mask[r]) and cols:
            values.append(per_row(d, t, cols))
    return sum(values) / len(values) if values else 0.0


def naive_kl(draft, target, row_mask, tau=1.0) -> float:
    def per_row(d, t, cols):
        logq, logp = _log_softmax(d, cols, tau), _log_softmax(t, cols, tau)
        return sum(math.exp(logp[c]) * (logp[c] - logq[c]) for c in cols)

    return _mean_over_real(draft, target, row_mask, per_row)


def naive_tvd(draft, target, row_mask, tau=1.0) -> float:
    def per_row(d, t, cols):
        logq, logp = _log_softmax(d, cols, tau), _log_softmax(t, cols, tau)
        return 0.5 * sum(abs(math.exp(logp[c]) - math.exp(logq[c])) for c in cols)

    return _mean_over_real(draft, target, row_mask, per_row)


def naive_seqkd(draft, labels, row_mask) -> float:
    values = []
    for r in range(draft.shape[0]):
        d = draft[r].double().tolist()
        cols = [c for c in range(len(d)) if d[c] != NEG_INF]
        if bool(row_mask[r]) and cols:
            values.append(-_log_softmax(d, cols)[int(labels[r])])
    return sum(values) / len(values) if values else 0.0


def naive_atspeed_s_row(d, t, cols, top_k, tau, density_weight) -> tuple[float, float, float, float]:
    """-> (loss, reverse KL, p̃_K, H(q̃)) of one row, with τ applied literally on the probabilities."""
    logq, logp = _log_softmax(d, cols), _log_softmax(t, cols)  # q, p over the whole support, τ = 1
    top = sorted(cols, key=lambda c: -d[c])[:top_k]  # the draft's top-K, best first
    # q̃_c = q_c^(1/τ) / Σ_{c' in top} q_c'^(1/τ), in log space
    lse_q = _logsumexp([logq[c] / tau for c in top])
    lse_p = _logsumexp([logp[c] / tau for c in top])
    log_qt = {c: logq[c] / tau - lse_q for c in top}
    log_pt = {c: logp[c] / tau - lse_p for c in top}
    reverse_kl = sum(math.exp(log_qt[c]) * (log_qt[c] - log_pt[c]) for c in top)
    entropy = -sum(math.exp(log_qt[c]) * log_qt[c] for c in top)
    p_kth = math.exp(log_pt[top[-1]])
    return reverse_kl + density_weight * p_kth * entropy, reverse_kl, p_kth, entropy


def naive_atspeed_s_public_row(d, t, cols, top_k, tau, density_weight) -> float:
    """The public code's form, literally: probabilities q_c, p_c over the support, the draft's top-K, then
    q̃ = softmax(q[T] / τ), p̃ = softmax(p[T] / τ); KL(q̃ ‖ p̃) + p̃_K · H(q̃)."""
    logq, logp = _log_softmax(d, cols), _log_softmax(t, cols)
    top = sorted(cols, key=lambda c: -d[c])[:top_k]
    q = {c: math.exp(logq[c]) for c in top}
    p = {c: math.exp(logp[c]) for c in top}
    lse_q = _logsumexp([q[c] / tau for c in top])
    lse_p = _logsumexp([p[c] / tau for c in top])
    log_qt = {c: q[c] / tau - lse_q for c in top}
    log_pt = {c: p[c] / tau - lse_p for c in top}
    reverse_kl = sum(math.exp(log_qt[c]) * (log_qt[c] - log_pt[c]) for c in top)
    entropy = -sum(math.exp(log_qt[c]) * log_qt[c] for c in top)
    return reverse_kl + density_weight * math.exp(log_pt[top[-1]]) * entropy


def naive_atspeed_s(draft, target, row_mask, top_k, tau=1.0, density_weight=1.0) -> float:
    def per_row(d, t, cols):
        return naive_atspeed_s_row(d, t, cols, top_k, tau, density_weight)[0]

    return _mean_over_real(draft, target, row_mask, per_row)


# ---------------------------------------------------------------------------------------------------------------
# against the references
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_kl_loss_matches_naive_reference(seed, tau):
    draft, target, mask = make_batch(seed)
    assert float(kl_loss(draft, target, mask, temperature=tau)) == pytest.approx(
        naive_kl(draft, target, mask, tau), abs=ATOL
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_tvd_loss_matches_naive_reference(seed, tau):
    draft, target, mask = make_batch(seed)
    assert float(tvd_loss(draft, target, mask, temperature=tau)) == pytest.approx(
        naive_tvd(draft, target, mask, tau), abs=ATOL
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_atspeed_r_loss_matches_naive_reference(seed, tau):
    draft, target, mask = make_batch(seed)
    assert float(atspeed_r_loss(draft, target, mask, temperature=tau)) == pytest.approx(
        naive_tvd(draft, target, mask, tau), abs=ATOL
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seqkd_loss_matches_naive_reference(seed):
    draft, _, mask = make_batch(seed)
    labels = make_labels(seed, draft)
    assert float(seqkd_loss(draft, labels, mask)) == pytest.approx(naive_seqkd(draft, labels, mask), abs=ATOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_k", [1, 3, 5, 100])
@pytest.mark.parametrize(("tau", "density_weight"), [(1.0, 1.0), (0.5, 0.3), (2.0, 0.0)])
def test_atspeed_s_loss_matches_naive_reference(seed, top_k, tau, density_weight):
    draft, target, mask = make_batch(seed)
    got = atspeed_s_loss(draft, target, mask, top_k=top_k, temperature=tau, density_weight=density_weight)
    want = naive_atspeed_s(draft, target, mask, top_k, tau, density_weight)
    assert float(got) == pytest.approx(want, abs=ATOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_k", [1, 3, 5, 100])
@pytest.mark.parametrize(("tau", "density_weight"), [(1.0, 1.0), (0.05, 0.3), (0.001, 1.0)])
def test_atspeed_s_loss_public_form_matches_naive_reference(seed, top_k, tau, density_weight):
    draft, target, mask = make_batch(seed)
    got = atspeed_s_loss(draft, target, mask, top_k=top_k, temperature=tau, density_weight=density_weight,
                         temperature_form="public")
    want = _mean_over_real(draft, target, mask, lambda d, t, cols: naive_atspeed_s_public_row(
        d, t, cols, top_k, tau, density_weight))
    assert float(got) == pytest.approx(want, abs=ATOL, rel=1e-6)  # τ = 0.001 gives losses in the hundreds


def test_atspeed_s_loss_public_form_differs_and_is_flat_at_unit_temperature():
    """At τ = 1 the public q̃ = softmax(q / 1) is nearly uniform over T: its loss and gradient are far smaller
    than the power form's, which at τ = 1 is plain renormalisation."""
    gen = torch.Generator().manual_seed(21)
    draft = (torch.randn(8, 40, generator=gen) * 3).requires_grad_(True)
    target = torch.randn(8, 40, generator=gen) * 3
    mask = torch.ones(8, dtype=torch.bool)
    power = atspeed_s_loss(draft, target, mask, top_k=20, density_weight=0.0)
    public = atspeed_s_loss(draft, target, mask, top_k=20, density_weight=0.0, temperature_form="public")
    (g_power,) = torch.autograd.grad(power, draft)
    (g_public,) = torch.autograd.grad(public, draft)
    assert float(public) < 0.1 * float(power)
    assert float(g_public.norm()) < 0.1 * float(g_power.norm())


def test_atspeed_s_loss_rejects_unknown_temperature_form():
    draft, target, mask = make_batch(0)
    with pytest.raises(ValueError, match="temperature_form"):
        atspeed_s_loss(draft, target, mask, top_k=3, temperature_form="logits")


# ---------------------------------------------------------------------------------------------------------------
# draft == target
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [kl_loss, tvd_loss, atspeed_r_loss], ids=lambda f: f.__name__)
@pytest.mark.parametrize("tau", [0.001, 1.0, 2.0])
def test_distribution_losses_zero_when_draft_equals_target(loss, tau):
    draft, _, mask = make_batch(3)
    assert float(loss(draft, draft.clone(), mask, temperature=tau)) == pytest.approx(0.0, abs=ATOL)


@pytest.mark.parametrize("top_k", [1, 4, 100])
def test_atspeed_s_loss_draft_equals_target_leaves_density_term(top_k):
    draft, _, mask = make_batch(4)
    no_density = atspeed_s_loss(draft, draft.clone(), mask, top_k=top_k, density_weight=0.0)
    assert float(no_density) == pytest.approx(0.0, abs=ATOL)

    weight = 0.7
    expected = []
    for r in range(draft.shape[0]):
        d = draft[r].double().tolist()
        cols = _support(d, d)
        if bool(mask[r]) and cols:
            _, reverse_kl, p_kth, entropy = naive_atspeed_s_row(d, d, cols, top_k, 1.0, weight)
            assert reverse_kl == pytest.approx(0.0, abs=1e-12)
            expected.append(weight * p_kth * entropy)
    got = atspeed_s_loss(draft, draft.clone(), mask, top_k=top_k, density_weight=weight)
    assert float(got) == pytest.approx(sum(expected) / len(expected), abs=ATOL)
    if top_k > 1:
        assert float(got) > 0.0


def test_atspeed_s_loss_top_k_one_is_zero():
    draft, target, mask = make_batch(5)
    assert float(atspeed_s_loss(draft, target, mask, top_k=1)) == pytest.approx(0.0, abs=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# masking
# ---------------------------------------------------------------------------------------------------------------


def _all_losses(draft, target, mask, labels):
    return {
        "kl": kl_loss(draft, target, mask),
        "tvd": tvd_loss(draft, target, mask),
        "seqkd": seqkd_loss(draft, labels, mask),
        "atspeed_s": atspeed_s_loss(draft, target, mask, top_k=3),
        "atspeed_r": atspeed_r_loss(draft, target, mask, temperature=0.001),
    }


@pytest.mark.parametrize("fill", ["random", "neg_inf", "nan", "huge"])
def test_losses_ignore_masked_rows(fill):
    draft, target, mask = make_batch(6)
    labels = make_labels(6, draft)
    before = _all_losses(draft, target, mask, labels)

    draft2, target2, labels2 = draft.clone(), target.clone(), labels.clone()
    masked = ~mask
    n = int(masked.sum())
    values = {
        "random": lambda: torch.randn(n, draft.shape[1]) * 50,
        "neg_inf": lambda: torch.full((n, draft.shape[1]), NEG_INF),
        "nan": lambda: torch.full((n, draft.shape[1]), float("nan")),
        "huge": lambda: torch.full((n, draft.shape[1]), 3e38),
    }[fill]
    draft2[masked], target2[masked] = values(), values()
    labels2[masked] = -100
    draft2.requires_grad_(True)
    after = _all_losses(draft2, target2, mask, labels2)

    for name in before:
        assert torch.isfinite(after[name]), name
        assert after[name].item() == pytest.approx(before[name].item(), abs=1e-6), name
        (grad,) = torch.autograd.grad(after[name], draft2)
        assert torch.isfinite(grad).all(), name
        assert (grad[masked] == 0).all(), name


def test_losses_all_masked_batch_is_zero_with_finite_grads():
    draft, target, _ = make_batch(7)
    mask = torch.zeros(draft.shape[0], dtype=torch.bool)
    draft[::2] = NEG_INF
    draft.requires_grad_(True)
    for name, value in _all_losses(draft, target, mask, make_labels(7, draft.detach())).items():
        assert value.item() == 0.0, name
        (grad,) = torch.autograd.grad(value, draft)
        assert torch.isfinite(grad).all() and (grad == 0).all(), name


def test_losses_empty_batch_is_zero():
    draft = torch.zeros(0, 5, requires_grad=True)
    mask = torch.zeros(0, dtype=torch.bool)
    for name, value in _all_losses(draft, draft.detach(), mask, torch.zeros(0, dtype=torch.long)).items():
        assert value.item() == 0.0, name
        value.backward()


def test_losses_real_row_without_usable_column_does_not_count():
    draft, target, mask = make_batch(8)
    reference = _all_losses(draft, target, mask, make_labels(8, draft))
    draft2 = torch.cat([draft, torch.full((1, draft.shape[1]), NEG_INF)])
    target2 = torch.cat([target, torch.full((1, draft.shape[1]), NEG_INF)])
    mask2 = torch.cat([mask, torch.tensor([True])])
    got = _all_losses(draft2, target2, mask2, make_labels(8, draft2))
    for name in reference:
        assert float(got[name]) == pytest.approx(float(reference[name]), abs=1e-6), name


def test_seqkd_loss_ignores_negative_labels():
    draft, _, mask = make_batch(9)
    labels = make_labels(9, draft)
    labels2 = labels.clone()
    labels2[0] = -100
    mask2 = mask.clone()
    mask2[0] = False
    assert float(seqkd_loss(draft, labels2, mask)) == pytest.approx(float(seqkd_loss(draft, labels, mask2)))


def test_kl_loss_neg_inf_in_one_tensor_removes_column_from_both():
    draft, target, mask = make_batch(10, masked_fully_neg_inf=False)
    target_one_sided = target.clone()
    target_one_sided[:, 0] = NEG_INF  # draft keeps a finite logit at column 0
    both = target_one_sided.clone()
    draft_both = draft.clone()
    draft_both[:, 0] = NEG_INF
    for loss in (kl_loss, tvd_loss):
        one_sided = loss(draft, target_one_sided, mask)
        assert float(one_sided) == pytest.approx(float(loss(draft_both, both, mask)), abs=1e-6)
    assert torch.isfinite(atspeed_s_loss(draft, target_one_sided, mask, top_k=4))


# ---------------------------------------------------------------------------------------------------------------
# temperature
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [kl_loss, tvd_loss, atspeed_r_loss], ids=lambda f: f.__name__)
def test_distribution_losses_temperature_divides_logits(loss):
    draft, target, mask = make_batch(11)
    tau = 0.37
    got = loss(draft, target, mask, temperature=tau)
    assert float(got) == pytest.approx(float(loss(draft / tau, target / tau, mask)), abs=ATOL)


def test_atspeed_r_loss_small_temperature_counts_argmax_disagreements():
    draft, target, mask = make_batch(12, rows=40, cols=7, masked_fully_neg_inf=False)
    disagree = (draft.argmax(-1) != target.argmax(-1))[mask].double().mean()
    got = atspeed_r_loss(draft, target, mask, temperature=0.001)
    assert float(got) == pytest.approx(float(disagree), abs=1e-3)
    assert float(atspeed_r_loss(draft, target, mask, temperature=1.0)) < float(got)


def test_atspeed_s_loss_temperature_is_on_probabilities():
    """q̃ = q^(1/τ) renormalised over the draft's top-K, with q the draft's softmax over the whole row."""
    gen = torch.Generator().manual_seed(13)
    draft, target = torch.randn(1, 6, generator=gen), torch.randn(1, 6, generator=gen)
    tau, top_k = 0.5, 3
    top = draft[0].argsort(descending=True)[:top_k]
    q, p = draft[0].double().softmax(-1), target[0].double().softmax(-1)
    q_t = q[top] ** (1 / tau) / (q[top] ** (1 / tau)).sum()
    p_t = p[top] ** (1 / tau) / (p[top] ** (1 / tau)).sum()
    entropy = -(q_t * q_t.log()).sum()
    want = (q_t * (q_t.log() - p_t.log())).sum() + p_t[-1] * entropy
    got = atspeed_s_loss(draft, target, torch.tensor([True]), top_k=top_k, temperature=tau)
    assert float(got) == pytest.approx(float(want), abs=ATOL)


def test_atspeed_s_loss_full_top_k_equals_reverse_kl_over_row():
    draft, target, mask = make_batch(14)
    tau, weight = 0.8, 0.5
    per_row = []
    for r in range(draft.shape[0]):
        if not mask[r]:
            continue
        cols = torch.isfinite(draft[r])
        d, t = draft[r, cols].double() / tau, target[r, cols].double() / tau
        logq, logp = d.log_softmax(-1), t.log_softmax(-1)
        reverse_kl = (logq.exp() * (logq - logp)).sum()
        entropy = -(logq.exp() * logq).sum()
        p_kth = logp[d.argmin()].exp()  # the draft's lowest-ranked usable token
        per_row.append(reverse_kl + weight * p_kth * entropy)
    want = torch.stack(per_row).mean()
    for top_k in (draft.shape[1], draft.shape[1] + 5):
        got = atspeed_s_loss(draft, target, mask, top_k=top_k, temperature=tau, density_weight=weight)
        assert float(got) == pytest.approx(float(want), abs=ATOL)


def test_atspeed_s_loss_gradient_treats_density_weight_as_constant():
    """d loss / d draft = d reverse KL + sg(p̃_K) · d H(q̃): p̃_K contributes no gradient of its own."""
    gen = torch.Generator().manual_seed(15)
    draft = torch.randn(3, 5, generator=gen, dtype=torch.float64).requires_grad_(True)
    target = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    mask = torch.ones(3, dtype=torch.bool)
    top_k = 3
    (grad,) = torch.autograd.grad(atspeed_s_loss(draft, target, mask, top_k=top_k, density_weight=2.0), draft)

    top = draft.detach().argsort(-1, descending=True)[:, :top_k]
    logq = draft.gather(-1, top).log_softmax(-1)
    logp = target.gather(-1, top).log_softmax(-1)
    p_kth = logp[:, -1].exp()  # constant: target has no grad
    manual = ((logq.exp() * (logq - logp)).sum(-1) + 2.0 * p_kth * -(logq.exp() * logq).sum(-1)).mean()
    (want,) = torch.autograd.grad(manual, draft)
    torch.testing.assert_close(grad, want)


# ---------------------------------------------------------------------------------------------------------------
# gradients and numerics
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def loss_inputs(draw):
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 50.0]))
    gen = torch.Generator().manual_seed(seed)
    draft = torch.randn(rows, cols, generator=gen) * scale
    target = torch.randn(rows, cols, generator=gen) * scale
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)))
    for r in range(rows):
        banned = torch.rand(cols, generator=gen) < draw(st.floats(0.0, 1.0))
        if mask[r] and banned.all():
            banned[int(torch.randint(cols, (1,), generator=gen))] = False  # a real row keeps >= 1 column
        draft[r, banned] = NEG_INF
        target[r, banned] = NEG_INF
    tau = draw(st.floats(0.001, 2.0))
    top_k = draw(st.integers(1, cols + 2))
    return draft, target, mask, tau, top_k


@settings(max_examples=40, deadline=None)
@given(loss_inputs())
def test_losses_gradients_finite_property(inputs):
    draft, target, mask, tau, top_k = inputs
    draft = draft.requires_grad_(True)
    target = target.requires_grad_(True)
    labels = make_labels(0, draft.detach())
    values = {
        "kl": kl_loss(draft, target, mask, temperature=tau),
        "tvd": tvd_loss(draft, target, mask, temperature=tau),
        "seqkd": seqkd_loss(draft, labels, mask),
        "atspeed_s": atspeed_s_loss(draft, target, mask, top_k=top_k, temperature=tau, density_weight=1.0),
        "atspeed_r": atspeed_r_loss(draft, target, mask, temperature=tau),
    }
    for name, value in values.items():
        assert value.dim() == 0 and torch.isfinite(value), name
        assert value.item() >= -1e-5, name
        (grad,) = torch.autograd.grad(value, draft)
        assert torch.isfinite(grad).all(), name
        assert (grad[~mask] == 0).all(), name
        assert (grad[torch.isneginf(draft.detach())] == 0).all(), name
    for name in ("tvd", "atspeed_r"):
        assert values[name].item() <= 1.0 + 1e-5, name


def test_losses_target_gets_no_gradient():
    draft, target, mask = make_batch(16)
    draft.requires_grad_(True)
    target.requires_grad_(True)
    for name, value in _all_losses(draft, target, mask, make_labels(16, draft.detach())).items():
        assert value.requires_grad, name
        value.backward()
    assert target.grad is None
    assert draft.grad is not None


def test_losses_half_precision_inputs_computed_in_float32():
    draft, target, mask = make_batch(17)
    for name, value in _all_losses(draft.half(), target.half(), mask, make_labels(17, draft)).items():
        assert value.dtype == torch.float32, name
        reference = _all_losses(draft.half().float(), target.half().float(), mask, make_labels(17, draft))[name]
        assert float(value) == pytest.approx(float(reference), abs=1e-6), name


def test_losses_leading_dims_are_flattened():
    draft, target, mask = make_batch(18, rows=24)
    labels = make_labels(18, draft)
    flat = _all_losses(draft, target, mask, labels)
    shaped = _all_losses(draft.view(2, 3, 4, -1), target.view(2, 3, 4, -1), mask.view(2, 3, 4), labels.view(2, 3, 4))
    for name in flat:
        assert float(shaped[name]) == pytest.approx(float(flat[name]), abs=1e-6), name


def test_losses_reject_bad_arguments():
    draft, target, mask = make_batch(19)
    with pytest.raises(ValueError, match="temperature"):
        kl_loss(draft, target, mask, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        atspeed_s_loss(draft, target, mask, top_k=0)
    with pytest.raises(ValueError, match="row_mask"):
        tvd_loss(draft, target, mask[:-1])
    with pytest.raises(ValueError, match="target_logits"):
        tvd_loss(draft, target[:, :-1], mask)



def test_losses_take_one_row_without_leading_dims():
    """``[S]`` logits with a 0-d mask are one row: the same loss as the ``[1, S]`` batch."""
    draft, target, mask = make_batch(20)
    labels = make_labels(20, draft)
    one = _all_losses(draft[0], target[0], mask[0], labels[0])
    batch = _all_losses(draft[:1], target[:1], mask[:1], labels[:1])
    for name in batch:
        assert float(one[name]) == pytest.approx(float(batch[name]), abs=1e-6), name
        assert float(batch[name]) > 0, name


def test_losses_name_the_bad_shapes():
    scalar = torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"^draft_logits must have a column dimension, got shape \(\)$"):
        kl_loss(scalar, scalar, torch.tensor(True))
    draft = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"^row_mask shape \(2, 4\) != draft_logits rows \(2, 3\)$"):
        kl_loss(draft, draft, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="^3 labels for 2 rows$"):
        seqkd_loss(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long), torch.ones(2, dtype=torch.bool))


def test_seqkd_loss_counts_labels_in_zero_to_s_and_no_others():
    """Every label in [0, S) counts (also those >= the number of rows); S and beyond, like -100, drop the row."""
    gen = torch.Generator().manual_seed(31)
    draft = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, dtype=torch.bool)
    labels = torch.tensor([5, 4])  # both >= R = 2
    assert float(seqkd_loss(draft, labels, mask)) == pytest.approx(naive_seqkd(draft, labels, mask), rel=1e-9)
    first_only = naive_seqkd(draft[:1], labels[:1], mask[:1])
    for outside in (6, 7, -1):
        assert float(seqkd_loss(draft, torch.tensor([5, outside]), mask)) == pytest.approx(first_only, rel=1e-9)

# ---------------------------------------------------------------------------------------------------------------
# total loss and registry
# ---------------------------------------------------------------------------------------------------------------


def test_mixed_loss_weights_ce_and_alignment():
    ce, align = torch.tensor(2.0), torch.tensor(10.0)
    assert float(mixed_loss(ce, align, 0.7)) == pytest.approx(0.3 * 2.0 + 0.7 * 10.0)
    assert float(mixed_loss(ce, align, 0.0)) == 2.0
    assert float(mixed_loss(ce, align, 1.0)) == 10.0
    with pytest.raises(ValueError, match="alpha"):
        mixed_loss(ce, align, 1.5)


def test_get_alignment_loss_returns_registered_functions():
    assert set(ALIGNMENT_LOSSES) == {"kl", "tvd", "seqkd", "atspeed_s", "atspeed_r"}
    for name, fn in ALIGNMENT_LOSSES.items():
        assert get_alignment_loss(name) is fn
    assert get_alignment_loss("atspeed_s") is atspeed_s_loss


def test_get_alignment_loss_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_alignment_loss("atspeed")
    message = str(err.value)
    assert message == "unknown alignment loss 'atspeed'; valid names: atspeed_r, atspeed_s, kl, seqkd, tvd"
