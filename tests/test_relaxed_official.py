"""The public AtSpeed code's relaxed verification (``mode="relaxed_official"``): the selection rule against a naive
loop and against its exact law, its edge cases, the top-k warper, and the engine in that mode."""

import collections
import itertools
import math

import pytest
import torch
from decoding_fixtures import make_trie, random_prompts
from toy_lm import ToyLM

# sibling test module: its helpers, and its autouse one_thread fixture (active here once imported)
from test_speculative import (  # noqa: F401, I001
    Scaled,
    check_invariants,
    noisy_copy,
    one_thread,
    sampling_noise,
    successive_sampling_sets,
    total_variation,
)
from atspeed_exp.decoding.beam_search import beam_search, left_pad
from atspeed_exp.decoding.sampling import top_k_warp
from atspeed_exp.decoding.speculative import relaxed_official_select, speculative_beam_search
from atspeed_exp.decoding.verify import RELAXED_RULES, RelaxedRule

INF = float("inf")


# -- a naive reference: the published description, one row at a time -------------------------------------------
def naive_official(log_p, log_q, candidates, k, generator):
    """The public code's relaxed verification of one depth written as a plain loop over rows, consuming the same
    random numbers as the vectorised rule (one uniform per candidate slot, then one Exp(1) per continuation whose
    -log gives a Gumbel key): accept each candidate with probability min(1, P/Q); with >= K accepted keep a random K
    of them (the K with the largest keys: iid keys give a uniformly random order); otherwise keep them all and draw
    the rest one at a time from max(P - Q, 0) without the accepted ones (successive sampling: argmax of log
    residual + key among those left), then from P once the residual's support is used up."""
    batch, width = log_p.shape
    uniform = torch.rand(tuple(candidates.shape), generator=generator)
    keys = -torch.log(torch.empty(batch, max(width, k)).exponential_(generator=generator))
    out = []
    for b in range(batch):
        p, q = log_p[b].double().exp(), log_q[b].double().exp()
        accepted = []
        for j, c in enumerate(candidates[b].tolist()):
            if c >= 0 and q[c] > 0 and torch.log(uniform[b, j]) < log_p[b, c] - log_q[b, c]:
                accepted.append(c)
        possible = [c for c in range(width) if p[c] > 0]
        if len(accepted) >= k:
            chosen = sorted(accepted, key=lambda c: -float(keys[b, c]))[:k]
        else:
            chosen = list(accepted)
            residual = {c: float(p[c] - q[c]) for c in possible if c not in accepted and p[c] > q[c]}
            while len(chosen) < min(k, len(possible)):
                pool = residual if residual else {c: float(p[c]) for c in possible if c not in chosen}
                c = max(pool, key=lambda c: math.log(pool[c]) + float(keys[b, c]))
                chosen.append(c)
                residual.pop(c, None)
        taken = k if len(accepted) >= min(k, len(possible)) else len(accepted)
        out.append((frozenset(chosen), taken))
    return out


def random_case(case: str, rows: int, width: int, seed: int):
    """P and a sub-normalised Q over ``width`` continuations (the draft's sampling distribution also covers
    continuations outside them: beams whose parent was not accepted), with candidates drawn from the draft's full
    distribution (-1 for draws outside)."""
    gen = torch.Generator().manual_seed(seed)
    outside = 3  # continuations of parents that were not accepted
    log_p = (torch.randn(rows, width, generator=gen) * 1.5).log_softmax(1)
    log_full = (torch.randn(rows, width + outside, generator=gen) * 1.5).log_softmax(1)
    num_candidates = 5
    if case == "equal":  # Q == P on the accepted beams' continuations, and nothing outside
        log_full[:, width:] = -INF
        log_full[:, :width] = log_p
    elif case == "few_possible":
        log_p[:, 2:] = -INF
        log_p = log_p.log_softmax(1)
    elif case == "few_candidates":
        num_candidates = 2
    elif case == "peaked":
        log_p, log_full = (log_p * 30).log_softmax(1), (log_full * 30).log_softmax(1)
    keys = log_full - torch.log(-torch.log(torch.rand(rows, width + outside, generator=gen)))
    keys, drawn = keys.topk(num_candidates, dim=1)
    candidates = drawn.masked_fill(torch.isinf(keys) | (drawn >= width), -1)
    return log_p, log_full[:, :width], candidates


