"""Score processors: every decoder applies them alike (strict speculative decoding returns the processed beam
search's lists), and D3's ghost-token debiasing against a plain-Python reference."""

import itertools
import math

import pytest
import torch
from decoding_fixtures import make_trie, random_prompts
from test_speculative import check_invariants, noisy_copy, one_thread, same_list  # noqa: F401
from test_speculative_batched import one_user
from toy_lm import ToyLM

from atspeed_exp.decoding.beam_search import beam_search, left_pad
from atspeed_exp.decoding.processors import PROCESSORS, CFAssistant, GhostDebias, ScoreProcessor
from atspeed_exp.decoding.speculative import speculative_beam_search
from atspeed_exp.decoding.tree import tree_beam_search
from atspeed_exp.decoding.trie import ItemTrie


class UserCodeBonus(ScoreProcessor):
    """A processor that reorders lists: a fixed random bonus per (trie node, code), scaled per user, so a wrong
    node, code or user shows up in the lists."""

    name = "test_bonus"

    def __init__(self, trie: ItemTrie, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.table = 3.0 * torch.rand(trie.global_allowed.shape, generator=gen)  # [G, S]
        self.users: torch.Tensor | None = None

    def begin(self, prompt_ids, prompt_mask, trie):
        bound = UserCodeBonus.__new__(UserCodeBonus)
        bound.table = self.table
        bound.users = 1.0 + (prompt_mask.sum(1) % 3).float()  # [B] a per-user scale from the prompt
        return bound

    def __call__(self, log_probs, nodes, trie, rows):
        scale = self.users[rows][:, None, None]  # [B, 1, 1]
        return log_probs + scale * self.table[nodes]  # -inf stays -inf


def test_processor_changes_beam_search_and_tree_beam_search_agrees():
    trie, _, _, vocab = make_trie(seed=3)
    model = ToyLM(vocab, seed=3)
    prompts = random_prompts(4, vocab, seed=3)
    ids, mask = left_pad(prompts, pad_id=0)
    bonus = UserCodeBonus(trie, seed=3)
    plain = beam_search(model, ids, mask, trie, 5)
    processed = beam_search(model, ids, mask, trie, 5, processors=[bonus])
    assert not torch.equal(plain.items, processed.items)
    tree = tree_beam_search(model, ids, mask, trie, 5, processors=[bonus])
    assert same_list(tree, processed)


def test_processor_strict_speculative_matches_processed_beam_search():
    for seed in (0, 1):
        trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=2, seed=seed)
        target = ToyLM(vocab, seed=seed)
        drafts = [ToyLM(vocab, seed=1000 + seed), noisy_copy(target, vocab, 0.1, 2000 + seed)]
        bonus = UserCodeBonus(trie, seed=seed)
        prompts = random_prompts(4, vocab, seed=seed)
        ids, mask = left_pad(prompts, pad_id=0)
        for k in (1, 3, 5):
            refs = [beam_search(target, *left_pad([p], pad_id=0), trie, k, processors=[bonus]) for p in prompts]
            for draft, gamma in itertools.product(drafts, (1, 2, 3)):
                for row, prompt in enumerate(prompts):  # batch 1
                    out = speculative_beam_search(target, draft, *left_pad([prompt], pad_id=0), trie, k, 2 * k,
                                                  gamma, processors=[bonus])
                    assert same_list(out, refs[row]), (seed, k, gamma, row)
                    check_invariants(out, trie, item_ids, k)
                batched = speculative_beam_search(target, draft, ids, mask, trie, k, 2 * k, gamma,
                                                  processors=[bonus])  # ragged progress: rows leave the batch
                for row in range(len(prompts)):
                    assert same_list(one_user(batched, row), refs[row]), (seed, k, gamma, row)


