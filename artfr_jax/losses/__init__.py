"""Training losses: pixel, perceptual (LPIPS), adversarial (ART-FR Sec. 3.1, Eq. 4)."""

from artfr_jax.losses.adversarial import (
    adversarial_weight,
    generator_adv_loss,
    hinge_d_loss,
    vanilla_d_loss,
)
from artfr_jax.losses.perceptual import LPIPS, load_lpips_params, lpips_distance
from artfr_jax.losses.pixel import charbonnier_loss, l1_loss, l2_loss

__all__ = [
    "LPIPS",
    "adversarial_weight",
    "charbonnier_loss",
    "generator_adv_loss",
    "hinge_d_loss",
    "l1_loss",
    "l2_loss",
    "load_lpips_params",
    "lpips_distance",
    "vanilla_d_loss",
]
