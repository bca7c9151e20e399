"""Modulated deformable convolution (DCNv2, Zhu et al. 2019) in JAX, NHWC.

VQFR's texture warping module (VQFR Sec. 3.2, Eq. 5; Sec. 6.1, Table 4: "Deformable Conv 3x3,
4-dg") warps texture features with a DCNv2 whose offsets and masks come from an offset convolution.
For output pixel ``p`` and tap ``k``

    y(p) = sum_k w_k * m_k(p) * x(p * stride - pad + p_k * dilation + dp_k(p)) + b,

with ``x(.)`` read by bilinear interpolation. The sampling runs as four row gathers (one per
bilinear corner) from the image flattened to ``[B * H * W * G, Cin / G]``, so every gathered row is
a contiguous run of a group's channels, and the kernel contraction is one matmul over ``K * Cin``.
The layer runs over chunks of output rows (one ``lax.scan``, :data:`MAX_POINTS` sample points a
chunk), so its temporaries do not grow with the image. Its custom VJP keeps only the inputs: the
backward pass regathers each chunk's corners, scatter-adds the input gradient into one accumulator
of at least float32 and adds up the kernel gradient chunk by chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any
PrecisionLike = Any

__all__ = ["ModulatedDeformConv", "deform_conv2d", "output_size"]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"deform_conv2d: {name} must be an int or a pair of ints, got {value!r}")
    return value


def output_size(
    size: int, kernel: int, stride: int = 1, padding: int = 1, dilation: int = 1
) -> int:
    """Output length along one spatial axis (the usual convolution arithmetic)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _corners(shape: tuple[int, ...], py: jax.Array, px: jax.Array):
    """The four bilinear corners of each sample position.

    Args:
      shape: ``(B, H, W, Cin)`` of the image.
      py, px: ``[B, Ho, Wo, K, G]`` sample rows / columns (float32 or float64).

    Returns:
      ``[(rows, weight, dweight_dy, dweight_dx)] * 4``, each ``[B, Ho, Wo, K, G]``: ``rows`` index
      the image flattened to ``[B * H * W * G, Cin / G]`` (clamped into range), ``weight`` is the
      bilinear weight, zero for a corner outside the image (torchvision's convention), and
      ``dweight_*`` its derivatives with respect to ``py`` and ``px``.
    """
    b, h, w, _ = shape
    g = py.shape[-1]
    # Past [-1, H] every corner is outside, so clipping there changes no value and keeps floor()
    # finite and the int32 cast exact for any offset; the position gradient is zero out there.
    iny = ((py > -1.0) & (py < h)).astype(py.dtype)
    inx = ((px > -1.0) & (px < w)).astype(py.dtype)
    py = jnp.clip(py, -1.0, float(h))
    px = jnp.clip(px, -1.0, float(w))
    y0, x0 = jnp.floor(py), jnp.floor(px)
    ly, lx = py - y0, px - x0
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    base = jnp.arange(b, dtype=jnp.int32).reshape(b, 1, 1, 1, 1) * (h * w * g)
    base = base + jnp.arange(g, dtype=jnp.int32)
    out = []
    for cy, wy, sy in ((0, 1.0 - ly, -iny), (1, ly, iny)):
        yi = y0 + cy
        vy = (yi >= 0) & (yi < h)
        yi = jnp.clip(yi, 0, h - 1)
        for cx, wx, sx in ((0, 1.0 - lx, -inx), (1, lx, inx)):
            xi = x0 + cx
            valid = (vy & (xi >= 0) & (xi < w)).astype(py.dtype)
            xi = jnp.clip(xi, 0, w - 1)
            rows = base + (yi * w + xi) * g
            out.append((rows, valid * wy * wx, valid * sy * wx, valid * wy * sx))
    return out


def _take(flat: jax.Array, rows: jax.Array) -> jax.Array:
    return flat.at[rows].get(mode="promise_in_bounds", wrap_negative_indices=False)


