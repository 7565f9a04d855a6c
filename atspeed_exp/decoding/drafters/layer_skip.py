"""The layer-skip drafter (``drafter: layer_skip``): the target drafts for itself with some of its sublayers skipped
(self-speculative decoding, Draft & Verify, Zhang et al., arXiv 2309.08168; docs/method.md section 6).

A skip set names decoder layers whose attention block and layers whose MLP block the draft leaves out: a skipped
sublayer adds nothing to the residual stream, so the draft is the target's own embedding, kept sublayers, final norm
and output head, with no weight copied (``SkippableLM.skipping`` gives a view of the target) and no training. The
draft keeps a cache of its own (the kept attention layers' keys and values over the draft's tree), so it drafts
exactly as the draft-model drafter does (``drafters/model.py``: tree attention, D = max d_b calls per round, the
same ``DraftSpec`` handling and Q rows for the relaxed rules). An empty skip set makes the draft the target itself:
with N = K drafted beams it runs the target's own beam search, so strict verification accepts every drafted depth
(with N > K a continuation of one of the draft's extra beams can outrank one of the target's top K). Which set to
skip is a trade between the draft's cost (the share of sublayers it runs) and acceptance; ``decoding/skip_search.py``
searches it on validation prompts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from atspeed_exp.decoding.drafters.model import ModelDrafter
from atspeed_exp.decoding.protocol import DecoderLM


@runtime_checkable
class SkippableLM(Protocol):
    """A ``DecoderLM`` that can run with sublayers skipped (``models.lean.LeanLlamaLM``)."""

    @property
    def num_layers(self) -> int: ...

    def skipping(self, attention: Iterable[int] = (), mlp: Iterable[int] = ()) -> DecoderLM:
        """The same model (shared weights) with the attention of layers ``attention`` and the MLP of layers ``mlp``
        skipped; its own caches."""
        ...


class LayerSkipDrafter(ModelDrafter):
    """Drafts with ``target`` run without the attention of layers ``skip_attention`` and the MLP of layers
    ``skip_mlp`` (0-based decoder layer indices)."""

    name = "layer_skip"
    runs_model = True

    def __init__(self, target: DecoderLM, skip_attention: Iterable[int] = (), skip_mlp: Iterable[int] = ()) -> None:
        if not isinstance(target, SkippableLM):
            raise TypeError(f"the layer-skip drafter needs a target that can skip sublayers (the lean forward, "
                            f"eval.backend=lean or auto); got a {type(target).__name__}")
        self.skip_attention = tuple(sorted({int(i) for i in skip_attention}))
        self.skip_mlp = tuple(sorted({int(i) for i in skip_mlp}))
        self.num_layers = target.num_layers
        super().__init__(target.skipping(self.skip_attention, self.skip_mlp))

    @property
    def kept_fraction(self) -> float:
        """Share of the target's 2 x layers sublayers the draft runs (the cost model of ``skip_search``)."""
        return 1.0 - (len(self.skip_attention) + len(self.skip_mlp)) / (2 * self.num_layers)
