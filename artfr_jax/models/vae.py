"""The KL-regularised autoencoder of latent diffusion (Rombach et al., 2022, Sec. 3), diffusers'
``AutoencoderKL``: the latent space in which Stable Diffusion's UNet, and so OSDFace, works.

The encoder and decoder are the VQGAN's (``models/vqgan.py``: the same residual levels, bottleneck
attention and layer names), without a codebook: the encoder ends in ``2 * latent_channels``
channels, a 1x1 ``quant_conv`` gives the mean and log-variance of a diagonal Gaussian posterior,
and a 1x1 ``post_quant_conv`` leads into the decoder. Defaults are SD-2.1's VAE (f = 8, 4 latent
channels). Latents enter the UNet multiplied by ``scaling_factor``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from artfr_jax.models.kernels import Kernels
from artfr_jax.models.layers import Conv
from artfr_jax.models.vqgan import Decoder, Encoder

Dtype = Any

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


def sample_posterior(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """``z = mean + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` (the reparameterisation trick)."""
    eps = jax.random.normal(rng, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar) * eps


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """``KL(N(mean, exp(logvar)) || N(0, I))`` summed over latent axes, ``[B, h, w, C] -> [B]``."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))


class AutoencoderKL(nn.Module):
    """Image <-> latent autoencoder of Stable Diffusion (diffusers ``AutoencoderKL``).

    Attributes:
      in_channels / out_channels: image channels.
      block_out_channels: encoder widths per level, a downsampling after every level but the last
        (SD: (128, 256, 512, 512), so f = 8).
      layers_per_block: residual blocks per encoder level; the decoder has one more per level.
      attention_levels: encoder levels with attention after each residual block (none in SD).
      mid_attention: attention in both bottlenecks.
      latent_channels: width of the Gaussian latent.
      norm_num_groups, norm_eps, act_fn: GroupNorm groups / epsilon and activation.
      scaling_factor: latents are multiplied by it before the UNet (SD-2.1: 0.18215).
      use_quant_conv / use_post_quant_conv: the 1x1 projections around the latent (SD: both).
      remat, dtype, param_dtype, precision, kernels: the framework's policy (``models/factory.py``).

    ``encode(x [B, H, W, in_channels] in [-1, 1]) -> (mean, logvar)``, each
    ``[B, H/f, W/f, latent_channels]`` float32, ``logvar`` clamped to ``LOGVAR_RANGE``;
    ``decode(z [B, h, w, latent_channels]) -> [B, h*f, w*f, out_channels]`` float32 (unscaled
    latents: divide by ``scaling_factor`` first); ``__call__(x, rng=None)`` decodes the posterior
    mean (or a sample given ``rng``) and returns ``(images, mean, logvar)``.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    attention_levels: tuple[int, ...] = ()
    mid_attention: bool = True
    latent_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    act_fn: str = "silu"
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernels: Kernels = Kernels()

    def setup(self):
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"AutoencoderKL: norm_num_groups={self.norm_num_groups} must divide every "
                    f"entry of block_out_channels={self.block_out_channels}"
                )
        common = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernels=self.kernels,
        )
        arch = dict(
            block_out_channels=tuple(self.block_out_channels),
            attention_levels=tuple(self.attention_levels),
            mid_attention=self.mid_attention,
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            act_fn=self.act_fn,
            remat=self.remat,
        )
        latent = self.latent_channels
        self.encoder = Encoder(
            layers_per_block=self.layers_per_block, out_channels=2 * latent, **arch, **common
        )
        if self.use_quant_conv:
            self.quant_conv = Conv(2 * latent, (1, 1), **common)
        if self.use_post_quant_conv:
            self.post_quant_conv = Conv(latent, (1, 1), **common)
        self.decoder = Decoder(
            layers_per_block=self.layers_per_block + 1,
            out_channels=self.out_channels,
            **arch,
            **common,
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior ``(mean, logvar)`` of images ``x`` in [-1, 1] (float32)."""
        h = self.encoder(x.astype(self.dtype))
        if self.use_quant_conv:
            h = self.quant_conv(h)
        h = h.astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Images (float32, about [-1, 1]) from unscaled latents ``z``."""
        h = z.astype(self.dtype)
        if self.use_post_quant_conv:
            h = self.post_quant_conv(h)
        return self.decoder(h).astype(jnp.float32)

    def __call__(
        self, x: jax.Array, rng: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        mean, logvar = self.encode(x)
        z = mean if rng is None else sample_posterior(rng, mean, logvar)
        return self.decode(z), mean, logvar
