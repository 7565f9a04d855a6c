"""The tri-gram drafter: counts, history context and back-off estimate against naive Python counterparts, the PUCT
allocation against its sequential loop, online updates that move the drafts toward the target's lists, and strict
losslessness with updates and PUCT on (the contract's invariance tests, with nothing learned, are in
test_drafters.py)."""

import collections
import io
import itertools
import math

import pytest
import torch
from decoding_fixtures import make_trie, random_prompts
from toy_lm import ToyLM

from atspeed_exp.decoding.beam_search import beam_search, left_pad
from atspeed_exp.decoding.drafters import TrigramCounts, TrigramDrafter, build_trigram_counts
from atspeed_exp.decoding.drafters.trigram import history_context, puct_select
from atspeed_exp.decoding.speculative import speculative_beam_search
from atspeed_exp.decoding.tree import Level, View
from atspeed_exp.evaluation import evaluate_all_users, evaluate_speculative

from test_drafters import history_prompts, random_histories  # noqa: I001
from test_speculative import one_thread, same_list  # noqa: F401
from test_speculative_batched import one_user  # noqa: I001


def local(trie, sid) -> list[int]:
    return [int(t) - start for t, (start, _) in zip(sid.tolist(), trie.level_blocks)]


def is_item(trie, codes) -> bool:
    node = torch.zeros((), dtype=torch.long)
    for level, code in enumerate(codes):
        if not 0 <= code < trie.level_blocks[level][1] - trie.level_blocks[level][0]:
            return False
        node = trie.global_advance(node, torch.tensor(code))
    return int(trie.global_leaves_to_local(node)) < trie.num_leaves


def naive_counts(trie, histories):
    """n3[(d, a, b)][c], n2[(d, b)][c], n1[d][c] over each user's stream; an unknown item's tokens count nothing
    and give no context."""
    n3, n2, n1 = (collections.defaultdict(collections.Counter) for _ in range(3))
    for history in histories:
        stream = []
        for sid in history:
            codes = local(trie, sid)
            known = is_item(trie, codes)
            stream += [(d, c if known else None) for d, c in enumerate(codes)]
        for i, (d, c) in enumerate(stream):
            if c is None:
                continue
            n1[d][c] += 1
            b = stream[i - 1][1] if i >= 1 else None
            a = stream[i - 2][1] if i >= 2 else None
            if b is not None:
                n2[(d, b)][c] += 1
                if a is not None:
                    n3[(d, a, b)][c] += 1
    return n3, n2, n1


def allowed_codes(trie, prefix) -> list[int]:
    node = torch.zeros((), dtype=torch.long)
    for code in prefix:
        node = trie.global_advance(node, torch.tensor(code))
    return trie.global_allowed[node].nonzero().squeeze(1).tolist()


def naive_log_probs(trie, counts, history, prefix, alpha) -> dict[int, float]:
    """log p3 of the module docstring for a beam with local codes ``prefix`` after history codes ``history``
    (the last item's last two codes, or None)."""
    n3, n2, n1 = counts
    d = len(prefix)
    stream = [*(history or (None, None)), *prefix]
    a, b = stream[d], stream[d + 1]
    allowed = allowed_codes(trie, prefix)
    p = {c: 1 / len(allowed) for c in allowed}
    orders = [n1[d], n2[(d, b)] if b is not None else {}, n3[(d, a, b)] if a is not None and b is not None else {}]
    for n in orders:
        total = sum(n.get(c, 0) for c in allowed)
        if total > 0:
            p = {c: (n.get(c, 0) + alpha * p[c]) / (total + alpha) for c in allowed}
    return {c: math.log(v) if v > 0 else float("-inf") for c, v in p.items()}


def catalogue(seed=0, num_users=40):
    trie, item_ids, tokens, vocab = make_trie(num_items=60, num_collisions=2, seed=seed)
    histories = random_histories(tokens, num_users, seed=200 + seed, max_len=8)
    return trie, item_ids, tokens, vocab, histories


