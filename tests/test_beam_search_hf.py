"""Our batched beam search against transformers' own constrained beam search on a tiny random LLaMA."""

import pytest
import torch
from decoding_fixtures import make_trie, random_prompts
from transformers import LlamaConfig, LlamaForCausalLM

from atspeed_exp.decoding.beam_search import beam_search, left_pad
from atspeed_exp.models.adapter import HFDecoderLM

PAD, BOS, EOS = 0, 1, 2


def tiny_llama(vocab: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper distributions than the default init, so beams differ clearly
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.mark.parametrize("num_beams", [1, 3, 5, 10, 20])
def test_beam_search_equals_transformers_generate(num_beams):
    trie, _, tokens, vocab = make_trie(num_items=80, level_sizes=(24, 6, 5, 4), num_collisions=2, seed=num_beams)
    prefixes: dict[tuple[int, ...], list[int]] = {}
    for row in tokens.tolist():
        for t in range(4):
            prefixes.setdefault(tuple(row[:t]), []).append(row[t])
    model = tiny_llama(vocab, seed=num_beams)
    prompts = random_prompts(3, vocab, seed=num_beams)
    ids, mask = left_pad(prompts, pad_id=PAD)
    ours = beam_search(HFDecoderLM(model), ids, mask, trie, num_beams)

    for row, prompt in enumerate(prompts):
        width = prompt.numel()

        def allowed(batch_id, input_ids, width=width):
            return sorted(set(prefixes.get(tuple(input_ids[width:].tolist()), [EOS])))

        out = model.generate(
            prompt[None], attention_mask=torch.ones(1, width, dtype=torch.long), num_beams=num_beams,
            num_return_sequences=num_beams, prefix_allowed_tokens_fn=allowed, max_new_tokens=4, min_new_tokens=4,
            do_sample=False, output_scores=True,
            **({"length_penalty": 0.0, "early_stopping": True} if num_beams > 1 else {}),
            return_dict_in_generate=True, pad_token_id=PAD, eos_token_id=EOS,
        )
        theirs = out.sequences[:, width:]
        assert ours.sequences[row].tolist() == theirs.tolist()
        if num_beams > 1:
            expected_scores = out.sequences_scores
        else:  # generate() runs greedy search for one beam and reports no sequence score: score it ourselves
            with torch.no_grad():
                logp = torch.log_softmax(model(out.sequences).logits[0, width - 1 : -1].float(), -1)
            expected_scores = logp.gather(1, theirs[0, :, None]).sum()[None]
        assert ours.sequence_scores[row].tolist() == pytest.approx(expected_scores.tolist(), abs=1e-4)
