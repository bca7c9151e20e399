"""The models' 2-D convolutions on the CPU: weight gradients in row bands or as patch matmuls,
1x1 convolutions as matmuls, Winograd 3x3 convolutions.

Why: for ``dL/dw`` XLA emits one convolution whose window is the whole output image and whose
contraction runs over batch x height x width. XLA:CPU's kernel for that shape slows down sharply as
the contraction grows (at 512 px its weight gradients took 5x torch's time), while its forward and
input-gradient convolutions run at about torch's speed. Here the weight gradient of a large
convolution is a sum over bands of output rows, each band a small convolution in XLA:CPU's native
NHWC/HWIO layout, looped with ``lax.scan`` so the program stays small; that of a smaller one is one
matmul of the input's patches against ``dy``; 1x1 convolutions are matmuls over channels.
Stride-1 'SAME' 3x3 convolutions on large enough float32 images run their forward and both
gradients as Winograd (``winograd.py``), with a quarter of the multiply-adds.

:func:`plan` says what a convolution gets (``None``: nothing here is quicker than XLA's own) and
:func:`conv` runs a plan; ``models/kernels.py`` decides whether the CPU kernels apply at all.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from artfr_jax.models.cpu_kernels import CpuKernels, named, reaches, winograd

_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
Pads = tuple[tuple[int, int], tuple[int, int]]


class Plan(NamedTuple):
    """How the CPU runs one convolution (static; hashable for ``custom_vjp``).

    kind: ``"matmul"`` (a 1x1 convolution), ``"winograd"`` (forward and both gradients) or
    ``"direct"`` (XLA's forward and input gradient, ``wgrad`` for the weight gradient).
    wgrad: ``"banded"`` (:func:`weight_grad`), ``"patches"`` (:func:`weight_grad_patches`) or
    ``"xla"``.
    """

    kind: str
    strides: tuple[int, int]
    pads: Pads
    wgrad: str = "xla"
    small_tile: tuple[int, int] = winograd.NO_SMALL_TILE
    band_positions: int = 2048


def is_nhwc_hwio(dimension_numbers, ndim: int) -> bool:
    if ndim != 4 or dimension_numbers is None:
        return False
    dn = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, dimension_numbers)
    return (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == _NHWC


def plan(
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    dtype,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    options: CpuKernels,
    *,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    preferred_element_type: Any = None,
) -> Plan | None:
    """The CPU path of ``lax.conv_general_dilated`` with these arguments, or ``None`` where XLA's
    own convolution is as quick (grouped, dilated or non-NHWC/HWIO convolutions, small ones)."""
    if (
        not is_nhwc_hwio(dimension_numbers, len(lhs_shape))
        or feature_group_count != 1
        or batch_group_count != 1
        or any(d != 1 for d in (lhs_dilation or ()))
        or any(d != 1 for d in (rhs_dilation or ()))
        or preferred_element_type is not None
    ):
        return None
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[:2], strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if tuple(rhs_shape[:2]) == (1, 1) and strides == (1, 1) and pads == ((0, 0), (0, 0)):
        # XLA:CPU runs a 1x1 convolution (and its gradients) 4-10x faster as a matmul at 512 px.
        return Plan("matmul", strides, pads)
    out_h = (lhs_shape[1] + sum(pads[0]) - rhs_shape[0]) // strides[0] + 1
    out_w = (lhs_shape[2] + sum(pads[1]) - rhs_shape[1]) // strides[1] + 1
    positions = lhs_shape[0] * out_h * out_w
    common = dict(
        small_tile=tuple(options.winograd_small_tile), band_positions=options.band_positions
    )
    if (
        options.winograd
        and tuple(rhs_shape[:2]) == (3, 3)
        and strides == (1, 1)
        and pads == ((1, 1), (1, 1))
        and jnp.dtype(dtype) == jnp.float32
        and reaches(options.winograd_min_sizes, positions, min(rhs_shape[2:]))
    ):
        return Plan("winograd", strides, pads, **common)
    wgrad = weight_grad_path(positions, rhs_shape, dtype, options)
    return None if wgrad == "xla" else Plan("direct", strides, pads, wgrad, **common)


def weight_grad_path(positions: int, w_shape: Sequence[int], dtype, options: CpuKernels) -> str:
    """How the CPU computes ``dL/dw``: ``"banded"`` (:func:`weight_grad`), ``"patches"``
    (:func:`weight_grad_patches`) or ``"xla"`` (XLA's transpose of the convolution)."""
    if positions >= options.min_banded_positions:
        return "banded"
    kh, kw, c = (int(d) for d in w_shape[:3])
    patch_bytes = positions * kh * kw * c * jnp.dtype(dtype).itemsize
    return "patches" if patch_bytes <= options.max_patch_bytes else "xla"


def conv(lhs: jax.Array, rhs: jax.Array, p: Plan, precision: Any = None) -> jax.Array:
    """The NHWC/HWIO convolution of ``lhs`` with ``rhs`` as :func:`plan` planned it."""
    if p.kind == "matmul":
        return lax.dot_general(lhs, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision)
    return _conv(lhs, rhs, p, precision)


def _plain(x, w, strides, pads, precision):
    return lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, p: Plan, precision):
    if p.kind == "winograd":
        return winograd.conv3x3(x, w, precision, p.small_tile)
    return _plain(x, w, p.strides, p.pads, precision)


def _conv_fwd(x, w, p, precision):
    return _conv(x, w, p, precision), (x, w)


def _conv_bwd(p, precision, res, dy):
    x, w = res
    if p.kind == "winograd":
        dx = winograd.conv3x3_input_grad(dy, w, precision, p.small_tile)
        dw = winograd.conv3x3_weight_grad(x, dy, precision, p.small_tile)
        return dx, dw.astype(w.dtype)
    (dx,) = jax.linear_transpose(
        lambda x_: _plain(x_, w, p.strides, p.pads, precision),
        jax.ShapeDtypeStruct(x.shape, x.dtype),
    )(dy)
    if p.wgrad == "banded":
        dw = weight_grad(x, dy, w.shape, p.strides, p.pads, precision, p.band_positions)
    elif p.wgrad == "patches":
        dw = weight_grad_patches(x, dy, w.shape, p.strides, p.pads, precision)
    else:
        (dw,) = jax.linear_transpose(
            lambda w_: _plain(x, w_, p.strides, p.pads, precision),
            jax.ShapeDtypeStruct(w.shape, w.dtype),
        )(dy)
    return dx, dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


@named("patch_weight_grad")
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


def band_rows(batch: int, out_height: int, out_width: int, band_positions: int = 2048) -> int:
    """Output rows per band: about ``band_positions`` contracted positions (XLA:CPU's
    weight-gradient kernel is fastest from roughly 1k to 4k of them), at least one row."""
    return max(1, min(out_height, band_positions // max(1, batch * out_width)))


@named("banded_weight_grad")
def weight_grad(
    x: jax.Array,
    dy: jax.Array,
    w_shape: Sequence[int],
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
    precision: Any = None,
    band_positions: int = 2048,
    rows: int | None = None,
) -> jax.Array:
    """``dL/dw`` of ``y = conv(x, w)`` (NHWC/HWIO) as a sum over bands of ``rows`` output rows
    (default: :func:`band_rows`).

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
    rows = min(ho, rows or band_rows(b, ho, wo, band_positions))
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
