"""D3's text-free assistant (cf_assistant): collaborative item probabilities summed over the trie against a naive
per-prefix sum, the mixing formula, its limits g = 1 (the LLM) and g = 0 (the collaborative model alone), strict
speculative decoding with it, the pipeline with the sasrec stage, and the tuning of g on validation users."""

import itertools
import json
import math

import pytest
import torch
from decoding_fixtures import make_trie, random_prompts
from test_speculative import check_invariants, noisy_copy, one_thread, same_list  # noqa: F401
from test_speculative_batched import one_user
from toy_lm import ToyLM

from atspeed_exp.decoding.beam_search import beam_search, left_pad
from atspeed_exp.decoding.processors import CFAssistant
from atspeed_exp.decoding.processors.cf_assistant import cf_step_log_probs, node_mass
from atspeed_exp.decoding.speculative import speculative_beam_search
from atspeed_exp.decoding.trie import ItemTrie


def random_item_probs(num_users: int, num_item_ids: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(3.0 * torch.randn(num_users, num_item_ids, generator=gen), -1)  # [B, I]


def global_nodes_by_prefix(trie: ItemTrie, tokens: torch.Tensor) -> dict[tuple[int, ...], int]:
    """Each SID prefix of the catalogue (local codes) -> its global node, by walking the trie in Python."""
    starts = [s for s, _ in trie.level_blocks]
    out = {(): 0}
    for row in tokens.tolist():
        node = 0
        for depth, token in enumerate(row):
            node = int(trie.global_child[node, token - starts[depth]])
            out[tuple(t - s for t, s in zip(row[: depth + 1], starts))] = node
    return out


def naive_mass(probs: torch.Tensor, item_ids: torch.Tensor, tokens: torch.Tensor, starts: list[int],
               prefix: tuple[int, ...]) -> torch.Tensor:
    """[B]: the summed probability of the items whose SID (local codes) starts with ``prefix``."""
    total = torch.zeros(probs.shape[0], dtype=torch.float64)
    for item, row in zip(item_ids.tolist(), tokens.tolist()):
        if tuple(t - s for t, s in zip(row, starts))[: len(prefix)] == prefix:
            total += probs[:, item].double()
    return total


# -- aggregation over the trie -----------------------------------------------------------------------------------------
def test_node_mass_and_step_probs_equal_naive_per_prefix_sums():
    for seed in (0, 5):
        trie, item_ids, tokens, _ = make_trie(num_items=50, num_collisions=3, seed=seed)
        num_ids = int(item_ids.max()) + 4  # ids outside the catalogue carry mass the trie never sees
        probs = random_item_probs(3, num_ids, seed)
        mass = node_mass(probs, trie)  # [B, G]
        starts = [s for s, _ in trie.level_blocks]
        prefixes = global_nodes_by_prefix(trie, tokens)
        for prefix, node in prefixes.items():
            assert torch.allclose(mass[:, node].double(), naive_mass(probs, item_ids, tokens, starts, prefix),
                                  atol=1e-6), prefix
        live = torch.zeros(mass.shape[1], dtype=torch.bool)
        live[list(prefixes.values())] = True
        assert (mass[:, ~live] == 0).all()  # dead nodes and the sink hold nothing
        # step probabilities at every internal node: child's mass over the node's
        nodes = torch.tensor([node for prefix, node in prefixes.items() if len(prefix) < trie.num_levels])
        step = cf_step_log_probs(mass, nodes[None].expand(3, -1), trie, 1e-12).exp()  # [B, M, S]
        for col, (prefix, node) in enumerate((p, n) for p, n in prefixes.items() if len(p) < trie.num_levels):
            parent = naive_mass(probs, item_ids, tokens, starts, prefix)
            for code in trie.global_allowed[node].nonzero().flatten().tolist():
                child = naive_mass(probs, item_ids, tokens, starts, prefix + (code,))
                assert torch.allclose(step[:, col, code].double(), child / parent, atol=1e-5), (prefix, code)


def test_cf_assistant_mixes_scores_on_a_hand_built_trie():
    # level blocks: 3 codes, then 2; items 0:(0,0) 1:(0,1) 2:(1,0) 3:(2,1), and item 4 shares item 3's SID
    blocks = [(0, 3), (3, 5)]
    tokens = torch.tensor([[0, 3], [0, 4], [1, 3], [2, 4], [2, 4]])
    trie = ItemTrie(tokens, torch.arange(5), blocks)
    probs = torch.tensor([0.1, 0.3, 0.0, 0.2, 0.4])  # item 2 has no collaborative mass
    processor = CFAssistant(0.25, probs, epsilon=1e-6).begin(torch.ones(1, 2, dtype=torch.long),
                                                             torch.ones(1, 2, dtype=torch.bool), trie)
    root = torch.zeros(1, 1, dtype=torch.long)
    node0 = trie.global_advance(root, torch.zeros_like(root))  # prefix (0,)
    nodes = torch.cat([root, node0], dim=1)  # [1, 2]
    log_llm = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]]]))  # [1, 2, 3]; code 2 past level 1's block
    log_llm = log_llm.masked_fill(~trie.global_allowed[nodes], -math.inf)
    out = processor(log_llm, nodes, trie, torch.zeros(1, dtype=torch.long))
    cf_root = torch.tensor([0.4, 1e-6, 0.6])  # (0.1 + 0.3), floored 0, (0.2 + 0.4); the root's mass is 1
    cf_node0 = torch.tensor([0.25, 0.75])  # 0.1 / 0.4, 0.3 / 0.4
    assert torch.allclose(out[0, 0], 0.25 * log_llm[0, 0] + 0.75 * cf_root.log())
    assert torch.allclose(out[0, 1, :2], 0.25 * log_llm[0, 1, :2] + 0.75 * cf_node0.log())
    assert out[0, 1, 2] == -math.inf  # forbidden stays forbidden
    assert torch.isfinite(out[0, 0]).all()  # item 2's code keeps a finite score (the floor)
    dead = torch.full((1, 2, 3), -math.inf)  # rows the caller did not expand stay -inf
    assert torch.isinf(processor(dead, nodes, trie, torch.zeros(1, dtype=torch.long))).all()
    with pytest.raises(ValueError, match="weight"):
        CFAssistant(1.5, probs)
    with pytest.raises(ValueError, match="epsilon"):
        CFAssistant(0.5, probs, epsilon=0.0)
    with pytest.raises(RuntimeError, match="begin"):
        CFAssistant(0.5, probs)(log_llm, nodes, trie, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="item id 4"):
        node_mass(probs[None, :4], trie)


