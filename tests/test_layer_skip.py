"""The layer-skip drafter: a skipped sublayer is a zero residual update (checked against a transformers model whose
skipped sublayers' output projections are zeroed), the draft shares the target's weights, strict verification
returns beam search's lists for any skip set, and the empty set with N = K drafts what the target verifies (acceptance
1; with N > K the draft's wider beam can rank a continuation of one of its extra beams above one of the target's top
K, so a depth can fail even then)."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from decoding_fixtures import make_trie, random_prompts
from test_lean import PAD, llama, run_calls

from atspeed_exp.decoding.beam_search import beam_search, left_pad
from atspeed_exp.decoding.drafters import DRAFTERS, LayerSkipDrafter
from atspeed_exp.decoding.skip_search import SkipSearchResult, search_skip_set
from atspeed_exp.decoding.speculative import speculative_beam_search
from atspeed_exp.models.adapter import HFDecoderLM
from atspeed_exp.models.lean import LeanLlamaLM

# sibling test modules: their helpers, and the autouse one_thread fixture (active here once imported)
from test_drafters import history_prompts  # noqa: I001
from test_speculative import one_thread, same_list  # noqa: F401, I001
from test_speculative_batched import one_user  # noqa: I001

LAYERS = 3
SKIP_SETS = [((), ()), ((1,), ()), ((), (0, 2)), ((0, 2), (1,)), (tuple(range(LAYERS)), tuple(range(LAYERS)))]


def zeroed(model, attention, mlp):
    """A copy of ``model`` whose skipped sublayers add zero to the residual stream (output projections zeroed)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for i in attention:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
        for i in mlp:
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


def lean_target(seed: int, vocab: int) -> LeanLlamaLM:
    return LeanLlamaLM(llama(seed=seed, vocab_size=vocab, num_hidden_layers=LAYERS))


@pytest.mark.parametrize("attention, mlp", SKIP_SETS)
def test_skipping_equals_zeroed_sublayers_through_prefill_reorder_tree_and_pruning(attention, mlp):
    model = llama(seed=2, num_hidden_layers=LAYERS)
    ids = torch.tensor([[1, 11, 12, 13, 14], [PAD, PAD, 1, 21, 22]])
    expected = run_calls(HFDecoderLM(zeroed(model, attention, mlp)), ids, ids != PAD)
    full = LeanLlamaLM(model)
    for stacked in (False, True):
        full.stack_cache_edits = stacked
        got = run_calls(full.skipping(attention, mlp), ids, ids != PAD)
        for want, have in zip(expected, got, strict=True):
            torch.testing.assert_close(have, want, atol=2e-5, rtol=0)
    if attention or mlp:  # the skip changes the outputs (else the comparison above proves nothing)
        assert not torch.allclose(run_calls(full, ids, ids != PAD)[0], expected[0], atol=1e-3)


def test_skipping_is_a_view_sharing_the_weights():
    target = lean_target(0, 50)
    view = target.skipping([0], [1, 2])
    assert view.layers is target.layers and view.embed.data_ptr() == target.embed.data_ptr()
    assert target.skip_attention == frozenset() and view.skip_attention == {0} and view.skip_mlp == {1, 2}
    with pytest.raises(ValueError, match="outside 0..2"):
        target.skipping([3])
    drafter = LayerSkipDrafter(target, [2, 0, 0], [1])
    assert drafter.skip_attention == (0, 2) and drafter.kept_fraction == pytest.approx(0.5)
    assert DRAFTERS["layer_skip"] is LayerSkipDrafter
    with pytest.raises(TypeError, match="skip sublayers"):
        LayerSkipDrafter(HFDecoderLM(llama()), [0])


def full_acceptance_calls(num_levels: int, gamma: int) -> int:
    """Target calls per list when every drafted depth passes: a round drafts d = min(gamma, L - t - 1) depths and
    advances d + 1 tokens."""
    t = calls = 0
    while t < num_levels:
        t, calls = t + min(gamma, num_levels - t - 1) + 1, calls + 1
    return calls


@pytest.mark.parametrize("attention, mlp", SKIP_SETS)
def test_layer_skip_strict_lists_equal_beam_search(attention, mlp):
    trie, _, tokens, vocab = make_trie(num_items=60, num_collisions=2, seed=1)
    target = lean_target(1, vocab)
    drafter = LayerSkipDrafter(target, attention, mlp)
    prompts = [*random_prompts(2, vocab, min_len=2, max_len=10, seed=1), *history_prompts(tokens, 2, 1)]
    for k, n, gamma in ((1, 1, 3), (5, 5, 2), (3, 3, 1), (1, 4, 3), (5, 10, 2), (10, 40, 3)):
        ref = beam_search(target, *left_pad(prompts, pad_id=PAD), trie, k)
        out = speculative_beam_search(target, drafter, *left_pad(prompts, pad_id=PAD), trie, k, n, gamma)
        for row in range(len(prompts)):
            assert same_list(one_user(out, row), one_user(ref, row)), (attention, mlp, k, row)
        single = speculative_beam_search(target, drafter, *left_pad(prompts[:1], pad_id=PAD), trie, k, n, gamma)
        assert same_list(single, one_user(ref, 0))
        stats = out.stats
        if not attention and not mlp and n == k:  # the draft runs the target's own K-beam search: all depths pass
            assert stats.drafted_steps > 0 and stats.accepted_steps == stats.drafted_steps
            assert out.lists.target_calls == [full_acceptance_calls(trie.num_levels, gamma)] * len(prompts)