@pytest.mark.parametrize("case", ["random", "equal", "few_possible", "few_candidates", "peaked"])
def test_relaxed_official_select_matches_a_naive_loop_draw_for_draw(case):
    width, k, rows = 7, 3, 400
    log_p, log_q, candidates = random_case(case, rows, width, seed=3)
    chosen, alive, accepted = relaxed_official_select(log_p, log_q, candidates, k, torch.Generator().manual_seed(9))
    naive = naive_official(log_p, log_q, candidates, k, torch.Generator().manual_seed(9))
    for b, (expected, taken) in enumerate(naive):
        assert frozenset(chosen[b][alive[b]].tolist()) == expected, (case, b)
        assert int(accepted[b]) == taken, (case, b)
    if case == "equal":  # P == Q and no draft mass elsewhere: every candidate passes
        assert (accepted == k).all()


def official_scheme_sets(p: list, q_full: list, width: int, num_candidates: int, k: int) -> dict:
    """Brute force: the law of the K kept continuations under the public code's rule at one depth. The draft draws
    ``num_candidates`` without replacement from ``q_full`` (over the ``width`` continuations of the accepted beams,
    then those of the others); P is over the first ``width``; Q is ``q_full`` as it is (not renormalised)."""
    dist = collections.defaultdict(float)
    items = range(width)
    for drawn, prob in successive_sampling_sets(dict(enumerate(q_full)), num_candidates).items():
        drafted = sorted(c for c in drawn if c < width)  # a draw outside has P = 0: never accepted
        for flags in itertools.product((False, True), repeat=len(drafted)):
            accepted = frozenset(c for c, f in zip(drafted, flags) if f)
            prob_a = prob
            for c, f in zip(drafted, flags):
                a = min(1.0, p[c] / q_full[c])
                prob_a *= a if f else 1.0 - a
            if prob_a == 0.0:
                continue
            if len(accepted) >= k:  # a uniformly random K of them
                subsets = list(itertools.combinations(sorted(accepted), k))
                for subset in subsets:
                    dist[frozenset(subset)] += prob_a / len(subsets)
                continue
            residual = {c: p[c] - q_full[c] for c in items if c not in accepted and p[c] > q_full[c]}
            need = k - len(accepted)
            if len(residual) >= need:
                fills = successive_sampling_sets(residual, need).items()
            else:  # the residual's whole support, then P without everything chosen
                rest = {c: p[c] for c in items if c not in accepted and c not in residual}
                tails = successive_sampling_sets(rest, need - len(residual)).items()
                fills = [(frozenset(residual) | tail, prob_t) for tail, prob_t in tails]
            for fill, prob_f in fills:
                dist[accepted | fill] += prob_a * prob_f
    return dist


@pytest.mark.parametrize("case", ["random", "q_above_p", "few_candidates", "peaked"])
def test_relaxed_official_select_has_the_law_of_the_published_rule(case):
    # exact law of the rule (enumerated from its description) against 30000 draws of the vectorised one
    gen = torch.Generator().manual_seed(21)
    width, outside, k, rows, num_candidates = 5, 2, 2, 30000, 3
    p = (torch.randn(width, generator=gen) * 1.5).softmax(0)
    q_full = (torch.randn(width + outside, generator=gen) * 1.5).softmax(0)
    if case == "q_above_p":  # Q > P on all but one continuation: the residual has one entry
        p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
        q_full = torch.tensor([0.1, 0.25, 0.2, 0.15, 0.1, 0.1, 0.1])
    elif case == "few_candidates":
        num_candidates = 1
    elif case == "peaked":
        p, q_full = (p.log() * 4).softmax(0), (q_full.log() * 4).softmax(0)
    keys = q_full.log() - torch.log(-torch.log(torch.rand(rows, width + outside, generator=gen)))
    drawn = keys.topk(num_candidates, dim=1).indices
    candidates = drawn.masked_fill(drawn >= width, -1)
    log_q = q_full[:width].log().expand(rows, -1)
    chosen, alive, _ = relaxed_official_select(p.log().expand(rows, -1), log_q, candidates, k, gen)
    assert alive.all()
    empirical = collections.Counter(frozenset(row) for row in chosen.tolist())
    law = official_scheme_sets(p.tolist(), q_full.tolist(), width, num_candidates, k)
    assert abs(sum(law.values()) - 1.0) < 1e-9
    assert total_variation(empirical, law) < 2 * sampling_noise(law, rows), case


