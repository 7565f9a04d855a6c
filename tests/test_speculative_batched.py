"""Batched speculative beam search: B users in one call, each with its own tree, acceptance and depth (ragged
progress). Strict mode must return, for every user, exactly the batch-1 list (and so target beam search's); top-M
verification and the level-restricted output projection must keep that."""

import itertools

import pytest
import torch
from decoding_fixtures import make_trie, random_prompts, tiny_llama
from toy_lm import ToyLM

from atspeed_exp.decoding.beam_search import beam_search, left_pad
from atspeed_exp.decoding.speculative import speculative_beam_search

# sibling test module: its helpers, and its autouse one_thread fixture (active here once imported)
from test_speculative import check_invariants, noisy_copy, one_thread, same_list  # noqa: F401, I001


def one_user(out, row):
    """Row ``row`` of a batched output, shaped like a batch-1 output (for same_list)."""
    class Row:
        items = out.items[row : row + 1]
        scores = out.scores[row : row + 1]
        sequences = out.sequences[row : row + 1]
        sequence_scores = out.sequence_scores[row : row + 1]
    return Row


class QueryCounter:
    """A ToyLM that records the query width of each call."""

    def __init__(self, model: ToyLM) -> None:
        self.model, self.queries = model, []

    def hidden(self, ids, positions, mask, cache):
        self.queries.append(ids.shape[1])
        return self.model.hidden(ids, positions, mask, cache)

    def __getattr__(self, name):
        return getattr(self.model, name)


def batched_sweep(seeds, num_users, settings):
    progress = set()  # numbers of rounds seen within one batch: ragged progress must occur
    for seed in seeds:
        trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=2, seed=seed)
        target = ToyLM(vocab, seed=seed)
        draft = noisy_copy(target, vocab, 0.3, 3000 + seed)
        prompts = random_prompts(num_users, vocab, min_len=2, max_len=12, seed=seed)  # ragged prompt lengths
        ids, mask = left_pad(prompts, pad_id=0)
        for index, (k, n, m, gamma, scope) in enumerate(settings):
            prune = index % 2 == 0  # half the settings keep rejected branches in the caches
            out = speculative_beam_search(target, draft, ids, mask, trie, k, n, gamma, verify_beams=m, scope=scope,
                                          prune=prune)
            ref = beam_search(target, ids, mask, trie, k, scope=scope)
            for row, prompt in enumerate(prompts):
                one_ids, one_mask = left_pad([prompt], pad_id=0)
                single = speculative_beam_search(target, draft, one_ids, one_mask, trie, k, n, gamma,
                                                 verify_beams=m, scope=scope)
                assert same_list(one_user(out, row), single), (seed, k, n, m, gamma, scope, row)
                assert same_list(one_user(out, row), one_user(ref, row)), (seed, k, n, m, gamma, scope, row)
                check_invariants(single, trie, item_ids, k)
                # per-list counters of the batch are the list's own counters
                for field in ("target_calls", "draft_calls", "rounds", "drafted_steps", "accepted_steps",
                              "target_tokens", "draft_tokens"):
                    assert getattr(out.lists, field)[row] == getattr(single.stats, field), (field, row)
            progress.add(len(set(out.lists.rounds)) > 1)
    return progress


SETTINGS = [
    (1, 4, 4, 3, "vocab"),
    (3, 6, 3, 2, "vocab"),
    (5, 40, 5, 3, "level"),
    (5, 40, 12, 1, "vocab"),
    (10, 20, 20, 3, "level"),
    (20, 40, 25, 2, "vocab"),
]


def test_batched_strict_equals_batch_one_and_beam_search():
    progress = batched_sweep(seeds=[0, 1], num_users=5, settings=SETTINGS)
    assert True in progress  # some batch held users at different depths


