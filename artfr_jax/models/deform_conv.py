"""Modulated deformable convolution (DCNv2, Zhu et al. 2019) in JAX, NHWC.

VQFR's texture warping module (VQFR Sec. 3.2, Eq. 5; Sec. 6.1, Table 4: "Deformable Conv 3x3,
4-dg") warps texture features with a DCNv2 whose offsets and masks come from an offset convolution.
For output pixel ``p`` and tap ``k``

    y(p) = sum_k w_k * m_k(p) * x(p * stride - pad + p_k * dilation + dp_k(p)) + b,

with ``x(.)`` read by bilinear interpolation. The sampling runs as four row gathers (one per
bilinear corner) from the image flattened to ``[B * H * W * G, Cin / G]``, so every gathered row is
a contiguous run of a group's channels, and the kernel contraction is one matmul over ``K * Cin``.
The backward pass (a custom VJP) regathers the corners rather than keeping four column-sized tensors
alive and scatter-adds the input gradient in at least float32.
"""

from __future__ import annotations

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


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sample_columns(
    x: jax.Array, py: jax.Array, px: jax.Array, mask: jax.Array, out_dtype: Dtype
) -> jax.Array:
    """Bilinear, mask-weighted samples ``[B, Ho, Wo, K, G, Cin / G]`` of ``x [B, H, W, Cin]``.

    ``py, px, mask``: ``[B, Ho, Wo, K, G]``, float32 or wider; sums run in
    ``promote_types(x.dtype, py.dtype)``. The custom VJP keeps only the inputs as
    residuals (the backward pass regathers the corners instead of storing four column-sized
    tensors) and accumulates the input gradient in that wide dtype whatever the dtype of ``x``.
    """
    return _sample_fwd(x, py, px, mask, out_dtype)[0]


def _sample_fwd(x, py, px, mask, out_dtype):
    b, h, w, c = x.shape
    g = py.shape[-1]
    flat = x.reshape(b * h * w * g, c // g)
    wide = jnp.promote_types(x.dtype, py.dtype)
    acc = None
    for rows, weight, _, _ in _corners(x.shape, py, px):
        term = _take(flat, rows).astype(wide) * (weight * mask).astype(wide)[..., None]
        acc = term if acc is None else acc + term
    return acc.astype(out_dtype), (x, py, px, mask)


def _sum_minor(*terms: jax.Array) -> tuple[jax.Array, ...]:
    """Sums of each term over its last axis, as one variadic reduce.

    One reduce reads the shared operands once and fuses the gathers that feed it; XLA:CPU would
    otherwise hand each plain sum to a library kernel that needs its gathered input materialised
    (3x slower backward on CPU).
    """
    zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
    add = lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True))
    return tuple(jax.lax.reduce(terms, zeros, add, (terms[0].ndim - 1,)))


def _sample_bwd(out_dtype, res, ct):
    del out_dtype
    # The barrier keeps XLA from sharing the forward pass's corner gathers with the ones below (CSE
    # would materialise four column-sized tensors to feed both); regathering fuses into the reduce.
    x, py, px, mask = jax.lax.optimization_barrier(res)
    b, h, w, c = x.shape
    g = py.shape[-1]
    flat = x.reshape(b * h * w * g, c // g)
    wide = jnp.promote_types(x.dtype, py.dtype)
    ct = ct.astype(wide)
    corners = _corners(x.shape, py, px)
    # <ct, corner value>: how the output moves with each corner's bilinear weight.
    sums = _sum_minor(*(ct * _take(flat, rows).astype(wide) for rows, _, _, _ in corners))
    dflat = jnp.zeros(flat.shape, wide)
    dmask = dpy = dpx = jnp.zeros(py.shape, py.dtype)
    for (rows, weight, dwy, dwx), s in zip(corners, sums, strict=True):
        dflat = dflat.at[rows].add(
            ct * (weight * mask).astype(wide)[..., None],
            mode="promise_in_bounds",
            wrap_negative_indices=False,
        )
        s = s.astype(py.dtype)
        dmask, dpy, dpx = dmask + weight * s, dpy + dwy * s, dpx + dwx * s
    return dflat.reshape(x.shape).astype(x.dtype), dpy * mask, dpx * mask, dmask


_sample_columns.defvjp(_sample_fwd, _sample_bwd)


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
    wide = jnp.promote_types(dtype, jnp.float32)
    pdtype = jnp.promote_types(offset.dtype, jnp.float32)
    # [B, Ho, Wo, G, K, 2] -> [B, Ho, Wo, K, G]: tap-major so the columns flatten to kernel order.
    off = offset.astype(pdtype).reshape(b, ho, wo, g, k, 2).transpose(0, 1, 2, 4, 3, 5)
    if mask is None:
        m = jnp.ones((b, ho, wo, k, g), pdtype)
    else:
        m = mask.astype(pdtype).reshape(b, ho, wo, g, k).transpose(0, 1, 2, 4, 3)
    base_y = (jnp.arange(ho) * sh - ph)[:, None] + (jnp.arange(kh) * dh)[None, :]  # [Ho, kh]
    base_x = (jnp.arange(wo) * sw - pw)[:, None] + (jnp.arange(kw) * dw)[None, :]  # [Wo, kw]
    base_y = jnp.broadcast_to(base_y[:, None, :, None], (ho, wo, kh, kw)).reshape(ho, wo, k, 1)
    base_x = jnp.broadcast_to(base_x[None, :, None, :], (ho, wo, kh, kw)).reshape(ho, wo, k, 1)
    py = base_y.astype(pdtype) + off[..., 0]
    px = base_x.astype(pdtype) + off[..., 1]

    cols = _sample_columns(x, py, px, m, dtype)  # [B, Ho, Wo, K, G, Cin/G]
    cols = cols.reshape(b, ho, wo, k * cin)
    y = jax.lax.dot_general(
        cols,
        kernel.astype(dtype).reshape(k * cin, cout),
        (((3,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=wide,
    )
    if bias is not None:
        y = y + bias.astype(wide)
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
