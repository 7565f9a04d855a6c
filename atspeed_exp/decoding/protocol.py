"""The contract between the decoding core and any model.

The core never imports transformers: it drives a model through ``DecoderLM``, so a Hugging Face model (through
``atspeed_exp.models.adapter.HFDecoderLM``), a TorchScript module or a scripted fake in a test all fit.

Conventions:
- ``attention_mask`` is additive float ``[B, 1, q_len, kv_len]`` (0 = attend, a large negative number = masked),
  where ``kv_len`` = tokens already in the cache + ``q_len``; the core builds it, the model uses it as is.
- ``position_ids`` ``[B, q_len]`` are explicit (left padding and tree attention both need them).
- The cache is opaque to the core; it only asks the model to create, reorder and shrink it.
- The core asks for logits only where selection needs them: ``hidden`` runs the layers, and ``project`` applies the
  output projection to the rows it picked, restricted to a token range (one SID level's block), so a 50k-token
  vocabulary costs a 256-column matmul per needed row. ``__call__`` (all rows, full vocabulary) is the plain form.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class DecoderLM(Protocol):
    def __call__(
        self,
        input_ids: torch.Tensor,  # [B, q_len] long
        position_ids: torch.Tensor,  # [B, q_len] long
        attention_mask: torch.Tensor,  # [B, 1, q_len, kv_len] additive float
        cache: Any,
    ) -> tuple[torch.Tensor, Any]:
        """Run the model on ``input_ids`` after whatever ``cache`` holds; return logits ``[B, q_len, V]`` (float32)
        and the cache extended by the ``q_len`` new positions."""
        ...

    def hidden(
        self,
        input_ids: torch.Tensor,  # [B, q_len] long
        position_ids: torch.Tensor,  # [B, q_len] long
        attention_mask: torch.Tensor,  # [B, 1, q_len, kv_len] additive float
        cache: Any,
    ) -> tuple[torch.Tensor, Any]:
        """As ``__call__`` but return the final hidden states ``[B, q_len, H]`` (the output projection's input)."""
        ...

    def project(self, hidden: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Logits (float32) of tokens ``start..end - 1`` (default: the whole vocabulary) for hidden states
        ``[..., H]`` -> ``[..., end - start]``; equal to slicing the full logits."""
        ...

    @property
    def vocab_size(self) -> int: ...

    def new_cache(self) -> Any:
        """An empty cache."""
        ...

    def reorder_cache(self, cache: Any, batch_index: torch.Tensor) -> Any:
        """Rows ``batch_index`` ``[B']`` of the batch dimension (repeat, permute or drop rows)."""
        ...

    def gather_cache(self, cache: Any, positions: torch.Tensor) -> Any:
        """Keep, per row, the sequence positions ``positions`` ``[B, T']``, dropping the rest.
        Used to prune a cache to the accepted path after tree verification. The order of the kept positions is the
        order of the new cache's columns (callers keep their masks in the same order)."""
        ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...


def mask_value(dtype: torch.dtype) -> float:
    """The additive value for a masked position: the dtype's minimum, not -inf, so a fully masked (padding) row
    softmaxes to something finite instead of NaN."""
    return torch.finfo(dtype).min
