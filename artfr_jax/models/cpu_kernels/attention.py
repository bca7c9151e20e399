"""Softmax attention computed in query blocks on the CPU.

``softmax(q k^T / sqrt(d)) v`` (Vaswani et al., 2017, Eq. 1) over ``N`` positions builds an
``[N, N]`` weight matrix per head. XLA:CPU writes it to memory and reads it back in each of the
softmax's passes and in both matmuls, so at ``N = 1024`` (the VQGAN's attention at 32x32) the
matmuls ran at a quarter of their speed. :func:`blocked_attention` takes ``block`` queries at a
time instead (``lax.map``), with the weights of a block small enough to stay in cache; its
backward pass recomputes each block's weights from the saved log-sum-exp, as flash attention
does, and never holds the ``[N, N]`` matrix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def applies(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> bool:
    """Float32 self-attention over ``N`` positions, ``N`` a multiple of ``block`` larger than it."""
    n = q.shape[1]
    return (
        n > block
        and n % block == 0
        and k.shape == q.shape == v.shape
        and all(x.dtype == jnp.float32 for x in (q, k, v))
    )


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
    """Attention on ``[B, N, H, D]`` in blocks of ``block`` queries (where :func:`applies`)."""
    b, n, h, d = q.shape
    heads = lambda x: x.transpose(0, 2, 1, 3).reshape(b * h, n, d)  # noqa: E731
    out = _blocked(heads(q), heads(k), heads(v), block)
    return out.reshape(b, h, n, d).transpose(0, 2, 1, 3)


def _forward_blocks(q, k, v, block):
    """Output ``[G, N, D]`` and log-sum-exp ``[G, N]`` of ``[G, N, D]`` inputs, a block at a time."""
    g, n, d = q.shape
    scale = d**-0.5

    def one(i):
        qb = lax.dynamic_slice_in_dim(q, i * block, block, axis=1)
        s = jnp.einsum("gqd,gkd->gqk", qb, k) * scale
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        total = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("gqk,gkd->gqd", p, v) / total
        return o, (m + jnp.log(total))[..., 0]

    o, lse = lax.map(one, jnp.arange(n // block))  # [nb, G, block, D], [nb, G, block]
    return o.transpose(1, 0, 2, 3).reshape(g, n, d), lse.transpose(1, 0, 2).reshape(g, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(q, k, v, block):
    return _forward_blocks(q, k, v, block)[0]


def _blocked_fwd(q, k, v, block):
    o, lse = _forward_blocks(q, k, v, block)
    return o, (q, k, v, o, lse)


def _blocked_bwd(block, res, do):
    q, k, v, o, lse = res
    d = q.shape[-1]
    scale = d**-0.5
    delta = jnp.sum(do * o, axis=-1)  # [G, N]: rowsum(dP * P) of the softmax backward

    def one(carry, i):
        dk, dv = carry
        rows = lambda x: lax.dynamic_slice_in_dim(x, i * block, block, axis=1)  # noqa: E731
        qb, dob, lse_b, delta_b = rows(q), rows(do), rows(lse), rows(delta)
        p = jnp.exp(jnp.einsum("gqd,gkd->gqk", qb, k) * scale - lse_b[..., None])
        dv = dv + jnp.einsum("gqk,gqd->gkd", p, dob)
        dp = jnp.einsum("gqd,gkd->gqk", dob, v)
        ds = p * (dp - delta_b[..., None]) * scale
        dk = dk + jnp.einsum("gqk,gqd->gkd", ds, qb)
        return (dk, dv), jnp.einsum("gqk,gkd->gqd", ds, k)

    n = q.shape[1]
    (dk, dv), dq = lax.scan(one, (jnp.zeros_like(k), jnp.zeros_like(v)), jnp.arange(n // block))
    return dq.transpose(1, 0, 2, 3).reshape(q.shape), dk, dv


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
