"""The lean LLaMA forward (atspeed_exp.models.lean) against transformers' module: same hidden states and logits
through prefill with left padding, cache reorder and pruning, tree calls, biases, grouped-query attention and scaled
RoPE; same lists from beam search and speculative beam search; clear refusals of what it cannot run."""

from __future__ import annotations

import pytest
import torch
import transformers
from decoding_fixtures import make_trie, random_prompts

from atspeed_exp.decoding.beam_search import left_pad
from atspeed_exp.decoding.protocol import mask_value
from atspeed_exp.decoding.speculative import speculative_beam_search
from atspeed_exp.decoding.tree import tree_beam_search
from atspeed_exp.models.adapter import HFDecoderLM
from atspeed_exp.models.lean import LeanLlamaLM, decoder_for, lean_supported

VOCAB, PAD = 50, 0


def llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD,
                    attn_implementation="sdpa")
    settings.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()


def additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.where(allowed, 0.0, mask_value(torch.float32))[:, None]


def run_calls(lm, ids: torch.Tensor, not_pad: torch.Tensor) -> list[torch.Tensor]:
    """Prefill a left-padded batch, reorder its rows, append a 3-token tree, prune, append one more token; the
    logits of each call (padding query rows dropped)."""
    batch, width = ids.shape
    positions = (not_pad.long().cumsum(-1) - 1).clamp(min=0)
    allowed = torch.ones(width, width, dtype=torch.bool).tril()[None] & not_pad[:, None, :]
    logits, cache = lm(ids, positions, additive(allowed), lm.new_cache())
    outputs = [logits[not_pad]]
    order = torch.tensor([1, 0, 1])  # rows repeated and permuted
    cache, not_pad, positions = lm.reorder_cache(cache, order), not_pad[order], positions[order]
    start = positions[:, -1:] + 1
    tree = torch.tensor([[5, 6, 7]] * 3)  # a root and two children: 6 and 7 both see 5, not each other
    tree_positions = torch.cat([start, start + 1, start + 1], 1)
    own = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    allowed = torch.cat([not_pad[:, None, :].expand(-1, 3, -1), own.expand(3, -1, -1)], -1)
    logits, cache = lm(tree, tree_positions, additive(allowed), cache)
    outputs.append(logits)
    keep = torch.cat([torch.arange(width).expand(3, -1), torch.tensor([[width, width + 2]] * 3)], 1)
    cache = lm.gather_cache(cache, keep)  # keep the path 5 -> 7
    allowed = torch.cat([not_pad, torch.ones(3, 3, dtype=torch.bool)], 1)[:, None, :]
    logits, _ = lm(torch.tensor([[9]] * 3), start + 2, additive(allowed), cache)
    outputs.append(logits)
    return outputs


@pytest.mark.parametrize("overrides", [
    {},
    {"attention_bias": True, "mlp_bias": True},
    {"num_key_value_heads": 4, "tie_word_embeddings": True},
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}},
])
def test_lean_matches_transformers_through_prefill_reorder_tree_and_pruning(overrides):
    model = llama(**overrides)
    if overrides.get("attention_bias"):  # transformers initialises biases to zero: make them matter
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.5)
    ids = torch.tensor([[1, 11, 12, 13, 14], [PAD, PAD, 1, 21, 22]])
    hf = run_calls(HFDecoderLM(model), ids, ids != PAD)
    for stacked in (False, True):  # cache reorder/prune per layer (the CPU default) or all layers at once (CUDA's)
        lean = run_calls(LeanLlamaLM(model, stack_cache_edits=stacked), ids, ids != PAD)
        for expected, got in zip(hf, lean, strict=True):
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