def unknown_sid(trie, tokens) -> torch.Tensor:
    """A SID whose codes are in their blocks but that names no catalogue item."""
    for sid in tokens:
        codes = local(trie, sid)
        for other in range(trie.level_blocks[-1][1] - trie.level_blocks[-1][0]):
            if not is_item(trie, codes[:-1] + [other]):
                return torch.tensor([*sid[:-1].tolist(), trie.level_blocks[-1][0] + other])
    raise AssertionError("every SID is an item")


def test_trigram_counts_equal_a_naive_count_across_item_boundaries():
    trie, _, tokens, _, histories = catalogue(seed=1)
    histories[3] = torch.cat([histories[3], unknown_sid(trie, tokens)[None], tokens[:2]])  # a gap in the stream
    counts = build_trigram_counts(histories, trie)
    n3, n2, n1 = naive_counts(trie, histories)
    state = counts.state()
    width = counts.width
    stored = {(int(k) // width, int(k) % width): float(v)
              for k, v in zip(state["trigram_keys"], state["trigram_counts"])}
    expected = {(((d * width + a) * width + b), c): float(n) for (d, a, b), row in n3.items() for c, n in row.items()}
    assert stored == expected
    assert counts.used == len(n3) and (counts.context_rows >= 0).sum() == len(n3)
    assert sum(v for row in n2.values() for v in row.values()) == counts.bigram.sum()
    for (d, b), row in n2.items():
        for c, n in row.items():
            assert counts.bigram[d, b, c] == n
    for d, row in n1.items():
        for c, n in row.items():
            assert counts.unigram[d, c] == n
    assert counts.unigram.sum() == sum(v for row in n1.values() for v in row.values())


def test_history_context_is_the_last_item_of_the_prompt():
    trie, _, tokens, _, _ = catalogue()
    last_two = [c for c in local(trie, tokens[5])[-2:]]
    prompts = [
        torch.cat([torch.tensor([1]), tokens[3], tokens[5], torch.tensor([2])]),  # two items: the last one counts
        torch.cat([torch.tensor([1]), tokens[5], tokens[3][:2], torch.tensor([2])]),  # a cut item after it
        torch.tensor([1, 2, 3]),  # no item
        torch.cat([torch.tensor([1]), tokens[5][:2], torch.tensor([1]), tokens[5][2:]]),  # broken by another token
    ]
    ids, mask = left_pad(prompts, pad_id=0)
    assert history_context(ids, mask, trie).tolist() == [last_two, last_two, [-1, -1], [-1, -1]]
    hidden = torch.cat([tokens[5], torch.tensor([1, 2])])  # the only item in the left padding: not real tokens
    ids, mask = left_pad([hidden], pad_id=0)
    mask[:, : tokens.shape[1]] = False
    assert history_context(ids, mask, trie).tolist() == [[-1, -1]]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 3.0])
def test_trigram_log_probs_follow_the_back_off_estimate(alpha):
    trie, _, tokens, _, histories = catalogue(seed=2, num_users=12)
    counts = build_trigram_counts(histories, trie)
    naive = naive_counts(trie, histories)
    drafter = TrigramDrafter(counts, smoothing=alpha, adapt="none")
    gen = torch.Generator().manual_seed(0)
    prompts = [*history_prompts(tokens, 3, 2), torch.tensor([1, 2])]  # the last one shows no item
    ids, mask = left_pad(prompts, pad_id=0)
    session = drafter.begin(View.round_one(ids, mask), trie, "vocab")
    history = [None if h[0] < 0 else tuple(h) for h in session.history.tolist()]
    num_levels = trie.num_levels
    # per user: beams at every depth: prefixes of random catalogue items (some never seen in a context)
    rows = [[local(trie, tokens[int(torch.randint(len(tokens), (1,), generator=gen))])[:d]
             for d in range(num_levels) for _ in range(4)] for _ in prompts]
    sequences = torch.zeros(len(prompts), len(rows[0]), num_levels, dtype=torch.long)
    nodes = torch.zeros(len(prompts), len(rows[0]), dtype=torch.long)
    for b, beams in enumerate(rows):
        for m, prefix in enumerate(beams):
            node = torch.zeros((), dtype=torch.long)
            for d, code in enumerate(prefix):
                sequences[b, m, d] = code + trie.level_blocks[d][0]
                node = trie.global_advance(node, torch.tensor(code))
            nodes[b, m] = node
    level = Level(sequences, nodes, torch.zeros(nodes.shape), torch.zeros(nodes.shape, dtype=torch.long))
    out = session.next_log_probs(level)
    for b, beams in enumerate(rows):
        for m, prefix in enumerate(beams):
            expected = torch.full((trie.max_block,), float("-inf"))
            for code, lp in naive_log_probs(trie, naive, history[b], prefix, alpha).items():
                expected[code] = lp
            assert torch.allclose(out[b, m], expected, atol=1e-5), (b, prefix)
    dead = Level(sequences[:, :1], torch.full((len(prompts), 1), int(trie.global_dead[2])), torch.zeros(4, 1),
                 torch.zeros(4, 1, dtype=torch.long))
    assert torch.isinf(session.next_log_probs(dead)).all()


