import collections
import itertools
import math
import subprocess
import sys

import pytest
import torch
from decoding_fixtures import make_trie, random_prompts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toy_lm import ToyLM

from atspeed_exp.decoding.beam_search import beam_search, left_pad
from atspeed_exp.decoding.speculative import beam_sample, relaxed_select, speculative_beam_search

INF = float("inf")


@pytest.fixture(autouse=True)
def one_thread():
    # the tensors here are tiny: thread start-up costs more than the work (and thrashes on a shared CPU)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noisy_copy(model: ToyLM, vocab: int, scale: float, seed: int) -> ToyLM:
    """A draft close to the target: its weights plus Gaussian noise (some drafted steps accepted, some not)."""
    draft = ToyLM(vocab, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    draft.token_emb = model.token_emb + scale * torch.randn(model.token_emb.shape, generator=gen)
    draft.pos_emb = model.pos_emb.clone()
    draft.out = model.out + scale * torch.randn(model.out.shape, generator=gen)
    return draft


class Scaled:
    """A model with its logits multiplied by ``scale``: large scales give near one-hot distributions whose
    probabilities underflow (empty residuals, fewer non-zero entries than beams)."""

    def __init__(self, model: ToyLM, scale: float) -> None:
        self.model, self.scale = model, scale
        self.dtype, self.device = model.dtype, model.device

    def __call__(self, ids, positions, mask, cache):
        logits, cache = self.model(ids, positions, mask, cache)
        return logits * self.scale, cache

    def full_sequence_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.full_sequence_logits(ids) * self.scale

    def __getattr__(self, name):  # new_cache, reorder_cache, gather_cache
        return getattr(self.model, name)


class Recorder:
    """Records every call (inputs, the cache it was given, logits) of a ToyLM."""

    def __init__(self, model: ToyLM) -> None:
        self.model, self.calls = model, []
        self.dtype, self.device = model.dtype, model.device

    def __call__(self, ids, positions, mask, cache):
        logits, new_cache = self.model(ids, positions, mask, cache)
        self.calls.append((ids, positions, mask, cache, logits))
        return logits, new_cache

    def __getattr__(self, name):
        return getattr(self.model, name)


def same_list(out, ref) -> bool:
    return (
        torch.equal(out.items, ref.items)
        and torch.equal(out.sequences, ref.sequences)
        and torch.allclose(out.scores, ref.scores, atol=1e-4)
        and torch.allclose(out.sequence_scores, ref.sequence_scores, atol=1e-4)
    )


def check_invariants(out, trie, item_ids, num_beams: int) -> None:
    stats = out.stats
    assert stats.target_calls == stats.rounds and 1 <= stats.rounds <= trie.num_levels
    assert stats.rounds + stats.accepted_steps == trie.num_levels  # each round: accepted steps + the target's one
    assert stats.draft_calls == stats.drafted_steps and 0 <= stats.accepted_steps <= stats.drafted_steps
    assert min(stats.draft_time_s, stats.verify_time_s, stats.accept_time_s, stats.other_time_s) >= 0
    items = out.items[0].tolist()
    assert len(set(items)) == num_beams and set(items) <= set(item_ids.tolist())
    assert torch.isfinite(out.scores).all()
    assert (out.sequence_scores[0, :-1] >= out.sequence_scores[0, 1:]).all()  # ranked by target score


# -- strict: lossless ------------------------------------------------------------------------------------------------
def strict_sweep(seeds, num_prompts, beam_sizes=(1, 3, 5, 10, 20)) -> collections.Counter:
    rounds = collections.Counter()  # lists per number of rounds (4 - accepted steps)
    for seed in seeds:
        trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=2, seed=seed)
        target = ToyLM(vocab, seed=seed)
        drafts = [ToyLM(vocab, seed=1000 + seed), noisy_copy(target, vocab, 0.1, 2000 + seed)]
        for prompt in random_prompts(num_prompts, vocab, seed=seed):
            ids, mask = left_pad([prompt], pad_id=0)
            for k in beam_sizes:
                ref = beam_search(target, ids, mask, trie, k)
                for draft, gamma, n in itertools.product(drafts, (1, 2, 3), sorted({k, 2 * k, 40})):
                    out = speculative_beam_search(target, draft, ids, mask, trie, k, n, gamma)
                    assert same_list(out, ref), (seed, k, gamma, n)
                    check_invariants(out, trie, item_ids, k)
                    rounds[out.stats.rounds] += 1
    return rounds


def test_speculative_strict_matches_beam_search():
    rounds = strict_sweep(seeds=[0], num_prompts=2)
    assert set(rounds) == {1, 2, 3, 4}  # full acceptance, rejections at every depth


