"""Sampling algorithms: mask schedules and MaskGIT-style iterative decoding (ART-FR Sec. 3.3)."""

from artfr_jax.sampling.mask_schedule import (
    SCHEDULE_KINDS,
    num_masked_training,
    schedule,
    training_mask,
)
from artfr_jax.sampling.maskgit import (
    DecodeState,
    decode,
    decode_python_loop,
    decode_step,
    init_state,
    masked_counts,
)

__all__ = [
    "SCHEDULE_KINDS",
    "DecodeState",
    "decode",
    "decode_python_loop",
    "decode_step",
    "init_state",
    "masked_counts",
    "num_masked_training",
    "schedule",
    "training_mask",
]
