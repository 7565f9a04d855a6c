"""The drafter contract: any drafter under strict verification returns exactly beam search's lists (batch 1 and
batched with ragged progress), the engine runs every drafter through the same round loop, and the model drafter
is the draft-model path itself."""

import itertools

import pytest
import torch
from decoding_fixtures import make_trie, random_prompts
from toy_lm import ToyLM

from atspeed_exp.decoding.beam_search import beam_search, left_pad
from atspeed_exp.decoding.drafters import (
    DRAFTERS,
    DraftSession,
    Drafter,
    ModelDrafter,
    RetrievalDrafter,
    TrigramDrafter,
    build_retrieval_pools,
    build_trigram_counts,
    extend_level,
)
from atspeed_exp.decoding.speculative import speculative_beam_search

# sibling test modules: their helpers, and the autouse one_thread fixture (active here once imported)
from test_speculative import check_invariants, noisy_copy, one_thread, same_list  # noqa: F401, I001
from test_speculative_batched import one_user  # noqa: I001


class TrieUniformDrafter(Drafter):
    """A stateless drafter for the contract tests: every allowed code equally likely (no model, no pool)."""

    name = "trie_uniform"
    runs_model = False

    def begin(self, first, trie, scope):
        return TrieUniformSession()


class TrieUniformSession(DraftSession):
    def draft(self, root, trie, t, steps, host, spec, tokens):
        levels = [root]
        for _ in range(max(d for _, d in host)):
            allowed = trie.global_allowed[levels[-1].nodes]  # [B, M, S]
            log_probs = torch.where(allowed, -torch.log(allowed.sum(-1, keepdim=True).clamp(min=1)), float("-inf"))
            levels.append(extend_level(levels, log_probs, trie, t, steps, host, spec))
        return levels, 0


def random_histories(tokens: torch.Tensor, num_users: int, seed: int, max_len: int = 6) -> list[torch.Tensor]:
    """Per user, the SIDs ``[n, L]`` of 1..max_len random catalogue items (``tokens``: every item's SID)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (num_users,), generator=gen).tolist()
    return [tokens[torch.randint(tokens.shape[0], (n,), generator=gen)] for n in lengths]


def history_prompts(tokens: torch.Tensor, num: int, seed: int) -> list[torch.Tensor]:
    """Prompts as the data layer writes them, in miniature: a start token, the history's SIDs, a separator."""
    return [torch.cat([torch.tensor([1]), h.flatten(), torch.tensor([2])]) for h in random_histories(tokens, num, seed)]


def make_drafter(name: str, target: ToyLM, vocab: int, seed: int, trie=None, tokens=None) -> Drafter:
    if name == "model":
        return ModelDrafter(noisy_copy(target, vocab, 0.2, 100 + seed))
    if name == "retrieval":
        pools = build_retrieval_pools(random_histories(tokens, 40, 500 + seed), trie, groups=3, top_n=4, dim=4,
                                      seed=seed)
        return RetrievalDrafter(pools)
    if name == "trigram":  # nothing learned across calls: a list's counts do not depend on the lists before it
        return TrigramDrafter(build_trigram_counts(random_histories(tokens, 40, 500 + seed), trie), adapt="none")
    if name == "trie_uniform":
        return TrieUniformDrafter()
    raise AssertionError(name)


# the layer-skip drafter drafts with the target itself (a lean LLaMA, not ToyLM): tests/test_layer_skip.py
DRAFTER_NAMES = [*(name for name in DRAFTERS if name != "layer_skip"), "trie_uniform"]


def test_drafters_registry_names_every_drafter_by_its_name():
    assert DRAFTERS["model"] is ModelDrafter
    for name, cls in DRAFTERS.items():
        assert cls.name == name and issubclass(cls, Drafter)


