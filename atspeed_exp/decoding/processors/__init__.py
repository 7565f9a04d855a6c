"""Score processors, one per file (torch only): the contract is ``base.ScoreProcessor``; they are registered here
by the name the ``decoding.processors`` setting lists, and every decoder applies them alike."""

from __future__ import annotations

from atspeed_exp.decoding.processors.base import ScoreProcessor, apply_processors, begin_all
from atspeed_exp.decoding.processors.cf_assistant import CFAssistant
from atspeed_exp.decoding.processors.ghost_debias import GhostDebias

PROCESSORS: dict[str, type[ScoreProcessor]] = {
    GhostDebias.name: GhostDebias,
    CFAssistant.name: CFAssistant,
}

__all__ = ["PROCESSORS", "CFAssistant", "GhostDebias", "ScoreProcessor", "apply_processors", "begin_all"]
