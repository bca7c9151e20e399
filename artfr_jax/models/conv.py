"""The models' 2-D convolutions: on the CPU, weight gradients in row bands or as patch matmuls,
and Winograd.

``conv_general_dilated`` is a drop-in for ``lax.conv_general_dilated`` (flax ``nn.Conv`` takes it as
its ``conv_general_dilated`` field; parameters and results are unchanged). On accelerators, and for
any convolution other than a plain NHWC/HWIO one, it *is* ``lax.conv_general_dilated``.

Why: for ``dL/dw`` XLA emits one convolution whose window is the whole output image and whose
contraction runs over batch x height x width. XLA:CPU's kernel for that shape slows down sharply as
the contraction grows: at 512 px its weight gradients took 5x torch's time and made a VQGAN training
step 2.3x slower than diffusers' (``benchmarks/vqgan_vs_diffusers.py``), while its forward and
input-gradient convolutions run at about torch's speed. Here the weight gradient of a large
convolution is a sum over bands of output rows, each band a small convolution in XLA:CPU's native
NHWC/HWIO layout, looped with ``lax.scan`` so the program stays small; that of a smaller one is one
matmul of the input's patches against ``dy`` (``weight_grad_path``); 1x1 convolutions are matmuls
over channels. ``benchmarks/conv_weight_grad.py`` times the three weight gradients per shape.

Stride-1 'SAME' 3x3 convolutions on large enough float32 images run their forward and both
gradients as Winograd F(4x4, 3x3) on the CPU (``models/winograd.py``; ``USE_WINOGRAD``), with a
quarter of the multiply-adds: 1.2-1.8x faster than XLA:CPU's direct convolution at 64-512 px
(F(2x2, 3x3) where few positions meet many channels, ``winograd.SMALL_TILE``).

``upsample2x_conv`` is nearest x2 upsampling followed by a 3x3 convolution (the decoders'
``Upsample``) computed on the input's own grid, with 4/9 of the multiply-adds; on the CPU, large
enough ones run that 2x2 convolution as Winograd F(4x4, 2x2) (``winograd.MIN_SIZES_2X2``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from artfr_jax.models import winograd

# Rows per band are chosen so that one band contracts over about this many (batch, row, column)
# positions; XLA:CPU's weight-gradient kernel is fastest from roughly 1k to 4k of them.
BAND_POSITIONS = 2048
# Below this many output positions (batch x height x width) the weight gradient is not banded:
# there the scan's per-band overhead dominates (2x128x128 was about even with XLA's own kernel,
# 1x256x256 3.7x faster banded). It is one matmul of x's patches instead (``weight_grad_patches``).
MIN_BANDED_POSITIONS = 65536
# ... as long as the patches, ``positions x kh kw C`` floats, take at most this many bytes; larger
# ones keep XLA's weight gradient. XLA:CPU's kernel ran at 15-40 GFLOP/s below the banded sizes,
# the patch matmul at 60-120; ``benchmarks/conv_weight_grad.py`` times the three per shape.
MAX_PATCH_BYTES = 256 * 2**20

_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))

# On the CPU, 'SAME' 3x3 convolutions run as Winograd F(4x4, 3x3) where ``_winograd_applies``; read
# when a function is traced (benchmarks switch it off to time the direct convolution).
USE_WINOGRAD = True


def _is_nhwc_hwio(dimension_numbers, ndim: int) -> bool:
    if ndim != 4:
        return False
    if dimension_numbers is None:
        return False
    dn = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, dimension_numbers)
    return (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == _NHWC


def banded_backend() -> bool:
    """Whether convolutions take the banded weight gradient (the default backend is the CPU)."""
    return jax.default_backend() == "cpu"


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` with a banded weight gradient on the CPU (module docstring)."""
    kwargs = dict(
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    plain = (
        not banded_backend()
        or not _is_nhwc_hwio(dimension_numbers, lhs.ndim)
        or feature_group_count != 1
        or batch_group_count != 1
        or any(d != 1 for d in (lhs_dilation or ()))
        or any(d != 1 for d in (rhs_dilation or ()))
        or preferred_element_type is not None
    )
    if plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if rhs.shape[:2] == (1, 1) and strides == (1, 1) and pads == ((0, 0), (0, 0)):
        # A 1x1 convolution is a matmul over channels; XLA:CPU runs it (and its gradients) as one,
        # 4-10x faster than as a convolution at 512 px.
        return lax.dot_general(lhs, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision)
    out_h = (lhs.shape[1] + sum(pads[0]) - rhs.shape[0]) // strides[0] + 1
    out_w = (lhs.shape[2] + sum(pads[1]) - rhs.shape[1]) // strides[1] + 1
    positions = lhs.shape[0] * out_h * out_w
    fast = _winograd_applies(lhs, rhs, strides, pads, positions)
    wgrad = weight_grad_path(positions, rhs.shape, lhs.dtype)
    if not fast and wgrad == "xla":
        return lax.conv_general_dilated(lhs, rhs, strides, pads, **kwargs)
    return _conv(lhs, rhs, strides, pads, precision, fast, wgrad)


def weight_grad_path(positions: int, w_shape: Sequence[int], dtype) -> str:
    """How the CPU computes ``dL/dw``: ``"banded"`` (``weight_grad``), ``"patches"``
    (``weight_grad_patches``) or ``"xla"`` (XLA's transpose of the convolution)."""
    if positions >= MIN_BANDED_POSITIONS:
        return "banded"
    kh, kw, c = (int(d) for d in w_shape[:3])
    patch_bytes = positions * kh * kw * c * jnp.dtype(dtype).itemsize
    return "patches" if patch_bytes <= MAX_PATCH_BYTES else "xla"


def _winograd_applies(x, w, strides, pads, positions: int) -> bool:
    """Whether the forward and both gradients run as Winograd (``models/winograd.conv3x3``)."""
    return (
        USE_WINOGRAD
        and w.shape[:2] == (3, 3)
        and strides == (1, 1)
        and pads == ((1, 1), (1, 1))
        and x.dtype == w.dtype == jnp.float32
        and winograd.applies_to(positions, min(w.shape[2:]))
    )


def _plain(x, w, strides, pads, precision):
    return lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv(x, w, strides, pads, precision, fast, wgrad):
    """The convolution; ``fast``: Winograd forward and gradients (a 'SAME' 3x3); else ``wgrad``:
    the weight gradient's path (``weight_grad_path``)."""
    if fast:
        return winograd.conv3x3(x, w, precision)
    return _plain(x, w, strides, pads, precision)


def _conv_fwd(x, w, strides, pads, precision, fast, wgrad):
    return _conv(x, w, strides, pads, precision, fast, wgrad), (x, w)


def _conv_bwd(strides, pads, precision, fast, wgrad, res, dy):
    x, w = res
    if fast:
        dx = winograd.conv3x3_input_grad(dy, w, precision)
    else:
        (dx,) = jax.linear_transpose(
            lambda x_: _plain(x_, w, strides, pads, precision),
            jax.ShapeDtypeStruct(x.shape, x.dtype),
        )(dy)
    if fast:
        dw = winograd.conv3x3_weight_grad(x, dy, precision)
    elif wgrad == "banded":
        dw = weight_grad(x, dy, w.shape, strides, pads, precision)
    elif wgrad == "patches":
        dw = weight_grad_patches(x, dy, w.shape, strides, pads, precision)
    else:
        (dw,) = jax.linear_transpose(
            lambda w_: _plain(x, w_, strides, pads, precision),
            jax.ShapeDtypeStruct(w.shape, w.dtype),
        )(dy)
    return dx, dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def weight_grad_patches(
    x: jax.Array,
    dy: jax.Array,
    w_shape: Sequence[int],
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
    precision: Any = None,
) -> jax.Array:
    """``dL/dw`` of ``y = conv(x, w)`` (NHWC/HWIO) as one matmul over all output positions:
    ``dw[(i, j, c), o] = sum_{n, h, v} P[n, h, v, (i, j, c)] dy[n, h, v, o]`` with the patches
    ``P[n, h, v, (i, j, c)] = x_pad[n, s h + i, s v + j, c]`` (kh kw strided slices of the padded
    ``x``, side by side). Shapes: ``x [B, H, W, C]``, ``dy [B, Ho, Wo, O]`` -> ``[kh, kw, C, O]``.
    """
    kh, kw = int(w_shape[0]), int(w_shape[1])
    (sh, sw), (b, ho, wo, o) = strides, dy.shape
    c = x.shape[-1]
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    patches = jnp.concatenate(
        [
            lax.slice(
                xp,
                (0, i, j, 0),
                (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                (1, sh, sw, 1),
            )
            for i in range(kh)
            for j in range(kw)
        ],
        axis=-1,
    )
    dw = lax.dot_general(
        patches,
        dy,
        (((0, 1, 2), (0, 1, 2)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.promote_types(x.dtype, jnp.float32),
    )
    return dw.reshape(kh, kw, c, o)


def band_rows(batch: int, out_height: int, out_width: int) -> int:
    """Output rows per band: about ``BAND_POSITIONS`` contracted positions, at least one row."""
    return max(1, min(out_height, BAND_POSITIONS // max(1, batch * out_width)))


def weight_grad(
    x: jax.Array,
    dy: jax.Array,
    w_shape: Sequence[int],
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
    precision: Any = None,
    rows: int | None = None,
) -> jax.Array:
    """``dL/dw`` of ``y = conv(x, w)`` (NHWC/HWIO) as a sum over bands of ``rows`` output rows.

    Each band is ``dw_b[i, j, c, o] = sum_{n, h, v} x_pad[n, s*h + i, s*v + j, c] * dy[n, h, v, o]``
    over its rows ``h``: a convolution of a slice of ``x`` (channels as its batch, the batch as
    its features) with ``dy`` as the kernel, dilated by the stride. The zero padding of ``x`` is
    the band convolution's own padding, so neither ``x`` nor ``dy`` is copied whole (XLA:CPU pads
    and transposes at about 1 GB/s). Bands away from the borders run in one ``lax.scan``; the
    border bands, with their own padding, and a last partial band are unrolled.
    Shapes: ``x [B, H, W, C]``, ``dy [B, Ho, Wo, O]`` -> ``[kh, kw, C, O]``.
    """
    kh, kw = int(w_shape[0]), int(w_shape[1])
    sh, sw = strides
    (pt, _), (pl, _) = pads
    h = x.shape[1]
    b, ho, wo, o = dy.shape
    rows = min(ho, rows or band_rows(b, ho, wo))
    # Columns of x that the kernel reaches: [-pl, -pl + (wo - 1) * sw + kw); outside is padding.
    if pl < 0:
        x, pl = x[:, :, -pl:], 0
    cols = (wo - 1) * sw + kw - pl
    x = x[:, :, :cols]
    col_pads = (pl, cols - x.shape[2])
    dyt = dy.transpose(1, 2, 0, 3)  # [Ho, Wo, B, O]: a kernel with B inputs and O outputs
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)

    def band(xs, ds, row_pads):
        # xs [B, r, cols, C] -> [C, r, cols, B]: channels as batch, batch as features.
        return lax.conv_general_dilated(
            xs.transpose(3, 1, 2, 0),
            ds,
            (1, 1),
            (row_pads, col_pads),
            rhs_dilation=(sh, sw),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=precision,
        ).astype(acc_dtype)  # [C, kh, kw, O]

    def static_band(r0, n):
        lo = r0 * sh - pt  # first row of x the band reads; the band reads (n - 1) * sh + kh rows
        hi = lo + (n - 1) * sh + kh
        xs = x[:, max(lo, 0) : min(hi, h)]
        return band(xs, dyt[r0 : r0 + n], (max(0, -lo), max(0, hi - h)))

    n_full = ho // rows
    # Full bands that need no row padding: i * rows * sh >= pt and they end inside x.
    first = -(-pt // (rows * sh)) if pt > 0 else 0
    last = min(n_full, (h + pt - (rows - 1) * sh - kh) // (rows * sh) + 1)
    band_in = (rows - 1) * sh + kh
    parts = [static_band(i * rows, rows) for i in range(min(first, n_full))]
    if last - first >= 2:

        def body(acc, i):
            xs = lax.dynamic_slice_in_dim(x, i * rows * sh - pt, band_in, 1)
            ds = lax.dynamic_slice_in_dim(dyt, i * rows, rows, 0)
            return acc + band(xs, ds, (0, 0)), None

        zero = jnp.zeros((x.shape[-1], kh, kw, o), acc_dtype)
        parts.append(lax.scan(body, zero, jnp.arange(first, last))[0])
    else:
        last = max(first, min(last, n_full))
        parts += [static_band(i * rows, rows) for i in range(first, last)]
    parts += [static_band(i * rows, rows) for i in range(max(first, last), n_full)]
    if ho % rows:
        parts.append(static_band(n_full * rows, ho % rows))
    return functools.reduce(jnp.add, parts).transpose(1, 2, 0, 3)


# Nearest x2 upsampling followed by a 3x3 "SAME" convolution, as four 2x2 phase convolutions.
# Output row 2i + a of the upsampled-then-convolved image reads upsampled rows 2i + a - 1 .. 2i + a + 1,
# i.e. input rows (i - 1, i) for a = 0 and (i, i + 1) for a = 1; the three kernel rows fold onto
# those two as [w0, w1 + w2] and [w0 + w1, w2] (same for columns).
def _fold(rhs: jax.Array) -> jax.Array:
    """The four phases' 2x2 kernels: ``[3, 3, C, O] -> [2, 2, C, 4 O]``, outputs ordered (a, b, o).

    Sums of kernel slices, one fused loop (as an einsum with a 0/1 folding matrix, XLA:CPU ran
    it as two skinny matmuls with transposes: 30 ms per 512-px tokenizer forward)."""

    def taps(w):  # [3, ...] -> [phase][input tap] of [...]
        return [[w[0], w[1] + w[2]], [w[0] + w[1], w[2]]]

    rows = taps(rhs)  # [a][r] of [3, C, O]
    k = [[taps(rows[a][r]) for r in (0, 1)] for a in (0, 1)]  # [a][r][b][s] of [C, O]
    c, o = rhs.shape[2:]
    return jnp.stack(
        [
            jnp.stack(
                [jnp.stack([k[a][r][b][s] for a in (0, 1) for b in (0, 1)], 1) for s in (0, 1)]
            )
            for r in (0, 1)
        ]
    ).reshape(2, 2, c, 4 * o)


def upsample2x_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int] = (1, 1),
    padding: str | Sequence[tuple[int, int]] = "SAME",
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = ("NHWC", "HWIO", "NHWC"),
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``conv(upsample_nearest2x(lhs), rhs)``, 3x3 kernel, stride 1, ``SAME`` padding.

    Signature of ``lax.conv_general_dilated``, so ``nn.Conv`` takes it as its convolution and keeps
    its parameters (``kernel [3, 3, C, O]``, ``bias``). The four output phases (even/odd row and
    column) each see a 2x2 window of ``lhs`` with folded weights (``_fold``), so one 2x2 convolution
    of ``lhs`` with ``4 O`` outputs replaces the 3x3 convolution of the 4x larger upsampled image:
    16 instead of 36 multiply-adds per input pixel and channel pair, and the upsampled image is
    never built. Equal to the two-step form up to float rounding. Shapes: ``[B, H, W, C] ->
    [B, 2H, 2W, O]``.
    """
    pads_ok = padding == "SAME" or tuple(map(tuple, padding)) == ((1, 1), (1, 1))
    if (
        rhs.shape[:2] != (3, 3)
        or tuple(window_strides) != (1, 1)
        or not pads_ok
        or any(d != 1 for d in (lhs_dilation or ()))
        or any(d != 1 for d in (rhs_dilation or ()))
        or not _is_nhwc_hwio(dimension_numbers, lhs.ndim)
        or feature_group_count != 1
        or batch_group_count != 1
    ):
        raise ValueError(
            "upsample2x_conv: expected a 3x3 NHWC/HWIO kernel, stride 1, SAME padding, no dilation"
            f" or groups; got kernel {rhs.shape}, strides {window_strides}, padding {padding}"
        )
    b, h, w, _ = lhs.shape
    c, o = rhs.shape[2:]
    k = _fold(rhs)
    xp = jnp.pad(lhs, ((0, 0), (1, 1), (1, 1), (0, 0)))
    z = _phase_conv(xp, k, precision, preferred_element_type)  # [B, H + 1, W + 1, 4 O]
    z = z.reshape(b, h + 1, w + 1, 2, 2, o)
    # Phase (a, b) at input pixel (i, j) is z[i + a, j + b, a, b]; interleave to [B, 2H, 2W, O].
    rows = [jnp.stack([z[:, a : a + h, s : s + w, a, s] for s in (0, 1)], 3) for a in (0, 1)]
    return jnp.stack(rows, 2).reshape(b, 2 * h, 2 * w, o)


def _phase_plain(xp, k, precision, preferred_element_type):
    return lax.conv_general_dilated(
        xp,
        k,
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _phase_conv(xp, k, precision, preferred_element_type):
    if not banded_backend():
        return _phase_plain(xp, k, precision, preferred_element_type)
    return _phase_conv_cpu(xp, k, precision, preferred_element_type)


def _phase_winograd(xp, k, preferred_element_type, sizes) -> bool:
    """Whether the phase convolution (or its gradients) runs as Winograd F(4x4, 2x2)."""
    b, hp, wp, c = xp.shape
    return (
        USE_WINOGRAD
        and xp.dtype == k.dtype == jnp.float32
        and preferred_element_type is None
        and winograd.applies_to(b * (hp - 1) * (wp - 1), min(c, k.shape[-1] // 4), sizes)
    )


def _phase_forward(xp, k, precision, preferred_element_type):
    if _phase_winograd(xp, k, preferred_element_type, winograd.MIN_SIZES_2X2):
        return winograd.conv2x2(xp, k, precision)
    return _phase_plain(xp, k, precision, preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _phase_conv_cpu(xp, k, precision, preferred_element_type):
    return _phase_forward(xp, k, precision, preferred_element_type)


def _phase_fwd(xp, k, precision, preferred_element_type):
    return _phase_forward(xp, k, precision, preferred_element_type), (xp, k)


def _phase_bwd(precision, preferred_element_type, res, dz):
    # dL/dk as Winograd F(4x4, 2x2) run backwards or one matmul over the 2x2 patches: XLA:CPU's
    # convolution weight gradient for this shape (a 2x2 kernel with 4 O outputs) ran at a quarter
    # of its matmul speed.
    xp, k = res
    if _phase_winograd(xp, k, preferred_element_type, winograd.MIN_SIZES_2X2_GRADS):
        dxp = winograd.conv2x2_input_grad(dz, k, precision)
        dk = winograd.conv2x2_weight_grad(xp, dz, precision)
    else:
        (dxp,) = jax.linear_transpose(
            lambda x_: _phase_plain(x_, k, precision, preferred_element_type),
            jax.ShapeDtypeStruct(xp.shape, xp.dtype),
        )(dz)
        dk = weight_grad_patches(xp, dz, k.shape, (1, 1), ((0, 0), (0, 0)), precision)
    return dxp, dk.astype(k.dtype)


_phase_conv_cpu.defvjp(_phase_fwd, _phase_bwd)