# -- edge cases ----------------------------------------------------------------------------------------------------
def law_of(chosen, alive) -> collections.Counter:
    return collections.Counter(
        frozenset(c for c, a in zip(row, live) if a) for row, live in zip(chosen.tolist(), alive.tolist())
    )


def test_relaxed_official_select_no_candidates_draws_from_the_residual():
    # nothing drafted continues an accepted beam: the K beams are drawn from max(P - Q, 0) (Q = 0: from P)
    rows, k = 20000, 2
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    q = torch.tensor([0.05, 0.35, 0.1, 0.05])  # sub-normalised: the draft's mass sits mostly elsewhere
    none = torch.full((rows, 3), -1)
    for log_q, weights in ((q.log(), (p - q).clamp(min=0)), (torch.full((4,), -INF), p)):
        chosen, alive, accepted = relaxed_official_select(
            p.log().expand(rows, -1), log_q.expand(rows, -1), none, k, torch.Generator().manual_seed(0)
        )
        assert (accepted == 0).all() and alive.all()
        law = successive_sampling_sets(dict(enumerate(weights.tolist())), k)
        assert total_variation(law_of(chosen, alive), law) < 2 * sampling_noise(law, rows)


def test_relaxed_official_select_all_accepted_keeps_a_uniform_random_k():
    # Q == P: every candidate is accepted; with 4 candidates and K = 2 each of the 6 pairs is kept equally often
    rows, k = 12000, 2
    log_p = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1]).log().expand(rows, -1)
    candidates = torch.tensor([[4, 0, 2, 3]]).expand(rows, -1)
    chosen, alive, accepted = relaxed_official_select(
        log_p, log_p.clone(), candidates, k, torch.Generator().manual_seed(3)
    )
    assert (accepted == k).all() and alive.all()
    law = {frozenset(pair): 1 / 6 for pair in itertools.combinations([0, 2, 3, 4], 2)}
    assert total_variation(law_of(chosen, alive), law) < 2 * sampling_noise(law, rows)


def test_relaxed_official_select_fewer_possible_than_k_pads_with_placeholders():
    log_p = torch.tensor([[0.6, 0.4, 0.0, 0.0, 0.0]]).log()  # 2 possible continuations, K = 4
    log_q = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05]]).log()
    for candidates, accepted_all in (([[0, 1, 2]], True), ([[2, 3]], False)):
        chosen, alive, accepted = relaxed_official_select(
            log_p, log_q, torch.tensor(candidates), 4, torch.Generator().manual_seed(1)
        )
        assert set(chosen[0][alive[0]].tolist()) == {0, 1} and int(alive.sum()) == 2
        assert (int(accepted[0]) == 4) == accepted_all  # both possible ones accepted (P >= Q there): depth passes
    # fewer continuations than beams at all (C < K)
    chosen, alive, accepted = relaxed_official_select(
        torch.tensor([[0.0]]), torch.tensor([[0.0]]), torch.tensor([[0]]), 3, torch.Generator().manual_seed(0)
    )
    assert chosen.shape == (1, 3) and alive.tolist() == [[True, False, False]] and int(accepted[0]) == 3


def test_relaxed_official_select_empty_residual_falls_back_to_p():
    # Q >= P everywhere (Q == P on these continuations): the residual is empty, so after the one accepted candidate
    # the other K - 1 are drawn from P without it, never a repeat or an impossible continuation
    rows, k = 20000, 3
    p = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    log_p = p.log().expand(rows, -1)
    chosen, alive, accepted = relaxed_official_select(
        log_p, log_p.clone(), torch.tensor([[1]]).expand(rows, -1), k, torch.Generator().manual_seed(2)
    )
    assert (accepted == 1).all() and alive.all()
    rest = successive_sampling_sets({0: 0.4, 2: 0.2, 3: 0.1}, k - 1)
    law = {fill | {1}: prob for fill, prob in rest.items()}
    assert total_variation(law_of(chosen, alive), law) < 2 * sampling_noise(law, rows)


