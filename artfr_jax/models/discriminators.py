"""PatchGAN discriminator for the adversarial term L_G of ART-FR's stage I (Sec. 3.1, Eq. 4).

Layout of taming-transformers' ``NLayerDiscriminator`` (the VQGAN discriminator, after pix2pix).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from artfr_jax.models.kernels import Kernels
from artfr_jax.models.layers import Conv

Dtype = Any

NORMS = ("group", "instance", "none")


class PatchDiscriminator(nn.Module):
    """PatchGAN: 4x4 convolutions giving one real/fake logit per overlapping patch.

    ``conv4x4/s2 + LeakyReLU(0.2)``, then ``num_layers - 1`` blocks of ``conv4x4/s2 + norm +
    LeakyReLU`` with channels doubling (capped at 8x ``base_features``), then ``conv4x4/s1 + norm +
    LeakyReLU`` and a ``conv4x4/s1`` to one channel; padding 1 everywhere.

    Taming uses BatchNorm here. This module defaults to GroupNorm instead: BatchNorm would put
    running statistics (``batch_stats``) into the train state, make the output depend on the other
    samples in the (sharded) batch and behave differently in train and eval; GroupNorm keeps the
    discriminator a pure function of its params and one image, with the same affine parameters.
    ``instance`` is GroupNorm with one channel per group; ``none`` drops the norm and gives the
    normalised convs a bias instead (convs followed by a norm have none, as in taming).

    Attributes:
      base_features: channels of the first conv (taming ``ndf``).
      num_layers: stride-2 convs (taming ``n_layers``); the receptive field grows with it.
      norm: ``group`` (32 groups, or gcd(32, C) for narrow test models), ``instance`` or ``none``.
      dtype: computation dtype; the logits are returned in float32.
      param_dtype: parameter dtype.
      kernels: CPU kernels or plain XLA ops for the convolutions (``models/kernels.py``).

    Shapes: ``[B, H, W, C]`` (RGB in [-1, 1]) -> logits ``[B, h, w, 1]`` with
    ``h = H / 2**num_layers - 2`` (e.g. 64 -> 6, 256 -> 30, 512 -> 62 for ``num_layers=3``).
    Params: ``conv{i}`` / ``norm{i}`` with ``i`` the index in taming's ``main`` Sequential, so a
    converter can map its conv weights by name.
    """

    base_features: int = 64
    num_layers: int = 3
    norm: str = "group"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.norm not in NORMS:
            raise ValueError(f"PatchDiscriminator.norm={self.norm!r}; expected one of {NORMS}")
        if self.num_layers < 1:
            raise ValueError(f"PatchDiscriminator.num_layers={self.num_layers}; expected >= 1")
        if x.ndim != 4:
            raise ValueError(f"PatchDiscriminator: expected input [B, H, W, C], got {x.shape}")
        min_size = 2**self.num_layers * 3
        if min(x.shape[1:3]) < min_size:
            raise ValueError(
                f"PatchDiscriminator: input {x.shape[1]}x{x.shape[2]} is too small for "
                f"num_layers={self.num_layers}; expected at least {min_size}x{min_size}"
            )
        init = nn.initializers.normal(0.02)  # taming's weights_init for convs
        use_norm = self.norm != "none"

        def conv(features: int, stride: int, idx: int, bias: bool) -> nn.Conv:
            return Conv(
                features,
                (4, 4),
                strides=(stride, stride),
                padding=((1, 1), (1, 1)),
                use_bias=bias,
                kernel_init=init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernels=self.kernels,
                name=f"conv{idx}",
            )

        def norm(h: jax.Array, idx: int) -> jax.Array:
            if not use_norm:
                return h
            c = h.shape[-1]
            groups = math.gcd(32, c) if self.norm == "group" else c
            return nn.GroupNorm(
                num_groups=groups,
                epsilon=1e-5,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"norm{idx}",
            )(h)

        h = conv(self.base_features, 2, 0, True)(x.astype(self.dtype))
        h = nn.leaky_relu(h, 0.2)
        idx, mult = 2, 1
        for n in range(1, self.num_layers + 1):
            mult = min(2**n, 8)
            stride = 2 if n < self.num_layers else 1
            h = conv(self.base_features * mult, stride, idx, not use_norm)(h)
            h = nn.leaky_relu(norm(h, idx + 1), 0.2)
            idx += 3
        h = conv(1, 1, idx, True)(h)
        return h.astype(jnp.float32)
