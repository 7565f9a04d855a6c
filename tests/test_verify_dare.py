"""DARE's relaxed verification (``mode="dare"``) against a naive implementation of its formula, and in the engine:
with k = K and threshold 0 it is strict verification."""

import itertools
import math

import pytest
import torch
from decoding_fixtures import make_trie, random_prompts
from toy_lm import ToyLM

from atspeed_exp.decoding.beam_search import left_pad
from atspeed_exp.decoding.speculative import MODES, speculative_beam_search
from atspeed_exp.decoding.verify import RELAXED_RULES, dare_select

from test_speculative import noisy_copy, one_thread, same_list  # noqa: F401, I001


def naive_dare(log_p, step_log_p, candidates, k_beams, top_k, threshold):
    """One row at a time, from the formula: passes = drafted, possible, log_p >= the top_k-th largest log_p,
    p_step >= threshold; >= min(K, possible) passes: the K best passing by log_p, else the K best of all."""
    chosen, alive, accepted = [], [], []
    for b in range(log_p.shape[0]):
        row = log_p[b].tolist()
        possible = [c for c, v in enumerate(row) if v != -math.inf]
        kth = sorted(row, reverse=True)[min(top_k, len(row)) - 1]
        drafted = {c for c in candidates[b].tolist() if c >= 0}
        passes = [c for c in possible if c in drafted and row[c] >= kth
                  and (threshold == 0 or math.exp(step_log_p[b, c]) >= threshold)]
        need = min(k_beams, len(possible))
        pool = passes if len(passes) >= need else possible
        best = sorted(pool, key=lambda c: -row[c])[:k_beams]
        chosen.append(best)
        alive.append([True] * len(best) + [False] * (k_beams - len(best)))
        accepted.append(k_beams if len(passes) >= need else len(passes))
    return chosen, alive, accepted


def random_depth(batch, width, num_candidates, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, width, generator=gen) * 2
    scores[torch.rand(batch, width, generator=gen) < 0.2] = -math.inf  # impossible continuations
    scores[0, : max(0, width - 2)] = -math.inf  # a row with at most 2 possible continuations
    scores[:, -1] = 0.0  # every row has one (a depth always has a live beam with a valid continuation)
    log_p = scores.log_softmax(1)
    step_log_p = (torch.randn(batch, width, generator=gen) - 1.5).clamp(max=0)
    candidates = torch.randint(-1, width, (batch, num_candidates), generator=gen)  # -1: none; duplicates happen
    return log_p, step_log_p, candidates


@pytest.mark.parametrize("k_beams, top_k, threshold", [
    (1, 1, 0.0), (1, 2, 0.2), (3, 3, 0.0), (3, 6, 0.1), (5, 10, 0.05), (5, 50, 0.3), (4, None, 0.0),
])
def test_dare_select_matches_the_naive_formula(k_beams, top_k, threshold):
    for seed, (width, num_candidates) in enumerate(itertools.product((3, 12, 40), (2, 8, 30))):
        log_p, step_log_p, candidates = random_depth(6, width, num_candidates, seed)
        chosen, alive, accepted = dare_select(log_p, log_p, candidates, k_beams, None, step_log_p=step_log_p,
                                              dare_top_k=top_k, dare_threshold=threshold)
        k = 2 * k_beams if top_k is None else top_k
        want_chosen, want_alive, want_accepted = naive_dare(log_p, step_log_p, candidates, k_beams, k, threshold)
        assert accepted.tolist() == want_accepted, (seed, width)
        assert alive.tolist() == want_alive, (seed, width)
        for b in range(log_p.shape[0]):
            live = chosen[b][alive[b]].tolist()
            assert live == want_chosen[b], (seed, width, b)  # best first by target score
            assert all(0 <= c < width for c in chosen[b].tolist())


