"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018): a small causal Transformer over
item ids, the sequential-recommendation baseline the LLM target is compared with.

Contract: a history is a row of item ids, left-padded with -1 to ``max_len`` so that its latest item sits at the last
position (as in the original, the learned positional embedding then encodes recency). Position t sees positions
<= t only; its hidden state scores every item by a dot product with the (shared) item embedding table:
``scores[b, t, i] = hidden[b, t] · item_embedding[i]``, the model's belief about the item after position t.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

PAD = -1  # item id of an empty history slot


def left_pad_histories(histories: Sequence[Sequence[int]], max_len: int) -> torch.Tensor:
    """Ragged histories (time order) -> ``[B, max_len]`` long, the latest ``max_len`` items right-aligned, -1 before."""
    out = torch.full((len(histories), max_len), PAD, dtype=torch.long)
    for row, items in enumerate(histories):
        items = list(items)[-max_len:]
        if items:
            out[row, max_len - len(items):] = torch.as_tensor(items, dtype=torch.long)
    return out


class CausalSelfAttentionBlock(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN(x)), then x + FFN(LN(x)); the FFN is hidden -> hidden -> hidden
    with GELU, as SASRec's point-wise feed-forward."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_norm = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.ffn_norm = nn.LayerNorm(hidden_size)
        self.ffn = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_size, hidden_size))
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x: ``[B, T, H]``; allowed: bool ``[B, 1, T, T]``, True where query t may attend to key s."""
        batch, length, hidden = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(hidden, dim=-1)
        # [B, T, H] -> [B, heads, T, H / heads]
        q, k, v = (t.view(batch, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                              dropout_p=self.attn_dropout if self.training else 0.0)
        x = x + self.dropout(self.out(attn.transpose(1, 2).reshape(batch, length, hidden)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class SASRec(nn.Module):
    """Item embedding + learned positional embedding -> ``num_blocks`` causal self-attention blocks -> LayerNorm.

    Args:
        num_items: size of the item id space (ids ``0 .. num_items - 1``); one more embedding row is the padding.
        hidden_size: embedding and hidden width H.
        num_blocks: Transformer blocks.
        num_heads: attention heads (H divisible by it).
        dropout: dropout on the embeddings, attention weights, and each block's residual branches.
        max_len: history length T (positions ``0 .. T - 1``; longer inputs are refused).
    """

    def __init__(self, num_items: int, hidden_size: int = 64, num_blocks: int = 2, num_heads: int = 1,
                 dropout: float = 0.2, max_len: int = 20) -> None:
        super().__init__()
        self.num_items = num_items
        self.max_len = max_len
        self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=num_items)
        self.position_embedding = nn.Embedding(max_len, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(hidden_size, num_heads, dropout) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(hidden_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items: ``[B, T]`` long item ids, -1 = padding (left), T <= max_len. Returns hidden states ``[B, T, H]``;
        rows at padded positions are zero and carry no meaning."""
        length = items.shape[1]
        if length > self.max_len:
            raise ValueError(f"history of {length} positions, the model has max_len {self.max_len}")
        real = items >= 0  # [B, T]
        tokens = torch.where(real, items, torch.full_like(items, self.num_items))
        # right-aligned positions: the last slot is always position max_len - 1
        positions = torch.arange(self.max_len - length, self.max_len, device=items.device)
        x = self.item_embedding(tokens) * self.item_embedding.embedding_dim ** 0.5 + self.position_embedding(positions)
        x = self.dropout(x) * real[..., None]
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()  # [T, T]
        # a query sees earlier real keys; a padded query sees only itself (no empty softmax rows)
        allowed = causal & (real[:, None, :] | torch.eye(length, dtype=torch.bool, device=items.device))
        allowed = allowed[:, None]  # [B, 1, T, T]
        for block in self.blocks:
            x = block(x, allowed) * real[..., None]
        return self.final_norm(x) * real[..., None]

    def item_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: ``[..., H]`` -> scores over all items ``[..., num_items]`` (dot product with item embeddings)."""
        return hidden @ self.item_embedding.weight[: self.num_items].T

    def last_scores(self, items: torch.Tensor) -> torch.Tensor:
        """Scores of the next item after each (left-padded) history: items ``[B, T]`` -> ``[B, num_items]``."""
        return self.item_scores(self(items)[:, -1])

    @torch.no_grad()
    def recommend(self, items: torch.Tensor, k: int, exclude_history: bool = False) -> torch.Tensor:
        """Top-``k`` item ids per history, best first: items ``[B, T]`` -> ``[B, k]``. With ``exclude_history`` the
        history's own items are never recommended."""
        scores = self.last_scores(items)  # [B, N]
        if exclude_history:
            rows = torch.arange(items.shape[0], device=items.device)[:, None].expand_as(items)
            real = items >= 0
            scores[rows[real], items[real]] = float("-inf")
        return scores.topk(k, dim=-1).indices
