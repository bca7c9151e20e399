"""OSDFace's HQ-LQ feature association loss (Sec. 3.2, Eqs. 9-10; from DAEFR, Chen et al. 2024).

A CLIP-style contrastive loss between the ``quant_conv`` features of the HQ and LQ encoders: every
latent position is one feature vector; the similarity matrix ``M_assoc`` holds the scaled cosine
similarities between HQ and LQ vectors, and the label of HQ position ``i`` is LQ position ``i``
(the diagonal), in both directions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

LOGIT_SCALE_INIT = math.log(1.0 / 0.07)  # CLIP's temperature 0.07, as DAEFR


class LogitScale(nn.Module):
    """The learnable log logit scale ``s`` (a float32 scalar param ``logit_scale``, initialised
    ``log(1 / 0.07)``); ``__call__() -> s``. Pass it to :func:`association_loss`."""

    init_value: float = LOGIT_SCALE_INIT

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("logit_scale", nn.initializers.constant(self.init_value), (), jnp.float32)


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def association_loss(
    z_hq: jax.Array,
    z_lq: jax.Array,
    logit_scale: jax.Array,
    *,
    group_size: int | None = 1,
) -> jax.Array:
    """``L_assoc = (L_CE^H + L_CE^L) / 2`` (Eqs. 9-10), a float32 scalar.

    ``z_hq, z_lq [B, h, w, C]`` (or ``[B, K, C]``): HQ / LQ ``quant_conv`` features of the same
    faces; ``logit_scale``: the log scale ``s`` (:class:`LogitScale`), logits
    ``exp(s) * zhat_H zhat_L^T`` of the l2-normalised position vectors.

    ``group_size``: images whose positions share one similarity matrix. ``1`` (default): one
    ``K x K`` matrix per image, ``K = h * w``, as Eq. 9 writes it (labels = same position, mean
    over positions and images). ``None``: one ``BK x BK`` matrix over the whole batch, as DAEFR's
    code flattens batch and positions together; ``g``: ``B / g`` matrices of ``gK x gK`` (DAEFR's
    code under data parallelism with ``g`` images per device). All agree when ``B = 1``.
    """
    if z_hq.shape != z_lq.shape:
        raise ValueError(f"association_loss: z_hq {z_hq.shape} and z_lq {z_lq.shape} differ")
    b, c = z_hq.shape[0], z_hq.shape[-1]
    g = b if group_size is None else group_size
    if g < 1 or b % g:
        raise ValueError(f"association_loss: group_size={group_size} must divide the batch {b}")
    hq = _l2_normalize(z_hq.astype(jnp.float32).reshape(b // g, -1, c))
    lq = _l2_normalize(z_lq.astype(jnp.float32).reshape(b // g, -1, c))
    scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    logits = scale * jnp.einsum("gic,gjc->gij", hq, lq, precision=jax.lax.Precision.HIGHEST)
    # CE against the diagonal: rows (HQ -> LQ, p^h) and columns (LQ -> HQ, p^l).
    diag = jnp.diagonal(logits, axis1=1, axis2=2)
    ce_h = jnp.mean(jax.nn.logsumexp(logits, axis=2) - diag)
    ce_l = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)
    return (ce_h + ce_l) / 2
