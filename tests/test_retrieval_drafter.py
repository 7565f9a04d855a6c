"""The retrieval drafter's pools, router and lookups against naive Python counterparts (strict losslessness with it
is in test_drafters.py)."""

import collections
import io
import math

import pytest
import torch
from decoding_fixtures import make_trie

from atspeed_exp.decoding.drafters import RetrievalDrafter, RetrievalPools, build_retrieval_pools
from atspeed_exp.decoding.beam_search import left_pad
from atspeed_exp.decoding.tree import View

from test_drafters import history_prompts, random_histories  # noqa: I001
from test_speculative import one_thread  # noqa: F401


def node_of(trie, prefix: tuple[int, ...]) -> int:
    """Global trie node of a prefix of local codes (walked from the root)."""
    node = torch.zeros((), dtype=torch.long)
    for code in prefix:
        node = trie.global_advance(node, torch.tensor(code))
    return int(node)


def local_codes(trie, sid: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(t) - start for t, (start, _) in zip(sid.tolist(), trie.level_blocks))


def naive_rows(trie, histories, users, top_n) -> dict[int, list[tuple[int, float]]]:
    """Per global node: the top_n (code, log share) of the interactions of ``users``, by count then code."""
    counts: dict[tuple[int, ...], collections.Counter] = collections.defaultdict(collections.Counter)
    for u in users:
        for sid in histories[u]:
            codes = local_codes(trie, sid)
            for depth in range(len(codes)):
                counts[codes[:depth]][codes[depth]] += 1
    rows = {}
    for prefix, counter in counts.items():
        total = sum(counter.values())
        ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]
        rows[node_of(trie, prefix)] = [(code, math.log(n / total)) for code, n in ranked]
    return rows


def stored_rows(pools, pool: int, num_nodes: int) -> dict[int, list[tuple[int, float]]]:
    rows = {}
    for node in range(num_nodes):
        row = pool * num_nodes + node
        start, end = int(pools.offsets[row]), int(pools.offsets[row + 1])
        if end > start:
            rows[node] = list(zip(pools.codes[start:end].tolist(), pools.log_probs[start:end].tolist()))
    return rows


def build(seed=0, groups=3, top_n=2, num_users=60, **kwargs):
    trie, _, tokens, _ = make_trie(num_items=60, num_collisions=2, seed=seed)
    histories = random_histories(tokens, num_users, seed=100 + seed, max_len=8)
    pools = build_retrieval_pools(histories, trie, groups=groups, top_n=top_n, dim=6, seed=seed, **kwargs)
    return trie, tokens, histories, pools


@pytest.mark.parametrize("top_n", [1, 2, 10])
def test_retrieval_pools_hold_the_top_continuations_of_a_naive_count(top_n):
    trie, _, histories, pools = build(top_n=top_n, min_history=3)
    num_nodes = trie.global_allowed.shape[0]
    groups = pools.num_groups
    assert groups == 3 and int(pools.group_sizes.sum()) == int((pools.user_groups < groups).sum())
    assert all(len(h) < 3 for h, g in zip(histories, pools.user_groups.tolist()) if g == groups)  # too short
    for pool in range(groups + 1):
        users = range(len(histories)) if pool == groups else (pools.user_groups == pool).nonzero().squeeze(1).tolist()
        expected, found = naive_rows(trie, histories, users, top_n), stored_rows(pools, pool, num_nodes)
        assert found.keys() == expected.keys(), pool
        for node, row in expected.items():
            assert [c for c, _ in found[node]] == [c for c, _ in row], (pool, node)
            assert torch.allclose(torch.tensor([lp for _, lp in found[node]]), torch.tensor([lp for _, lp in row]),
                                  atol=1e-6)


def test_retrieval_router_sends_a_training_history_to_its_users_group():
    trie, _, histories, pools = build(groups=4, min_history=2)
    users = [u for u, g in enumerate(pools.user_groups.tolist()) if g < pools.num_groups][:20]
    prompts = [torch.cat([torch.tensor([1]), histories[u].flatten(), torch.tensor([2])]) for u in users]
    ids, mask = left_pad(prompts, pad_id=0)
    assert pools.route(ids, mask, trie).tolist() == pools.user_groups[users].tolist()
    assert len(set(pools.user_groups[users].tolist())) > 1