@pytest.mark.slow
def test_batched_strict_equals_batch_one_exhaustive():
    settings = [
        (k, n, m, gamma, scope)
        for k, gamma, scope in itertools.product((1, 3, 5, 10, 20), (1, 2, 3), ("vocab", "level"))
        for n in sorted({k, 2 * k, 40})
        for m in sorted({k, (k + n) // 2, n})
    ]
    assert True in batched_sweep(seeds=range(2, 5), num_users=7, settings=settings)


def test_top_m_verification_is_lossless_and_feeds_fewer_tokens():
    trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=2, seed=11)
    target = ToyLM(vocab, seed=11)
    draft = noisy_copy(target, vocab, 0.3, 12)
    ids, mask = left_pad(random_prompts(6, vocab, seed=11), pad_id=0)
    ref = beam_search(target, ids, mask, trie, 5)
    widths = {}
    for m in (5, 10, 20, 40):
        counted = QueryCounter(target)
        out = speculative_beam_search(counted, draft, ids, mask, trie, 5, 40, 3, verify_beams=m)
        for row in range(6):
            assert same_list(one_user(out, row), one_user(ref, row)), m
        widths[m] = counted.queries[0]  # round 1: prompt + the verified tree of 3 drafted levels
        assert widths[m] <= ids.shape[1] + 1 + 3 * m
    assert widths[5] < widths[10] < widths[20] < widths[40]


def test_level_scope_ranks_by_block_normalised_scores():
    # scope="level": log-probs normalised over each level's block; beam search and SD agree, and the scores are
    # the sums of block-normalised log-probs of the chosen tokens
    trie, _, _, vocab = make_trie(seed=4)
    target = ToyLM(vocab, seed=4)
    prompt = random_prompts(1, vocab, seed=4)[0]
    ids, mask = left_pad([prompt], pad_id=0)
    out = beam_search(target, ids, mask, trie, 3, scope="level")
    for k in range(3):
        sequence = out.sequences[0, k]
        total = 0.0
        for depth in range(trie.num_levels):
            logits = target.full_sequence_logits(torch.cat([prompt, sequence[:depth]]))[-1]
            start, end = trie.block(depth)
            total += float(torch.log_softmax(logits[start:end], -1)[sequence[depth] - start])
        assert abs(total - float(out.sequence_scores[0, k])) < 1e-4


@pytest.mark.parametrize("mode", ["relaxed", "relaxed_exact", "relaxed_official"])
def test_batched_relaxed_returns_valid_lists_and_consistent_counters(mode):
    trie, item_ids, _, vocab = make_trie(num_items=50, level_sizes=(2, 4, 4, 4), num_collisions=3, seed=13)
    target = ToyLM(vocab, seed=13)
    draft = noisy_copy(target, vocab, 0.5, 14)
    prompts = random_prompts(8, vocab, seed=13)
    ids, mask = left_pad(prompts, pad_id=0)
    out = speculative_beam_search(target, draft, ids, mask, trie, 10, 20, 3, mode=mode, verify_beams=15,
                                  generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.scores).all()
    for row in range(len(prompts)):
        items = out.items[row].tolist()
        assert len(set(items)) == 10 and set(items) <= set(item_ids.tolist())
        assert (out.sequence_scores[row, :-1] >= out.sequence_scores[row, 1:]).all()
        assert out.lists.rounds[row] + out.lists.accepted_steps[row] == trie.num_levels
        assert out.lists.draft_calls[row] == out.lists.drafted_steps[row]
    assert out.stats.rounds == max(out.lists.rounds)
    assert out.stats.accepted_steps == sum(out.lists.accepted_steps)


def test_batched_hf_llama_strict_matches_beam_search():
    pytest.importorskip("transformers")
    from atspeed_exp.decoding.tree import tree_beam_search

    trie, _, _, vocab = make_trie(seed=9)
    target, draft = tiny_llama(vocab, 2, 64, 0), tiny_llama(vocab, 1, 32, 1)
    ids, mask = left_pad(random_prompts(5, vocab, min_len=2, max_len=12, seed=9), pad_id=0)
    for k, n, m, gamma, scope in [(3, 6, 3, 3, "vocab"), (5, 40, 10, 2, "level"), (10, 10, 10, 1, "level")]:
        ref = beam_search(target, ids, mask, trie, k, scope=scope)
        out = speculative_beam_search(target, draft, ids, mask, trie, k, n, gamma, verify_beams=m, scope=scope)
        tree = tree_beam_search(target, ids, mask, trie, k, scope=scope)
        for row in range(5):
            assert same_list(one_user(out, row), one_user(ref, row)), (k, n, m, gamma, scope, row)
            assert same_list(one_user(tree, row), one_user(ref, row)), (k, scope, row)


def test_vocabulary_ending_at_a_short_last_block():
    # dead beams carry codes up to the widest block; their (void) tokens must still be valid ids when the last,
    # narrower block ends the vocabulary
    trie, item_ids, _, _ = make_trie(num_items=40, level_sizes=(6, 5, 5, 2), num_collisions=0, seed=21)
    vocab = trie.block(trie.num_levels - 1)[1]
    target, draft = ToyLM(vocab, seed=21), ToyLM(vocab, seed=22)
    ids, mask = left_pad(random_prompts(4, vocab, seed=21), pad_id=0)
    ref = beam_search(target, ids, mask, trie, 10)
    for mode in ("strict", "relaxed", "relaxed_official"):
        out = speculative_beam_search(target, draft, ids, mask, trie, 10, 20, 3, mode=mode, verify_beams=12,
                                      generator=torch.Generator().manual_seed(0))
        if mode == "strict":
            for row in range(4):
                assert same_list(one_user(out, row), one_user(ref, row))


@pytest.mark.parametrize("scope", ["vocab", "level"])
def test_tree_beam_search_equals_beam_search(scope):
    from atspeed_exp.decoding.tree import tree_beam_search

    for seed, level_sizes in ((0, (6, 5, 5, 4)), (5, (2, 4, 4, 4))):
        trie, _, _, vocab = make_trie(num_items=50, level_sizes=level_sizes, num_collisions=2, seed=seed)
        model = ToyLM(vocab, seed=seed)
        ids, mask = left_pad(random_prompts(6, vocab, min_len=2, max_len=12, seed=seed), pad_id=0)
        for k in (1, 3, 10, 20):
            ref = beam_search(model, ids, mask, trie, k, scope=scope)
            out = tree_beam_search(model, ids, mask, trie, k, scope=scope)
            assert out.model_calls == ref.model_calls == trie.num_levels
            for row in range(6):
                assert same_list(one_user(out, row), one_user(ref, row)), (seed, k, row)


def test_strict_record_logits_equal_beam_search_records():
    # teacher data made with a draft: the target's level logits at every final beam's prefixes, gathered across
    # rounds and ragged users, equal those the target-only beam search records
    trie, _, _, vocab = make_trie(num_items=60, num_collisions=2, seed=17)
    target = ToyLM(vocab, seed=17)
    draft = noisy_copy(target, vocab, 0.8, 18)
    ids, mask = left_pad(random_prompts(6, vocab, min_len=2, max_len=12, seed=17), pad_id=0)
    ragged = False
    for k, n, m, gamma in ((5, 10, 10, 3), (10, 40, 20, 2), (10, 40, 40, 1), (3, 6, 4, 3)):
        ref = beam_search(target, ids, mask, trie, k, record_logits=True)
        out = speculative_beam_search(target, draft, ids, mask, trie, k, n, gamma, verify_beams=m,
                                      record_logits=True)
        assert torch.equal(out.sequences, ref.sequences)
        ragged |= len(set(out.lists.rounds)) > 1
        torch.testing.assert_close(out.full_logsumexp, ref.full_logsumexp, atol=1e-4, rtol=0)
        for depth in range(trie.num_levels):
            torch.testing.assert_close(out.level_logits[depth], ref.level_logits[depth], atol=1e-4, rtol=0)
    assert ragged  # users finished after different numbers of rounds
    with pytest.raises(ValueError, match="record_logits needs mode='strict'"):
        speculative_beam_search(target, draft, ids, mask, trie, 5, 10, 3, mode="relaxed", record_logits=True,
                                generator=torch.Generator())


def test_bfloat16_models_decode_valid_lists():
    # the CUDA setting (eval.dtype auto -> bfloat16) exercised on the CPU: masks, scores and caches in bf16
    pytest.importorskip("transformers")
    from atspeed_exp.decoding.tree import tree_beam_search

    trie, item_ids, _, vocab = make_trie(seed=23)
    target = tiny_llama(vocab, 2, 64, 23, dtype=torch.bfloat16)
    assert target.dtype == torch.bfloat16
    ids, mask = left_pad(random_prompts(4, vocab, min_len=2, max_len=12, seed=23), pad_id=0)
    for out in (speculative_beam_search(target, target, ids, mask, trie, 5, 10, 3, verify_beams=5, scope="level"),
                tree_beam_search(target, ids, mask, trie, 5, scope="level")):
        assert torch.isfinite(out.scores).all()
        for row in range(4):
            items = out.items[row].tolist()
            assert len(set(items)) == 5 and set(items) <= set(item_ids.tolist())