def test_trigram_counts_are_deterministic_and_survive_save_and_load():
    trie, _, _, _, histories = catalogue(seed=3)
    counts = build_trigram_counts(histories, trie)
    again = build_trigram_counts(histories, trie)
    buffer = io.BytesIO()
    counts.save(buffer)
    buffer.seek(0)
    loaded = TrigramCounts.load(buffer)
    for other in (again, loaded):
        for name, value in counts.state().items():
            other_value = other.state()[name]
            assert torch.equal(value, other_value) if isinstance(value, torch.Tensor) else value == other_value, name
    assert torch.equal(loaded.context_rows, counts.context_rows)
    assert torch.equal(loaded.trigram[: loaded.used], counts.trigram[: counts.used])


def test_trigram_drafter_refuses_counts_of_another_catalogue_and_bad_settings():
    trie, _, _, _, histories = catalogue(seed=0)
    counts = build_trigram_counts(histories, trie)
    other, _, tokens, _ = make_trie(num_items=50, seed=4)
    ids, mask = left_pad(history_prompts(tokens, 2, 4), pad_id=0)
    with pytest.raises(ValueError, match="another item catalogue"):
        TrigramDrafter(counts).begin(View.round_one(ids, mask), other, "vocab")
    with pytest.raises(ValueError, match="adapt must be one of"):
        TrigramDrafter(counts, adapt="always")
    with pytest.raises(ValueError, match="update_weight > 0"):
        TrigramDrafter(counts, update_weight=0)


# -- PUCT ----------------------------------------------------------------------------------------------------------
def sequential_puct(beam_scores, log_probs, num, value, c):
    """The PUCT allocation of one user as the module docstring states it, one expansion at a time: each parent adds
    its children likeliest first (ties: lower code); the next expansion goes to the parent whose next child has the
    highest U(j, r) = Q(r) + c * P(j, r) * sqrt(N) / (1 + r) (ties: lower parent). Returns (parent, code) pairs."""
    beams, size = len(log_probs), len(log_probs[0])
    children, totals = [], {}
    for j in range(beams):
        finite = [cd for cd in range(size) if math.isfinite(beam_scores[j]) and math.isfinite(log_probs[j][cd])]
        children.append(sorted(finite, key=lambda cd: (-log_probs[j][cd], cd)))
        for cd in finite:
            totals[(j, cd)] = beam_scores[j] + log_probs[j][cd]
    if not totals:
        return []
    top = max(totals.values())
    norm = sum(math.exp(v - top) for v in totals.values())
    prior = {key: math.exp(v - top) / norm for key, v in totals.items()}
    visits, picked = [0] * beams, []
    for _ in range(num):
        best = None
        for j in range(beams):
            if visits[j] < len(children[j]):
                r = visits[j]
                u = value[r] + c * prior[(j, children[j][r])] * math.sqrt(num) / (1 + r)
                if best is None or u > best[0]:
                    best = (u, j)
        if best is None:
            break
        j = best[1]
        picked.append((j, children[j][visits[j]]))
        visits[j] += 1
    return picked


