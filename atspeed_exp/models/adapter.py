"""``HFDecoderLM``: a transformers causal LM (``LlamaForCausalLM`` or a peft wrapper of one) behind the ``DecoderLM``
protocol of ``atspeed_exp.decoding.protocol``, with a ``transformers.DynamicCache`` as the cache.

Contract:
- ``__call__`` passes the additive 4-D mask ``[B, 1, q_len, kv_len]`` and explicit ``position_ids`` to the model,
  which uses a 4-D mask as is (no causal mask of its own), for ``sdpa`` and ``eager`` alike; it runs under
  ``torch.inference_mode`` (decoding only, never training) and returns float32 logits as a normal tensor (editable
  in place); the cache tensors are inference tensors, edited only through the methods below.
- The model must be in eval mode (dropout off): ``HFDecoderLM(model)`` never changes ``model.training`` (a model
  being trained stays as it is; callers switch it to eval, as Lightning does in validation) and ``__call__`` refuses a
  model in training mode; ``HFDecoderLM.from_model(model)`` switches it to eval for inference-only use.
- ``reorder_cache`` and ``gather_cache`` edit the cache in place (per layer ``keys``/``values``
  ``[B, kv_heads, seq, head_dim]``) and return it; a pruned cache behaves exactly as if only the kept tokens had
  been fed (their rotary positions are baked into the keys, so kept positions must be the path's own positions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def editable_float(logits: torch.Tensor) -> torch.Tensor:
    """Logits as float32 in a normal tensor. Made under inference_mode, they would refuse in-place edits (e.g. the
    trie constraint's masked_fill_) outside it; .float() of float32 logits is a no-op, so those are copied. A caller
    that is itself under inference_mode (the decoders) can edit them as they are: no copy."""
    logits = logits.float()
    return logits.clone() if logits.is_inference() and not torch.is_inference_mode_enabled() else logits


class HFDecoderLM:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def from_model(cls, model: nn.Module) -> HFDecoderLM:
        """Wrap ``model`` for inference: switches it to eval mode (do not use on a model mid-training)."""
        model.eval()
        return cls(model)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype  # the base model's dtype (peft forwards the attribute)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def new_cache(self) -> DynamicCache:
        # With the config the cache builds one layer per decoder layer of the right type (a sliding-window model
        # would get sliding layers, which the pruning below refuses); without it, layers are created lazily.
        return DynamicCache(config=self.model.config)

    def __call__(
        self,
        input_ids: torch.Tensor,  # [B, q_len] long
        position_ids: torch.Tensor,  # [B, q_len] long
        attention_mask: torch.Tensor,  # [B, 1, q_len, kv_len] additive float
        cache: DynamicCache | None,
    ) -> tuple[torch.Tensor, DynamicCache]:
        """Logits ``[B, q_len, V]`` float32 and ``cache`` extended by the ``q_len`` new positions."""
        hidden, cache = self.hidden(input_ids, position_ids, attention_mask, cache)
        return self.project(hidden), cache

    def hidden(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: DynamicCache | None,
    ) -> tuple[torch.Tensor, DynamicCache]:
        """Final (normed) hidden states ``[B, q_len, H]`` in the model's dtype, and the extended cache."""
        if self.model.training:
            raise RuntimeError("HFDecoderLM needs the model in eval mode (dropout would make decoding random)")
        if cache is None:
            cache = self.new_cache()
        batch, q_len = input_ids.shape
        expected = (batch, 1, q_len, cache.get_seq_length() + q_len)
        if tuple(attention_mask.shape) != expected:
            # checked here because a batch-1 mask would broadcast silently over the batch
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {expected}")
        mask = self.additive_mask(attention_mask, self.dtype, self.device)
        with torch.inference_mode():
            out = self.model.get_decoder()(
                input_ids=input_ids.to(self.device),
                position_ids=position_ids.to(self.device),
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
            )
        return out.last_hidden_state, out.past_key_values

    def project(self, hidden: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Logits of tokens ``start..end - 1`` ``[..., end - start]`` float32: a plain linear head multiplies by
        those rows of its weight only; any other head (a peft wrapper) is run whole and sliced."""
        head = self.model.get_output_embeddings()
        with torch.inference_mode():
            if type(head) is nn.Linear:
                bias = None if head.bias is None else head.bias[start:end]
                logits = F.linear(hidden, head.weight[start:end], bias)
            else:
                logits = head(hidden)[..., start:end]
        return editable_float(logits)

    @staticmethod
    def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The mask in the model's dtype and device. Eager attention adds the mask to the scores, so a bool mask
        would give wrong numbers silently: it is converted. Values are clamped to the dtype's minimum because a
        float32 minimum (or -inf) cast to bf16/fp16 becomes -inf, and a fully masked (padding) row then softmaxes
        to NaN."""
        mask = attention_mask.to(device)
        if mask.dtype == torch.bool:
            zero = torch.zeros((), dtype=dtype, device=mask.device)
            return torch.where(mask, zero, torch.finfo(dtype).min)
        return mask.clamp(min=torch.finfo(dtype).min).to(dtype)

    @staticmethod
    def _layers(cache: DynamicCache) -> list[DynamicLayer]:
        layers = [layer for layer in cache.layers if layer.is_initialized]
        for layer in layers:
            # A plain DynamicLayer's only state is keys/values (its length is keys.shape[-2]); subclasses (sliding
            # window, quantized, indexed) keep extra bookkeeping that indexing keys/values would leave inconsistent.
            if type(layer) is not DynamicLayer:
                raise NotImplementedError(f"cannot prune a {type(layer).__name__} cache layer")
        return layers

    def reorder_cache(self, cache: DynamicCache, batch_index: torch.Tensor) -> DynamicCache:
        """Rows ``batch_index`` ``[B']`` of the batch dimension (repeat, permute or drop rows); in place."""
        with torch.inference_mode():
            for layer in self._layers(cache):
                index = batch_index.to(layer.keys.device)
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
        return cache

    def gather_cache(self, cache: DynamicCache, positions: torch.Tensor) -> DynamicCache:
        """Keep, per row, the cache positions ``positions`` ``[B, T']`` in that order; in place."""
        with torch.inference_mode():
            for layer in self._layers(cache):
                batch, heads, _, head_dim = layer.keys.shape
                index = positions.to(layer.keys.device)[:, None, :, None].expand(batch, heads, -1, head_dim)
                layer.keys = layer.keys.gather(2, index)  # [B, H, T', D]
                layer.values = layer.values.gather(2, index)
        return cache