# -- the limits g = 1 and g = 0 ----------------------------------------------------------------------------------------
class PromptItemProbs:
    """A collaborative model from the prompt: a fixed random item-score row per token, summed over the prompt."""

    def __init__(self, vocab: int, num_item_ids: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.table = 2.0 * torch.randn(vocab, num_item_ids, generator=gen)  # [V, I]

    def __call__(self, prompt_ids, prompt_mask, trie):
        scores = (self.table[prompt_ids] * prompt_mask[..., None]).sum(1)  # [B, I]
        return torch.softmax(scores, -1)


def test_cf_weight_one_gives_the_llm_lists_exactly():
    trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=2, seed=2)
    model = ToyLM(vocab, seed=2)
    ids, mask = left_pad(random_prompts(4, vocab, seed=2), pad_id=0)
    source = PromptItemProbs(vocab, int(item_ids.max()) + 1, seed=2)
    plain = beam_search(model, ids, mask, trie, 6)
    assisted = beam_search(model, ids, mask, trie, 6, processors=[CFAssistant(1.0, source)])
    for name in ("items", "scores", "sequences", "sequence_scores"):
        assert torch.equal(getattr(assisted, name), getattr(plain, name)), name
    half = beam_search(model, ids, mask, trie, 6, processors=[CFAssistant(0.5, source)])
    assert not torch.equal(half.items, plain.items)  # the assistant does change lists when it has weight


