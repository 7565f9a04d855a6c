"""A tiny torch-only language model that honours the DecoderLM protocol (mask, positions, cache), for testing the
decoding core without transformers: one layer of masked mean-pooling "attention" over position-modulated token
embeddings. Its cache is the (tokens, positions) it has seen, so gather/reorder are exact by construction."""

from __future__ import annotations

import torch


class ToyLM:
    def __init__(self, vocab_size: int, dim: int = 16, seed: int = 0, max_positions: int = 512) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.token_emb = torch.randn(vocab_size, dim, generator=gen)
        self.pos_emb = torch.randn(max_positions, dim, generator=gen) * 0.5
        self.out = torch.randn(dim, vocab_size, generator=gen) * 3.0
        self.calls = 0

    dtype = torch.float32
    device = torch.device("cpu")

    def new_cache(self):
        return None

    @property
    def vocab_size(self) -> int:
        return self.out.shape[1]

    def __call__(self, input_ids, position_ids, attention_mask, cache):
        hidden, cache = self.hidden(input_ids, position_ids, attention_mask, cache)
        return self.project(hidden), cache

    def project(self, hidden, start=0, end=None):
        return hidden @ self.out[:, start:end]

    def hidden(self, input_ids, position_ids, attention_mask, cache):
        self.calls += 1
        if cache is None:
            tokens, positions = input_ids, position_ids
        else:
            tokens = torch.cat([cache[0], input_ids], dim=1)
            positions = torch.cat([cache[1], position_ids], dim=1)
        if attention_mask.shape[-1] != tokens.shape[1]:
            raise AssertionError(f"mask covers {attention_mask.shape[-1]} keys, cache+input has {tokens.shape[1]}")
        feats = self.token_emb[tokens] * (1.0 + self.pos_emb[positions])  # [B, T, D]
        visible = (attention_mask[:, 0] == 0).float()  # [B, q, T]
        pooled = visible @ feats / visible.sum(-1, keepdim=True).clamp(min=1.0)
        query = self.pos_emb[position_ids]  # the query position matters too
        return torch.tanh(pooled + query), (tokens, positions)

    def reorder_cache(self, cache, batch_index):
        return (cache[0][batch_index], cache[1][batch_index])

    def gather_cache(self, cache, positions):
        return (cache[0].gather(1, positions), cache[1].gather(1, positions))

    def full_sequence_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Reference: logits of one unpadded sequence ``[T]`` run without cache -> ``[T, V]``."""
        length = ids.numel()
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        mask = torch.zeros(1, 1, length, length).masked_fill(~causal, torch.finfo(torch.float32).min)
        logits, _ = self(ids[None], torch.arange(length)[None], mask, None)
        return logits[0]