def test_layer_skip_drops_acceptance_when_most_sublayers_are_skipped():
    trie, _, _, vocab = make_trie(seed=5)
    target = lean_target(5, vocab)
    ids, mask = left_pad(random_prompts(6, vocab, seed=5), pad_id=PAD)
    rates = [speculative_beam_search(target, LayerSkipDrafter(target, a, m), ids, mask, trie, 5, 5, 3)
             .stats.acceptance_rate for a, m in (((), ()), ((0, 1, 2), (0, 1, 2)))]
    assert rates[0] == 1.0 and rates[1] < 1.0


@pytest.mark.parametrize("mode", ["relaxed", "relaxed_exact", "relaxed_official", "dare"])
def test_layer_skip_runs_every_relaxed_rule(mode):
    trie, item_ids, _, vocab = make_trie(seed=6)
    target = lean_target(6, vocab)
    ids, mask = left_pad(random_prompts(3, vocab, seed=6), pad_id=PAD)
    out = speculative_beam_search(target, LayerSkipDrafter(target, [1], [0, 2]), ids, mask, trie, 5, 10, 3,
                                  mode=mode, generator=torch.Generator().manual_seed(0))
    assert torch.isin(out.items, item_ids).all() and torch.isfinite(out.scores).all()
    assert out.stats.draft_calls > 0


# -- skip-set search -------------------------------------------------------------------------------------------------
def naive_objective(target, attention, mlp, prompts, trie, k, n, gamma) -> float:
    """The cost model by hand: per list, one batch-1 call at a time, target calls + kept share x draft calls."""
    kept = 1 - (len(set(attention)) + len(set(mlp))) / (2 * LAYERS)
    total = 0.0
    for prompt in prompts:
        out = speculative_beam_search(target, LayerSkipDrafter(target, attention, mlp),
                                      *left_pad([prompt], pad_id=PAD), trie, k, n, gamma)
        total += out.stats.target_calls + kept * out.stats.draft_calls
    return total / len(prompts)


def test_skip_search_beats_the_empty_and_full_sets_and_is_deterministic(caplog):
    trie, _, tokens, vocab = make_trie(seed=7)
    model = llama(seed=7, vocab_size=vocab, num_hidden_layers=LAYERS)
    with torch.no_grad():  # one sublayer that matters: a random init's residual stream is mostly the embedding
        model.model.layers[1].mlp.down_proj.weight.mul_(60)
    target = LeanLlamaLM(model)
    prompts = [*random_prompts(2, vocab, seed=7), *history_prompts(tokens, 2, 7)]
    k, n, gamma = 3, 6, 3
    with caplog.at_level(logging.INFO, logger="atspeed_exp.decoding.skip_search"):
        result = search_skip_set(target, prompts, trie, PAD, k, n, gamma, seed=0, batch_size=4)
    progress = [r.getMessage() for r in caplog.records if r.name == "atspeed_exp.decoding.skip_search"]
    assert len(progress) == len(result.trace)  # a log line per measurement, so a long search shows where it is
    assert progress[0].startswith("skip-set search: measurement 1 (at most ") and "-> objective" in progress[0]
    everything = tuple(range(LAYERS))
    chosen = naive_objective(target, result.skip_attention, result.skip_mlp, prompts, trie, k, n, gamma)
    assert chosen == pytest.approx(result.best.objective)
    empty = naive_objective(target, (), (), prompts, trie, k, n, gamma)
    full = naive_objective(target, everything, everything, prompts, trie, k, n, gamma)
    assert chosen < empty and chosen < full  # here strictly: the search keeps the sublayer that matters
    assert 1 not in result.skip_mlp and len(result.skip_attention) + len(result.skip_mlp) > 0
    assert result.trace[0]["objective"] == pytest.approx(empty) and result.trace[-1]["objective"] == pytest.approx(full)
    assert min(step["objective"] for step in result.trace) == pytest.approx(chosen)
    assert sum(1 for step in result.trace if step["step"] == 1) == 2 * LAYERS
    again = search_skip_set(target, prompts, trie, PAD, k, n, gamma, seed=0, batch_size=2)
    assert again.trace == result.trace and again.best == result.best
    restored = SkipSearchResult.from_state(json.loads(json.dumps(result.state())))
    assert restored.best == result.best and restored.trace == result.trace


def test_skip_search_respects_max_skipped_and_runs_a_sampling_rule():
    trie, _, _, vocab = make_trie(seed=8)
    target = lean_target(8, vocab)
    prompts = random_prompts(4, vocab, seed=8)
    result = search_skip_set(target, prompts, trie, PAD, 2, 4, 2, mode="relaxed", seed=3, max_skipped=1)
    assert {step["step"] for step in result.trace} <= {-1, 0, 1}
    assert len(result.skip_attention) + len(result.skip_mlp) in (0, 1, 2 * LAYERS)
    again = search_skip_set(target, prompts, trie, PAD, 2, 4, 2, mode="relaxed", seed=3, max_skipped=1)
    assert again.trace == result.trace
