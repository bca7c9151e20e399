"""Attention in query blocks (models/cpu_kernels/attention.py) against the one-matrix form, values
and gradients; the transformer's attention asks for cuDNN only where it can run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artfr_jax.models import kernels as kernels_lib
from artfr_jax.models import layers
from artfr_jax.models.kernels import Kernels

BLOCK = Kernels().cpu.attention_block
blocked = functools.partial(kernels_lib.spatial_attention, kernels=Kernels("cpu"))
reference = kernels_lib.reference_attention


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
    np.testing.assert_allclose(
        jax.jit(blocked)(q, k, v), jax.jit(reference)(q, k, v), rtol=1e-5, atol=1e-5
    )
    got = jax.jit(lambda *a: _grads(blocked, *a))(q, k, v)
    want = jax.jit(lambda *a: _grads(reference, *a))(q, k, v)
    for name, g, w in zip("qkv", got, want, strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale, err_msg=f"d{name}")


def test_blocked_path_is_taken_and_never_builds_the_full_matrix():
    q, k, v = _qkv((1, 1024, 1, 8))
    hlo = jax.jit(jax.grad(lambda *a: jnp.sum(blocked(*a)))).lower(q, k, v)
    text = hlo.as_text()
    assert "1024x1024" not in text
    assert f"{BLOCK}x1024" in text
    ref = jax.jit(jax.grad(lambda *a: jnp.sum(reference(*a)))).lower(q, k, v)
    assert "1024x1024" in ref.as_text()


@pytest.mark.parametrize("n", [256, 300])
def test_short_or_uneven_sequences_use_the_one_matrix_form(n):
    q, k, v = _qkv((2, n, 1, 8))
    np.testing.assert_array_equal(blocked(q, k, v), reference(q, k, v))


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
    o = reference(q, k, v).reshape(2, 1024, 32)
    want = x + (o @ p["out"]["kernel"] + p["out"]["bias"]).reshape(x.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_xla_mode_and_short_sequences_build_the_one_matrix_form():
    q, k, v = _qkv((1, 1024, 1, 8))
    xla = functools.partial(kernels_lib.spatial_attention, kernels=Kernels("xla"))
    text = jax.jit(jax.grad(lambda *a: jnp.sum(xla(*a)))).lower(q, k, v).as_text()
    assert "1024x1024" in text and "custom_call" not in text


def test_cudnn_is_asked_for_only_where_it_applies():
    """bfloat16/float16 heads of width 8k up to 128 on a GPU; on this host (no cuDNN) the
    transformer's attention is XLA's, with the softmax in float32."""
    shape = (2, 64, 4, 64)
    bf16 = [x.astype(jnp.bfloat16) for x in _qkv(shape)]
    assert kernels_lib.cudnn_applies(*bf16)
    assert not kernels_lib.cudnn_applies(*_qkv(shape))  # float32
    assert not kernels_lib.cudnn_applies(*[x.astype(jnp.bfloat16) for x in _qkv((1, 8, 1, 512))])
    assert not kernels_lib.cudnn_applies(*[x.astype(jnp.bfloat16) for x in _qkv((1, 8, 1, 12))])
    out = jax.jit(kernels_lib.dot_product_attention)(*bf16)
    want = reference(*bf16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        out.astype(jnp.float32), want.astype(jnp.float32), rtol=2e-2, atol=2e-2
    )
    if not kernels_lib._cudnn_available():
        text = jax.jit(kernels_lib.dot_product_attention).lower(*bf16).as_text()
        assert "cudnn" not in text


def test_flash_is_asked_for_only_where_it_applies():
    """The Pallas TPU kernel takes sequences in 128-wide blocks and heads up to 128 wide (or
    multiples of 128); the transformer's attention lowered for this host stays XLA's."""
    qkv = _qkv((2, 256, 2, 64))
    assert kernels_lib.flash_applies(*qkv)
    assert kernels_lib.flash_applies(*[x.astype(jnp.bfloat16) for x in qkv])
    assert kernels_lib.flash_applies(*_qkv((1, 128, 1, 256)))
    assert not kernels_lib.flash_applies(*_qkv((1, 96, 1, 64)))  # not whole blocks
    assert not kernels_lib.flash_applies(*_qkv((1, 128, 1, 192)))  # head width
    assert not kernels_lib.flash_applies(*[x.astype(jnp.float16) for x in qkv])
    text = jax.jit(kernels_lib.dot_product_attention).lower(*qkv).as_text()
    assert "tpu_custom_call" not in text and "pallas" not in text


@pytest.mark.parametrize("devices", [1, 2])
def test_tpu_flash_attention_equals_xla_in_interpret_mode(devices):
    """The TPU kernel run by Pallas's interpreter on this host, values and gradients, against
    XLA's attention; under a mesh each device runs it on its rows of the batch (shard_map)."""
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

    q, k, v = _qkv((2, 256, 2, 64), scale=2.0)
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    xla = functools.partial(jax.nn.dot_product_attention, implementation="xla")
    with pltpu.force_tpu_interpret_mode(), jax.set_mesh(mesh):
        out = jax.jit(kernels_lib.tpu_flash_attention)(q, k, v)
        got = jax.jit(lambda *a: _grads(kernels_lib.tpu_flash_attention, *a))(q, k, v)
        text = jax.jit(kernels_lib.tpu_flash_attention).lower(q, k, v).as_text()
    assert ("shard_map" in text or "manual" in text) == (devices > 1)
    np.testing.assert_allclose(out, xla(q, k, v), rtol=1e-5, atol=1e-5)
    want = _grads(xla, q, k, v)
    for name, g, w in zip("qkv", got, want, strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
