"""``LeanLlamaLM``: the forward pass of a transformers ``LlamaForCausalLM`` written out in plain torch ops, behind the
``DecoderLM`` protocol, for decoding only.

Why: our models are small (a Beauty target is 4 layers of width 192), so a call of a few tokens costs mostly
per-call overhead (module dispatch, mask and cache bookkeeping, output dataclasses), not arithmetic: one-token calls
of the Beauty target and draft are 1.5x and 2.4x faster than transformers' on the project's CPU
(``benchmarks/bench_forward.py``). Fewer, larger matmuls should help a GPU the same way (fewer kernel launches).

Contract (the same as ``HFDecoderLM``; any difference is float rounding):
- Built from a plain ``LlamaForCausalLM`` in eval mode by ``LeanLlamaLM.from_model``; the weights are read at
  construction (q/k/v and gate/up are concatenated into one matrix each), so a model that is trained afterwards
  needs a new ``LeanLlamaLM``. ``lean_supported`` says why a model cannot be taken (peft wrappers, other
  architectures or activations, RoPE types that change with the sequence length).
- The cache (``LeanCache``) holds per layer keys/values ``[B, kv_heads, seq, head_dim]`` with the rotary positions
  baked in; ``reorder_cache``/``gather_cache`` return it edited as ``HFDecoderLM``'s do.
- Everything runs under ``torch.inference_mode``; logits are float32 normal tensors (editable in place).
- ``skipping(attention, mlp)`` is a view of the same model (no weight copied) whose forward skips the attention of
  the listed decoder layers and the MLP of others: the residual stream passes them unchanged (the layer-skip
  drafter, ``decoding/drafters/layer_skip.py``). Its cache holds the kept attention layers only; with none kept it
  counts columns alone, so the masks the core builds keep their shape.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from atspeed_exp.models.adapter import HFDecoderLM, editable_float

# RoPE types whose inverse frequencies are fixed at construction (the rest rescale with the sequence length)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class LeanCache:
    keys: list[torch.Tensor] = field(default_factory=list)  # per kept attention layer [B, kv_heads, seq, head_dim]
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # columns held, read only when no attention layer runs (a view skipping all of them)

    def get_seq_length(self) -> int:
        return self.keys[0].shape[2] if self.keys else self.length


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, H]
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    out_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * I, H]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


def lean_supported(model: nn.Module) -> str | None:
    """None if ``LeanLlamaLM`` can run ``model`` exactly, else the reason it cannot."""
    if type(model).__name__ != "LlamaForCausalLM":
        return f"a {type(model).__name__} (expected a plain LlamaForCausalLM; merge LoRA adapters first)"
    config = model.config
    if config.hidden_act != "silu":
        return f"hidden_act={config.hidden_act!r} (expected 'silu')"
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope_type={rope_type!r} (expected one of {STATIC_ROPE_TYPES})"
    if getattr(config, "pretraining_tp", 1) != 1:
        return f"pretraining_tp={config.pretraining_tp} (expected 1)"
    return None


def _cat_bias(*linears: nn.Linear) -> torch.Tensor | None:
    if all(linear.bias is None for linear in linears):
        return None
    return torch.cat([linear.bias for linear in linears]).detach()


class LeanLlamaLM:
    @torch.no_grad()  # the fused copies of a model being trained (the callback's draft) must not record a graph
    def __init__(self, model: nn.Module, stack_cache_edits: bool | None = None) -> None:
        reason = lean_supported(model)
        if reason is not None:
            raise ValueError(f"LeanLlamaLM cannot run {reason}; use the 'hf' decoding backend for this model")
        if model.training:
            raise RuntimeError("LeanLlamaLM needs the model in eval mode (it reads the weights once, for decoding)")
        config = model.config
        base = model.get_decoder()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.embed = base.embed_tokens.weight.detach()
        self.norm = base.norm.weight.detach()
        head = model.get_output_embeddings()
        self.head = head.weight.detach()
        self.head_bias = None if head.bias is None else head.bias.detach()
        self.layers = [
            _Layer(
                input_norm=layer.input_layernorm.weight.detach(),
                qkv=torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                               layer.self_attn.v_proj.weight]).detach(),
                qkv_bias=_cat_bias(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                out=layer.self_attn.o_proj.weight.detach(),
                out_bias=_cat_bias(layer.self_attn.o_proj),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                gate_up=torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).detach(),
                gate_up_bias=_cat_bias(layer.mlp.gate_proj, layer.mlp.up_proj),
                down=layer.mlp.down_proj.weight.detach(),
                down_bias=_cat_bias(layer.mlp.down_proj),
            )
            for layer in base.layers
        ]
        rotary = base.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().float().to(self.embed.device)
        self.rope_scaling = float(rotary.attention_scaling)
        self.scaling = self.head_dim**-0.5
        # cache reorder/prune as one indexing of all layers (fewer launches) or per layer (no extra copy); see below
        self.stack_cache_edits = self.device.type == "cuda" if stack_cache_edits is None else stack_cache_edits
        self.skip_attention: frozenset[int] = frozenset()  # decoder layers whose attention is skipped (``skipping``)
        self.skip_mlp: frozenset[int] = frozenset()  # decoder layers whose MLP is skipped

    @classmethod
    def from_model(cls, model: nn.Module) -> LeanLlamaLM:
        """Switches ``model`` to eval mode (do not use on a model mid-training) and reads its weights."""
        model.eval()
        return cls(model)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def vocab_size(self) -> int:
        return self.head.shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def skipping(self, attention: Iterable[int] = (), mlp: Iterable[int] = ()) -> LeanLlamaLM:
        """This model with the attention of decoder layers ``attention`` and the MLP of layers ``mlp`` skipped (0-based
        indices; the residual stream passes a skipped sublayer unchanged). A view: it shares every weight tensor."""
        attention, mlp = frozenset(int(i) for i in attention), frozenset(int(i) for i in mlp)
        outside = sorted(i for i in attention | mlp if not 0 <= i < self.num_layers)
        if outside:
            raise ValueError(f"skipped layers {outside} outside 0..{self.num_layers - 1}")
        view = copy.copy(self)  # shallow: the layer list and its tensors are the same objects
        view.skip_attention, view.skip_mlp = attention, mlp
        return view

    def new_cache(self) -> LeanCache:
        return LeanCache()

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, cache: LeanCache | None
    ) -> tuple[torch.Tensor, LeanCache]:
        hidden, cache = self.hidden(input_ids, position_ids, attention_mask, cache)
        return self.project(hidden), cache

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[B, 1, q_len, head_dim]`` in the model's dtype, computed as transformers does (a table indexed
        by position would need the largest position on the host: a device sync per call on a GPU)."""
        freqs = positions[..., None].float() * self.inv_freq  # [B, q_len, head_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return (emb.cos() * self.rope_scaling).to(self.dtype), (emb.sin() * self.rope_scaling).to(self.dtype)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the same arithmetic as below, without two no-op casts per norm
            return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        x32 = x.float()  # transformers normalises in float32 and casts back before the weight
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], dim=-1) * sin

    def hidden(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, cache: LeanCache | None
    ) -> tuple[torch.Tensor, LeanCache]:
        """Final (normed) hidden states ``[B, q_len, H]`` in the model's dtype, and the extended cache."""
        cache = LeanCache() if cache is None else cache
        batch, q_len = input_ids.shape
        expected = (batch, 1, q_len, cache.get_seq_length() + q_len)
        if tuple(attention_mask.shape) != expected:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {expected}")
        with torch.inference_mode():
            mask = HFDecoderLM.additive_mask(attention_mask, self.dtype, self.device)
            position_ids = position_ids.to(self.device)
            cos, sin = self._rotary(position_ids)
            x = F.embedding(input_ids.to(self.device), self.embed)
            keys, values = [], []
            for index, layer in enumerate(self.layers):
                if index not in self.skip_attention:
                    x = self._attention(x, layer, len(keys), cache, keys, values, cos, sin, mask)
                if index not in self.skip_mlp:
                    gate, up = F.linear(self._rms_norm(x, layer.post_norm), layer.gate_up, layer.gate_up_bias).chunk(
                        2, -1)
                    x = x + F.linear(F.silu(gate) * up, layer.down, layer.down_bias)
            hidden = self._rms_norm(x, self.norm)
        return hidden, LeanCache(keys, values, cache.get_seq_length() + q_len)

    def _attention(self, x: torch.Tensor, layer: _Layer, slot: int, cache: LeanCache, keys: list[torch.Tensor],
                   values: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
                   ) -> torch.Tensor:
        """``x`` after ``layer``'s attention block; its keys and values (cache slot ``slot``: the kept attention
        layers before it) are appended to ``keys`` / ``values``."""
        batch, q_len, _ = x.shape
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(self._rms_norm(x, layer.input_norm), layer.qkv, layer.qkv_bias)
        q, k, v = qkv.view(batch, q_len, heads + 2 * kv_heads, head_dim).transpose(1, 2).split(
            [heads, kv_heads, kv_heads], dim=1
        )  # [B, heads | kv_heads, q_len, head_dim]
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        if cache.keys:
            k = torch.cat([cache.keys[slot], k], dim=2)
            v = torch.cat([cache.values[slot], v], dim=2)
        keys.append(k)
        values.append(v)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=kv_heads != heads
        )  # [B, heads, q_len, head_dim]
        attended = attended.transpose(1, 2).reshape(batch, q_len, heads * head_dim)
        return x + F.linear(attended, layer.out, layer.out_bias)

    def project(self, hidden: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Logits of tokens ``start..end - 1`` ``[..., end - start]`` float32 (only those rows of the head)."""
        with torch.inference_mode():
            bias = None if self.head_bias is None else self.head_bias[start:end]
            logits = F.linear(hidden, self.head[start:end], bias)
        return editable_float(logits)

    # With ``stack_cache_edits`` both edits stack the layers' keys and values and index them once: 2 kernels instead
    # of 2 per layer (a 30-layer target launches 60 per pruning round), for one extra copy of the cache. On a GPU
    # launches are what a small cache costs; on the CPU the copy is (30 layers at batch 1: 3.1 ms stacked vs 2.7 ms
    # per layer; 4 layers at batch 64: 11.3 vs 9.4 ms), so the default stacks on CUDA only.
    @staticmethod
    def _stacked(cache: LeanCache) -> torch.Tensor:
        return torch.stack(cache.keys + cache.values)  # [2 * layers, B, kv_heads, seq, head_dim]

    @staticmethod
    def _unstacked(stacked: torch.Tensor) -> LeanCache:
        layers = stacked.shape[0] // 2
        parts = stacked.unbind(0)
        return LeanCache(list(parts[:layers]), list(parts[layers:]))

    def reorder_cache(self, cache: LeanCache, batch_index: torch.Tensor) -> LeanCache:
        with torch.inference_mode():
            if not cache.keys:
                return cache
            index = batch_index.to(self.device)
            if self.stack_cache_edits:
                return self._unstacked(self._stacked(cache).index_select(1, index))
            return LeanCache([keys.index_select(0, index) for keys in cache.keys],
                             [values.index_select(0, index) for values in cache.values])

    def gather_cache(self, cache: LeanCache, positions: torch.Tensor) -> LeanCache:
        with torch.inference_mode():
            if not cache.keys:  # empty, or a view that runs no attention: only the column count changes
                return LeanCache(length=positions.shape[1]) if cache.length else cache
            if not self.stack_cache_edits:
                batch, kv_heads, _, head_dim = cache.keys[0].shape
                index = positions.to(self.device)[:, None, :, None].expand(batch, kv_heads, -1, head_dim)
                return LeanCache([keys.gather(2, index) for keys in cache.keys],
                                 [values.gather(2, index) for values in cache.values])
            stacked = self._stacked(cache)
            planes, batch, kv_heads, _, head_dim = stacked.shape
            index = positions.to(self.device)[None, :, None, :, None].expand(planes, batch, kv_heads, -1, head_dim)
            return self._unstacked(stacked.gather(3, index))


BACKENDS = ("auto", "lean", "hf")


def decoder_for(model: nn.Module, backend: str = "auto") -> HFDecoderLM | LeanLlamaLM:
    """``model`` (in eval mode) behind the decoding protocol: ``lean`` = ``LeanLlamaLM`` (refuses what it cannot run),
    ``hf`` = ``HFDecoderLM`` (any transformers causal LM or peft wrapper), ``auto`` = lean where it can."""
    if backend not in BACKENDS:
        raise ValueError(f"decoding backend {backend!r}: expected one of {BACKENDS}")
    if backend == "lean" or (backend == "auto" and lean_supported(model) is None):
        return LeanLlamaLM(model)
    return HFDecoderLM(model)