def test_cf_weight_zero_is_beam_search_over_the_collaborative_model():
    trie, item_ids, _, vocab = make_trie(num_items=40, num_collisions=0, seed=7)
    model = ToyLM(vocab, seed=7)
    ids, mask = left_pad(random_prompts(3, vocab, seed=7), pad_id=0)
    probs = random_item_probs(3, int(item_ids.max()) + 1, seed=7)
    probs[:, ~torch.isin(torch.arange(probs.shape[1]), item_ids)] = 0  # all mass on the catalogue
    probs = probs / probs.sum(-1, keepdim=True)
    processor = CFAssistant(0.0, probs)
    # every leaf kept: the step scores telescope to log p_CF(item), so the list is the items by p_CF
    out = beam_search(model, ids, mask, trie, trie.num_leaves, processors=[processor])
    expected_scores, expected_items = probs[:, item_ids].sort(dim=1, descending=True)
    assert torch.equal(out.items, item_ids[expected_items])
    assert torch.allclose(out.scores, expected_scores.log(), atol=1e-5)
    assert torch.equal(out.items[:, 0], probs.argmax(-1))
    # a CF model with more than half the mass on one item: even one beam finds it
    peaked = probs.clone()
    peaked[torch.arange(3), item_ids[:3]] += 2.0
    peaked = peaked / peaked.sum(-1, keepdim=True)
    greedy = beam_search(model, ids, mask, trie, 1, processors=[CFAssistant(0.0, peaked)])
    assert torch.equal(greedy.items[:, 0], item_ids[:3])


# -- strict speculative decoding ---------------------------------------------------------------------------------------
def test_cf_assistant_strict_speculative_matches_processed_beam_search():
    for seed in (0, 1):
        trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=2, seed=seed)
        target = ToyLM(vocab, seed=seed)
        drafts = [ToyLM(vocab, seed=1000 + seed), noisy_copy(target, vocab, 0.1, 2000 + seed)]
        processor = CFAssistant(0.4, PromptItemProbs(vocab, int(item_ids.max()) + 1, seed))
        prompts = random_prompts(4, vocab, seed=seed)
        ids, mask = left_pad(prompts, pad_id=0)
        for k in (1, 5):
            refs = [beam_search(target, *left_pad([p], pad_id=0), trie, k, processors=[processor]) for p in prompts]
            assert not all(same_list(ref, beam_search(target, *left_pad([p], pad_id=0), trie, k))
                           for ref, p in zip(refs, prompts))
            for draft, gamma in itertools.product(drafts, (1, 3)):
                for row, prompt in enumerate(prompts):  # batch 1
                    out = speculative_beam_search(target, draft, *left_pad([prompt], pad_id=0), trie, k, 2 * k,
                                                  gamma, processors=[processor])
                    assert same_list(out, refs[row]), (seed, k, gamma, row)
                    check_invariants(out, trie, item_ids, k)
                batched = speculative_beam_search(target, draft, ids, mask, trie, k, 2 * k, gamma,
                                                  processors=[processor])  # ragged progress: rows leave the batch
                for row in range(len(prompts)):
                    assert same_list(one_user(batched, row), refs[row]), (seed, k, gamma, row)


# -- tuning g ----------------------------------------------------------------------------------------------------------
def test_tune_cf_weight_picks_the_weight_with_the_best_recall():
    from atspeed_exp.evaluation import tune_cf_weight

    trie, item_ids, _, vocab = make_trie(num_items=60, num_collisions=2, seed=4)
    model = ToyLM(vocab, seed=4)
    prompts = [p.tolist() for p in random_prompts(8, vocab, seed=4)]
    truth = [(int(item_ids[i]),) for i in range(8)]

    def oracle(prompt_ids, prompt_mask, trie):  # a collaborative model that knows each user's next item
        rows = torch.tensor([prompts.index(p[m].tolist()) for p, m in zip(prompt_ids, prompt_mask)])
        probs = torch.full((len(rows), int(item_ids.max()) + 1), 1e-4)
        probs[torch.arange(len(rows)), item_ids[rows]] = 1.0
        return probs / probs.sum(-1, keepdim=True)

    best, recall = tune_cf_weight(model, prompts, truth, trie, oracle, [0.0, 0.5, 1.0], k=3, pad_id=0,
                                  batch_size=3)
    assert list(recall) == [0.0, 0.5, 1.0]
    assert recall[0.0] == 1.0 and best == max(g for g in recall if recall[g] == 1.0)
    assert recall[1.0] < 1.0  # the toy LLM alone misses some of them