def test_retrieval_router_sends_cold_users_to_the_global_pool():
    trie, tokens, _, pools = build(groups=3, min_history=2)
    one_item = torch.cat([torch.tensor([1]), tokens[0], torch.tensor([2])])
    no_item = torch.tensor([1, 2, 3])
    cut = torch.cat([tokens[0, :2], torch.tensor([1]), tokens[1, 2:]])  # a SID broken by another token
    ids, mask = left_pad([one_item, no_item, cut], pad_id=0)
    assert pools.route(ids, mask, trie).tolist() == [pools.num_groups] * 3
    # a whole history in the left padding does not count: only real prompt tokens do
    hidden = torch.cat([tokens[:3].flatten(), torch.tensor([1, 2])])
    ids, mask = left_pad([hidden], pad_id=0)
    mask[:, : 3 * tokens.shape[1]] = False
    assert pools.route(ids, mask, trie).tolist() == [pools.num_groups]


def test_retrieval_lookup_backs_off_to_the_global_pool_then_to_the_trie():
    trie, tokens, histories, pools = build(groups=2, top_n=10, min_history=1, num_users=6)
    num_nodes, groups = trie.global_allowed.shape[0], pools.num_groups
    seen = {g: set(stored_rows(pools, g, num_nodes)) for g in range(groups + 1)}
    unseen_by_group0 = sorted(seen[groups] - seen[0])
    never_seen = sorted(n for n in range(num_nodes) if trie.global_allowed[n].any() and n not in seen[groups])
    assert unseen_by_group0 and never_seen  # the random histories leave both kinds
    nodes = torch.tensor([[*unseen_by_group0[:3], never_seen[0], sorted(seen[0])[0]]])
    out = pools.next_log_probs(torch.tensor([0]), nodes, trie)[0]  # [5, S]
    global_rows, group_rows = stored_rows(pools, groups, num_nodes), stored_rows(pools, 0, num_nodes)
    for row, node in enumerate(nodes[0].tolist()):
        expected = torch.full((trie.max_block,), float("-inf"))
        if node in group_rows:
            entries = group_rows[node]
        elif node in global_rows:
            entries = global_rows[node]
        else:  # uniform over the allowed codes
            allowed = trie.global_allowed[node]
            entries = [(c, -math.log(int(allowed.sum()))) for c in allowed.nonzero().squeeze(1).tolist()]
        for code, lp in entries:
            expected[code] = lp
        assert torch.allclose(out[row], expected), node
    dead = torch.tensor([[int(trie.global_dead[1])]])
    assert torch.isinf(pools.next_log_probs(torch.tensor([groups]), dead, trie)).all()


def test_retrieval_pools_are_deterministic_and_survive_save_and_load():
    trie, tokens, histories, pools = build(seed=2)
    again = build_retrieval_pools(histories, trie, groups=3, top_n=2, dim=6, seed=2)
    buffer = io.BytesIO()
    pools.save(buffer)
    buffer.seek(0)
    loaded = RetrievalPools.load(buffer)
    for other in (again, loaded):
        for name, value in pools.state().items():
            other_value = other.state()[name]
            assert torch.equal(value, other_value) if isinstance(value, torch.Tensor) else value == other_value, name
    ids, mask = left_pad(history_prompts(tokens, 4, 2), pad_id=0)
    assert torch.equal(pools.route(ids, mask, trie), loaded.route(ids, mask, trie))


def test_retrieval_drafter_refuses_pools_of_another_catalogue():
    _, _, _, pools = build(seed=0)
    other, _, tokens, _ = make_trie(num_items=50, seed=4)
    ids, mask = left_pad(history_prompts(tokens, 2, 4), pad_id=0)
    with pytest.raises(ValueError, match="another item catalogue"):
        RetrievalDrafter(pools).begin(View.round_one(ids, mask), other, "vocab")


def test_retrieval_pools_without_groups_or_known_items():
    trie, _, tokens, _ = make_trie(seed=1)
    histories = random_histories(tokens, 5, seed=1)
    pools = build_retrieval_pools(histories, trie, groups=0, top_n=3, dim=2)
    assert pools.num_groups == 0 and (pools.user_groups == 0).all()  # group 0 = G: the global pool
    ids, mask = left_pad(history_prompts(tokens, 2, 1), pad_id=0)
    assert pools.route(ids, mask, trie).tolist() == [0, 0]
    with pytest.raises(ValueError, match="no training interaction"):
        build_retrieval_pools([torch.zeros(2, tokens.shape[1], dtype=torch.long)], trie)