@pytest.mark.slow
def test_speculative_strict_matches_beam_search_exhaustive():
    rounds = strict_sweep(seeds=range(1, 6), num_prompts=8)
    assert set(rounds) == {1, 2, 3, 4}


def test_speculative_strict_few_first_level_codes_returns_k_items():
    # 2 level-0 codes but 20 beams: beams below K are placeholders until the trie widens
    trie, item_ids, _, vocab = make_trie(num_items=50, level_sizes=(2, 4, 4, 4), num_collisions=0, seed=5)
    target = ToyLM(vocab, seed=5)
    ids, mask = left_pad(random_prompts(1, vocab, seed=5), pad_id=0)
    ref = beam_search(target, ids, mask, trie, 20)
    for draft in (target, ToyLM(vocab, seed=6)):
        for gamma in (1, 2, 3):
            out = speculative_beam_search(target, draft, ids, mask, trie, 20, 40, gamma)
            assert same_list(out, ref)
            check_invariants(out, trie, item_ids, 20)


def test_speculative_left_padded_prompt_gives_the_same_list():
    trie, _, _, vocab = make_trie(seed=2)
    target, draft = ToyLM(vocab, seed=2), ToyLM(vocab, seed=3)
    prompt = random_prompts(1, vocab, seed=2)[0]
    ids, mask = left_pad([prompt], pad_id=0)
    padded_ids, padded_mask = left_pad([prompt, torch.cat([prompt, prompt])], pad_id=0)
    plain = speculative_beam_search(target, draft, ids, mask, trie, 5, 10, 2)
    padded = speculative_beam_search(target, draft, padded_ids[:1], padded_mask[:1], trie, 5, 10, 2)
    assert same_list(padded, plain)


# -- draft = target --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["strict", "relaxed"])
@pytest.mark.parametrize("gamma", [1, 2, 3])
def test_speculative_draft_equal_to_target_accepts_every_step(mode, gamma):
    trie, item_ids, _, vocab = make_trie(seed=4)
    target, draft = ToyLM(vocab, seed=4), ToyLM(vocab, seed=4)  # same weights, separate objects
    gen = torch.Generator().manual_seed(0)
    for prompt in random_prompts(3, vocab, seed=4):
        ids, mask = left_pad([prompt], pad_id=0)
        for k in (1, 5, 10):
            target.calls = 0
            out = speculative_beam_search(target, draft, ids, mask, trie, k, k, gamma, mode=mode, generator=gen)
            check_invariants(out, trie, item_ids, k)
            assert out.stats.accepted_steps == out.stats.drafted_steps
            assert out.stats.target_calls == target.calls == {1: 2, 2: 2, 3: 1}[gamma]
            if mode == "strict":
                assert same_list(out, beam_search(target, ids, mask, trie, k))


# -- tree attention --------------------------------------------------------------------------------------------------
def test_speculative_tree_calls_match_branch_by_branch_decoding():
    trie, _, tokens, vocab = make_trie(seed=7)
    prefixes = {tuple(row[:t].tolist()) for row in tokens for t in range(tokens.shape[1] + 1)}
    target = Recorder(ToyLM(vocab, seed=7))
    draft = Recorder(noisy_copy(target.model, vocab, 0.3, 8))
    prompt = random_prompts(1, vocab, seed=7)[0]
    ids, mask = left_pad([prompt], pad_id=0)
    out = speculative_beam_search(target, draft, ids, mask, trie, 3, 6, 2)
    assert out.stats.rounds >= 2  # later rounds run on pruned caches
    assert target.calls[0][0].shape[1] == prompt.numel() + 2 * 6  # prompt + two drafted levels, one call

    for model in (target, draft):
        for call_ids, positions, call_mask, cache, logits in model.calls:
            key_ids = call_ids if cache is None else torch.cat([cache[0], call_ids], dim=1)
            key_positions = positions if cache is None else torch.cat([cache[1], positions], dim=1)
            for row in range(call_ids.shape[1]):
                visible = call_mask[0, 0, row] == 0
                branch = key_ids[0, visible]  # the prompt and this token's own ancestors, in order
                assert torch.equal(key_positions[0, visible], torch.arange(branch.numel()))
                assert torch.equal(branch[: prompt.numel()], prompt[: branch.numel()])  # prompt rows: causal
                assert tuple(branch[prompt.numel() :].tolist()) in prefixes
                expected = model.model.full_sequence_logits(branch)[-1]
                torch.testing.assert_close(logits[0, row], expected, atol=1e-5, rtol=1e-5)


