"""Random item catalogues with SID token ids laid out as a tokenizer would (specials first, then one block per
level), shared by the decoding tests."""

from __future__ import annotations

import torch

from atspeed_exp.decoding.trie import ItemTrie

NUM_SPECIAL = 4  # pad, bos, eos, unk


def random_catalogue(
    num_items: int = 60, level_sizes: tuple[int, ...] = (6, 5, 5, 4), num_collisions: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]], int]:
    """Returns (item_ids [N], item_token_ids [N, L], level_blocks, vocab_size)."""
    gen = torch.Generator().manual_seed(seed)
    blocks, start = [], NUM_SPECIAL
    for size in level_sizes:
        blocks.append((start, start + size))
        start += size
    vocab_size = start + 3  # a few non-SID tokens after the blocks
    codes: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    while len(codes) < num_items - num_collisions:
        code = tuple(int(torch.randint(size, (1,), generator=gen)) for size in level_sizes)
        if code not in seen:
            seen.add(code)
            codes.append(code)
    codes += [codes[i] for i in range(num_collisions)]  # items sharing a full SID with an earlier item
    local = torch.tensor(codes, dtype=torch.long)
    offsets = torch.tensor([s for s, _ in blocks])
    # item ids are deliberately not 0..N-1 and not in SID order
    item_ids = torch.randperm(num_items * 3, generator=gen)[:num_items]
    return item_ids, local + offsets, blocks, vocab_size


def make_trie(**kwargs) -> tuple[ItemTrie, torch.Tensor, torch.Tensor, int]:
    item_ids, tokens, blocks, vocab = random_catalogue(**kwargs)
    return ItemTrie(tokens, item_ids, blocks), item_ids, tokens, vocab


def random_prompts(num: int, vocab_size: int, min_len: int = 3, max_len: int = 9, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (num,), generator=gen)
    return [torch.randint(NUM_SPECIAL, vocab_size, (int(n),), generator=gen) for n in lengths]


def tiny_llama(vocab_size: int, layers: int, hidden: int, seed: int, dtype=None):
    """A random LLaMA (transformers) behind the DecoderLM adapter, in eval mode; ``dtype`` e.g. torch.bfloat16."""
    import transformers

    from atspeed_exp.models.adapter import HFDecoderLM

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config)
    return HFDecoderLM.from_model(model if dtype is None else model.to(dtype))