@pytest.mark.parametrize("seed", range(12))
def test_puct_select_equals_the_sequential_puct_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, beams, size = 3, 5, 7
    num = [1, 4, 9, 40][seed % 4]  # 40 > every candidate: the rest come back as -inf
    log_probs = torch.randn(batch, beams, size, generator=gen).log_softmax(-1)
    if seed % 3 == 0:  # quantised: ties between codes, parents and scores
        log_probs = (log_probs * 2).round() / 2
    log_probs = log_probs.masked_fill(torch.rand(batch, beams, size, generator=gen) < 0.3, float("-inf"))
    beam_scores = torch.randn(batch, beams, generator=gen)
    beam_scores[0, 1] = float("-inf")  # a dead parent
    beam_scores[2] = float("-inf")  # a user with nothing to draft
    beam_scores[2, 0] = 0.0
    value = torch.rand(batch, size, generator=gen)
    if seed % 2:  # values rising with rank: the running minimum matters
        value = value.sort(dim=1).values
    c = [0.0, 0.5, 2.0][seed % 3]
    scores, parent, codes = puct_select(beam_scores, log_probs, num, value, c)
    for b in range(batch):
        expected = sequential_puct(beam_scores[b].tolist(), log_probs[b].tolist(), num, value[b].tolist(), c)
        alive = torch.isfinite(scores[b])
        got = list(zip(parent[b][alive].tolist(), codes[b][alive].tolist()))
        assert got == expected, (b, got, expected)
        assert alive.tolist() == [True] * len(expected) + [False] * (num - len(expected))
        for (j, cd), s in zip(got, scores[b][alive].tolist()):
            assert s == pytest.approx(float(beam_scores[b, j] + log_probs[b, j, cd]))


def test_puct_without_value_or_exploration_weight_spreads_expansions():
    # two parents, one much likelier: top-N beam search gives it every slot, PUCT's 1 / (1 + r) spreads them
    log_probs = torch.log(torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]]]))
    beam_scores = torch.log(torch.tensor([[0.8, 0.2]]))
    _, parent, _ = puct_select(beam_scores, log_probs, 4, torch.zeros(1, 4), 1.0)
    assert sorted(parent[0].tolist()) == [0, 0, 0, 1]


# -- online updates and losslessness -------------------------------------------------------------------------------
def root_log_probs(drafter, trie, ids, mask) -> torch.Tensor:
    session = drafter.begin(View.round_one(ids, mask), trie, "vocab")
    batch = ids.shape[0]
    root = Level(torch.zeros(batch, 1, trie.num_levels, dtype=torch.long), torch.zeros(batch, 1, dtype=torch.long),
                 torch.zeros(batch, 1), torch.zeros(batch, 1, dtype=torch.long))
    return session.next_log_probs(root)[:, 0]  # [B, S]


def test_trigram_updates_move_the_drafts_toward_the_target_lists():
    trie, _, tokens, vocab, histories = catalogue(seed=5)
    target = ToyLM(vocab, seed=5)
    drafter = TrigramDrafter(build_trigram_counts(histories, trie), adapt="evaluation", update_weight=100.0)
    ids, mask = left_pad(history_prompts(tokens, 1, 5), pad_id=0)
    before = root_log_probs(drafter, trie, ids, mask)[0]
    first = speculative_beam_search(target, drafter, ids, mask, trie, 5, 10, 3)
    assert same_list(first, beam_search(target, ids, mask, trie, 5))
    chosen = sorted({c for c in (first.sequences[0, :, 0] - trie.level_blocks[0][0]).tolist()})
    after = root_log_probs(drafter, trie, ids, mask)[0]
    # the target's beams after each round are counted (here: 5 first codes, of which the final list keeps 3):
    # the drafter moves its mass toward them, and the list's codes become its favourites
    assert after[chosen].exp().sum() > before[chosen].exp().sum() + 0.05
    assert set(chosen) <= set(after.topk(5).indices.tolist())
    assert not set(chosen) <= set(before.topk(len(chosen) + 1).indices.tolist())
    again = speculative_beam_search(target, drafter, ids, mask, trie, 5, 10, 3)
    assert same_list(again, first)
    assert again.stats.accepted_steps > first.stats.accepted_steps and again.stats.target_calls == 1
    # a fresh drafter has learned nothing; one that learns per call forgets when the call ends
    assert torch.equal(root_log_probs(drafter.fresh(), trie, ids, mask)[0], before)
    per_call = TrigramDrafter(drafter.counts, adapt="call", update_weight=100.0)
    speculative_beam_search(target, per_call, ids, mask, trie, 5, 10, 3)
    assert per_call.learned is None and torch.equal(root_log_probs(per_call, trie, ids, mask)[0], before)


