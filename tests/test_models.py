"""Tests of atspeed_exp.models: scratch LLaMA, the DecoderLM adapter (padding, cache reorder, tree pruning,
sdpa vs eager) and the LoRA + new-token-rows path with its save/load round trip. Tiny models, no downloads."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from atspeed_exp.decoding.protocol import mask_value
from atspeed_exp.models.adapter import HFDecoderLM
from atspeed_exp.models.build import (
    build_scratch_llama,
    count_parameters,
    load_model,
    load_pretrained_with_lora,
    merge_lora,
    save_model,
)

VOCAB, PAD, BOS, EOS = 64, 0, 1, 2
ATOL = 1e-5


def tiny_llama(attn: str = "sdpa", seed: int = 0, tie: bool = False, vocab: int = VOCAB) -> LlamaForCausalLM:
    return build_scratch_llama(
        vocab_size=vocab,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, so the cache has fewer heads than the queries
        tie_word_embeddings=tie,
        attn_implementation=attn,
        seed=seed,
    ).eval()


def additive(allowed: torch.Tensor) -> torch.Tensor:
    """bool [B, q, kv] (True = attend) -> additive float [B, 1, q, kv]."""
    return torch.where(allowed, 0.0, mask_value(torch.float32))[:, None]


@torch.no_grad()
def reference_last_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """Logits [V] at the last position of the unpadded sequence, no cache, default causal mask."""
    return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()


PROMPTS = [[BOS, 5, 9, 13, 17], [BOS, 21, 8]]  # different lengths -> row 1 is left-padded


def left_padded_prefill(lm: HFDecoderLM, prompts: list[list[int]]):
    """Prefill a left-padded batch; returns logits, cache, key-not-pad mask [B, S] and next positions [B]."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])  # [B, S]
    not_pad = ids != PAD
    positions = (not_pad.long().cumsum(-1) - 1).clamp(min=0)  # [B, S]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal[None] & not_pad[:, None, :]  # [B, q, kv]
    logits, cache = lm(ids, positions, additive(allowed), lm.new_cache())
    return logits, cache, not_pad, positions[:, -1] + 1


def decode_step(lm: HFDecoderLM, cache, tokens: torch.Tensor, key_ok: torch.Tensor, position: torch.Tensor):
    """One cached step: tokens [B], key_ok [B, kv-1] (previous keys visible), position [B]."""
    allowed = torch.cat([key_ok, torch.ones(len(tokens), 1, dtype=torch.bool)], dim=1)[:, None, :]  # [B, 1, kv]
    logits, cache = lm(tokens[:, None], position[:, None], additive(allowed), cache)
    return logits[:, -1], cache, allowed[:, 0]


def test_build_scratch_llama_shapes_and_params():
    model = tiny_llama()
    assert model.config._attn_implementation == "sdpa"
    assert model.model.embed_tokens.weight.shape == (VOCAB, 32)
    assert model.lm_head.weight.shape == (VOCAB, 32)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 8, 32)  # 2 kv heads of dim 8
    logits = model(input_ids=torch.tensor([[BOS, 4, 5]])).logits
    assert logits.shape == (1, 3, VOCAB)
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters()) == counts["trainable"]
    tied = tiny_llama(tie=True)
    assert count_parameters(tied)["total"] == counts["total"] - VOCAB * 32  # the tied head is counted once
    # the seed fixes the weights without touching the caller's RNG
    state = torch.random.get_rng_state()
    assert torch.equal(tiny_llama(seed=3).lm_head.weight, tiny_llama(seed=3).lm_head.weight)
    assert torch.equal(state, torch.random.get_rng_state())


def test_adapter_left_padded_prefill_then_decode_matches_unpadded():
    model = tiny_llama()
    lm = HFDecoderLM(model)
    logits, cache, key_ok, position = left_padded_prefill(lm, PROMPTS)
    assert logits.dtype == torch.float32 and logits.shape == (2, 5, VOCAB)
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(logits[row, -1], reference_last_logits(model, prompt), atol=ATOL, rtol=0)
    steps = torch.tensor([[30, 31], [40, 41], [50, 51]])  # [step, B]
    for t, tokens in enumerate(steps):
        last, cache, key_ok = decode_step(lm, cache, tokens, key_ok, position)
        position = position + 1
        for row, prompt in enumerate(PROMPTS):
            expected = reference_last_logits(model, prompt + steps[: t + 1, row].tolist())
            torch.testing.assert_close(last[row], expected, atol=ATOL, rtol=0)
    assert cache.get_seq_length() == 5 + 3


