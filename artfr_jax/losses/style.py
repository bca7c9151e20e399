"""VQFR's perceptual loss: LPIPS plus a Gram-matrix style term (VQFR Sec. 3.3 / 4.1,
``L_per = ||phi(x_r) - phi(x_h)|| + lambda_style * ||Gram(phi(x_r)) - Gram(phi(x_h))||_1``).

Follows the official ``vqfr/losses/lpips.py`` (``perceptual_opt: type LPIPS, perceptual_weight 1,
style_weight 2000, style_measure L1``): the content term is the LPIPS (VGG16, v0.1 heads)
distance; the style term reuses the same five LPIPS features ``relu1_2 ... relu5_3`` *after*
LPIPS' channel unit-normalisation, takes per-image Gram matrices normalised by ``C * H * W``, and
sums over the five layers the mean absolute difference of the Gram entries (mean over batch and
``C x C``). The VGG trunk runs once per image for both terms. (The paper writes the content term
as an L1 VGG distance; the released training uses LPIPS, followed here.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from artfr_jax.losses.perceptual import LPIPS_SCALE, LPIPS_SHIFT, unit_normalize
from artfr_jax.models.vgg import LPIPS_LAYERS, VGG

Dtype = Any
Params = Any

STYLE_MEASURES = ("L1", "L2")


def gram_matrix(
    features: jax.Array, *, precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST
) -> jax.Array:
    """Gram matrix ``F^T F / (C * H * W)`` of ``[B, H, W, C]`` features -> ``[B, C, C]`` float32.

    ``precision`` defaults to HIGHEST: the style loss is a small difference of Gram entries, which
    TF32/bf16 matmul passes would blur; the matmul is cheap next to the VGG trunk.
    """
    if features.ndim != 4:
        raise ValueError(f"gram_matrix: expected features [B, H, W, C], got {features.shape}")
    b, h, w, c = features.shape
    f = features.astype(jnp.float32).reshape(b, h * w, c)
    return jnp.einsum("bnc,bnd->bcd", f, f, precision=precision) / (c * h * w)


def _lpips_features(vgg_params: Params, x: jax.Array, dtype: Dtype) -> dict[str, jax.Array]:
    """Unit-normalised LPIPS features ``{relu1_2 ... relu5_3: [B, h, w, C]}`` in float32."""
    shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
    scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
    feats = VGG(output_layers=LPIPS_LAYERS, dtype=dtype).apply(
        {"params": vgg_params}, (x.astype(jnp.float32) - shift) / scale
    )
    return {k: unit_normalize(v.astype(jnp.float32)) for k, v in feats.items()}


def style_distance(
    fx: dict[str, jax.Array], fy: dict[str, jax.Array], *, measure: str = "L1"
) -> jax.Array:
    """Sum over layers of ``mean(|Gram(fx) - Gram(fy)|)`` (``L2``: mean squared) -> scalar."""
    if measure not in STYLE_MEASURES:
        raise ValueError(f"style_distance: measure={measure!r}; expected one of {STYLE_MEASURES}")
    total = jnp.float32(0.0)
    for name in fx:
        d = gram_matrix(fx[name]) - gram_matrix(fy[name])
        total = total + jnp.mean(jnp.abs(d) if measure == "L1" else jnp.square(d))
    return total


def perceptual_style_loss(
    lpips_params: Params,
    x: jax.Array,
    y: jax.Array,
    *,
    perceptual_weight: float = 1.0,
    style_weight: float = 2000.0,
    style_measure: str = "L1",
    dtype: Dtype = jnp.float32,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """VQFR's ``lambda_per * L_per`` for restored ``x`` against ground truth ``y``.

    Args:
      lpips_params: the ``LPIPS`` params tree (``load_lpips_params``): ``vgg`` and ``lin0..4``.
      x, y: ``[B, H, W, 3]`` in [-1, 1] (H, W >= 16); gradients flow to both.
      perceptual_weight: weight of the LPIPS term (official 1.0).
      style_weight: weight of the style term (official 2000); a Python ``0`` skips the Gram
        matrices.
      style_measure: ``L1`` (official) or ``L2`` on the Gram differences.
      dtype: compute dtype of the VGG convolutions; the rest is float32.

    Returns:
      ``(total, {'perceptual': ..., 'style': ...})``, float32 scalars, each term already
      weighted (as the official loss returns them) and ``total`` their sum. ``perceptual`` is
      ``perceptual_weight * mean_b LPIPS(x_b, y_b)``.
    """
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"perceptual_style_loss: expected two images of the same shape [B, H, W, 3], got "
            f"{x.shape} and {y.shape}"
        )
    if style_measure not in STYLE_MEASURES:
        raise ValueError(
            f"perceptual_style_loss: style_measure={style_measure!r}; expected one of "
            f"{STYLE_MEASURES}"
        )
    fx = _lpips_features(lpips_params["vgg"], x, dtype)
    fy = _lpips_features(lpips_params["vgg"], y, dtype)
    lpips = jnp.zeros((x.shape[0],), jnp.float32)
    for k, name in enumerate(LPIPS_LAYERS):
        # The v0.1 head is a bias-free 1x1 conv, so it commutes with the spatial mean.
        d = jnp.mean(jnp.square(fx[name] - fy[name]), axis=(1, 2))  # [B, C]
        head = jnp.asarray(lpips_params[f"lin{k}"]["kernel"], jnp.float32)  # [C, 1]
        lpips = lpips + jnp.dot(d, head, precision=jax.lax.Precision.HIGHEST)[:, 0]
    perceptual = jnp.float32(perceptual_weight) * jnp.mean(lpips)
    if isinstance(style_weight, int | float) and style_weight == 0:
        style = jnp.float32(0.0)
    else:  # a traced weight (jit argument) always computes the term
        style = jnp.float32(style_weight) * style_distance(fx, fy, measure=style_measure)
    return perceptual + style, {"perceptual": perceptual, "style": style}
