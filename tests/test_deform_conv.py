"""Modulated deformable convolution (DCNv2): against plain convolution, shifted convolution, a
slow loop-by-loop NumPy reference of torchvision's bilinear convention, and finite differences."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from artfr_jax.models.deform_conv import ModulatedDeformConv, deform_conv2d, output_size

HIGHEST = lax.Precision.HIGHEST


def _dcn(*args, **kwargs):
    """``deform_conv2d`` under one jit (eager op-by-op dispatch would dominate the test time)."""
    return jax.jit(lambda *a: deform_conv2d(*a, **kwargs))(*args)


def _conv(x, kernel, stride, padding, dilation):
    return lax.conv_general_dilated(
        x,
        kernel,
        stride,
        [(padding[0], padding[0]), (padding[1], padding[1])],
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=HIGHEST,
    )


def _bilinear(img: np.ndarray, y: float, x: float) -> np.ndarray:
    """torchvision's ``bilinear_interpolate``: zero outside (-1, H) x (-1, W), else the in-image
    corners weighted bilinearly (out-of-image corners contribute nothing)."""
    h, w, c = img.shape
    if y <= -1 or y >= h or x <= -1 or x >= w:
        return np.zeros(c)
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    out = np.zeros(c)
    for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[yy, xx]
    return out


def _reference(x, offset, mask, kernel, bias, stride, padding, dilation, groups):
    """DCNv2 with explicit loops over batch, output pixels, groups and taps (float64)."""
    x, offset, mask, kernel = (np.asarray(a, np.float64) for a in (x, offset, mask, kernel))
    b, h, w, cin = x.shape
    kh, kw, _, cout = kernel.shape
    ntap = kh * kw
    cg = cin // groups
    ho = output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = output_size(w, kw, stride[1], padding[1], dilation[1])
    out = np.zeros((b, ho, wo, cout))
    for n in range(b):
        for oy in range(ho):
            for ox in range(wo):
                acc = np.array(bias, np.float64) if bias is not None else np.zeros(cout)
                for g in range(groups):
                    img = x[n, :, :, g * cg : (g + 1) * cg]
                    for i in range(kh):
                        for j in range(kw):
                            t = i * kw + j
                            dy = offset[n, oy, ox, 2 * (g * ntap + t)]
                            dx = offset[n, oy, ox, 2 * (g * ntap + t) + 1]
                            y = oy * stride[0] - padding[0] + i * dilation[0] + dy
                            xx = ox * stride[1] - padding[1] + j * dilation[1] + dx
                            v = mask[n, oy, ox, g * ntap + t] * _bilinear(img, y, xx)
                            acc += v @ kernel[i, j, g * cg : (g + 1) * cg]
                out[n, oy, ox] = acc
    return out


def _inputs(rng, b, h, w, cin, cout, ksize, stride, padding, dilation, groups):
    kh, kw = ksize
    ho = output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = output_size(w, kw, stride[1], padding[1], dilation[1])
    x = rng.normal(size=(b, h, w, cin)).astype(np.float32)
    kernel = rng.normal(size=(kh, kw, cin, cout)).astype(np.float32)
    bias = rng.normal(size=(cout,)).astype(np.float32)
    return x, kernel, bias, ho, wo


CONV_CASES = [
    # ksize, stride, padding, dilation, groups
    ((3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((3, 3), (2, 2), (1, 1), (1, 1), 2),
    ((3, 3), (1, 1), (2, 2), (2, 2), 4),
    ((2, 3), (2, 1), (0, 2), (1, 2), 4),
    ((1, 1), (1, 1), (0, 0), (1, 1), 8),
]


@pytest.mark.parametrize("ksize,stride,padding,dilation,groups", CONV_CASES)
def test_zero_offsets_equal_conv(ksize, stride, padding, dilation, groups):
    rng = np.random.default_rng(0)
    x, kernel, bias, ho, wo = _inputs(rng, 2, 7, 8, 8, 5, ksize, stride, padding, dilation, groups)
    ntap = ksize[0] * ksize[1]
    offset = jnp.zeros((2, ho, wo, groups * ntap * 2))
    want = _conv(x, kernel, stride, padding, dilation)
    kw = dict(stride=stride, padding=padding, dilation=dilation, offset_groups=groups)
    got = _dcn(x, offset, None, kernel, precision=HIGHEST, **kw)
    assert got.shape == want.shape == (2, ho, wo, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ones = jnp.ones((2, ho, wo, groups * ntap))
    got = _dcn(x, offset, ones, kernel, bias, precision=HIGHEST, **kw)
    np.testing.assert_allclose(got, want + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [(1, -2), (-3, 0), (2, 5)])
def test_integer_offsets_equal_shifted_conv(shift):
    """Offset (dy, dx) on every tap = convolution of the zero-extended image read at
    (y + dy, x + dx), i.e. a VALID conv over the shifted window of the zero-padded image."""
    dy, dx = shift
    rng = np.random.default_rng(1)
    pad, groups = (1, 1), 2
    x, kernel, _, ho, wo = _inputs(rng, 2, 6, 7, 4, 3, (3, 3), (1, 1), pad, (1, 1), groups)
    offset = np.zeros((2, ho, wo, groups * 9, 2), np.float32)
    offset[..., 0], offset[..., 1] = dy, dx
    got = _dcn(
        x, offset.reshape(2, ho, wo, -1), None, kernel, offset_groups=groups, precision=HIGHEST
    )
    big = 8
    xp = np.pad(x, ((0, 0), (big, big), (big, big), (0, 0)))
    y0, x0 = big - pad[0] + dy, big - pad[1] + dx
    window = xp[:, y0 : y0 + ho + 2, x0 : x0 + wo + 2]
    want = _conv(window, kernel, (1, 1), (0, 0), (1, 1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and it is not the unshifted conv
    assert np.abs(np.asarray(got) - np.asarray(_conv(x, kernel, (1, 1), pad, (1, 1)))).max() > 0.1


def test_samples_outside_read_zero():
    rng = np.random.default_rng(2)
    x, kernel, bias, ho, wo = _inputs(rng, 2, 5, 5, 4, 3, (3, 3), (1, 1), (1, 1), (1, 1), 2)
    far = np.array([1e4, -1e4, 1e6, -1e30, 5.0 + 1.0, -2.0])  # 6 and -2 leave a 5x5 image
    offset = rng.choice(far, size=(2, ho, wo, 2 * 9 * 2)).astype(np.float32)
    offset[..., ::2] = np.sign(offset[..., ::2]) * 1e5  # every row offset far outside
    mask = rng.uniform(size=(2, ho, wo, 2 * 9)).astype(np.float32)
    args = (jnp.asarray(x), jnp.asarray(offset), jnp.asarray(mask), jnp.asarray(kernel))
    y = _dcn(*args, bias, offset_groups=2)
    np.testing.assert_array_equal(y, np.broadcast_to(bias, y.shape))
    grads = jax.jit(
        jax.grad(
            lambda *a: jnp.sum(deform_conv2d(*a, bias, offset_groups=2) ** 2), argnums=(0, 1, 2, 3)
        )
    )(*args)
    for grad in grads:
        assert np.all(np.isfinite(grad))
        np.testing.assert_array_equal(grad, 0.0)


def _random_offsets(rng, b, ho, wo, groups, ksize, stride, padding, dilation, h, w):
    """Offsets whose sample positions mix interior fractional points, points in the border strips
    (-1, 0) and (H-1, H), exact grid points and points outside the image."""
    kh, kw = ksize
    ntap = kh * kw
    oy = np.arange(ho)[:, None, None, None] * stride[0] - padding[0]
    ox = np.arange(wo)[None, :, None, None] * stride[1] - padding[1]
    ty = (np.arange(ntap) // kw * dilation[0])[None, None, None, :]
    tx = (np.arange(ntap) % kw * dilation[1])[None, None, None, :]
    base_y = np.broadcast_to(oy + ty, (ho, wo, groups, ntap))
    base_x = np.broadcast_to(ox + tx, (ho, wo, groups, ntap))

    def targets(size, n):
        kind = rng.integers(0, 5, size=n)
        return np.select(
            [kind == 0, kind == 1, kind == 2, kind == 3],
            [
                rng.uniform(-0.999, 0.0, n),  # strip above / left of the image
                rng.uniform(size - 1, size - 0.001, n),  # strip below / right
                rng.integers(-2, size + 2, n).astype(np.float64),  # grid points, some outside
                rng.uniform(-4.0, size + 3.0, n),  # anywhere, often outside
            ],
            rng.uniform(0.0, size - 1.0, n),  # interior
        )

    n = b * ho * wo * groups * ntap
    py = targets(h, n).reshape(b, ho, wo, groups, ntap)
    px = targets(w, n).reshape(b, ho, wo, groups, ntap)
    off = np.stack([py - base_y, px - base_x], axis=-1)
    return off.reshape(b, ho, wo, groups * ntap * 2).astype(np.float32)


REF_CASES = [
    # ksize, stride, padding, dilation, groups, cin
    ((3, 3), (1, 1), (1, 1), (1, 1), 1, 4),
    ((3, 3), (2, 2), (1, 1), (1, 1), 4, 8),
    ((3, 3), (1, 1), (2, 2), (2, 2), 4, 8),
    ((2, 3), (2, 1), (0, 1), (1, 2), 2, 4),
]


@pytest.mark.parametrize("ksize,stride,padding,dilation,groups,cin", REF_CASES)
def test_matches_loop_reference(ksize, stride, padding, dilation, groups, cin):
    rng = np.random.default_rng(3)
    h, w = 6, 7
    x, kernel, bias, ho, wo = _inputs(
        rng, 2, h, w, cin, 3, ksize, stride, padding, dilation, groups
    )
    offset = _random_offsets(rng, 2, ho, wo, groups, ksize, stride, padding, dilation, h, w)
    mask = rng.uniform(size=(2, ho, wo, groups * ksize[0] * ksize[1])).astype(np.float32)
    kw = dict(stride=stride, padding=padding, dilation=dilation, offset_groups=groups)
    got = jax.jit(lambda *a: deform_conv2d(*a, precision=HIGHEST, **kw))(
        x, offset, mask, kernel, bias
    )
    want = _reference(x, offset, mask, kernel, bias, stride, padding, dilation, groups)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the offsets matter: the result is far from the plain convolution
    plain = np.asarray(_conv(x, kernel, stride, padding, dilation)) + bias
    assert np.abs(want - plain).max() > 1.0


def test_gradients_match_finite_differences():
    """Central differences in float64 for every entry of x, offset, mask and kernel. Sample
    positions keep fractional parts in [0.2, 0.8], away from the grid lines (and from -1 and H)
    where bilinear interpolation has kinks; some lie in the border strips and outside."""
    rng = np.random.default_rng(4)
    b, h, w, cin, cout, groups = 1, 4, 5, 4, 3, 2
    with jax.enable_x64(True):
        x = rng.normal(size=(b, h, w, cin))
        kernel = rng.normal(size=(3, 3, cin, cout))
        bias = rng.normal(size=(cout,))
        offset = rng.integers(-3, 4, size=(b, h, w, groups * 18)) + rng.uniform(
            0.2, 0.8, size=(b, h, w, groups * 18)
        )
        mask = rng.uniform(0.1, 1.0, size=(b, h, w, groups * 9))
        ct = rng.normal(size=(b, h, w, cout))
        args = tuple(jnp.asarray(a, jnp.float64) for a in (x, offset, mask, kernel))

        def loss(*a):
            return jnp.sum(deform_conv2d(*a, bias, offset_groups=groups, precision=HIGHEST) * ct)

        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
        eps = 1e-6
        for idx, (arg, grad) in enumerate(zip(args, grads, strict=True)):
            assert grad.dtype == jnp.float64
            basis = jnp.eye(arg.size, dtype=jnp.float64).reshape((arg.size,) + arg.shape)

            def along(direction, idx=idx):
                def f(step):
                    moved = list(args)
                    moved[idx] = args[idx] + step * direction
                    return loss(*moved)

                return (f(eps) - f(-eps)) / (2 * eps)

            numeric = jax.jit(jax.vmap(along))(basis).reshape(arg.shape)
            np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7, err_msg=f"arg {idx}")
            assert np.abs(np.asarray(grad)).max() > 1e-3  # non-trivial gradients


@pytest.mark.parametrize("with_mask", [True, False])
def test_chunks_of_rows_change_nothing(with_mask):
    """The layer runs in chunks of output rows (``max_points``): one row per chunk, two rows with
    the last chunk padded (Ho = 5 is odd), and one piece give the same output and the same
    gradients for every input, the chunk seams and padded rows included (strided, dilated)."""
    rng = np.random.default_rng(9)
    ksize, stride, padding, dilation, groups = (3, 3), (2, 1), (2, 1), (2, 1), 2
    b, h, w = 2, 9, 6
    x, kernel, bias, ho, wo = _inputs(rng, b, h, w, 4, 3, ksize, stride, padding, dilation, groups)
    assert ho == 5
    offset = _random_offsets(rng, b, ho, wo, groups, ksize, stride, padding, dilation, h, w)
    mask = rng.uniform(size=(b, ho, wo, groups * 9)).astype(np.float32) if with_mask else None
    ct = rng.normal(size=(b, ho, wo, 3)).astype(np.float32)
    per_row = b * wo * 9 * groups

    def run(max_points):
        def loss(x, offset, mask, kernel, bias):
            y = deform_conv2d(
                x, offset, mask, kernel, bias, stride=stride, padding=padding, dilation=dilation,
                offset_groups=groups, precision=HIGHEST, max_points=max_points,
            )  # fmt: skip
            return jnp.sum(y * ct), y

        argnums = (0, 1, 2, 3, 4) if with_mask else (0, 1, 3, 4)
        return jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(x, offset, mask, kernel, bias)

    whole_grads, whole = run(10**9)
    assert np.abs(np.asarray(whole)).max() > 1.0
    for max_points in (1, per_row, 2 * per_row + 1):
        grads, y = run(max_points)
        np.testing.assert_allclose(y, whole, rtol=1e-5, atol=1e-5, err_msg=str(max_points))
        for i, (g, want) in enumerate(zip(grads, whole_grads, strict=True)):
            assert np.abs(np.asarray(want)).max() > 1e-3
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-4, err_msg=f"{max_points} {i}")


def test_bfloat16_close_to_float32():
    rng = np.random.default_rng(5)
    x, kernel, bias, ho, wo = _inputs(rng, 2, 6, 6, 8, 4, (3, 3), (1, 1), (1, 1), (1, 1), 4)
    offset = jnp.asarray(2 * rng.normal(size=(2, ho, wo, 4 * 18)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(2, ho, wo, 4 * 9)), jnp.float32)
    y32 = _dcn(x, offset, mask, kernel, bias, offset_groups=4, precision=HIGHEST)
    xb, kb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
    y16 = _dcn(xb, offset, mask, kb, bias, offset_groups=4)
    assert y16.dtype == jnp.bfloat16
    scale = float(jnp.abs(y32).max())
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.02 * scale)
    gx, go = jax.jit(
        jax.grad(
            lambda x, o: jnp.sum(
                deform_conv2d(x, o, mask, kb, offset_groups=4).astype(jnp.float32)
            ),
            argnums=(0, 1),
        )
    )(xb, offset)
    assert gx.dtype == jnp.bfloat16 and go.dtype == jnp.float32
    gx32, go32 = jax.jit(
        jax.grad(
            lambda x, o: jnp.sum(deform_conv2d(x, o, mask, kernel, offset_groups=4)), argnums=(0, 1)
        )
    )(jnp.asarray(x), offset)
    for g16, g32 in ((gx, gx32), (go, go32)):
        tol = 0.03 * float(jnp.abs(g32).max())
        np.testing.assert_allclose(np.asarray(g16, np.float32), g32, atol=tol)


def test_module_params_and_equivalence():
    rng = np.random.default_rng(6)
    layer = ModulatedDeformConv(features=6, offset_groups=2, strides=(2, 2), dilation=(1, 2))
    x = jnp.asarray(rng.normal(size=(2, 9, 8, 4)), jnp.float32)
    ho, wo = output_size(9, 3, 2, 1, 1), output_size(8, 3, 2, 1, 2)
    offset = jnp.asarray(rng.normal(size=(2, ho, wo, 2 * 9 * 2)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(2, ho, wo, 2 * 9)), jnp.float32)
    params = jax.jit(layer.init)(jax.random.key(0), x, offset, mask)["params"]
    assert {k: v.shape for k, v in params.items()} == {"kernel": (3, 3, 4, 6), "bias": (6,)}
    bound = 1 / math.sqrt(3 * 3 * 4)  # DCNv2's uniform(+-1/sqrt(fan_in)) init
    assert float(jnp.abs(params["kernel"]).max()) <= bound
    assert float(jnp.abs(params["kernel"]).max()) > 0.5 * bound
    np.testing.assert_array_equal(params["bias"], 0.0)
    params = {**params, "bias": jnp.arange(6.0)}
    y = jax.jit(layer.apply)({"params": params}, x, offset, mask)
    want = _dcn(
        x,
        offset,
        mask,
        params["kernel"],
        params["bias"],
        stride=(2, 2),
        dilation=(1, 2),
        offset_groups=2,
    )
    assert y.shape == (2, ho, wo, 6)
    np.testing.assert_array_equal(y, want)
    y_nomask = jax.jit(layer.apply)({"params": params}, x, offset)
    want = _dcn(
        x,
        offset,
        None,
        params["kernel"],
        params["bias"],
        stride=2,
        dilation=(1, 2),
        offset_groups=2,
    )
    np.testing.assert_array_equal(y_nomask, want)

    nobias = ModulatedDeformConv(features=3, use_bias=False, dtype=jnp.bfloat16)
    x1 = x[:, :4, :4]
    off1 = jnp.zeros((2, 4, 4, 18))
    p = jax.jit(nobias.init)(jax.random.key(1), x1, off1)["params"]
    assert set(p) == {"kernel"} and p["kernel"].dtype == jnp.float32
    y = jax.jit(nobias.apply)({"params": p}, x1, off1)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(y, np.float32), _conv(x1, p["kernel"], (1, 1), (1, 1), (1, 1)), atol=0.05
    )


def test_module_gradients_reach_all_inputs():
    rng = np.random.default_rng(7)
    layer = ModulatedDeformConv(features=4, offset_groups=2)
    x = jnp.asarray(rng.normal(size=(1, 5, 5, 4)), jnp.float32)
    offset = jnp.asarray(rng.normal(size=(1, 5, 5, 36)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(1, 5, 5, 18)), jnp.float32)
    params = jax.jit(layer.init)(jax.random.key(0), x, offset, mask)["params"]
    grads = jax.jit(
        jax.grad(lambda p, *a: jnp.sum(layer.apply({"params": p}, *a) ** 2), argnums=(0, 1, 2, 3))
    )(params, x, offset, mask)
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(leaf)) and np.abs(leaf).max() > 0


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(offset=np.zeros((1, 5, 5, 17))), "offset must be"),
        (dict(mask=np.zeros((1, 5, 5, 8))), "mask must be"),
        (dict(kernel=np.zeros((3, 3, 5, 2))), "input channels"),
        (dict(offset_groups=3), "offset_groups=3 must divide"),
        (dict(bias=np.zeros(3)), "bias must be"),
        (dict(stride=(0, 1)), "stride"),
        (dict(padding=(1, 1, 1)), "padding must be"),
        (dict(x=np.zeros((5, 5, 4))), "x must be"),
        (dict(max_points=0), "max_points must be >= 1"),
    ],
)
def test_bad_inputs_raise(change, match):
    args = dict(
        x=np.zeros((1, 5, 5, 4), np.float32),
        offset=np.zeros((1, 5, 5, 18), np.float32),
        mask=np.zeros((1, 5, 5, 9), np.float32),
        kernel=np.zeros((3, 3, 4, 2), np.float32),
        bias=np.zeros(2, np.float32),
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        deform_conv2d(
            args.pop("x"), args.pop("offset"), args.pop("mask"), args.pop("kernel"), **args
        )


def test_reference_is_itself_sensible():
    """The loop reference (the oracle above) reproduces plain convolution at zero offsets and
    puts a half-pixel sample halfway between two pixels."""
    rng = np.random.default_rng(8)
    x, kernel, bias, ho, wo = _inputs(rng, 1, 4, 5, 2, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    ref = _reference(x, np.zeros((1, ho, wo, 18)), np.ones((1, ho, wo, 9)), kernel, bias,
                     (1, 1), (1, 1), (1, 1), 1)  # fmt: skip
    np.testing.assert_allclose(ref, np.asarray(_conv(x, kernel, (1, 1), (1, 1), (1, 1))) + bias,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    img = x[0].astype(np.float64)
    for y, xx in itertools.product([0.5, 2.5], [1.5, 3.5]):
        want = (img[int(y - 0.5)] + img[int(y + 0.5)]) / 2
        want = (want[int(xx - 0.5)] + want[int(xx + 0.5)]) / 2
        np.testing.assert_allclose(_bilinear(img, y, xx), want, rtol=1e-12)
    np.testing.assert_allclose(_bilinear(img, -0.5, 0.0), 0.5 * img[0, 0], rtol=1e-12)