# -- the pipeline ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pipeline_decodes_with_the_sasrec_assistant(tmp_path, monkeypatch):
    """stages with sasrec and decoding.processors=[cf_assistant]: the trained SASRec feeds the processor of every
    decoder, and strict lists still equal the processed beam search's."""
    from pipeline_helpers import compose_config, tiny_overrides

    from atspeed_exp import pipeline
    from atspeed_exp.baselines import SASRecItemProbabilities
    from atspeed_exp.config_check import ConfigError

    calls = {"n": 0}
    original = SASRecItemProbabilities.__call__

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        probs = original(self, *args, **kwargs)
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[0]))
        return probs

    monkeypatch.setattr(SASRecItemProbabilities, "__call__", counting)
    base = tiny_overrides(tmp_path) + ["sasrec.max_epochs=1", "sasrec.model.hidden_size=16", "decoding.ks=[5]",
                                       "eval.batch1_users=0"]
    overrides = base + ["stages=[sasrec,target,teacher,draft,eval]", "decoding.processors=[cf_assistant]",
                        "decoding.cf_weight=0.5"]
    summary = pipeline.run(compose_config(overrides))
    metrics = summary["metrics"]
    assert calls["n"] > 0
    assert metrics["eval/all/strict/k5/mismatches"] == 0
    assert metrics["eval/strict/k5/recall@5"] == metrics["eval/beam/k5/recall@5"]
    cfg = compose_config(overrides)
    made = pipeline.make_processors(cfg)
    assert [(type(p), p.weight) for p in made] == [(CFAssistant, 0.5)]
    # the tuning script on the run's target and SASRec, validation users
    from test_benchmarks import load_script

    out = tmp_path / "tune.json"
    assert load_script("tune_cf_weight").main([
        summary["target_dir"], summary["sasrec_dir"], "--data-root", str(pipeline.data_root(cfg)),
        "--data-name", cfg.data.name, "--weights", "0", "0.5", "1", "--k", "5", "--users", "12", "--out", str(out),
    ]) == 0
    tuned = json.loads(out.read_text())
    assert tuned["users"] == 12 and set(tuned["recall"]) == {"0.0", "0.5", "1.0"}
    assert tuned["recall"][str(tuned["best"])] == max(tuned["recall"].values())
    with pytest.raises(ConfigError, match="decoding.cf_weight"):
        pipeline.run(compose_config(overrides[:-1] + ["decoding.cf_weight=1.5"]))
    with pytest.raises(ConfigError, match="cf_assistant needs SASRec"):  # a SASRec of other settings is not built
        pipeline.run(compose_config(base + ["decoding.processors=[cf_assistant]", "sasrec.max_epochs=2"]))
    # the built one is used without sasrec in stages (every stage cached: nothing is decoded again)
    again = pipeline.run(compose_config(base + ["stages=[target,teacher,draft,eval]",
                                                "decoding.processors=[cf_assistant]", "decoding.cf_weight=0.5"]))
    assert again["metrics"]["eval/all/strict/k5/target_calls_per_list"] == metrics[
        "eval/all/strict/k5/target_calls_per_list"]


@pytest.mark.parametrize("prompt_format", ["compact", "alpaca"])
def test_prompt_histories_read_the_examples_histories_off_the_prompts(tmp_path, prompt_format):
    """SASRec's input recovered from prompt ids equals the example's history (latest max_len items; a SID shared by
    several items reads as the lowest of their ids)."""
    from pipeline_helpers import compose_config, tiny_overrides

    from atspeed_exp import pipeline
    from atspeed_exp.baselines import prompt_histories
    from atspeed_exp.models.sasrec import left_pad_histories

    cfg = compose_config(tiny_overrides(tmp_path) + [f"data.prompt_format={prompt_format}"])
    data = pipeline.load_data(cfg)
    trie = data.trie()
    lowest = {}
    for item, sid in zip(trie.leaf_items[:, 0].tolist(), trie.leaf_items.tolist()):
        lowest.update({other: item for other in sid if other >= 0})
    split = data.splits["test"]
    assert len(lowest) > len(set(lowest.values()))  # the catalogue has SID collisions
    ids, mask = left_pad([torch.tensor(p) for p in split.prompts], data.pad_id)
    max_len = 5  # shorter than most histories: the latest items count
    expected = left_pad_histories([[lowest[i] for i in ex.history] for ex in split.examples], max_len)
    assert torch.equal(prompt_histories(ids, mask, trie, max_len), expected)