# -- relaxed: lossless in distribution --------------------------------------------------------------------------------
def successive_sampling_sets(probs: dict, k: int) -> dict:
    """Exact distribution of the set of k draws without replacement from ``probs`` (item -> probability)."""
    support = [c for c, p in probs.items() if p > 0]
    dist = collections.defaultdict(float)
    for draws in itertools.permutations(support, min(k, len(support))):
        prob = 1.0
        for j, c in enumerate(draws):
            left = sum(probs[o] for o in support if o not in draws[:j])  # summed, not subtracted: no cancellation
            prob *= probs[c] / left
        dist[frozenset(draws)] += prob
    return dist


def total_variation(empirical: collections.Counter, exact: dict) -> float:
    n = sum(empirical.values())
    return 0.5 * sum(abs(empirical[s] / n - exact.get(s, 0.0)) for s in set(empirical) | set(exact))


@pytest.mark.parametrize(
    "case", ["random", "equal", "target_mass_outside_draft", "few_possible", "few_candidates", "peaked"]
)
def test_relaxed_select_matches_successive_sampling(case):
    gen = torch.Generator().manual_seed(11)
    width, k, rows = 7, 3, 30000
    log_p = (torch.randn(width, generator=gen) * 1.5).log_softmax(0)
    log_q = (torch.randn(width, generator=gen) * 1.5).log_softmax(0)
    num_candidates = 5
    if case == "equal":
        log_q = log_p.clone()
    elif case == "target_mass_outside_draft":
        log_q[:3] = -INF
        log_q = log_q.log_softmax(0)
    elif case == "few_possible":  # 2 possible continuations for 3 draws
        log_p[2:] = -INF
        log_p = log_p.log_softmax(0)
    elif case == "few_candidates":
        num_candidates = 2
    elif case == "peaked":
        log_p, log_q = (log_p * 40).log_softmax(0), (log_q * 40).log_softmax(0)
    # the draft's samples: without replacement from Q, in draw order (-1 where Q has no more mass)
    keys = log_q - torch.log(-torch.log(torch.rand(rows, width, generator=gen)))
    keys, candidates = keys.topk(num_candidates, dim=1)
    candidates = candidates.masked_fill(torch.isinf(keys), -1)

    chosen, alive, accepted = relaxed_select(log_p.expand(rows, -1), log_q.expand(rows, -1), candidates, k, gen)
    empirical = collections.Counter(
        frozenset(c for c, a in zip(row, live) if a) for row, live in zip(chosen.tolist(), alive.tolist())
    )
    exact = successive_sampling_sets(dict(enumerate(log_p.exp().tolist())), k)
    assert total_variation(empirical, exact) < 0.02
    assert ((accepted >= 0) & (accepted <= k)).all()
    if case == "equal":
        assert (accepted == k).all()


def exact_beam_sample_distribution(model: ToyLM, prompt: torch.Tensor, tokens: torch.Tensor, k: int) -> dict:
    """Brute force: the distribution of the final set of SIDs under target beam sampling (K draws without
    replacement per depth from the softmax over all continuations of the current beams)."""
    prefixes = {tuple(row[:t].tolist()) for row in tokens for t in range(tokens.shape[1] + 1)}
    vocab_logp = {}

    def children(beams):
        out = {}
        for seq, score in beams:
            if seq not in vocab_logp:
                logits = model.full_sequence_logits(torch.cat([prompt, torch.tensor(seq, dtype=torch.long)]))
                vocab_logp[seq] = torch.log_softmax(logits[-1], -1).tolist()
            for tok, lp in enumerate(vocab_logp[seq]):
                if seq + (tok,) in prefixes:
                    out[seq + (tok,)] = score + lp
        return out

    dist = {frozenset([((), 0.0)]): 1.0}
    for _ in range(tokens.shape[1]):
        nxt = collections.defaultdict(float)
        for beams, prob in dist.items():
            scores = children(beams)
            norm = math.log(sum(math.exp(s) for s in scores.values()))
            for chosen, p in successive_sampling_sets({c: math.exp(s - norm) for c, s in scores.items()}, k).items():
                nxt[frozenset((c, scores[c]) for c in chosen)] += prob * p
        dist = nxt
    final = collections.defaultdict(float)
    for beams, prob in dist.items():
        final[frozenset(seq for seq, _ in beams)] += prob
    return final