def test_adapter_reorder_cache_repeat_and_permute():
    model = tiny_llama()
    lm = HFDecoderLM(model)
    _, cache, key_ok, position = left_padded_prefill(lm, PROMPTS)
    cache = lm.reorder_cache(cache, torch.tensor([0, 0, 1, 1]))  # repeat: beams
    perm = torch.tensor([3, 0, 2, 1])
    cache = lm.reorder_cache(cache, perm)  # permute: rows are now prompts [1, 0, 1, 0]
    rows = torch.tensor([0, 0, 1, 1])[perm]
    tokens = torch.tensor([33, 34, 35, 36])
    last, cache, _ = decode_step(lm, cache, tokens, key_ok[rows], position[rows])
    assert cache.layers[0].keys.shape[0] == 4
    for i, row in enumerate(rows.tolist()):
        expected = reference_last_logits(model, PROMPTS[row] + [tokens[i].item()])
        torch.testing.assert_close(last[i], expected, atol=ATOL, rtol=0)


def test_adapter_gather_cache_prunes_tree_to_kept_path():
    """Prompt + tree (t1 child of the prompt, t2 and t3 both children of t1); keep [prompt, t1, t3] in row 0 and
    [prompt, t1, t2] in row 1, then decode one more token: equal to feeding the kept path plainly."""
    model = tiny_llama()
    lm = HFDecoderLM(model)
    prompt = [BOS, 7, 11, 19]
    n = len(prompt)
    ids = torch.tensor([prompt, prompt])
    positions = torch.arange(n).expand(2, n)
    _, cache = lm(ids, positions, additive(torch.ones(n, n, dtype=torch.bool).tril().expand(2, n, n)), lm.new_cache())

    t1, t2, t3 = 23, 29, 37
    tree = torch.tensor([[t1, t2, t3]] * 2)
    tree_pos = torch.tensor([[n, n + 1, n + 1]] * 2)  # position = parent position + 1
    ancestors = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)  # t3 sees t1 and itself, not t2
    allowed = torch.cat([torch.ones(3, n, dtype=torch.bool), ancestors], dim=1).expand(2, 3, n + 3)
    tree_logits, cache = lm(tree, tree_pos, additive(allowed), cache)
    torch.testing.assert_close(tree_logits[0, 2], reference_last_logits(model, prompt + [t1, t3]), atol=ATOL, rtol=0)
    torch.testing.assert_close(tree_logits[0, 1], reference_last_logits(model, prompt + [t1, t2]), atol=ATOL, rtol=0)

    keep = torch.tensor([list(range(n)) + [n, n + 2], list(range(n)) + [n, n + 1]])  # [B, n+2] cache positions
    cache = lm.gather_cache(cache, keep)
    assert cache.get_seq_length() == n + 2
    nxt = torch.tensor([41, 43])
    last, cache, _ = decode_step(lm, cache, nxt, torch.ones(2, n + 2, dtype=torch.bool), torch.tensor([n + 2] * 2))
    torch.testing.assert_close(last[0], reference_last_logits(model, prompt + [t1, t3, 41]), atol=ATOL, rtol=0)
    torch.testing.assert_close(last[1], reference_last_logits(model, prompt + [t1, t2, 43]), atol=ATOL, rtol=0)


