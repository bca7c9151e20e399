"""Attention in query blocks (models/attention.py) against the one-matrix form, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artfr_jax.models import attention, layers


def _qkv(shape, seed=0, scale=1.0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [scale * jax.random.normal(k, shape, jnp.float32) for k in keys]


def _grads(fn, q, k, v):
    # A non-linear read-out so that every output element gets its own cotangent.
    return jax.grad(lambda *a: jnp.sum(jnp.sin(3.0 * fn(*a))), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("shape", [(2, 1024, 1, 16), (1, 512, 3, 8), (3, 768, 2, 4)])
def test_blocked_equals_one_matrix_attention(shape):
    # Scale 2 makes the softmax peaked (logits up to ~20), where a wrong log-sum-exp would show.
    q, k, v = _qkv(shape, scale=2.0)
    blocked = jax.jit(attention.dot_product_attention)
    ref = jax.jit(attention.reference_attention)
    np.testing.assert_allclose(blocked(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
    got = jax.jit(lambda *a: _grads(attention.dot_product_attention, *a))(q, k, v)
    want = jax.jit(lambda *a: _grads(attention.reference_attention, *a))(q, k, v)
    for name, g, w in zip("qkv", got, want, strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale, err_msg=f"d{name}")


def test_blocked_path_is_taken_and_never_builds_the_full_matrix():
    q, k, v = _qkv((1, 1024, 1, 8))
    hlo = jax.jit(jax.grad(lambda *a: jnp.sum(attention.dot_product_attention(*a)))).lower(q, k, v)
    text = hlo.as_text()
    assert "1024x1024" not in text
    assert f"{attention.BLOCK}x1024" in text
    ref = jax.jit(jax.grad(lambda *a: jnp.sum(attention.reference_attention(*a)))).lower(q, k, v)
    assert "1024x1024" in ref.as_text()


@pytest.mark.parametrize("n", [256, 300])
def test_short_or_uneven_sequences_use_the_one_matrix_form(n):
    q, k, v = _qkv((2, n, 1, 8))
    np.testing.assert_array_equal(
        attention.dot_product_attention(q, k, v), attention.reference_attention(q, k, v)
    )


def test_attention_block_is_unchanged():
    # The VQGAN's attention at 32x32 (1024 positions): blocked on the CPU.
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 32))
    block = layers.AttentionBlock(num_groups=8)
    params = block.init(jax.random.key(2), x)
    got = block.apply(params, x)

    p = params["params"]
    norm = block.norm(num_groups=8, epsilon=block.epsilon)
    y = norm.apply({"params": p["norm"]}, x).reshape(2, 1024, 32)
    q, k, v = ((y @ p[n]["kernel"] + p[n]["bias"]).reshape(2, 1024, 1, 32) for n in ("q", "k", "v"))
    o = attention.reference_attention(q, k, v).reshape(2, 1024, 32)
    want = x + (o @ p["out"]["kernel"] + p["out"]["bias"]).reshape(x.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
