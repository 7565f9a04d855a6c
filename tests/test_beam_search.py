
import pytest
import torch
from decoding_fixtures import make_trie, random_prompts
from toy_lm import ToyLM

from atspeed_exp.decoding.beam_search import beam_search, left_pad
from atspeed_exp.decoding.trie import ItemTrie


def reference_beam_search(model: ToyLM, prompt: torch.Tensor, tokens: torch.Tensor, num_beams: int):
    """Plain-Python beam search over full, uncached sequences: the behaviour beam_search must match."""
    prefixes = {tuple(row[:t].tolist()) for row in tokens for t in range(tokens.shape[1] + 1)}
    beams = [((), 0.0)]
    for _ in range(tokens.shape[1]):
        candidates = []
        for seq, score in beams:
            logp = torch.log_softmax(model.full_sequence_logits(torch.cat([prompt, torch.tensor(seq, dtype=torch.long)]))[-1], -1)
            for tok in range(logp.numel()):
                if seq + (tok,) in prefixes:
                    candidates.append((seq + (tok,), score + float(logp[tok])))
        candidates.sort(key=lambda c: -c[1])
        beams = candidates[:num_beams]
    return beams


def test_trie_allowed_and_leaves_match_item_set():
    trie, item_ids, tokens, _ = make_trie(num_items=40, num_collisions=3)
    prefixes = {tuple(row[:t].tolist()) for row in tokens for t in range(5)}
    # walk every item's path: the allowed mask at each node is exactly the set of continuing prefixes
    for row in tokens:
        node = torch.tensor(0)
        for depth in range(4):
            start, end = trie.block(depth)
            allowed = trie.allowed_mask(depth, node)
            expected = [tuple(row[:depth].tolist()) + (tok,) in prefixes for tok in range(start, end)]
            assert allowed.tolist() == expected
            node = trie.advance(depth, node, row[depth] - start)
        items = [i for i in trie.items_of_leaves(node).tolist() if i >= 0]
        same_sid = sorted(int(item_ids[j]) for j in range(len(tokens)) if torch.equal(tokens[j], row))
        assert items == same_sid
    assert trie.num_leaves == 40 - 3


def test_trie_dead_node_allows_nothing():
    trie, *_ = make_trie()
    for depth in range(4):
        dead = torch.tensor(trie.dead_node(depth))
        assert not trie.allowed_mask(depth, dead).any()
        assert int(trie.advance(depth, dead, torch.tensor(0))) == trie.dead_node(depth + 1)


def test_level_scores_may_skip_the_depth_check_only_for_rows_at_that_depth_or_dead():
    from atspeed_exp.decoding.beam_search import level_scores

    trie, *_, vocab = make_trie(seed=2)
    model = ToyLM(vocab, seed=2)
    depth = 1
    first = trie.depth_offsets[depth]
    live = torch.arange(first, first + 3)  # three depth-1 nodes
    dead = torch.tensor(trie.global_dead_ids)  # the dead node of every depth, the sink
    leaves = torch.arange(trie.depth_offsets[trie.num_levels], trie.depth_offsets[trie.num_levels] + 2)
    nodes = torch.cat([live, dead, leaves])[None]  # [1, n]
    hidden = torch.randn(1, nodes.shape[1], model.out.shape[0])
    checked, _ = level_scores(model, hidden, trie, nodes, [depth])
    skipped, _ = level_scores(model, hidden, trie, nodes, [depth], same_depth=True)
    assert torch.equal(checked, skipped)
    assert torch.isfinite(checked[0, :3]).any(1).all() and not torch.isfinite(checked[0, 3:]).any()
    # a live node of another depth is exactly what the check is for
    other = torch.tensor([[trie.depth_offsets[2]]])
    checked, _ = level_scores(model, hidden[:, :1], trie, other, [depth])
    assert not torch.isfinite(checked).any()


def test_trie_rejects_token_outside_block():
    _, item_ids, tokens, _ = make_trie()
    blocks = [(4, 10), (10, 15), (15, 20), (20, 24)]
    bad = tokens.clone()
    bad[3, 1] = 2
    with pytest.raises(ValueError, match=f"item {int(item_ids[3])}.*level 1"):
        ItemTrie(bad, item_ids, blocks)