@pytest.mark.parametrize(("adapt", "tree"), [("evaluation", "beam"), ("evaluation", "puct"), ("call", "puct"),
                                             ("none", "puct")])
def test_trigram_strict_lists_equal_beam_search_while_learning(adapt, tree):
    trie, _, tokens, vocab, histories = catalogue(seed=6)
    target = ToyLM(vocab, seed=6)
    drafter = TrigramDrafter(build_trigram_counts(histories, trie), adapt=adapt, tree=tree, update_weight=3.0,
                             puct_c=1.5, value_decay=0.8)
    prompts = [*history_prompts(tokens, 5, 6), *random_prompts(1, vocab, seed=6)]
    rounds = set()
    for prompt, (k, gamma) in zip(itertools.cycle(prompts), itertools.product((1, 5, 10), (1, 2, 3))):
        ids, mask = left_pad([prompt], pad_id=0)
        for n in sorted({k, 2 * k, 40}):
            out = speculative_beam_search(target, drafter, ids, mask, trie, k, n, gamma)
            assert same_list(out, beam_search(target, ids, mask, trie, k)), (k, gamma, n)
            rounds.add(out.stats.rounds)
    ids, mask = left_pad(prompts, pad_id=0)
    for k, n, m, gamma in ((3, 6, 3, 2), (5, 40, 12, 3), (10, 20, 20, 1)):
        out = speculative_beam_search(target, drafter, ids, mask, trie, k, n, gamma, verify_beams=m)
        ref = beam_search(target, ids, mask, trie, k)
        for row in range(len(prompts)):
            assert same_list(one_user(out, row), one_user(ref, row)), (k, n, m, gamma, row)
    assert len(rounds) > 1  # some drafted depths accepted, some rejected
    if adapt == "evaluation" and tree == "puct":
        learned = drafter.learned
        assert (learned.hits <= learned.drafted + 1e-6).all() and learned.hits.sum() > 0
        assert learned.counts.unigram.sum() > 0


def test_evaluation_gives_every_pass_a_drafter_that_learned_nothing():
    trie, item_ids, tokens, vocab, histories = catalogue(seed=7)
    target = ToyLM(vocab, seed=7)
    drafter = TrigramDrafter(build_trigram_counts(histories, trie), adapt="evaluation", update_weight=50.0)
    prompts = [p.tolist() for p in history_prompts(tokens, 5, 7)]
    truth = [(int(item_ids[u]),) for u in range(5)]
    settings = dict(ks=(5,), draft_beams=10, progress=False, batch_size=2, warmup=2)
    both = evaluate_speculative(target, drafter, prompts, truth, trie, modes=("dare", "strict"), **settings)
    alone = evaluate_speculative(target, drafter, prompts, truth, trie, modes=("strict",), **settings)
    assert drafter.learned is None  # the drafter given is never the one that learns
    # strict after dare on the same users drafts as strict alone: no pass sees another's (or the warm-up's) lists
    for name in ("acceptance_rate", "target_calls_per_list", "recall@5"):
        assert both[f"eval/strict/k5/{name}"] == alone[f"eval/strict/k5/{name}"]
    assert both["eval/strict/k5/batched_mismatches"] == 0
    all_users = evaluate_all_users(target, drafter, prompts, truth, trie, 0, modes=("strict",), ks=(5,),
                                   batch_size=2, draft_beams=10, resamples=0, progress=False)
    assert all_users["eval/all/strict/k5/mismatches"] == 0 and drafter.learned is None
