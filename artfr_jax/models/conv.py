"""2-D convolution whose weight gradient XLA:CPU computes in row bands.

``conv_general_dilated`` is a drop-in for ``lax.conv_general_dilated`` (flax ``nn.Conv`` takes it as
its ``conv_general_dilated`` field; parameters and results are unchanged). On accelerators, and for
any convolution other than a plain NHWC/HWIO one, it *is* ``lax.conv_general_dilated``.

Why: for ``dL/dw`` XLA emits one convolution whose window is the whole output image and whose
contraction runs over batch x height x width. XLA:CPU's kernel for that shape slows down sharply as
the contraction grows: at 512 px its weight gradients took 5x torch's time and made a VQGAN training
step 2.3x slower than diffusers' (``benchmarks/vqgan_vs_diffusers.py``), while its forward and
input-gradient convolutions were faster than torch's. Here the weight gradient is a sum over bands
of output rows, each band a small convolution in XLA:CPU's native NHWC/HWIO layout, looped with
``lax.scan`` so the program stays small. ``benchmarks/conv_weight_grad.py`` times both per shape.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# Rows per band are chosen so that one band contracts over about this many (batch, row, column)
# positions; XLA:CPU's weight-gradient kernel is fastest from roughly 1k to 4k of them.
BAND_POSITIONS = 2048

_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


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
    return _conv(lhs, rhs, strides, pads, precision)


def _plain(x, w, strides, pads, precision):
    return lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, precision):
    return _plain(x, w, strides, pads, precision)


def _conv_fwd(x, w, strides, pads, precision):
    return _plain(x, w, strides, pads, precision), (x, w)


def _conv_bwd(strides, pads, precision, res, dy):
    x, w = res
    (dx,) = jax.linear_transpose(
        lambda x_: _plain(x_, w, strides, pads, precision), jax.ShapeDtypeStruct(x.shape, x.dtype)
    )(dy)
    dw = weight_grad(x, dy, w.shape, strides, pads, precision)
    return dx, dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


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
    over its rows ``h``: a VALID convolution of ``x_pad`` (channels as its batch, the batch as
    its features) with ``dy`` as the kernel, dilated by the stride. Shapes: ``x [B, H, W, C]``,
    ``dy [B, Ho, Wo, O]`` -> ``[kh, kw, C, O]``.
    """
    kh, kw = int(w_shape[0]), int(w_shape[1])
    sh, sw = strides
    b, ho, wo, _ = dy.shape
    rows = rows or band_rows(b, ho, wo)
    n_bands = -(-ho // rows)
    # Pad so that every band (the last one included) has its full (rows - 1) * sh + kh input rows;
    # the extra output rows of dy are zeros and add nothing.
    in_rows = (n_bands * rows - 1) * sh + kh
    in_cols = (wo - 1) * sw + kw
    (pt, pb), (pl, pr) = pads
    xp = jnp.pad(x, ((0, 0), (max(0, pt), max(0, pb)), (max(0, pl), max(0, pr)), (0, 0)))
    xp = xp[:, max(0, -pt) :, max(0, -pl) :][:, :in_rows, :in_cols]  # negative padding crops
    xp = jnp.pad(xp, ((0, 0), (0, in_rows - xp.shape[1]), (0, in_cols - xp.shape[2]), (0, 0)))
    dyp = jnp.pad(dy, ((0, 0), (0, n_bands * rows - ho), (0, 0), (0, 0)))
    dyt = dyp.transpose(1, 2, 0, 3)  # [Ho, Wo, B, O]: a kernel with B inputs and O outputs
    band_in = (rows - 1) * sh + kh
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)

    def band(i):
        # [C, band_in, cols, B]: channels as batch, batch as features. Transposing band by band
        # is faster on CPU than transposing the whole image once.
        xs = lax.dynamic_slice_in_dim(xp, i * rows * sh, band_in, 1).transpose(3, 1, 2, 0)
        ds = lax.dynamic_slice_in_dim(dyt, i * rows, rows, 0)
        return lax.conv_general_dilated(
            xs,
            ds,
            (1, 1),
            "VALID",
            rhs_dilation=(sh, sw),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=precision,
        ).astype(acc_dtype)  # [C, kh, kw, O]

    if n_bands == 1:
        total = band(0)
    else:
        total = lax.scan(
            lambda acc, i: (acc + band(i), None),
            jnp.zeros((x.shape[-1], kh, kw, dy.shape[-1]), acc_dtype),
            jnp.arange(n_bands),
        )[0]
    return total.transpose(1, 2, 0, 3)