def relaxed_sampling_distances(num_samples: int) -> tuple[float, float, float]:
    """Total variation to the exact target beam-sampling distribution of relaxed SD's lists and of
    ``beam_sample``'s, on a setup small enough to enumerate (3 levels of 3/3/2 codes, K = 2, N = 3, gamma 1 and 2,
    softened models so that the mass spreads over many lists); also returns the acceptance rate."""
    trie, item_ids, tokens, vocab = make_trie(num_items=10, level_sizes=(3, 3, 2), num_collisions=0, seed=0)
    base = ToyLM(vocab, seed=0)
    target, draft = Scaled(base, 0.3), Scaled(noisy_copy(base, vocab, 1.0, 1), 0.3)
    prompt = random_prompts(1, vocab, seed=0)[0]
    ids, mask = left_pad([prompt], pad_id=0)
    exact = exact_beam_sample_distribution(target, prompt, tokens, 2)
    assert max(exact.values()) < 0.7 and len(exact) > 20
    draft_exact = exact_beam_sample_distribution(draft, prompt, tokens, 2)
    assert total_variation(collections.Counter({s: round(p * 1e6) for s, p in draft_exact.items()}), exact) > 0.3

    gen = torch.Generator().manual_seed(0)
    samples, reference, accepted, drafted = collections.Counter(), collections.Counter(), 0, 0
    for run in range(num_samples):
        out = speculative_beam_search(
            target, draft, ids, mask, trie, 2, 3, gamma=1 + run % 2, mode="relaxed", generator=gen
        )
        samples[frozenset(tuple(s) for s in out.sequences[0].tolist())] += 1
        accepted, drafted = accepted + out.stats.accepted_steps, drafted + out.stats.drafted_steps
        check_invariants(out, trie, item_ids, 2)
        ref = beam_sample(target, ids, mask, trie, 2, gen)
        reference[frozenset(tuple(s) for s in ref.sequences[0].tolist())] += 1
    return total_variation(samples, exact), total_variation(reference, exact), accepted / drafted


def test_speculative_relaxed_matches_target_beam_sampling():
    # sampling noise alone gives a TV of ~0.02 (max ~0.04 over 50 trials) at this sample size
    sd_tv, reference_tv, acceptance = relaxed_sampling_distances(2400)
    assert 0.3 < acceptance < 0.95  # both accepted and rejected depths occurred
    assert reference_tv < 0.05
    assert sd_tv < 0.05


@pytest.mark.slow
def test_speculative_relaxed_matches_target_beam_sampling_many_samples():
    sd_tv, reference_tv, _ = relaxed_sampling_distances(20000)  # noise TV ~0.007
    assert reference_tv < 0.02
    assert sd_tv < 0.02


def random_log_probs(data, width: int, mass: str) -> torch.Tensor:
    values = data.draw(st.lists(st.floats(-30, 30), min_size=width, max_size=width))
    logits = torch.tensor(values)
    if mass == "few":  # fewer possible continuations than draws
        keep = data.draw(st.integers(1, width))
        logits[keep:] = -INF
    return logits.log_softmax(0)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_relaxed_select_edge_cases_return_k_distinct_possible_draws(data):
    width = data.draw(st.integers(1, 12))
    k = data.draw(st.integers(1, 8))
    log_p = random_log_probs(data, width, data.draw(st.sampled_from(["all", "few"])))
    relation = data.draw(st.sampled_from(["independent", "equal", "scaled", "disjoint"]))
    if relation == "equal":  # residual empty everywhere
        log_q = log_p.clone()
    elif relation == "scaled":  # near one-hot: probabilities underflow
        log_q = (log_p * 50).nan_to_num(neginf=-INF).log_softmax(0)
    elif relation == "disjoint":  # the draft proposes only what the target cannot produce
        log_q = torch.where(torch.isinf(log_p), 0.0, -INF)
        log_q = log_q.log_softmax(0) if torch.isfinite(log_q).any() else log_p.clone()
    else:
        log_q = random_log_probs(data, width, "all")
    count = data.draw(st.integers(0, width))
    candidates = torch.tensor(data.draw(st.permutations(range(width)))[:count] + [-1], dtype=torch.long)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))

    chosen, alive, accepted = relaxed_select(log_p[None], log_q[None], candidates[None], k, gen)
    assert chosen.shape == alive.shape == (1, k) and 0 <= int(accepted[0]) <= k
    possible = int(torch.isfinite(log_p).sum())
    live = chosen[0][alive[0]].tolist()
    assert len(live) == min(k, possible) == len(set(live))  # K distinct draws, placeholders only if needed
    assert all(0 <= c < width and math.isfinite(float(log_p[c])) for c in live)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 1000),
    scale=st.sampled_from([1.0, 30.0, 300.0]),
    draft_scale=st.sampled_from([1.0, 30.0, 300.0]),
    k=st.sampled_from([1, 3, 10, 20]),
    extra=st.integers(0, 25),
    gamma=st.integers(1, 3),
)
def test_speculative_relaxed_peaked_models_return_k_valid_distinct_items(seed, scale, draft_scale, k, extra, gamma):
    trie, item_ids, _, vocab = make_trie(num_items=40, level_sizes=(3, 4, 4, 4), num_collisions=2, seed=seed % 5)
    target = Scaled(ToyLM(vocab, seed=seed), scale)
    draft = Scaled(ToyLM(vocab, seed=seed + 1), draft_scale)
    ids, mask = left_pad(random_prompts(1, vocab, seed=seed), pad_id=0)
    gen = torch.Generator().manual_seed(seed)
    out = speculative_beam_search(target, draft, ids, mask, trie, k, k + extra, gamma, mode="relaxed", generator=gen)
    check_invariants(out, trie, item_ids, k)