def test_dare_select_rejects_settings_outside_the_rule():
    log_p, step_log_p, candidates = random_depth(2, 10, 4, 0)
    with pytest.raises(ValueError, match="dare_top_k=2 must be >= K=3"):
        dare_select(log_p, log_p, candidates, 3, step_log_p=step_log_p, dare_top_k=2)
    with pytest.raises(ValueError, match="must be a probability"):
        dare_select(log_p, log_p, candidates, 3, step_log_p=step_log_p, dare_threshold=1.5)


def test_dare_is_registered_as_a_deterministic_mode():
    rule = RELAXED_RULES["dare"]
    assert "dare" in MODES and rule.select is dare_select and not rule.sampled and rule.step_log_p
    assert rule.options == ("dare_top_k", "dare_threshold")


def test_dare_with_k_equal_to_beams_and_no_threshold_is_strict_verification():
    for seed in (0, 1):
        trie, _, _, vocab = make_trie(num_items=60, num_collisions=2, seed=seed)
        target = ToyLM(vocab, seed=seed)
        draft = noisy_copy(target, vocab, 0.15, 50 + seed)
        ids, mask = left_pad(random_prompts(4, vocab, min_len=2, max_len=10, seed=seed), pad_id=0)
        for k, n, gamma in ((1, 4, 3), (3, 6, 2), (5, 40, 3), (10, 20, 1)):
            strict = speculative_beam_search(target, draft, ids, mask, trie, k, n, gamma)
            dare = speculative_beam_search(target, draft, ids, mask, trie, k, n, gamma, mode="dare",
                                           verify_options={"dare_top_k": k, "dare_threshold": 0.0})
            for row in range(ids.shape[0]):  # no generator needed: nothing is sampled
                assert torch.equal(dare.items[row], strict.items[row]), (seed, k, n, gamma, row)
            assert dare.lists == strict.lists


def test_dare_relaxes_strict_verification():
    trie, item_ids, _, vocab = make_trie(num_items=200, level_sizes=(8, 8, 8, 8), num_collisions=2, seed=3)
    target = ToyLM(vocab, seed=3)
    draft = noisy_copy(target, vocab, 0.6, 53)
    ids, mask = left_pad(random_prompts(6, vocab, min_len=2, max_len=10, seed=3), pad_id=0)
    accepted = {}
    for name, options in (("strict", None), ("top_k", {"dare_top_k": 20}),
                          ("threshold", {"dare_top_k": 20, "dare_threshold": 0.05})):
        mode = "strict" if options is None else "dare"
        out = speculative_beam_search(target, draft, ids, mask, trie, 5, 10, 3, mode=mode, verify_options=options)
        accepted[name] = out.stats.acceptance_rate
        assert (out.items >= 0).all() and set(out.items.flatten().tolist()) <= set(item_ids.tolist())
        assert all(len(set(row)) == 5 for row in out.items.tolist())
        assert (out.sequence_scores[:, :-1] >= out.sequence_scores[:, 1:]).all()
    assert accepted["top_k"] > accepted["strict"]  # a wider top-k passes more drafted depths
    assert accepted["threshold"] <= accepted["top_k"]  # a threshold only removes passes


def test_dare_draft_equal_to_target_accepts_every_step():
    trie, _, _, vocab = make_trie(seed=4)
    target, draft = ToyLM(vocab, seed=4), ToyLM(vocab, seed=4)
    ids, mask = left_pad(random_prompts(3, vocab, seed=4), pad_id=0)
    out = speculative_beam_search(target, draft, ids, mask, trie, 5, 5, 3, mode="dare",
                                  verify_options={"dare_top_k": 5})
    assert out.stats.accepted_steps == out.stats.drafted_steps


def test_verify_options_names_are_checked():
    trie, _, _, vocab = make_trie(seed=4)
    model = ToyLM(vocab, seed=4)
    ids, mask = left_pad(random_prompts(1, vocab, seed=4), pad_id=0)
    with pytest.raises(ValueError, match="unknown verify_options"):
        speculative_beam_search(model, model, ids, mask, trie, 3, 6, 2, mode="dare", verify_options={"top_k": 3})