# -- ghost_debias ----------------------------------------------------------------------------------------------------
def ghost_reference(model: ToyLM, prompt: torch.Tensor, tokens: torch.Tensor, num_beams: int,
                    threshold: float | None) -> list[tuple[tuple[int, ...], float]]:
    """Plain-Python beam search whose step score is 0 for a ghost token (its prefix has one continuation in the
    catalogue, or p >= threshold) and log p (full vocabulary) otherwise."""
    prefixes = {tuple(row[:t].tolist()) for row in tokens for t in range(tokens.shape[1] + 1)}
    beams = [((), 0.0)]
    for _ in range(tokens.shape[1]):
        candidates = []
        for seq, score in beams:
            logp = torch.log_softmax(
                model.full_sequence_logits(torch.cat([prompt, torch.tensor(seq, dtype=torch.long)]))[-1], -1)
            children = [tok for tok in range(logp.numel()) if seq + (tok,) in prefixes]
            for tok in children:
                ghost = len(children) == 1 or (threshold is not None and float(logp[tok]) >= math.log(threshold))
                candidates.append((seq + (tok,), score + (0.0 if ghost else float(logp[tok]))))
        candidates.sort(key=lambda c: -c[1])
        beams = candidates[:num_beams]
    return beams


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_ghost_debias_beam_search_matches_reference(threshold):
    for seed in (0, 4):
        trie, _, tokens, vocab = make_trie(num_items=40, num_collisions=2, seed=seed)
        model = ToyLM(vocab, seed=seed)
        processor = GhostDebias(threshold)
        changed = False
        for prompt in random_prompts(3, vocab, seed=seed):
            ids, mask = left_pad([prompt], pad_id=0)
            out = beam_search(model, ids, mask, trie, 6, processors=[processor])
            ref = ghost_reference(model, prompt, tokens, 6, threshold)
            assert [tuple(s) for s in out.sequences[0].tolist()] == [s for s, _ in ref]
            assert torch.allclose(out.sequence_scores[0], torch.tensor([s for _, s in ref]), atol=1e-5)
            changed |= not torch.equal(out.sequences, beam_search(model, ids, mask, trie, 6).sequences)
        assert changed  # the catalogue has forced steps that the plain likelihood punishes


def test_ghost_debias_zeroes_forced_steps_only_on_a_hand_built_trie():
    # level blocks: 3 codes, then 2; items (0,0) (0,1) (1,0) (2,1): node "1" and node "2" force their child
    blocks = [(0, 3), (3, 5)]
    tokens = torch.tensor([[0, 3], [0, 4], [1, 3], [2, 4]])
    trie = ItemTrie(tokens, torch.arange(4), blocks)
    nodes = torch.stack([trie.global_advance(torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]))])  # [1, 3]
    log_probs = torch.log(torch.tensor([[[0.6, 0.3, 0.1]] * 3]))  # [1, 3, 3]
    log_probs = log_probs.masked_fill(~trie.global_allowed[nodes], -math.inf)
    out = GhostDebias()(log_probs, nodes, trie, torch.zeros(1, dtype=torch.long))
    assert torch.equal(out[0, 0], log_probs[0, 0])  # node "0" branches: unchanged
    assert out[0, 1].tolist() == [0.0, -math.inf, -math.inf]  # node "1" forces code 0
    assert out[0, 2].tolist() == [-math.inf, 0.0, -math.inf]  # node "2" forces code 1
    dead = torch.full((1, 3), float("-inf"))[..., None].expand(1, 3, 3)  # rows not expanded stay -inf
    assert torch.isinf(GhostDebias()(dead, nodes, trie, torch.zeros(1, dtype=torch.long))).all()
    with pytest.raises(ValueError, match="threshold"):
        GhostDebias(1.5)


def test_processors_registry_names_each_processor_by_its_name():
    assert PROCESSORS == {"ghost_debias": GhostDebias, "cf_assistant": CFAssistant}
    assert all(cls.name == name for name, cls in PROCESSORS.items())


def test_pipeline_decodes_with_the_configured_processors(tmp_path, monkeypatch):
    """decoding.processors reaches every decoder of a run: the target's test beam search, the batch-1 and the
    all-users evaluations; strict lists still equal the (processed) beam search's."""
    from pipeline_helpers import compose_config, tiny_overrides

    from atspeed_exp import pipeline
    from atspeed_exp.decoding.processors import GhostDebias

    calls = {"n": 0}
    original = GhostDebias.__call__

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GhostDebias, "__call__", counting)
    overrides = tiny_overrides(tmp_path) + ["decoding.processors=[ghost_debias]", "decoding.ghost_threshold=0.99",
                                            "decoding.ks=[5]", "eval.batch1_users=0"]
    summary = pipeline.run(compose_config(overrides))
    metrics = summary["metrics"]
    assert calls["n"] > 0
    assert metrics["eval/all/strict/k5/mismatches"] == 0
    assert metrics["eval/strict/k5/recall@5"] == metrics["eval/beam/k5/recall@5"]
    assert [p.threshold for p in pipeline.make_processors(compose_config(overrides))] == [0.99]
    assert pipeline.make_processors(compose_config(tiny_overrides(tmp_path))) == ()