# -- settings and dependencies ---------------------------------------------------------------------------------------
def test_speculative_rejects_bad_settings():
    trie, _, _, vocab = make_trie(num_items=12, num_collisions=0)
    model = ToyLM(vocab)
    ids, mask = left_pad(random_prompts(2, vocab), pad_id=0)
    one, one_mask = ids[:1], mask[:1]
    gen = torch.Generator()
    cases = [
        (dict(num_beams=5, draft_beams=4), "draft_beams \\(N=4\\) must be >= num_beams \\(K=5\\)"),
        (dict(num_beams=5, gamma=0), "gamma=0 out of range"),
        (dict(num_beams=5, gamma=4), "gamma=4 out of range"),
        (dict(num_beams=13, draft_beams=40), "exceeds the number of distinct valid SIDs"),
        (dict(num_beams=0), "num_beams must be >= 1"),
        (dict(num_beams=3, mode="greedy"), "unknown mode 'greedy'"),
        (dict(num_beams=3, mode="relaxed"), "explicit torch.Generator"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            speculative_beam_search(model, model, one, one_mask, trie, **kwargs)
    with pytest.raises(ValueError, match="batch size 1"):
        speculative_beam_search(model, model, ids, mask, trie, 3, generator=gen)
    with pytest.raises(ValueError, match="empty prompt"):
        speculative_beam_search(model, model, one, torch.zeros_like(one_mask), trie, 3)


def test_speculative_imports_torch_only():
    code = (
        "import sys, atspeed_exp.decoding.speculative\n"
        "bad = [m for m in ('transformers', 'lightning', 'hydra', 'omegaconf', 'wandb') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_speculative_hf_llama_strict_matches_beam_search():
    transformers = pytest.importorskip("transformers")
    from atspeed_exp.models.adapter import HFDecoderLM

    trie, item_ids, _, vocab = make_trie(seed=9)

    def tiny_llama(layers: int, hidden: int, seed: int) -> HFDecoderLM:
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            attn_implementation="sdpa",
        )
        return HFDecoderLM.from_model(transformers.LlamaForCausalLM(config))

    target, draft = tiny_llama(2, 64, 0), tiny_llama(1, 32, 1)
    for prompt in random_prompts(2, vocab, seed=9):
        ids, mask = left_pad([prompt], pad_id=0)
        for k, n, gamma in [(3, 6, 3), (5, 40, 2), (10, 10, 1)]:
            ref = beam_search(target, ids, mask, trie, k)
            out = speculative_beam_search(target, draft, ids, mask, trie, k, n, gamma)
            assert same_list(out, ref), (k, n, gamma)
            check_invariants(out, trie, item_ids, k)
        same = speculative_beam_search(target, target, ids, mask, trie, 5, 5, 3)
        assert same.stats.target_calls == 1 and same_list(same, beam_search(target, ids, mask, trie, 5))


def test_beam_sample_batched_returns_valid_ranked_items():
    trie, item_ids, _, vocab = make_trie(num_items=50, level_sizes=(2, 4, 4, 4), num_collisions=3, seed=12)
    model = ToyLM(vocab, seed=12)
    ids, mask = left_pad(random_prompts(3, vocab, seed=12), pad_id=0)
    out = beam_sample(model, ids, mask, trie, 10, torch.Generator().manual_seed(0))
    assert out.model_calls == trie.num_levels and torch.isfinite(out.scores).all()
    for row in range(3):
        items = out.items[row].tolist()
        assert len(set(items)) == 10 and set(items) <= set(item_ids.tolist())
        assert (out.sequence_scores[row, :-1] >= out.sequence_scores[row, 1:]).all()