@pytest.mark.parametrize("name", DRAFTER_NAMES)
def test_drafter_strict_lists_equal_beam_search(name):
    rounds = set()
    for seed in (0, 1):
        trie, item_ids, tokens, vocab = make_trie(num_items=60, num_collisions=2, seed=seed)
        target = ToyLM(vocab, seed=seed)
        drafter = make_drafter(name, target, vocab, seed, trie, tokens)
        for prompt in [*random_prompts(1, vocab, seed=seed), *history_prompts(tokens, 2, seed)]:
            ids, mask = left_pad([prompt], pad_id=0)
            for k, gamma in itertools.product((1, 5, 10), (1, 2, 3)):
                ref = beam_search(target, ids, mask, trie, k)
                for n in sorted({k, 2 * k, 40}):
                    out = speculative_beam_search(target, drafter, ids, mask, trie, k, n, gamma)
                    assert same_list(out, ref), (name, seed, k, gamma, n)
                    if drafter.runs_model:
                        check_invariants(out, trie, item_ids, k)
                    else:  # no draft-model calls to count
                        assert out.stats.draft_calls == out.stats.draft_tokens == 0
                        assert out.stats.rounds + out.stats.accepted_steps == trie.num_levels
                    rounds.add(out.stats.rounds)
    assert len(rounds) > 1  # some drafted depths accepted, some rejected


@pytest.mark.parametrize("name", DRAFTER_NAMES)
def test_drafter_strict_batched_lists_equal_beam_search(name):
    trie, _, tokens, vocab = make_trie(num_items=60, num_collisions=2, seed=3)
    target = ToyLM(vocab, seed=3)
    drafter = make_drafter(name, target, vocab, 3, trie, tokens)
    prompts = [*random_prompts(2, vocab, min_len=2, max_len=12, seed=3), *history_prompts(tokens, 4, 3)]
    ids, mask = left_pad(prompts, pad_id=0)
    for k, n, m, gamma, prune in ((3, 6, 3, 2, True), (5, 40, 12, 3, False), (10, 20, 20, 1, True)):
        out = speculative_beam_search(target, drafter, ids, mask, trie, k, n, gamma, verify_beams=m, prune=prune)
        ref = beam_search(target, ids, mask, trie, k)
        for row, prompt in enumerate(prompts):
            assert same_list(one_user(out, row), one_user(ref, row)), (name, k, n, m, gamma, row)
            single = speculative_beam_search(target, drafter, *left_pad([prompt], pad_id=0), trie, k, n, gamma,
                                             verify_beams=m)
            for field in ("target_calls", "draft_calls", "rounds", "drafted_steps", "accepted_steps",
                          "target_tokens", "draft_tokens"):
                assert getattr(out.lists, field)[row] == getattr(single.stats, field), (name, field, row)


@pytest.mark.parametrize("name", ["retrieval", "trigram", "trie_uniform"])
@pytest.mark.parametrize("mode", ["relaxed", "relaxed_exact", "relaxed_official", "dare"])
def test_drafter_without_a_model_runs_every_relaxed_rule(name, mode):
    trie, item_ids, tokens, vocab = make_trie(seed=6)
    target = ToyLM(vocab, seed=6)
    drafter = make_drafter(name, target, vocab, 6, trie, tokens)
    ids, mask = left_pad(history_prompts(tokens, 3, 6), pad_id=0)
    gen = torch.Generator().manual_seed(0)
    out = speculative_beam_search(target, drafter, ids, mask, trie, 5, 10, 3, mode=mode, generator=gen)
    assert out.stats.draft_calls == 0 and out.stats.draft_tokens == 0 and sum(out.lists.draft_calls) == 0
    assert out.stats.drafted_steps > 0 and (out.items >= 0).all()
    assert set(out.items.flatten().tolist()) <= set(item_ids.tolist())
    assert all(len(set(row)) == 5 for row in out.items.tolist())


def test_model_drafter_is_the_draft_model_path():
    trie, _, _, vocab = make_trie(seed=9)
    target = ToyLM(vocab, seed=9)
    draft = noisy_copy(target, vocab, 0.3, 9)
    ids, mask = left_pad(random_prompts(4, vocab, min_len=2, max_len=10, seed=9), pad_id=0)
    for mode in ("strict", "relaxed", "relaxed_official"):
        runs = [speculative_beam_search(target, model, ids, mask, trie, 5, 10, 2, mode=mode,
                                        generator=torch.Generator().manual_seed(1))
                for model in (draft, ModelDrafter(draft))]
        assert torch.equal(runs[0].items, runs[1].items) and torch.equal(runs[0].sequences, runs[1].sequences)
        assert runs[0].lists == runs[1].lists
        assert runs[0].lists.draft_calls == runs[0].lists.drafted_steps  # one draft call per drafted step