def test_relaxed_official_select_p_equal_q_accepts_every_candidate():
    gen = torch.Generator().manual_seed(4)
    rows, width, k = 300, 9, 3
    log_p = (torch.randn(rows, width, generator=gen) * 2).log_softmax(1)
    candidates = torch.rand(rows, width, generator=gen).argsort(1)[:, :5]
    chosen, alive, accepted = relaxed_official_select(log_p, log_p.clone(), candidates, k, gen)
    assert (accepted == k).all() and alive.all()
    member = torch.zeros(rows, width, dtype=torch.bool).scatter(1, chosen, True)
    drafted = torch.zeros(rows, width, dtype=torch.bool).scatter(1, candidates, True)
    assert (member <= drafted).all() and (member.sum(1) == k).all()  # K distinct drafted continuations


# -- the warper ----------------------------------------------------------------------------------------------------
def test_top_k_warp_matches_transformers_rule_row_by_row():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 4, 9, generator=gen).log_softmax(-1)
    scores[0, 0, 3:] = -INF  # fewer allowed codes than k: unchanged
    scores[1, 1, :] = -INF  # a dead row
    scores[2, 2, 4] = scores[2, 2, 5]  # a tie at the k-th value: both kept
    for k in (1, 3, 9, 50):
        warped = top_k_warp(scores, k)
        for row, out in zip(scores.reshape(-1, 9), warped.reshape(-1, 9)):
            ranked = sorted(row.tolist(), reverse=True)
            floor = ranked[min(k, len(ranked)) - 1]
            expected = [x if x >= floor else -INF for x in row.tolist()]
            assert out.tolist() == expected
    assert top_k_warp(scores, None) is scores


# -- the engine ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["vocab", "level"])
def test_speculative_relaxed_official_top_1_warper_gives_greedy_decoding(scope):
    # with a top-1 warper P is one-hot on the target's best code: every drafted candidate elsewhere is rejected and
    # the residual is that code, so K = 1 reproduces greedy target decoding for any draft; the lists no longer
    # depend on the random draws, so the batched call equals the batch-1 calls
    trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=2, seed=3)
    target, draft = ToyLM(vocab, seed=3), ToyLM(vocab, seed=4)
    gen = torch.Generator().manual_seed(0)
    prompts = random_prompts(4, vocab, min_len=2, max_len=12, seed=3)
    batch_ids, batch_mask = left_pad(prompts, pad_id=0)
    for gamma, n, m in ((1, 3, 3), (3, 5, 2), (2, 4, 4)):
        batched = speculative_beam_search(target, draft, batch_ids, batch_mask, trie, 1, n, gamma, verify_beams=m,
                                          mode="relaxed_official", generator=gen, scope=scope, official_top_k=1)
        for row, prompt in enumerate(prompts):
            ids, mask = left_pad([prompt], pad_id=0)
            ref = beam_search(target, ids, mask, trie, 1, scope=scope)
            out = speculative_beam_search(target, draft, ids, mask, trie, 1, n, gamma, verify_beams=m,
                                          mode="relaxed_official", generator=gen, scope=scope, official_top_k=1)
            assert torch.equal(out.sequences, ref.sequences) and torch.equal(batched.sequences[row], ref.sequences[0])
            check_invariants(out, trie, item_ids, 1)


