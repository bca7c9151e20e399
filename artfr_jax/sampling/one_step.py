"""One-step diffusion restoration (OSDFace, Sec. 3.1, Eqs. 5-6), as pure functions.

The LQ face is encoded into the VAE's latent space, ``z_L = E(I_L) * scaling_factor``; one UNet call
at a fixed timestep ``T_L`` predicts the noise ``eps``; the HQ latent is the DDPM ``x_0`` estimate
``z_H = (z_L - sqrt(1 - abar_T) eps) / sqrt(abar_T)`` (Eq. 5), and ``I_H = D(z_H / scaling_factor)``
(Eq. 6). The UNet enters as a function ``eps_fn(z, t, context)``, so a plain UNet, one with a
LoRA (``models/lora.py``) or merged weights all serve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from artfr_jax.models.vae import sample_posterior
from artfr_jax.sampling import noise_schedule as ns

EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def encode_latents(
    vae: nn.Module, vae_params: Any, images: jax.Array, rng: jax.Array | None = None
) -> jax.Array:
    """``z = E(images) * scaling_factor``: a posterior sample given ``rng``, else its mean.

    ``images [B, H, W, 3]`` in [-1, 1] -> ``[B, H/f, W/f, latent_channels]`` float32.
    """
    mean, logvar = vae.apply({"params": vae_params}, images, method="encode")
    z = mean if rng is None else sample_posterior(rng, mean, logvar)
    return z * vae.scaling_factor


def decode_latents(vae: nn.Module, vae_params: Any, z: jax.Array) -> jax.Array:
    """``D(z / scaling_factor)``: images (float32, about [-1, 1]) from scaled latents."""
    return vae.apply({"params": vae_params}, z / vae.scaling_factor, method="decode")


def one_step_latents(
    eps_fn: EpsFn,
    schedule: ns.NoiseSchedule,
    z_lq: jax.Array,
    context: jax.Array,
    timestep: int = 399,
) -> jax.Array:
    """Eq. 5: ``z_H = (z_L - sqrt(1 - abar_T) eps(z_L, T, c)) / sqrt(abar_T)``, float32."""
    t = jnp.full((z_lq.shape[0],), timestep, jnp.int32)
    eps = eps_fn(z_lq, t, context)
    return ns.x0_from_epsilon(schedule, z_lq, eps, t)


def restore(
    eps_fn: EpsFn,
    vae: nn.Module,
    vae_params: Any,
    schedule: ns.NoiseSchedule,
    lq_images: jax.Array,
    context: jax.Array,
    *,
    timestep: int = 399,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Eqs. 5-6: LQ images ``[B, H, W, 3]`` in [-1, 1] -> restored images, float32.

    ``context [B, S, C]``: the UNet's cross-attention input (OSDFace: the projected visual prompt).
    ``rng``: sample the VAE posterior (OSDFace encodes a sample); None takes its mean.
    """
    z_lq = encode_latents(vae, vae_params, lq_images, rng)
    z_hq = one_step_latents(eps_fn, schedule, z_lq, context, timestep)
    return decode_latents(vae, vae_params, z_hq)