def test_adapter_sdpa_and_eager_agree_with_additive_mask():
    outputs = {}
    for attn in ("sdpa", "eager"):
        model = tiny_llama(attn=attn)
        assert model.config._attn_implementation == attn
        lm = HFDecoderLM(model)
        logits, cache, key_ok, position = left_padded_prefill(lm, PROMPTS)
        last, _, _ = decode_step(lm, cache, torch.tensor([30, 31]), key_ok, position)
        outputs[attn] = (logits, last)
        assert torch.isfinite(logits).all()  # fully masked padding rows softmax to something finite
    # padding query rows attend to nothing and may differ between kernels; compare the real positions
    torch.testing.assert_close(outputs["sdpa"][0][0], outputs["eager"][0][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(outputs["sdpa"][0][1, 2:], outputs["eager"][0][1, 2:], atol=ATOL, rtol=0)
    torch.testing.assert_close(outputs["sdpa"][1], outputs["eager"][1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_adapter_bool_mask_and_low_precision_are_safe(attn):
    model = tiny_llama(attn=attn)
    lm = HFDecoderLM(model)
    ids = torch.tensor([[PAD, PAD, BOS, 5, 6]])
    not_pad = ids != PAD
    positions = (not_pad.long().cumsum(-1) - 1).clamp(min=0)
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()[None] & not_pad[:, None, :]
    float_logits, _ = lm(ids, positions, additive(allowed), lm.new_cache())
    bool_logits, _ = lm(ids, positions, allowed[:, None], lm.new_cache())  # converted to additive by the adapter
    torch.testing.assert_close(bool_logits[:, 2:], float_logits[:, 2:], atol=ATOL, rtol=0)
    # a float32 minimum cast to bf16 would be -inf and NaN the padding rows; the adapter clamps it
    half, _ = HFDecoderLM(model.to(torch.bfloat16))(ids, positions, additive(allowed), None)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_adapter_mode_handling_and_mask_shape_check():
    model = tiny_llama().train()
    lm = HFDecoderLM(model)
    assert model.training  # the constructor leaves the mode alone
    ids, pos = torch.tensor([[BOS, 5]]), torch.tensor([[0, 1]])
    mask = additive(torch.ones(2, 2, dtype=torch.bool).tril()[None])
    with pytest.raises(RuntimeError, match="eval mode"):
        lm(ids, pos, mask, None)
    lm = HFDecoderLM.from_model(model)
    assert not model.training
    with pytest.raises(ValueError, match="expected"):
        lm(ids, pos, mask[:, :, :, :1], None)
    logits, cache = lm(ids, pos, mask, None)
    assert logits.shape == (1, 2, VOCAB) and cache.get_seq_length() == 2
    logits[:, :, 0] = mask_value(torch.float32)  # editable in place outside inference mode (trie masking)


def test_save_load_full_model_roundtrip_and_overwrite(tmp_path):
    model = tiny_llama(attn="eager")
    x = torch.tensor([[BOS, 3, 4, 5]])
    target = tmp_path / "ckpt"
    save_model(tiny_llama(seed=1), target)  # an older checkpoint, replaced atomically below
    save_model(model, target)
    loaded = load_model(target)
    assert loaded.config._attn_implementation == "eager" and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directories left behind


# ---- LoRA on a local pretrained directory, with new SID tokens ----

SID_TOKENS = [f"<a_{i}>" for i in range(4)] + [f"<b_{i}>" for i in range(4)]


def make_pretrained_dir(path, tie: bool) -> None:
    """A tiny 'pretrained' model and its tokenizer, saved with save_pretrained (what a local checkpoint holds)."""
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tiny_llama(tie=tie, seed=5).save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_lora_trains_only_adapters_and_new_rows_and_roundtrips(tmp_path, tie):
    base_dir = tmp_path / "base"
    make_pretrained_dir(base_dir, tie)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
    tokenizer.add_tokens(SID_TOKENS)
    new_ids = tokenizer.convert_tokens_to_ids(SID_TOKENS)
    assert new_ids == list(range(VOCAB, VOCAB + len(SID_TOKENS)))

    torch.manual_seed(0)  # the resize draws the added rows from the global RNG
    model = load_pretrained_with_lora(base_dir, tokenizer, new_ids)
    hidden = 32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora == 2 * ((8 * hidden + hidden * 8) + (8 * hidden + 16 * 8))  # r=8 on q (32->32), v (32->16); 2 layers
    rows = len(new_ids) * hidden * (1 if tie else 2)  # a tied head shares the input embedding's rows
    assert count_parameters(model)["trainable"] == lora + rows

    base = model.get_base_model()
    raw_embed = base.get_input_embeddings().original_module.weight
    assert not raw_embed.requires_grad and raw_embed.shape[0] == len(tokenizer)
    embed_before = base.get_input_embeddings().weight.detach().clone()  # merged weights: base + trained rows
    head_before = base.get_output_embeddings().weight.detach().clone()

    model.train()
    x = torch.tensor([[BOS, 7, 8, new_ids[0], new_ids[5], EOS]])
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert raw_embed.grad is None and base.get_output_embeddings().original_module.weight.grad is None
    for name, p in model.named_parameters():
        if "lora_B" in name or "trainable_tokens_delta" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    optimizer.step()

    embed_after = base.get_input_embeddings().weight.detach()
    head_after = base.get_output_embeddings().weight.detach()
    assert torch.equal(embed_after[:VOCAB], embed_before[:VOCAB])  # old rows untouched
    assert torch.equal(head_after[:VOCAB], head_before[:VOCAB])
    assert not torch.equal(embed_after[new_ids[0]], embed_before[new_ids[0]])  # a new row seen in the batch moved
    assert not torch.equal(head_after[VOCAB:], head_before[VOCAB:])

    model.eval()
    probe = torch.tensor([[BOS, new_ids[1], 9, new_ids[6], new_ids[0]]])
    with torch.no_grad():
        expected = model(input_ids=probe).logits
    save_model(model, tmp_path / "target", tokenizer=tokenizer)
    saved = {p.name for p in (tmp_path / "target").iterdir()}
    assert {"adapter_model.safetensors", "atspeed_extra_rows.safetensors", "atspeed_model.json"} <= saved
    assert "tokenizer.json" in saved and "model.safetensors" not in saved  # the base is referenced, not copied

    loaded = load_model(tmp_path / "target")
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=probe).logits, expected)

    # the adapter drives the peft model through the cache path with the same numbers
    lm = HFDecoderLM(loaded)
    n = probe.shape[1]
    mask = additive(torch.ones(n, n, dtype=torch.bool).tril()[None])
    prefix, cache = lm(probe[:, :-1], torch.arange(n - 1)[None], mask[:, :, :-1, :-1], None)
    last, _ = lm(probe[:, -1:], torch.tensor([[n - 1]]), mask[:, :, -1:, :], cache)
    torch.testing.assert_close(last[0, -1], expected[0, -1], atol=ATOL, rtol=0)

    # re-saving a loaded model works, and merging gives a plain model with the same logits up to rounding
    save_model(loaded, tmp_path / "again")
    merged = merge_lora(load_model(tmp_path / "again"))
    assert isinstance(merged, LlamaForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, expected, atol=ATOL, rtol=0)
