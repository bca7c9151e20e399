"""Reservoir sampling and k-means codebook re-estimation (VQFR Sec. 4.1)."""

import jax
import jax.numpy as jnp
import numpy as np

from artfr_jax.train import kmeans as km


def test_reservoir_keeps_everything_until_full_then_samples_uniformly():
    res = km.reservoir_init(8, 2)
    x = jnp.arange(10, dtype=jnp.float32).reshape(5, 2)
    res = km.reservoir_add(res, x, jax.random.key(0))
    assert int(res.seen) == 5
    np.testing.assert_array_equal(res.buffer[:5], x)

    # Stream 0..399 in batches of 40 into 50 slots, many times: every item is kept with
    # probability 50/400, early and late ones alike.
    add = jax.jit(km.reservoir_add)
    counts = np.zeros(400)
    for t in range(300):
        res = km.reservoir_init(50, 1)
        for b in range(10):
            batch = jnp.arange(40 * b, 40 * (b + 1), dtype=jnp.float32)[:, None]
            res = add(res, batch, jax.random.fold_in(jax.random.key(t), b))
        kept = np.asarray(res.buffer[:, 0]).astype(int)
        assert len(set(kept)) == 50  # no duplicates, buffer full of stream items
        counts[kept] += 1
    p = counts / 300
    assert abs(p.mean() - 50 / 400) < 1e-9
    assert abs(p[:200].mean() - p[200:].mean()) < 0.02  # no bias to early or late items
    assert abs(p[:40].mean() - 0.125) < 0.03 and abs(p[-40:].mean() - 0.125) < 0.03


def _blobs(k=6, n=60, d=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 10, (k, d))
    x = centers[rng.integers(0, k, n * k)] + rng.normal(0, 0.3, (n * k, d))
    return centers, x.astype(np.float32)


def test_kmeans_recovers_separated_clusters_and_matches_sklearn_inertia():
    centers, x = _blobs()
    got = np.asarray(jax.jit(km.kmeans, static_argnums=1)(jnp.asarray(x), 6, jax.random.key(1)))
    d = np.linalg.norm(got[:, None] - centers[None], axis=-1)
    assert np.all(d.min(axis=1) < 0.2) and len(set(d.argmin(axis=1))) == 6

    from sklearn import cluster  # the official code calls sklearn.cluster.k_means

    ref, *_ = cluster.k_means(x, 6, random_state=0, n_init=1)

    def inertia(c):
        return np.sum(np.min(((x[:, None] - c[None]) ** 2).sum(-1), axis=1))

    assert inertia(got) <= inertia(ref) * 1.001


def test_kmeans_ignores_invalid_rows():
    centers, x = _blobs(k=3, n=40)
    junk = np.full((30, x.shape[1]), 1e4, np.float32)
    xs = jnp.asarray(np.concatenate([x, junk]))
    valid = jnp.arange(xs.shape[0]) < len(x)
    got = np.asarray(km.kmeans(xs, 3, jax.random.key(0), valid=valid))
    assert np.abs(got).max() < 100  # no centre pulled to the junk rows
    d = np.linalg.norm(got[:, None] - centers[None], axis=-1)
    assert np.all(d.min(axis=1) < 0.2)


def test_maybe_reestimate_only_when_due_and_filled():
    _, x = _blobs(k=4, n=30)
    codebook = jnp.zeros((4, x.shape[1]))
    res = km.reservoir_add(
        km.reservoir_init(256, x.shape[1]), jnp.asarray(x[:100]), jax.random.key(0)
    )
    f = jax.jit(km.maybe_reestimate, static_argnames=("every", "max_steps", "iters"))
    kw = dict(every=10, max_steps=100)
    cb, r, did = f(codebook, res, jnp.int32(15), jax.random.key(0), **kw)  # not a multiple
    assert float(did) == 0 and int(r.seen) == 100 and np.all(np.asarray(cb) == 0)
    cb, r, did = f(codebook, res, jnp.int32(100), jax.random.key(0), **kw)  # past max_steps
    assert float(did) == 0
    cb, r, did = f(codebook, res, jnp.int32(20), jax.random.key(0), **kw)
    assert float(did) == 1 and int(r.seen) == 0 and np.abs(np.asarray(cb)).sum() > 0
    small = km.reservoir_add(
        km.reservoir_init(256, x.shape[1]), jnp.asarray(x[:3]), jax.random.key(0)
    )
    cb, r, did = f(codebook, small, jnp.int32(20), jax.random.key(0), **kw)  # 3 samples < 4 codes
    assert float(did) == 0 and int(r.seen) == 3
    cb, r, did = f(codebook, res, jnp.int32(1000), jax.random.key(0), every=10, max_steps=-1)
    assert float(did) == 1  # max_steps < 0: no end
