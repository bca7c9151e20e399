"""models/cpu_kernels/winograd.py and its use by the CPU convolution: Winograd F(4x4, 3x3) and
F(2x2, 3x3) equal the direct 3x3 'SAME' convolution and F(4x4, 2x2) the 2x2 'VALID' one in value,
input and weight gradients, and the CPU kernels take them only where they pay."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from artfr_jax.models import kernels as kernels_lib
from artfr_jax.models.cpu_kernels import CpuKernels, winograd
from artfr_jax.models.kernels import Kernels

DN = ("NHWC", "HWIO", "NHWC")


def _direct(x, w):
    return lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=DN, precision=lax.Precision.HIGHEST
    )


def _data(b, h, w, c, o, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, c, o)) / np.sqrt(9 * c), jnp.float32)
    return x, k


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _primitives(fn, *args):
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


# Sizes that are and are not multiples of the 4x4 output tile; one or more images; C != O.
SHAPES = [(1, 8, 8, 3, 4), (2, 9, 13, 5, 7), (3, 17, 4, 6, 2), (1, 1, 1, 2, 3), (2, 12, 20, 16, 8)]


# small_tile values that send every convolution to F(2x2, 3x3), or none.
TILE_2X2 = {"F4x4": (0, 10**9), "F2x2": (10**9, 0)}


@pytest.fixture(params=sorted(TILE_2X2))
def tile(request):
    return TILE_2X2[request.param]


def _cpu_conv(**options):
    """The models' convolution with the CPU kernels and ``CpuKernels(**options)``."""
    return functools.partial(
        kernels_lib.conv_general_dilated, kernels=Kernels("cpu", CpuKernels(**options))
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_conv3x3_equals_direct_convolution(shape, tile):
    x, w = _data(*shape)
    y = winograd.conv3x3(x, w, small_tile=tile)
    assert y.shape == x.shape[:3] + (w.shape[-1],)
    assert _rel(y, _direct(x, w)) < 1e-5
    np.testing.assert_allclose(y, _direct(x, w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_input_gradient_equals_direct_convolutions(shape, tile):
    x, w = _data(*shape, seed=1)
    y, vjp = jax.vjp(lambda x_: _direct(x_, w), x)
    dy = jnp.cos(3 * y)
    assert _rel(winograd.conv3x3_input_grad(dy, w, small_tile=tile), vjp(dy)[0]) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_weight_gradient_equals_xla(shape, tile):
    x, w = _data(*shape, seed=5)
    y, vjp = jax.vjp(lambda w_: _direct(x, w_), w)
    dy = jnp.cos(3 * y)
    dw = winograd.conv3x3_weight_grad(x, dy, small_tile=tile)
    assert dw.shape == w.shape
    assert _rel(dw, vjp(dy)[0]) < 1e-5


@pytest.mark.parametrize(
    "f",
    [winograd.F4_3, winograd.F4_2, winograd.F2_3],
    ids=["F4x4_3x3", "F4x4_2x2", "F2x2_3x3"],
)
def test_transforms_are_the_minimal_filtering_identity(f):
    """One tile by hand: Y = A^T [(G g G^T) * (B^T d B)] A equals the m x m valid correlation."""
    rng = np.random.default_rng(2)
    r, n, m = f.taps, f.span, f.tile
    assert n == m + r - 1
    assert f.b_t.shape == (n, n) and f.g.shape == (n, r) and f.a_t.shape == (m, n)
    d, g = rng.standard_normal((n, n)), rng.standard_normal((r, r))
    y = f.a_t @ ((f.g @ g @ f.g.T) * (f.b_t @ d @ f.b_t.T)) @ f.a_t.T
    ref = np.array([[np.sum(d[i : i + r, j : j + r] * g) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_few_positions_and_many_channels_take_the_2x2_tile():
    """The paper tokenizer's 16x16 levels at one image: F(2x2, 3x3); more images, fewer channel
    pairs, or larger images: F(4x4, 3x3)."""
    tile = CpuKernels().winograd_small_tile
    assert winograd.minimal_3x3(16 * 16, 512, 512, tile) is winograd.F2_3
    assert winograd.minimal_3x3(16 * 16, 256, 512, tile) is winograd.F2_3
    assert winograd.minimal_3x3(2 * 16 * 16, 512, 512, tile) is winograd.F4_3
    assert winograd.minimal_3x3(16 * 16, 256, 256, tile) is winograd.F4_3
    assert winograd.minimal_3x3(32 * 32, 512, 512, tile) is winograd.F4_3
    # The choice shows in the program: 16 transformed weight matrices instead of 36.
    x = jax.ShapeDtypeStruct((1, 16, 16, 512), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 512, 512), jnp.float32)
    out = jax.eval_shape(lambda w_: winograd.weight_transform(w_, winograd.F2_3), w)
    assert out.shape == (16, 512, 512)
    text = jax.jit(functools.partial(winograd.conv3x3, small_tile=tile)).lower(x, w).as_text()
    assert "tensor<16x512x512xf32>" in text and "tensor<36x512x512xf32>" not in text


def _direct_2x2(x, w, pad=0):
    return lax.conv_general_dilated(
        x, w, (1, 1), [(pad, pad)] * 2, dimension_numbers=DN, precision=lax.Precision.HIGHEST
    )


@pytest.mark.parametrize("shape", SHAPES[:3] + [(2, 12, 20, 16, 8)])
def test_conv2x2_and_its_gradients_equal_direct_convolutions(shape):
    b, h, w_, c, o = shape
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((b, h + 1, w_ + 1, c)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 2, c, o)) / np.sqrt(4 * c), jnp.float32)
    y = winograd.conv2x2(x, w)
    assert y.shape == (b, h, w_, o)
    np.testing.assert_allclose(y, _direct_2x2(x, w), rtol=1e-4, atol=1e-5)
    assert _rel(y, _direct_2x2(x, w)) < 1e-5
    dy = jnp.cos(3 * y)
    _, vjp = jax.vjp(lambda x_: _direct_2x2(x_, w), x)
    dx = winograd.conv2x2_input_grad(dy, w)
    assert dx.shape == x.shape
    assert _rel(dx, vjp(dy)[0]) < 1e-5
    _, vjp_w = jax.vjp(lambda w_: _direct_2x2(x, w_), w)
    dw = winograd.conv2x2_weight_grad(x, dy)
    assert dw.shape == w.shape
    assert _rel(dw, vjp_w(dy)[0]) < 1e-5


def test_rejects_other_kernels():
    with pytest.raises(ValueError, match=r"w \[3,3,C,O\]"):
        winograd.conv3x3(jnp.zeros((1, 4, 4, 2)), jnp.zeros((5, 5, 2, 2)))
    with pytest.raises(ValueError, match=r"w \[2,2,C,O\]"):
        winograd.conv2x2(jnp.zeros((1, 4, 4, 2)), jnp.zeros((2, 2, 3, 2)))


def test_models_conv_takes_it_with_gradients_equal_to_lax():
    """Above the thresholds (lowered here) neither the forward nor the backward has a convolution
    left; the value and the gradients for input and kernel equal lax's."""
    conv = _cpu_conv(winograd_min_sizes=((0, 1),))
    x, w = _data(2, 10, 12, 4, 6, seed=3)

    def ours(x_, w_):
        return conv(x_, w_, (1, 1), "SAME", dimension_numbers=DN)

    def loss(fn):
        return lambda x_, w_: jnp.sum(jnp.sin(fn(x_, w_)))

    assert "conv_general_dilated" not in _primitives(ours, x, w)
    assert "conv_general_dilated" not in _primitives(jax.grad(loss(ours), argnums=(0, 1)), x, w)
    np.testing.assert_allclose(jax.jit(ours)(x, w), _direct(x, w), rtol=1e-4, atol=1e-5)
    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, w)
    want = jax.grad(loss(_direct), argnums=(0, 1))(x, w)
    for g, r in zip(got, want, strict=True):
        assert _rel(g, r) < 1e-5


def test_default_thresholds_pick_large_float32_same_3x3_only():
    conv = _cpu_conv()

    def uses_winograd(x, w, strides=(1, 1), padding="SAME"):
        fn = lambda x_, w_: conv(x_, w_, strides, padding, dimension_numbers=DN)  # noqa: E731
        return "conv_general_dilated" not in _primitives(fn, x, w)

    big = jax.ShapeDtypeStruct((1, 128, 128, 64), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)
    assert uses_winograd(big, k)
    # The smoke configuration's 64-px levels: Winograd; the demo's 32-px levels and the tiny
    # configurations' few channels: direct.
    assert uses_winograd(jax.ShapeDtypeStruct((8, 32, 32, 64), jnp.float32), k)
    assert not uses_winograd(jax.ShapeDtypeStruct((8, 16, 16, 64), jnp.float32), k)
    k32 = jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)
    assert uses_winograd(jax.ShapeDtypeStruct((8, 64, 64, 32), jnp.float32), k32)
    assert not uses_winograd(jax.ShapeDtypeStruct((8, 32, 32, 32), jnp.float32), k32)
    k16 = jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.float32)
    assert not uses_winograd(jax.ShapeDtypeStruct((8, 64, 64, 16), jnp.float32), k16)
    # Many channels: down to the paper tokenizer's 16x16x512 level, not below.
    k512 = jax.ShapeDtypeStruct((3, 3, 512, 512), jnp.float32)
    assert uses_winograd(jax.ShapeDtypeStruct((1, 16, 16, 512), jnp.float32), k512)
    assert not uses_winograd(jax.ShapeDtypeStruct((1, 8, 8, 512), jnp.float32), k512)
    k128 = jax.ShapeDtypeStruct((3, 3, 128, 128), jnp.float32)
    assert uses_winograd(jax.ShapeDtypeStruct((8, 16, 16, 128), jnp.float32), k128)
    assert not uses_winograd(jax.ShapeDtypeStruct((8, 8, 8, 128), jnp.float32), k128)
    assert not uses_winograd(big, jax.ShapeDtypeStruct((3, 3, 64, 3), jnp.float32))
    assert not uses_winograd(big, k, strides=(2, 2))
    assert not uses_winograd(big, k, padding="VALID")
    bf16 = jax.ShapeDtypeStruct(big.shape, jnp.bfloat16)
    assert not uses_winograd(bf16, jax.ShapeDtypeStruct(k.shape, jnp.bfloat16))


def test_switch_off_gives_the_direct_convolution():
    conv = _cpu_conv(winograd=False)
    x = jax.ShapeDtypeStruct((1, 128, 128, 64), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)
    fn = lambda x_, w_: conv(x_, w_, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
    assert "conv_general_dilated" in _primitives(fn, x, k)
