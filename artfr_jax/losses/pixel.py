"""Pixel fidelity losses (the L_2 term of ART-FR Sec. 3.1, Eq. 4; L1/Charbonnier for VQFR).

All losses are means over every element, computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _diff(x: jax.Array, y: jax.Array) -> jax.Array:
    if x.shape != y.shape:
        raise ValueError(f"pixel loss: shapes differ, {x.shape} vs {y.shape}")
    return x.astype(jnp.float32) - y.astype(jnp.float32)


def l1_loss(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean absolute error ``mean(|x - y|)``; any equal shapes -> scalar."""
    return jnp.mean(jnp.abs(_diff(x, y)))


def l2_loss(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error ``mean((x - y)^2)`` (ART-FR Eq. 4, L_2); any equal shapes -> scalar."""
    return jnp.mean(jnp.square(_diff(x, y)))


def charbonnier_loss(x: jax.Array, y: jax.Array, eps: float = 1e-3) -> jax.Array:
    """Charbonnier (smooth L1) ``mean(sqrt((x - y)^2 + eps^2))``; any equal shapes -> scalar."""
    return jnp.mean(jnp.sqrt(jnp.square(_diff(x, y)) + eps * eps))
