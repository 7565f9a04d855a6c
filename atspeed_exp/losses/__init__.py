"""Draft-alignment objectives (torch only); see ``alignment`` for the row/mask contract."""

from atspeed_exp.losses.alignment import (
    ALIGNMENT_LOSSES,
    atspeed_r_loss,
    atspeed_s_loss,
    get_alignment_loss,
    kl_loss,
    mixed_loss,
    seqkd_loss,
    tvd_loss,
)

__all__ = [
    "ALIGNMENT_LOSSES",
    "atspeed_r_loss",
    "atspeed_s_loss",
    "get_alignment_loss",
    "kl_loss",
    "mixed_loss",
    "seqkd_loss",
    "tvd_loss",
]
