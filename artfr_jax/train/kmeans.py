"""Codebook re-estimation by k-means over a reservoir of recent encoder outputs (VQFR Sec. 4.1).

VQFR keeps a reservoir sample of the (projected) encoder features seen during training and, every
``every`` steps until ``max_steps``, replaces the codebook with the k-means centres of that
reservoir, then empties it. This keeps every code in use and the codebook close to the features.
Official settings at 512 px: reservoir 16384, every 2000 steps, up to step 30000, and no
quantisation at all before step 10000 (the quantiser is the identity while it warms up).

Everything here is a pure function of arrays, jittable, so the re-estimation runs inside the
training step under ``lax.cond`` (one jitted step per stage, nothing done on the host).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Reservoir:
    """A uniform sample of at most ``buffer.shape[0]`` vectors from a stream.

    ``seen`` counts the vectors offered since the last reset; ``buffer[:min(seen, size)]`` is valid.
    """

    buffer: jax.Array  # [R, D] float32
    seen: jax.Array  # int32 scalar


def reservoir_init(size: int, dim: int) -> Reservoir:
    return Reservoir(jnp.zeros((size, dim), jnp.float32), jnp.zeros((), jnp.int32))


def reservoir_add(res: Reservoir, samples: jax.Array, key: jax.Array) -> Reservoir:
    """Offers ``samples`` [N, D] to the reservoir (Algorithm R, vectorised over the batch).

    Sample ``j`` is the ``seen + j``-th of the stream; it goes to slot ``seen + j`` while there is
    room, else to a uniform slot in ``[0, seen + j]`` if that slot is inside the buffer. Two samples
    drawing the same slot in one call keep the later one, as the sequential algorithm would.
    """
    size = res.buffer.shape[0]
    n = samples.shape[0]
    pos = res.seen + jnp.arange(n, dtype=jnp.int32)
    draw = jax.random.randint(key, (n,), 0, pos + 1)
    slot = jnp.where(pos < size, pos, draw)
    slot = jnp.where(slot < size, slot, size)  # `size` = dropped (out of bounds, mode='drop')
    buffer = res.buffer.at[slot].set(samples.astype(jnp.float32), mode="drop")
    return Reservoir(buffer, res.seen + n)


def _sq_dist(x: jax.Array, c: jax.Array) -> jax.Array:
    """||x - c||^2 for x [N, D], c [K, D] -> [N, K]."""
    return (
        jnp.sum(x * x, -1, keepdims=True)
        - 2.0 * jnp.dot(x, c.T, precision=jax.lax.Precision.HIGHEST)
        + jnp.sum(c * c, -1)[None]
    )


def kmeans_plusplus_init(x: jax.Array, k: int, key: jax.Array, valid: jax.Array) -> jax.Array:
    """k-means++ seeding over the rows of ``x`` whose ``valid`` flag is set. Returns [k, D]."""
    keys = jax.random.split(key, k)
    first = jax.random.categorical(keys[0], jnp.where(valid, 0.0, -jnp.inf))
    centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    d2 = jnp.where(valid, jnp.sum((x - x[first]) ** 2, -1), 0.0)

    def body(i, carry):
        centers, d2 = carry
        # Probability proportional to the squared distance to the nearest chosen centre.
        logits = jnp.where(d2 > 0, jnp.log(jnp.maximum(d2, 1e-30)), -jnp.inf)
        logits = jnp.where(jnp.any(d2 > 0), logits, jnp.where(valid, 0.0, -jnp.inf))
        j = jax.random.categorical(keys[i], logits)
        centers = centers.at[i].set(x[j])
        d2 = jnp.minimum(d2, jnp.where(valid, jnp.sum((x - x[j]) ** 2, -1), 0.0))
        return centers, d2

    centers, _ = jax.lax.fori_loop(1, k, body, (centers, d2))
    return centers


def kmeans(
    x: jax.Array, k: int, key: jax.Array, *, iters: int = 30, valid: jax.Array | None = None
) -> jax.Array:
    """Lloyd's k-means with k-means++ seeding (as sklearn's ``k_means`` the official code calls).

    x: [N, D]; ``valid`` [N] bool masks rows that take part (a part-filled reservoir). A cluster
    left empty keeps its previous centre. Returns the centres [k, D] float32.
    """
    x = x.astype(jnp.float32)
    valid = jnp.ones(x.shape[0], bool) if valid is None else valid
    centers = kmeans_plusplus_init(x, k, key, valid)
    w = valid.astype(jnp.float32)

    def step(_, centers):
        assign = jnp.argmin(_sq_dist(x, centers), axis=-1)
        onehot = jax.nn.one_hot(assign, k, dtype=jnp.float32) * w[:, None]
        counts = jnp.sum(onehot, 0)
        sums = jnp.dot(onehot.T, x, precision=jax.lax.Precision.HIGHEST)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centers)

    return jax.lax.fori_loop(0, iters, step, centers)


def maybe_reestimate(
    codebook: jax.Array,
    res: Reservoir,
    step: jax.Array,
    key: jax.Array,
    *,
    every: int,
    max_steps: int,
    iters: int = 30,
) -> tuple[jax.Array, Reservoir, jax.Array]:
    """At ``step % every == 0`` (and ``step < max_steps``; ``max_steps < 0``: always) with at least
    as many reservoir samples as codes, returns the k-means codebook and an emptied reservoir.
    Otherwise returns the inputs. Third output: 1.0 when it re-estimated, else 0.0."""
    k = codebook.shape[0]
    size = res.buffer.shape[0]
    in_window = (step < max_steps) if max_steps >= 0 else jnp.asarray(True)
    due = (step % every == 0) & in_window & (jnp.minimum(res.seen, size) >= k)

    def run(_):
        valid = jnp.arange(size) < res.seen
        new = kmeans(res.buffer, k, key, iters=iters, valid=valid).astype(codebook.dtype)
        return new, Reservoir(res.buffer, jnp.zeros((), jnp.int32)), jnp.float32(1.0)

    def keep(_):
        return codebook, res, jnp.float32(0.0)

    return jax.lax.cond(due, run, keep, None)