def test_lean_bf16_matches_transformers_and_projects_a_block():
    model = llama(seed=3).to(torch.bfloat16)
    ids = torch.tensor([[1, 11, 12, 13, 14], [PAD, PAD, 1, 21, 22]])
    hf, lean = run_calls(HFDecoderLM(model), ids, ids != PAD), run_calls(LeanLlamaLM(model), ids, ids != PAD)
    for expected, got in zip(hf, lean, strict=True):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, atol=0.05, rtol=0.02)
    lm = LeanLlamaLM(model)
    hidden, _ = lm.hidden(ids[:1], torch.arange(5)[None], additive(torch.ones(1, 5, 5).tril().bool()), None)
    block = lm.project(hidden, 10, 20)
    torch.testing.assert_close(block, lm.project(hidden)[..., 10:20])
    block.masked_fill_(block > 0, 0.0)  # a normal tensor: the trie constraint edits logits in place


def test_lean_decoding_gives_the_transformers_lists():
    trie, _, _, vocab = make_trie(seed=4)
    target, draft = llama(seed=0, vocab_size=vocab), llama(seed=1, vocab_size=vocab, num_hidden_layers=1)
    ids, mask = left_pad(random_prompts(4, vocab, min_len=2, max_len=10, seed=4), pad_id=PAD)
    hf = tree_beam_search(HFDecoderLM(target), ids, mask, trie, 5)
    lean_target = LeanLlamaLM(target)
    lean = tree_beam_search(lean_target, ids, mask, trie, 5)
    assert torch.equal(lean.items, hf.items) and torch.equal(lean.sequences, hf.sequences)
    torch.testing.assert_close(lean.scores, hf.scores, atol=1e-4, rtol=0)
    assert not lean_target.stack_cache_edits  # per-layer cache edits on the CPU (no extra copy)
    for stacked in (False, True):
        sd = speculative_beam_search(LeanLlamaLM(target, stack_cache_edits=stacked),
                                     LeanLlamaLM(draft, stack_cache_edits=stacked), ids, mask, trie, 5,
                                     draft_beams=12, gamma=2)
        assert torch.equal(sd.items, hf.items) and torch.equal(sd.sequences, hf.sequences)


def test_lean_refusals_and_backend_choice():
    from peft import LoraConfig, get_peft_model

    model = llama()
    assert lean_supported(model) is None
    assert isinstance(decoder_for(model), LeanLlamaLM) and isinstance(decoder_for(model, "hf"), HFDecoderLM)
    with pytest.raises(ValueError, match="expected one of"):
        decoder_for(model, "fast")

    wrapped = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert "merge LoRA" in lean_supported(wrapped)
    assert isinstance(decoder_for(wrapped.eval()), HFDecoderLM)  # auto falls back to transformers' forward
    with pytest.raises(ValueError, match="LeanLlamaLM cannot run a PeftModel"):
        decoder_for(wrapped, "lean")

    assert "hidden_act='gelu'" in lean_supported(llama(hidden_act="gelu"))
    dynamic = llama(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    assert "rope_type='dynamic'" in lean_supported(dynamic)
    with pytest.raises(RuntimeError, match="eval mode"):
        LeanLlamaLM(llama().train())

    lm = LeanLlamaLM.from_model(llama().train())
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 1, 2, 3\), expected \(1, 1, 2, 2\)"):
        lm.hidden(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), torch.zeros(1, 1, 2, 3), None)
    _, cache = lm.hidden(torch.tensor([[1]]), torch.tensor([[0]]), torch.zeros(1, 1, 1, 1), None)
    with pytest.raises(ValueError, match=r"expected \(1, 1, 2, 3\)"):  # a batch-1 mask that ignores the cache
        lm.hidden(torch.tensor([[1, 2]]), torch.tensor([[1, 2]]), torch.zeros(1, 1, 2, 2), cache)


def test_lean_reads_weights_once():
    # a model trained after the LeanLlamaLM was built is not seen by it: callers rebuild it (the callback does)
    model = llama(seed=5)
    lm = LeanLlamaLM(model)
    ids, pos, mask = torch.tensor([[1, 7]]), torch.tensor([[0, 1]]), additive(torch.ones(1, 2, 2).tril().bool())
    before, _ = lm(ids, pos, mask, None)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    after, _ = lm(ids, pos, mask, None)
    torch.testing.assert_close(after, before)
    rebuilt, _ = LeanLlamaLM(model)(ids, pos, mask, None)
    assert not torch.allclose(rebuilt, before)