@pytest.mark.parametrize("num_beams", [1, 3, 5, 10, 20])
def test_beam_search_matches_reference(num_beams):
    trie, item_ids, tokens, vocab = make_trie(num_items=60, num_collisions=2, seed=num_beams)
    model = ToyLM(vocab, seed=num_beams)
    prompts = random_prompts(3, vocab, seed=num_beams)
    ids, mask = left_pad(prompts, pad_id=0)
    out = beam_search(model, ids, mask, trie, num_beams)
    assert out.model_calls == 4 and model.calls == 4
    for row, prompt in enumerate(prompts):
        expected = reference_beam_search(model, prompt, tokens, num_beams)
        assert [tuple(s) for s in out.sequences[row].tolist()] == [seq for seq, _ in expected]
        assert out.sequence_scores[row].tolist() == pytest.approx([s for _, s in expected], abs=1e-4)


def test_beam_search_expands_colliding_sids_and_cuts_at_k():
    trie, item_ids, tokens, vocab = make_trie(num_items=30, num_collisions=5, seed=3)
    model = ToyLM(vocab, seed=3)
    ids, mask = left_pad(random_prompts(4, vocab, seed=3), pad_id=0)
    out = beam_search(model, ids, mask, trie, 10)
    for row in range(4):
        expected_items, expected_scores = [], []
        for seq, score in zip(out.sequences[row], out.sequence_scores[row]):
            same = sorted(int(item_ids[j]) for j in range(len(tokens)) if torch.equal(tokens[j], seq))
            expected_items += same
            expected_scores += [float(score)] * len(same)
        assert out.items[row].tolist() == expected_items[:10]
        assert out.scores[row].tolist() == pytest.approx(expected_scores[:10])
        assert set(out.items[row].tolist()) <= set(item_ids.tolist())


def test_beam_search_few_first_level_codes_still_returns_k_items():
    # 2 codes at level 0 but 20 beams: early steps carry impossible beams, the final list is full and valid
    trie, item_ids, tokens, vocab = make_trie(num_items=50, level_sizes=(2, 4, 4, 4), num_collisions=0, seed=5)
    model = ToyLM(vocab, seed=5)
    ids, mask = left_pad(random_prompts(2, vocab, seed=5), pad_id=0)
    out = beam_search(model, ids, mask, trie, 20)
    assert (out.items >= 0).all() and torch.isfinite(out.scores).all()
    assert all(len(set(row)) == 20 for row in out.items.tolist())
    expected = reference_beam_search(model, random_prompts(2, vocab, seed=5)[0], tokens, 20)
    assert out.sequence_scores[0].tolist() == pytest.approx([s for _, s in expected], abs=1e-4)


def test_beam_search_rejects_bad_settings():
    trie, _, _, vocab = make_trie(num_items=12, num_collisions=0)
    ids, mask = left_pad(random_prompts(1, vocab), pad_id=0)
    with pytest.raises(ValueError, match="exceeds the number of distinct valid SIDs"):
        beam_search(ToyLM(vocab), ids, mask, trie, 13)
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        beam_search(ToyLM(vocab), ids, mask, trie, 0)
    with pytest.raises(ValueError, match="empty prompt"):
        left_pad([torch.tensor([5, 6]), torch.tensor([], dtype=torch.long)], pad_id=0)


def test_beam_search_recorded_logits_match_teacher_forcing():
    trie, item_ids, tokens, vocab = make_trie(num_items=60, num_collisions=2, seed=7)
    model = ToyLM(vocab, seed=7)
    prompts = random_prompts(3, vocab, seed=7)
    ids, mask = left_pad(prompts, pad_id=0)
    out = beam_search(model, ids, mask, trie, 5, record_logits=True)
    plain = beam_search(model, ids, mask, trie, 5)
    assert torch.equal(out.sequences, plain.sequences) and out.model_calls == 4
    for row, prompt in enumerate(prompts):
        for k in range(5):
            full = model.full_sequence_logits(torch.cat([prompt, out.sequences[row, k]]))  # [T, V]
            for depth in range(4):
                start, end = trie.block(depth)
                context_logits = full[prompt.numel() - 1 + depth]
                torch.testing.assert_close(out.level_logits[depth][row, k], context_logits[start:end], atol=1e-5, rtol=0)
                torch.testing.assert_close(out.full_logsumexp[row, k, depth], torch.logsumexp(context_logits, -1), atol=1e-5, rtol=0)