def test_speculative_relaxed_official_q_is_the_drafts_full_distribution(monkeypatch):
    # draft = target and no warper: Q of a continuation of the accepted beams is P times the share of the draft's
    # sampling mass on those beams, so log P - log Q is one constant >= 0 per row, 0 at a round's first depth (its
    # beams are all accepted) and > 0 once the accepted K are fewer than the N drafted beams (top-M included).
    # gamma 2: a round's second depth follows an accepted first one (Q == P there: all N candidates pass), so no
    # call verifies continuations of target-drawn beams (computed, then discarded, after a rejection)
    trie, _, _, vocab = make_trie(num_items=60, num_collisions=2, seed=6)
    target, draft = ToyLM(vocab, seed=6), ToyLM(vocab, seed=6)
    gaps = []

    def spy(log_p, log_q, candidates, num_beams, generator):
        both = torch.isfinite(log_p) & torch.isfinite(log_q)
        gap = torch.where(both, log_p - log_q, torch.nan)
        rows = both.any(1)
        low, high = gap.nan_to_num(INF).amin(1)[rows], gap.nan_to_num(-INF).amax(1)[rows]
        assert torch.allclose(low, high, atol=1e-4) and (low > -1e-4).all()
        gaps.extend(low.tolist())
        return relaxed_official_select(log_p, log_q, candidates, num_beams, generator)

    monkeypatch.setitem(RELAXED_RULES, "relaxed_official", RelaxedRule(spy, full_q=True, warped=True))
    ids, mask = left_pad(random_prompts(4, vocab, seed=6), pad_id=0)
    for m in (12, 8):
        speculative_beam_search(target, draft, ids, mask, trie, 4, 12, 2, mode="relaxed_official",
                                verify_beams=m, generator=torch.Generator().manual_seed(0), official_top_k=None)
    assert min(gaps) < 1e-4 and max(gaps) > 0.1


@pytest.mark.parametrize("top_k", [None, 2, 50])
def test_speculative_relaxed_official_batched_valid_lists_and_counters(top_k):
    trie, item_ids, _, vocab = make_trie(num_items=50, level_sizes=(2, 4, 4, 4), num_collisions=3, seed=13)
    target = ToyLM(vocab, seed=13)
    draft = noisy_copy(target, vocab, 0.5, 14)
    prompts = random_prompts(8, vocab, seed=13)
    ids, mask = left_pad(prompts, pad_id=0)
    for k, n, m, gamma, scope in ((10, 20, 15, 3, "vocab"), (3, 6, 6, 2, "level"), (5, 10, 7, 1, "vocab")):
        out = speculative_beam_search(target, draft, ids, mask, trie, k, n, gamma, mode="relaxed_official",
                                      verify_beams=m, scope=scope, generator=torch.Generator().manual_seed(0),
                                      official_top_k=top_k)
        assert torch.isfinite(out.scores).all()
        for row in range(len(prompts)):
            items = out.items[row].tolist()
            assert len(set(items)) == k and set(items) <= set(item_ids.tolist())
            assert (out.sequence_scores[row, :-1] >= out.sequence_scores[row, 1:]).all()
            assert out.lists.rounds[row] + out.lists.accepted_steps[row] == trie.num_levels
            assert out.lists.draft_calls[row] == out.lists.drafted_steps[row]
        assert out.stats.rounds == max(out.lists.rounds)
        assert out.stats.accepted_steps == sum(out.lists.accepted_steps)


def test_speculative_relaxed_official_peaked_models_return_k_valid_distinct_items():
    # near one-hot models: probabilities underflow, residuals empty, fewer possible continuations than beams
    for seed, scale, draft_scale, k, extra, gamma, top_k in itertools.islice(
        itertools.product(range(3), (1.0, 300.0), (1.0, 300.0), (1, 10), (0, 7), (1, 3), (None, 2)), 0, None, 7
    ):
        trie, item_ids, _, vocab = make_trie(num_items=40, level_sizes=(3, 4, 4, 4), num_collisions=2, seed=seed)
        target = Scaled(ToyLM(vocab, seed=seed), scale)
        draft = Scaled(ToyLM(vocab, seed=seed + 1), draft_scale)
        ids, mask = left_pad(random_prompts(1, vocab, seed=seed), pad_id=0)
        out = speculative_beam_search(target, draft, ids, mask, trie, k, k + extra, gamma, mode="relaxed_official",
                                      generator=torch.Generator().manual_seed(seed), official_top_k=top_k)
        if top_k is None:
            check_invariants(out, trie, item_ids, k)
        else:  # a top-2 warper can leave fewer than K continuations: placeholders (-1, -inf) rank last
            live = torch.isfinite(out.scores[0])
            items = out.items[0][live].tolist()
            assert len(set(items)) == len(items) >= 1 and set(items) <= set(item_ids.tolist())
            assert (out.items[0][~live] == -1).all() and live.long().diff().le(0).all()
