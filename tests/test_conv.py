"""The banded weight gradient (models/conv.py) equals XLA's, in value and in derivatives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from artfr_jax.models import conv
from artfr_jax.models.layers import Conv

DN = ("NHWC", "HWIO", "NHWC")

CASES = [
    # batch, height, width, in, out, kernel, stride, padding
    (2, 9, 7, 3, 5, 3, 1, "SAME"),
    (1, 16, 16, 4, 6, 3, 2, ((0, 1), (0, 1))),  # the VQGAN's downsampling conv
    (3, 11, 13, 2, 4, 3, 2, "SAME"),
    (2, 8, 8, 4, 4, 1, 1, "VALID"),
    (1, 10, 6, 3, 3, 4, 2, ((1, 2), (2, 1))),  # PatchGAN-like 4x4, uneven padding
    (2, 5, 5, 3, 2, 3, 1, "VALID"),
]


@pytest.fixture(autouse=True)
def _band_small_convs(monkeypatch):
    """The tests' convolutions are tiny; take the banded path for them anyway."""
    monkeypatch.setattr(conv, "MIN_BANDED_POSITIONS", 0)


def _data(b, h, w, c, o, k, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, c, o)), jnp.float32)
    return x, kernel


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rows", [1, 2, 3, None])
def test_weight_grad_matches_xla(case, rows):
    b, h, w, c, o, k, s, pad = case
    x, kernel = _data(b, h, w, c, o, k)
    y, vjp = jax.vjp(
        lambda k_: lax.conv_general_dilated(x, k_, (s, s), pad, dimension_numbers=DN), kernel
    )
    dy = jnp.cos(y)
    pads = lax.padtype_to_pads(x.shape[1:3], (k, k), (s, s), pad) if isinstance(pad, str) else pad
    got = conv.weight_grad(x, dy, kernel.shape, (s, s), tuple(map(tuple, pads)), rows=rows)
    np.testing.assert_allclose(got, vjp(dy)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_conv_values_and_gradients_match_lax(case):
    b, h, w, c, o, k, s, pad = case
    x, kernel = _data(b, h, w, c, o, k, seed=1)
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, DN)

    def loss(fn):
        return lambda x, k_: jnp.sum(jnp.sin(fn(x, k_, (s, s), pad, dimension_numbers=dn)))

    ours, ref = loss(conv.conv_general_dilated), loss(lax.conv_general_dilated)
    np.testing.assert_allclose(ours(x, kernel), ref(x, kernel), rtol=1e-5)
    got_grads = jax.jit(jax.grad(ours, (0, 1)))(x, kernel)
    for got, want in zip(got_grads, jax.grad(ref, (0, 1))(x, kernel), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_banded_path_is_taken_on_cpu_and_only_for_plain_convs():
    x, kernel = _data(1, 8, 8, 2, 3, 3)
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, DN)
    jaxpr = str(
        jax.make_jaxpr(
            lambda k_: conv.conv_general_dilated(x, k_, (1, 1), "SAME", dimension_numbers=dn)
        )(kernel)
    )
    assert ("custom_vjp" in jaxpr) == conv.banded_backend()
    dilated = str(
        jax.make_jaxpr(
            lambda k_: conv.conv_general_dilated(
                x, k_, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dn
            )
        )(kernel)
    )
    assert "custom_vjp" not in dilated


def test_small_convs_keep_xla_weight_gradient(monkeypatch):
    x, kernel = _data(1, 8, 8, 2, 3, 3)
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, DN)
    monkeypatch.setattr(conv, "MIN_BANDED_POSITIONS", 8 * 8 + 1)
    jaxpr = str(
        jax.make_jaxpr(
            lambda k_: conv.conv_general_dilated(x, k_, (1, 1), "SAME", dimension_numbers=dn)
        )(kernel)
    )
    assert "custom_vjp" not in jaxpr


def test_second_order_gradients_match_lax():
    """R1 penalties differentiate the input gradient of a discriminator again."""
    x, kernel = _data(2, 8, 8, 3, 4, 3)
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, DN)

    def r1(k_, fn):
        g = jax.grad(
            lambda x_: jnp.sum(jnp.tanh(fn(x_, k_, (1, 1), "SAME", dimension_numbers=dn)))
        )(x)
        return jnp.sum(g**2)

    np.testing.assert_allclose(
        jax.grad(r1)(kernel, conv.conv_general_dilated),
        jax.grad(r1)(kernel, lax.conv_general_dilated),
        rtol=1e-4,
        atol=1e-5,
    )


def test_conv_module_has_nn_conv_parameters_and_results():
    x, _ = _data(2, 12, 12, 3, 4, 3)
    ours, ref = Conv(8, (3, 3), strides=(2, 2), name="c"), nn.Conv(8, (3, 3), strides=(2, 2))
    params = ref.init(jax.random.key(0), x)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(params)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-6, atol=1e-6)
    g_ours = jax.grad(lambda p: jnp.sum(ours.apply(p, x) ** 2))(params)
    g_ref = jax.grad(lambda p: jnp.sum(ref.apply(p, x) ** 2))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ours, g_ref)
