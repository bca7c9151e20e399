"""Facial identity loss (OSDFace Sec. 3.3, Eq. 13): ``1 - cos(F(I_H), F(I_hat_H))`` with a frozen
ArcFace ``F`` (``evaluation/arcface.py``; weights converted by ``python -m artfr_jax.convert.arcface``).

The network's own preprocessing, made differentiable: images in [-1, 1] are resized with
``jax.image.resize`` (linear, antialiased when shrinking) to the backbone's input; ``resnet18``
takes the gray image (ITU-R 601 weights) in [-1, 1], the ``iresnet`` archs RGB in [-1, 1]
(``(x / 255 - 0.5) / 0.5``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from artfr_jax.evaluation import arcface

_GRAY = (0.299, 0.587, 0.114)


def arcface_input(arch: str, images: jax.Array) -> jax.Array:
    """``[B, H, W, 3]`` in [-1, 1] -> the ``arch`` backbone's input ``[B, h, w, c]`` float32."""
    h, w, c = arcface.input_shape(arch)
    x = images.astype(jnp.float32)
    if c == 1:
        x = jnp.tensordot(x, jnp.asarray(_GRAY, jnp.float32), axes=([-1], [0]))[..., None]
    return jax.image.resize(x, (x.shape[0], h, w, c), "linear", antialias=True)


def identity_loss(
    module: nn.Module, variables: Any, restored: jax.Array, target: jax.Array, arch: str
) -> jax.Array:
    """Eq. 13 per image, ``[B]`` float32: ``1 - cos`` of the ArcFace embeddings of ``restored``
    and ``target`` (``[B, H, W, 3]`` in [-1, 1]); the target's embedding gets no gradient."""
    emb = module.apply(variables, arcface_input(arch, jnp.concatenate([restored, target])))
    emb = emb.astype(jnp.float32)
    a, b = jnp.split(emb, 2)
    b = jax.lax.stop_gradient(b)
    cos = jnp.sum(a * b, -1) / (
        jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
    )
    return 1.0 - cos
