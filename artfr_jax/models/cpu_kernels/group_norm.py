"""Group normalisation (Wu & He, 2018) with a hand-written backward pass, on the CPU.

Statistics are computed in float32 over ``[B, N1, N2, C]`` (the positions split in two) and the
backward needs one fused reduction pass over ``(dy, x)`` and one elementwise pass, where autodiff
of the forward emits several (the backward dominated training on the CPU).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp


def _as_4d(x: jax.Array) -> jax.Array:
    """``[B, ..., C]`` as float32 ``[B, N1, N2, C]`` with ``N1 * N2`` the positions, ``N1 ~ sqrt``.

    XLA:CPU reduces ``[1, N, C]`` over ``N`` up to 70x slower than the same data as
    ``[1, N1, N2, C]`` over ``(N1, N2)`` (950 vs 13.5 ms at 512 x 512 x 128); other batch sizes
    are as fast either way.
    """
    b, c = x.shape[0], x.shape[-1]
    n = x.size // (b * c)
    n1 = math.isqrt(n)
    while n % n1:
        n1 -= 1
    return x.astype(jnp.float32).reshape(b, n1, n // n1, c)


def _sum_positions(x: jax.Array) -> jax.Array:
    """``[B, N1, N2, C] -> [B, C]``."""
    return jnp.sum(x, axis=(1, 2))


def _per_position(v: jax.Array) -> jax.Array:
    """``[B, C] -> [B, 1, 1, C]``, to broadcast against ``[B, N1, N2, C]``."""
    return v[:, None, None, :]


def _group_stats(xf: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
    """Two-pass per-(sample, group) mean and variance of ``xf [B, N1, N2, C]`` -> ``[B, G]``.

    Each pass reduces over the positions first (a contiguous, vectorised column reduction that
    XLA fuses with the elementwise producer), then the tiny ``[B, G, C/G]`` remainder; this is
    3-4x faster on CPU than reducing ``[B, N, G, C/G]`` over axes (1, 3) at once.
    """
    b, n1, n2, c = xf.shape
    cg = c // num_groups
    count = n1 * n2 * cg
    mean = _sum_positions(xf).reshape(b, num_groups, cg).sum(-1) / count
    centred = xf - _per_position(jnp.repeat(mean, cg, axis=1))
    var = _sum_positions(jnp.square(centred)).reshape(b, num_groups, cg).sum(-1) / count
    return mean, var


def _gn_forward(x, scale, bias, num_groups, epsilon):
    b, c = x.shape[0], x.shape[-1]
    cg = c // num_groups
    xf = _as_4d(x)
    mean, var = _group_stats(xf, num_groups)
    inv = jax.lax.rsqrt(var + epsilon)
    a = (inv[:, :, None] * scale.astype(jnp.float32).reshape(num_groups, cg)).reshape(b, c)
    shift = bias.astype(jnp.float32) - jnp.repeat(mean, cg, axis=1) * a
    y = xf * _per_position(a) + _per_position(shift)
    return y.reshape(x.shape), (mean, inv)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float
) -> jax.Array:
    """Group norm of ``x [B, ..., C]`` with affine ``scale, bias [C]``; float32 result."""
    return _gn_forward(x, scale, bias, num_groups, epsilon)[0]


def _gn_fwd(x, scale, bias, num_groups, epsilon):
    y, (mean, inv) = _gn_forward(x, scale, bias, num_groups, epsilon)
    return y, (x, scale, bias, mean, inv)


def _gn_bwd(num_groups, epsilon, res, dy):
    x, scale, bias, mean, inv = res
    b, c = x.shape[0], x.shape[-1]
    cg = c // num_groups
    xf, dyf = _as_4d(x), _as_4d(dy)
    count = xf.shape[1] * xf.shape[2] * cg
    gamma = scale.astype(jnp.float32)
    mc, ic = jnp.repeat(mean, cg, axis=1), jnp.repeat(inv, cg, axis=1)  # [B, C]
    s_dy = _sum_positions(dyf)
    s_dyxhat = (_sum_positions(dyf * xf) - mc * s_dy) * ic  # sum_n dy * xhat
    # With g = gamma * dy: dx = inv * (g - mean_group(g) - xhat * mean_group(g * xhat)).
    m1 = jnp.repeat((gamma * s_dy).reshape(b, num_groups, cg).sum(-1) / count, cg, axis=1)
    m2 = jnp.repeat((gamma * s_dyxhat).reshape(b, num_groups, cg).sum(-1) / count, cg, axis=1)
    k_dy = ic * gamma
    k_x = ic * ic * m2
    k_0 = ic * (mc * ic * m2 - m1)
    dx = _per_position(k_dy) * dyf - _per_position(k_x) * xf + _per_position(k_0)
    dscale = jnp.sum(s_dyxhat, axis=0).astype(scale.dtype)
    dbias = jnp.sum(s_dy, axis=0).astype(bias.dtype)
    return dx.reshape(x.shape).astype(x.dtype), dscale, dbias


group_norm.defvjp(_gn_fwd, _gn_bwd)