# Sample points (batch x output rows x output columns x taps x offset groups) per chunk. The
# sampling's per-point temporaries (corner indices and weights, gathered channel runs) exist for
# one chunk of output rows at a time; on TPU each point costs ~3.4 KB of them (small minor
# dimensions are tiled to 128 lanes), so a 512-px layer at batch 2 in one piece needed ~60 GiB.
MAX_POINTS = 2**17


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static description of one deformable convolution, split into ``chunks`` of ``rows``
    output rows (the last chunk padded with zero-mask rows)."""

    shape: tuple[int, int, int, int]  # x: (B, H, W, Cin)
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    out: tuple[int, int]  # (Ho, Wo)
    rows: int
    chunks: int
    dtype: Any  # of the gathered columns and the matmul operands
    precision: PrecisionLike

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]


def _positions(geo: _Geometry, chunk: jax.Array, offset: jax.Array, mask: jax.Array):
    """Sample rows/columns and masks ``[B, rows, Wo, K, G]`` of one chunk from its offsets
    ``[B, rows, Wo, G*K*2]`` and masks ``[B, rows, Wo, G*K]`` (channel layouts as
    :func:`deform_conv2d`'s)."""
    b, r, wo, _ = offset.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.padding, geo.dilation
    k, g = geo.taps, geo.groups
    off = offset.reshape(b, r, wo, g, k, 2).transpose(0, 1, 2, 4, 3, 5)  # tap-major
    m = mask.reshape(b, r, wo, g, k).transpose(0, 1, 2, 4, 3)
    oy = (chunk * r + jnp.arange(r)) * sh - ph
    base_y = oy[:, None] + (jnp.arange(kh) * dh)[None, :]  # [rows, kh]
    base_x = (jnp.arange(wo) * sw - pw)[:, None] + (jnp.arange(kw) * dw)[None, :]  # [Wo, kw]
    base_y = jnp.broadcast_to(base_y[:, None, :, None], (r, wo, kh, kw)).reshape(r, wo, k, 1)
    base_x = jnp.broadcast_to(base_x[None, :, None, :], (r, wo, kh, kw)).reshape(r, wo, k, 1)
    return base_y.astype(off.dtype) + off[..., 0], base_x.astype(off.dtype) + off[..., 1], m


def _gather(geo: _Geometry, x: jax.Array, corners) -> list[jax.Array]:
    """The image's channel runs ``[B, rows, Wo, K, G, Cin/G]`` at each corner of ``_corners``."""
    b, h, w, c = x.shape
    flat = x.reshape(b * h * w * geo.groups, c // geo.groups)
    return [_take(flat, rows) for rows, _, _, _ in corners]


def _columns(values, corners, m: jax.Array, wide: Any) -> jax.Array:
    """Mask-weighted bilinear sums ``[B, rows, Wo, K, G, Cin/G]`` in ``wide``."""
    acc = None
    for v, (_, weight, _, _) in zip(values, corners, strict=True):
        term = v.astype(wide) * (weight * m).astype(wide)[..., None]
        acc = term if acc is None else acc + term
    return acc


def _wide(geo: _Geometry, offset: jax.Array) -> Any:
    return jnp.promote_types(jnp.promote_types(geo.dtype, jnp.float32), offset.dtype)


def _sum_minor(*terms: jax.Array) -> tuple[jax.Array, ...]:
    """Sums of each term over its last axis, as one variadic reduce.

    One reduce reads the shared operands once and fuses the gathers that feed it; XLA:CPU would
    otherwise hand each plain sum to a library kernel that needs its gathered input materialised
    (3x slower backward on CPU).
    """
    zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
    add = lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True))
    return tuple(jax.lax.reduce(terms, zeros, add, (terms[0].ndim - 1,)))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _deform(geo: _Geometry, x, offset, mask, kernel):
    """DCNv2 without bias over chunks of output rows: ``offset [chunks, B, rows, Wo, G*K*2]``,
    ``mask [chunks, B, rows, Wo, G*K]``, ``kernel [K * Cin, Cout]`` -> ``[chunks, B, rows, Wo,
    Cout]`` in ``wide``. The custom VJP keeps only the inputs: the backward pass regathers each
    chunk's corners and scatter-adds the input gradient into one accumulator (in ``wide``)."""
    return _deform_fwd(geo, x, offset, mask, kernel)[0]


