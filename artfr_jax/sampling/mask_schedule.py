"""Mask-ratio schedules gamma(r) and training masks (ART-FR Sec. 3.2, MaskGIT Sec. 3.2-3.3).

gamma maps a ratio r in [0, 1] to the fraction of tokens that stay masked: gamma(0) = 1 (all
masked), gamma(1) = 0. ART-FR uses the concave cosine schedule gamma(r) = cos(pi/2 r) both to draw
the training mask ratio (Sec. 3.2) and to set how many tokens stay masked after each decoding step
(Sec. 3.3).
"""

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULE_KINDS = ("cosine", "linear", "square")


def schedule(ratio, kind: str = "cosine"):
    """gamma(r): fraction of tokens kept masked at ratio r in [0, 1].

    'cosine' = cos(pi/2 r) (ART-FR / MaskGIT default), 'linear' = 1 - r, 'square' = 1 - r^2.
    A jax array (or tracer) in gives a jax array out; Python / NumPy input is computed in float64
    NumPy, so static step counts are exact.
    """
    xp = jnp if isinstance(ratio, jax.Array) else np
    r = xp.asarray(ratio) if xp is jnp else np.asarray(ratio, dtype=np.float64)
    if kind == "cosine":
        return xp.cos(0.5 * np.pi * r)
    if kind == "linear":
        return 1.0 - r
    if kind == "square":
        return 1.0 - r * r
    raise ValueError(f"mask_schedule.schedule: kind must be one of {SCHEDULE_KINDS}, got {kind!r}")


def num_masked_training(rng, batch_size: int, seq_len: int, kind: str = "cosine") -> jax.Array:
    """Number of masked tokens per training example: int32 [B].

    r ~ U(0, 1) per example (``jax.random.uniform(rng, (B,))``), n = ceil(gamma(r) * N), clipped to
    [1, N] so every example has at least one target (ART-FR Sec. 3.2).
    """
    r = jax.random.uniform(rng, (batch_size,), dtype=jnp.float32)
    n = jnp.ceil(schedule(r, kind) * seq_len)
    return jnp.clip(n, 1, seq_len).astype(jnp.int32)


def training_mask(rng, batch_size: int, seq_len: int, kind: str = "cosine") -> jax.Array:
    """Random training mask: bool [B, N], True = replaced by [MASK] (ART-FR Sec. 3.2).

    ``count_key, position_key = jax.random.split(rng)``; row b has exactly
    ``num_masked_training(count_key, ...)[b]`` True entries, at the positions with the lowest
    uniform scores drawn from ``position_key`` (a uniformly random subset of that size).
    """
    count_key, position_key = jax.random.split(rng)
    n = num_masked_training(count_key, batch_size, seq_len, kind)
    scores = jax.random.uniform(position_key, (batch_size, seq_len))
    return rank_along_last(scores) < n[:, None]


def rank_along_last(x: jax.Array) -> jax.Array:
    """Rank of each entry in ascending order along the last axis (ties broken by index): int32."""
    order = jnp.argsort(x, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)
