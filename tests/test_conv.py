"""The CPU convolution kernels (models/cpu_kernels/conv.py, upsample.py) through the kernel switch:
the banded and the patch-matmul weight gradients equal XLA's, and the phase-decomposed upsampling
conv equals nearest x2 + 3x3 conv, in value and in derivatives."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from artfr_jax.models import kernels as kernels_lib
from artfr_jax.models.cpu_kernels import CpuKernels, conv
from artfr_jax.models.kernels import Kernels
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


# Thresholds (min_banded_positions, max_patch_bytes) that send every convolution down one path.
WGRAD_PATHS = {"banded": (0, 0), "patches": (10**9, 10**12), "xla": (10**9, 0)}


@pytest.fixture(params=sorted(WGRAD_PATHS))
def wgrad(request) -> Kernels:
    """The CPU kernels with every weight gradient on one path."""
    banded, patch_bytes = WGRAD_PATHS[request.param]
    return Kernels("cpu", CpuKernels(min_banded_positions=banded, max_patch_bytes=patch_bytes))


def _conv(kernels: Kernels):
    return functools.partial(kernels_lib.conv_general_dilated, kernels=kernels)


def _upsample(kernels: Kernels = Kernels("cpu")):
    return functools.partial(kernels_lib.upsample2x_conv, kernels=kernels)


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
def test_weight_grad_patches_matches_xla(case):
    b, h, w, c, o, k, s, pad = case
    x, kernel = _data(b, h, w, c, o, k, seed=2)
    y, vjp = jax.vjp(
        lambda k_: lax.conv_general_dilated(x, k_, (s, s), pad, dimension_numbers=DN), kernel
    )
    dy = jnp.cos(y)
    pads = lax.padtype_to_pads(x.shape[1:3], (k, k), (s, s), pad) if isinstance(pad, str) else pad
    got = conv.weight_grad_patches(x, dy, kernel.shape, (s, s), tuple(map(tuple, pads)))
    assert got.shape == kernel.shape
    np.testing.assert_allclose(got, vjp(dy)[0], rtol=1e-4, atol=1e-4)


def test_weight_grad_path_by_size():
    """Banded from min_banded_positions on; below, the patch matmul while its patches fit in
    max_patch_bytes (the paper step's 64x64x256 level at 6 images), else XLA's."""
    opt = CpuKernels()
    assert conv.weight_grad_path(4 * 128 * 128, (3, 3, 64, 64), jnp.float32, opt) == "banded"
    assert conv.weight_grad_path(6 * 64 * 64, (3, 3, 256, 256), jnp.float32, opt) == "patches"
    assert conv.weight_grad_path(8 * 64 * 64, (3, 3, 32, 32), jnp.float32, opt) == "patches"
    assert conv.weight_grad_path(6 * 64 * 64, (3, 3, 512, 512), jnp.float32, opt) == "xla"
    assert conv.weight_grad_path(6 * 64 * 64, (3, 3, 512, 512), jnp.bfloat16, opt) == "patches"


@pytest.mark.parametrize("case", CASES)
def test_conv_values_and_gradients_match_lax(case, wgrad):
    b, h, w, c, o, k, s, pad = case
    x, kernel = _data(b, h, w, c, o, k, seed=1)
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, DN)

    def loss(fn):
        return lambda x, k_: jnp.sum(jnp.sin(fn(x, k_, (s, s), pad, dimension_numbers=dn)))

    ours, ref = loss(_conv(wgrad)), loss(lax.conv_general_dilated)
    np.testing.assert_allclose(ours(x, kernel), ref(x, kernel), rtol=1e-5)
    got_grads = jax.jit(jax.grad(ours, (0, 1)))(x, kernel)
    for got, want in zip(got_grads, jax.grad(ref, (0, 1))(x, kernel), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_banded_path_is_taken_by_the_cpu_kernels_and_only_for_plain_convs():
    x, kernel = _data(1, 8, 8, 2, 3, 3)
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, DN)
    banded = Kernels("cpu", CpuKernels(min_banded_positions=0))

    def jaxpr(kernels, **kw):
        fn = _conv(kernels)
        return str(
            jax.make_jaxpr(lambda k_: fn(x, k_, (1, 1), "SAME", dimension_numbers=dn, **kw))(kernel)
        )

    assert "custom_vjp" in jaxpr(banded)
    assert "custom_vjp" not in jaxpr(Kernels("xla", banded.cpu))
    assert "custom_vjp" not in jaxpr(banded, rhs_dilation=(2, 2))


def test_convs_with_too_many_patches_keep_xla_weight_gradient():
    x, kernel = _data(1, 8, 8, 2, 3, 3)
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, DN)

    def jaxpr(**options):
        fn = _conv(Kernels("cpu", CpuKernels(min_banded_positions=8 * 8 + 1, **options)))
        return str(
            jax.make_jaxpr(lambda k_: fn(x, k_, (1, 1), "SAME", dimension_numbers=dn))(kernel)
        )

    assert "custom_vjp" in jaxpr()  # 8x8 positions: patches
    assert "custom_vjp" not in jaxpr(max_patch_bytes=8 * 8 * 9 * 2 * 4 - 1)


def test_second_order_gradients_match_lax(wgrad):
    """R1 penalties differentiate the input gradient of a discriminator again."""
    x, kernel = _data(2, 8, 8, 3, 4, 3)
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, DN)

    def r1(k_, fn):
        g = jax.grad(
            lambda x_: jnp.sum(jnp.tanh(fn(x_, k_, (1, 1), "SAME", dimension_numbers=dn)))
        )(x)
        return jnp.sum(g**2)

    np.testing.assert_allclose(
        jax.grad(r1)(kernel, _conv(wgrad)),
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


def _upsample_then_conv(x, kernel):
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return lax.conv_general_dilated(up, kernel, (1, 1), "SAME", dimension_numbers=DN)


@pytest.mark.parametrize("mode", ["cpu", "xla"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 4), (1, 8, 8, 6, 2), (1, 1, 3, 2, 5)])
def test_upsample2x_conv_equals_upsample_then_conv(shape, mode):
    """The four 2x2 phase convolutions (CPU) and XLA's nearest x2 + conv equal nearest x2 + 3x3
    SAME conv, with their gradients."""
    b, h, w, c, o = shape
    x, kernel = _data(b, h, w, c, o, 3, seed=h)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal((b, 2 * h, 2 * w, o)), jnp.float32)
    up = _upsample(Kernels(mode))
    ours = lambda x_, k_: up(x_, k_, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
    np.testing.assert_allclose(
        ours(x, kernel), _upsample_then_conv(x, kernel), rtol=1e-5, atol=1e-5
    )
    loss = lambda f: lambda x_, k_: jnp.sum(f(x_, k_) * cot)  # noqa: E731
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, kernel)
    g_ref = jax.grad(loss(_upsample_then_conv), argnums=(0, 1))(x, kernel)
    for a, r in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 4), (1, 8, 8, 6, 2)])
def test_upsample2x_conv_as_winograd_equals_upsample_then_conv(shape):
    """With the thresholds lowered, the phase convolution and its input gradient run as Winograd
    F(4x4, 2x2): no convolution is left in the forward, values and gradients are unchanged."""
    all_sizes = CpuKernels(upsample_min_sizes=((0, 1),), upsample_grad_min_sizes=((0, 1),))
    b, h, w, c, o = shape
    x, kernel = _data(b, h, w, c, o, 3, seed=w)
    cot = jnp.asarray(np.random.default_rng(2).standard_normal((b, 2 * h, 2 * w, o)), jnp.float32)
    up = _upsample(Kernels("cpu", all_sizes))
    ours = lambda x_, k_: up(x_, k_, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
    assert "conv_general_dilated" not in str(jax.make_jaxpr(ours)(x, kernel))
    y, ref = jax.jit(ours)(x, kernel), _upsample_then_conv(x, kernel)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    assert float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)) < 1e-5
    loss = lambda f: lambda x_, k_: jnp.sum(f(x_, k_) * cot)  # noqa: E731
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, kernel)
    g_ref = jax.grad(loss(_upsample_then_conv), argnums=(0, 1))(x, kernel)
    for a, r in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


def test_upsample2x_conv_default_thresholds():
    """The paper decoders' large upsamplings take Winograd; the small configurations do not."""

    def uses_winograd(shape, channels):
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        k = jax.ShapeDtypeStruct((3, 3, shape[-1], channels), jnp.float32)
        fn = lambda x_, k_: _upsample()(x_, k_, dimension_numbers=DN)  # noqa: E731
        return "conv_general_dilated" not in str(jax.make_jaxpr(fn)(x, k))

    assert uses_winograd((1, 256, 256, 128), 128)
    assert uses_winograd((1, 64, 64, 256), 256)
    assert not uses_winograd((1, 16, 16, 512), 512)
    assert not uses_winograd((2, 8, 8, 64), 64)
    assert not uses_winograd((1, 256, 256, 128), 3)


def test_upsample2x_conv_rejects_other_convolutions():
    x, kernel = _data(1, 4, 4, 2, 2, 3)
    with pytest.raises(ValueError, match="3x3 NHWC/HWIO kernel, stride 1, SAME"):
        _upsample()(x, kernel, (2, 2), "SAME", dimension_numbers=DN)
    with pytest.raises(ValueError, match=r"got kernel \(1, 1, 2, 2\)"):
        _upsample()(x, kernel[:1, :1], (1, 1), "SAME", dimension_numbers=DN)


def test_upsample_module_keeps_conv_parameters():
    """``Upsample`` keeps the parameters of nearest x2 + ``nn.Conv`` (checkpoints and converters)."""
    from artfr_jax.models.layers import Upsample

    x, _ = _data(2, 4, 6, 3, 5, 3)
    params = Upsample(out_channels=5).init(jax.random.key(0), x)
    ref = nn.Conv(5, (3, 3))
    assert jax.tree.structure(params["params"]["conv"]) == jax.tree.structure(
        ref.init(jax.random.key(0), x)["params"]
    )
    p = params["params"]["conv"]
    p = {"kernel": p["kernel"], "bias": jnp.arange(5.0)}
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(
        Upsample(out_channels=5).apply({"params": {"conv": p}}, x),
        ref.apply({"params": p}, up),
        rtol=1e-5,
        atol=1e-5,
    )


def test_upsample2x_conv_with_preferred_element_type():
    """bfloat16 operands with a float32 result (``preferred_element_type``), gradients included."""
    x, kernel = _data(1, 4, 5, 3, 2, 3)
    xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    f = lambda x_, k_: _upsample()(  # noqa: E731
        x_, k_, dimension_numbers=DN, preferred_element_type=jnp.float32
    )
    assert f(xb, kb).dtype == jnp.float32
    ref = _upsample_then_conv(xb.astype(jnp.float32), kb.astype(jnp.float32))
    np.testing.assert_allclose(f(xb, kb), ref, rtol=2e-2, atol=5e-2)
    gx, gk = jax.grad(lambda x_, k_: jnp.sum(f(x_, k_)), argnums=(0, 1))(xb, kb)
    assert gx.dtype == gk.dtype == jnp.bfloat16
    rx, rk = jax.grad(lambda x_, k_: jnp.sum(_upsample_then_conv(x_, k_)), argnums=(0, 1))(
        xb.astype(jnp.float32), kb.astype(jnp.float32)
    )
    np.testing.assert_allclose(gx.astype(jnp.float32), rx, rtol=2e-2, atol=1e-1)
    np.testing.assert_allclose(gk.astype(jnp.float32), rk, rtol=2e-2, atol=1e-1)