def _deform_fwd(geo: _Geometry, x, offset, mask, kernel):
    wide = _wide(geo, offset)
    b, _, _, cin = x.shape

    def chunk(_, inputs):
        i, off, m = inputs
        py, px, m = _positions(geo, i, off, m)
        corners = _corners(x.shape, py, px)
        cols = _columns(_gather(geo, x, corners), corners, m, wide)
        cols = cols.astype(geo.dtype).reshape(b, geo.rows, geo.out[1], geo.taps * cin)
        y = jax.lax.dot_general(
            cols,
            kernel,
            (((3,), (0,)), ((), ())),
            precision=geo.precision,
            preferred_element_type=wide,
        )
        return None, y

    _, y = jax.lax.scan(chunk, None, (jnp.arange(geo.chunks), offset, mask))
    return y, (x, offset, mask, kernel)


def _deform_bwd(geo: _Geometry, res, ct):
    x, offset, mask, kernel = res
    wide = _wide(geo, offset)
    b, h, w, cin = x.shape
    g, k = geo.groups, geo.taps
    r, wo = geo.rows, geo.out[1]
    pdtype = offset.dtype

    def chunk(carry, inputs):
        dflat, dkernel = carry
        i, off, m, cy = inputs
        py, px, m = _positions(geo, i, off, m)
        cy = cy.astype(geo.dtype)
        dcols = jax.lax.dot_general(
            cy,
            kernel,
            (((3,), (1,)), ((), ())),
            precision=geo.precision,
            preferred_element_type=wide,
        ).reshape(b, r, wo, k, g, cin // g)
        corners = _corners(x.shape, py, px)
        values = _gather(geo, x, corners)
        cols = _columns(values, corners, m, wide).astype(geo.dtype).reshape(b, r, wo, k * cin)
        dkernel = dkernel + jax.lax.dot_general(
            cols,
            cy,
            (((0, 1, 2), (0, 1, 2)), ((), ())),
            precision=geo.precision,
            preferred_element_type=wide,
        )
        # <dcols, corner value>: how the output moves with each corner's bilinear weight. The
        # barrier keeps XLA from sharing these gathers with the ones above (one materialised
        # copy of all four corners); gathered again, they fuse into the reduce.
        values = _gather(geo, jax.lax.optimization_barrier(x), corners)
        sums = _sum_minor(*(dcols * v.astype(wide) for v in values))
        dmask = dpy = dpx = jnp.zeros(py.shape, pdtype)
        for (rows, weight, dwy, dwx), s in zip(corners, sums, strict=True):
            dflat = dflat.at[rows].add(
                dcols * (weight * m).astype(wide)[..., None],
                mode="promise_in_bounds",
                wrap_negative_indices=False,
            )
            s = s.astype(pdtype)
            dmask, dpy, dpx = dmask + weight * s, dpy + dwy * s, dpx + dwx * s
        doff = jnp.stack([dpy * m, dpx * m], axis=-1).transpose(0, 1, 2, 4, 3, 5)
        dmask = dmask.transpose(0, 1, 2, 4, 3)
        return (dflat, dkernel), (doff.reshape(off.shape), dmask.reshape(m.shape[:3] + (-1,)))

    init = (
        jnp.zeros((b * h * w * g, cin // g), wide),
        jnp.zeros(kernel.shape, wide),
    )
    (dflat, dkernel), (doff, dmask) = jax.lax.scan(
        chunk, init, (jnp.arange(geo.chunks), offset, mask, ct)
    )
    return (
        dflat.reshape(x.shape).astype(x.dtype),
        doff.astype(offset.dtype),
        dmask.astype(mask.dtype),
        dkernel.astype(kernel.dtype),
    )


_deform.defvjp(_deform_fwd, _deform_bwd)


def _chunk_rows(b: int, ho: int, wo: int, points_per_pixel: int, max_points: int):
    """``(rows, chunks)``: the fewest chunks of at most ``max_points`` points (at least one
    row each), rows balanced between them."""
    per_row = b * wo * points_per_pixel
    chunks = -(-ho // max(1, min(ho, max_points // per_row)))
    return -(-ho // chunks), chunks


def deform_conv2d(
    x: jax.Array,
    offset: jax.Array,
    mask: jax.Array | None,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    stride: int | Sequence[int] = (1, 1),
    padding: int | Sequence[int] = (1, 1),
    dilation: int | Sequence[int] = (1, 1),
    offset_groups: int = 1,
    precision: PrecisionLike = None,
    max_points: int | None = None,
) -> jax.Array:
    """Modulated deformable convolution (DCNv2), NHWC / HWIO.

    Args:
      x: ``[B, H, W, Cin]``.
      offset: ``[B, Ho, Wo, G * kh * kw * 2]``; channel ``2 * (g * kh * kw + k)`` is the row (dy)
        and ``+ 1`` the column (dx) offset of group ``g``, tap ``k = i * kw + j`` (the torchvision /
        mmcv / BasicSR channel order, moved to the last axis).
      mask: ``[B, Ho, Wo, G * kh * kw]`` (channel ``g * kh * kw + k``) or None for ones.
      kernel: ``[kh, kw, Cin, Cout]`` (flax ``nn.Conv`` layout).
      bias: ``[Cout]`` or None.
      stride, padding, dilation: ints or (row, column) pairs; padding is symmetric.
      offset_groups: G; input channels split into G contiguous groups sharing offsets and masks.
      precision: for the kernel contraction.
      max_points: sample points (B * rows * Wo * kh * kw * G) per chunk of output rows; the layer
        runs chunk by chunk (a scan), so its temporaries are bounded by one chunk's whatever the
        image size. None: :data:`MAX_POINTS`. Results do not depend on it.

    Returns:
      ``[B, Ho, Wo, Cout]`` in ``result_type(x, kernel)``. Sample positions and bilinear weights are
      at least float32 (positions in bfloat16 would be off by pixels), and so are the bilinear sums
      and the matmul accumulator; with bfloat16 inputs the matmul operands stay bfloat16. Samples
      read zero outside the image, corner by corner, as in ``torchvision.ops.deform_conv2d``.
    """
    x, offset, kernel = jnp.asarray(x), jnp.asarray(offset), jnp.asarray(kernel)
    mask = None if mask is None else jnp.asarray(mask)
    bias = None if bias is None else jnp.asarray(bias)
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    if x.ndim != 4:
        raise ValueError(f"deform_conv2d: x must be [B, H, W, Cin], got shape {x.shape}")
    if kernel.ndim != 4:
        raise ValueError(f"deform_conv2d: kernel must be [kh, kw, Cin, Cout], got {kernel.shape}")
    b, h, w, cin = x.shape
    kh, kw, kcin, cout = kernel.shape
    k = kh * kw
    g = offset_groups
    if kcin != cin:
        raise ValueError(f"deform_conv2d: kernel has {kcin} input channels, x has {cin}")
    if g < 1 or cin % g:
        raise ValueError(f"deform_conv2d: offset_groups={g} must divide Cin={cin}")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(
            f"deform_conv2d: need stride, dilation >= 1 and padding >= 0, got "
            f"stride={(sh, sw)} dilation={(dh, dw)} padding={(ph, pw)}"
        )
    ho, wo = output_size(h, kh, sh, ph, dh), output_size(w, kw, sw, pw, dw)
    if ho < 1 or wo < 1:
        raise ValueError(f"deform_conv2d: empty output {(ho, wo)} for input {(h, w)}")
    if offset.shape != (b, ho, wo, g * k * 2):
        raise ValueError(
            f"deform_conv2d: offset must be [B, Ho, Wo, G*kh*kw*2] = {(b, ho, wo, g * k * 2)}, "
            f"got {offset.shape}"
        )
    if mask is not None and mask.shape != (b, ho, wo, g * k):
        raise ValueError(
            f"deform_conv2d: mask must be [B, Ho, Wo, G*kh*kw] = {(b, ho, wo, g * k)}, "
            f"got {mask.shape}"
        )
    if b * h * w * g >= 2**31:
        raise ValueError(f"deform_conv2d: B*H*W*G = {b * h * w * g} overflows the int32 row index")
    if bias is not None and bias.shape != (cout,):
        raise ValueError(f"deform_conv2d: bias must be [{cout}], got {bias.shape}")

    dtype = jnp.result_type(x.dtype, kernel.dtype)
    pdtype = jnp.promote_types(offset.dtype, jnp.float32)
    offset = offset.astype(pdtype)
    mask = jnp.ones((b, ho, wo, g * k), pdtype) if mask is None else mask.astype(pdtype)
    max_points = MAX_POINTS if max_points is None else max_points
    if max_points < 1:
        raise ValueError(f"deform_conv2d: max_points must be >= 1, got {max_points}")
    rows, chunks = _chunk_rows(b, ho, wo, k * g, max_points)
    geo = _Geometry(
        shape=(b, h, w, cin),
        kernel=(kh, kw),
        stride=(sh, sw),
        padding=(ph, pw),
        dilation=(dh, dw),
        groups=g,
        out=(ho, wo),
        rows=rows,
        chunks=chunks,
        dtype=jnp.dtype(dtype),
        precision=precision,
    )

    def split(a):  # [B, Ho, Wo, C] -> [chunks, B, rows, Wo, C]; padded rows have zero masks
        a = jnp.pad(a, ((0, 0), (0, rows * chunks - ho), (0, 0), (0, 0)))
        return a.reshape(b, chunks, rows, wo, a.shape[-1]).transpose(1, 0, 2, 3, 4)

    y = _deform(geo, x, split(offset), split(mask), kernel.astype(dtype).reshape(k * cin, cout))
    y = y.transpose(1, 0, 2, 3, 4).reshape(b, rows * chunks, wo, cout)[:, :ho]
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y.astype(dtype)


class ModulatedDeformConv(nn.Module):
    """DCNv2 layer with its own weight (VQFR Sec. 3.2, Eq. 5; Sec. 6.1, Table 4 "DConv").

    ``x [B, H, W, Cin]``, ``offset [B, Ho, Wo, G*kh*kw*2]``, ``mask [B, Ho, Wo, G*kh*kw]`` or None
    -> ``[B, Ho, Wo, features]``; see :func:`deform_conv2d` for the channel layout. Params:
    ``kernel [kh, kw, Cin, features]``, ``bias [features]``. The default init is DCNv2's
    ``uniform(+-1/sqrt(kh*kw*Cin))`` kernel and zero bias.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    offset_groups: int = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Callable[..., jax.Array] = nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform"
    )
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array, offset: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        kh, kw = self.kernel_size
        cin = x.shape[-1]
        if cin % self.offset_groups:
            raise ValueError(
                f"ModulatedDeformConv({self.name}): offset_groups={self.offset_groups} must divide "
                f"the {cin} input channels"
            )
        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, cin, self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return deform_conv2d(
            x,
            offset,
            mask,
            kernel,
            bias,
            stride=self.strides,
            padding=self.padding,
            dilation=self.dilation,
            offset_groups=self.offset_groups,
            precision=self.precision,
        )
