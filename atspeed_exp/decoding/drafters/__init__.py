"""Drafters of speculative beam search, one per file (torch only): the contract is ``base.Drafter``; they are
registered here by the name the ``decoding.drafter`` setting selects, and the engine takes any of them."""

from __future__ import annotations

from atspeed_exp.decoding.drafters.base import DraftSession, DraftSpec, Drafter, RoundResult, extend_level
from atspeed_exp.decoding.drafters.layer_skip import LayerSkipDrafter, SkippableLM
from atspeed_exp.decoding.drafters.model import ModelDrafter
from atspeed_exp.decoding.drafters.retrieval import RetrievalDrafter, RetrievalPools, build_retrieval_pools
from atspeed_exp.decoding.drafters.trigram import TrigramCounts, TrigramDrafter, build_trigram_counts

DRAFTERS: dict[str, type[Drafter]] = {
    ModelDrafter.name: ModelDrafter,
    RetrievalDrafter.name: RetrievalDrafter,
    TrigramDrafter.name: TrigramDrafter,
    LayerSkipDrafter.name: LayerSkipDrafter,
}

__all__ = [
    "DRAFTERS", "DraftSession", "DraftSpec", "Drafter", "LayerSkipDrafter", "ModelDrafter", "RetrievalDrafter",
    "RetrievalPools", "RoundResult", "SkippableLM", "TrigramCounts", "TrigramDrafter", "build_retrieval_pools",
    "build_trigram_counts", "extend_level",
]
