"""Drafters of speculative beam search, one per file (torch only): the contract is ``base.Drafter``; they are
registered here by the name the ``decoding.drafter`` setting selects, and the engine takes any of them."""

from __future__ import annotations

from atspeed_exp.decoding.drafters.base import DraftSession, DraftSpec, Drafter, RoundResult, extend_level
from atspeed_exp.decoding.drafters.model import ModelDrafter

DRAFTERS: dict[str, type[Drafter]] = {
    ModelDrafter.name: ModelDrafter,
}

__all__ = ["DRAFTERS", "DraftSession", "DraftSpec", "Drafter", "ModelDrafter", "RoundResult", "extend_level"]
