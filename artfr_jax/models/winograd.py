"""Small convolutions by Winograd's minimal filtering F(m x m, r x r) (Lavin & Gray, 2016).

Each m x m block of outputs of an r x r convolution is computed from the (m + r - 1)^2 block of
inputs around it with (m + r - 1)^2 element-wise products per channel pair instead of m^2 r^2:

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (one tile; * is element-wise)

Summed over input channels, the element-wise products become (m + r - 1)^2 matmuls
``[tiles, C_in] @ [C_in, C_out]``: for F(4x4, 3x3) 36 instead of 144 multiply-adds per tile, a
quarter; for F(4x4, 2x2) 25 instead of 64; for F(2x2, 3x3) 16 instead of 36, with 16 instead of 36
transformed weight matrices to read (``conv3x3`` takes it for few positions and many channels,
``SMALL_TILE``). The input transform is sums of tile rows that XLA fuses
into memory-bound loops; the output transform is one small matmul.

Used by ``models.conv`` on the CPU only, in float32: for stride-1 'SAME' 3x3 convolutions of the
sizes in ``MIN_SIZES`` (``benchmarks/conv_winograd.py`` times it per shape), and for the 2x2 phase
convolution of the decoders' upsampling (``models.conv.upsample2x_conv``; ``MIN_SIZES_2X2``). The
result differs from the direct sum by rounding only (about 3e-6 relative in float32).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class Minimal(NamedTuple):
    """The matrices of F(m x m, r x r): ``b_t [s, s]``, ``g [s, r]``, ``a_t [m, s]``; s = m + r - 1
    inputs per tile side."""

    b_t: np.ndarray
    g: np.ndarray
    a_t: np.ndarray

    @property
    def taps(self) -> int:
        return self.g.shape[1]

    @property
    def tile(self) -> int:
        """Outputs per tile side, m."""
        return self.a_t.shape[0]

    @property
    def span(self) -> int:
        """Input rows (and columns) per tile."""
        return self.b_t.shape[0]


# B^T, G and A^T of F(4, 3) with interpolation points 0, +-1, +-2 and infinity.
B_T = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    np.float64,
)
G = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    np.float64,
)
A_T = np.array(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    np.float64,
)
F4_3 = Minimal(B_T, G, A_T)
# F(4, 2) with interpolation points 0, 1, -1, 2 and infinity (Toom-Cook: A^T is the Vandermonde
# matrix of the points, G's rows are the points' powers over the Lagrange denominators, and B^T
# solves the identity for them).
F4_2 = Minimal(
    np.array(
        [
            [2, -1, -2, 1, 0],
            [0, -2, -1, 1, 0],
            [0, 2, -3, 1, 0],
            [0, -1, 0, 1, 0],
            [0, 2, -1, -2, 1],
        ],
        np.float64,
    ),
    np.array([[1 / 2, 0], [-1 / 2, -1 / 2], [-1 / 6, 1 / 6], [1 / 6, 1 / 3], [0, 1]], np.float64),
    np.array([[1, 1, 1, 1, 0], [0, 1, -1, 2, 0], [0, 1, 1, 4, 0], [0, 1, -1, 8, 1]], np.float64),
)
# F(2, 3) with interpolation points 0, +-1 and infinity.
F2_3 = Minimal(
    np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
    np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], np.float64),
    np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64),
)

# (positions, channels) pairs: a convolution of at least that many positions (batch x height x
# width) and input and output channels runs as Winograd, if it meets either pair. Below them the
# direct convolution is as fast or faster on the CPU: with few tiles, reading the 36 transformed
# weight matrices (4x the direct weights) dominates, and with few channels the transforms do.
# ``benchmarks/conv_winograd.py`` on 2 cores, jax 0.10 (forward, forward+backward in ms, direct ->
# Winograd), B x H x W x C -> O: 4x64x64x32 5.1 -> 3.5, 17.4 -> 15.1; 1x64x64x32 1.2 -> 1.2,
# 4.2 -> 4.6; 8x32x32x64 8.1 -> 4.6, 34 -> 25; 1x64x64x64 3.8 -> 2.2, 15.8 -> 12.2; 8x16x16x128
# 5.3 -> 4.0, 21.8 -> 18.1; 1x32x32x256 10.6 -> 7.8, 37 -> 33; 1x16x16x512 15.3 -> 11.2, 43 -> 39;
# 1x16x16x256 3.0 -> 2.5, 12.6 -> 12.7; 1x8x8x256 1.7 -> 2.6, 7.2 -> 9.0; 1x8x8x512 5.5 -> 10.0,
# 24 -> 32. Each Winograd convolution adds about half a second of compile time, so the smaller
# sizes that gain a little (4x16x16x64 1.7 -> 1.4, 5.3 -> 4.4: the demo's 32-px levels) stay
# direct. With it the smoke configuration's train step compiles in 31 instead of 18 s, and its 500
# steps (``configs/vqgan.py:smoke``) ran in 8:51 and 9:38 instead of 10:28 min (0.9-1.1 instead of
# 0.76-0.9 steps/s).
MIN_SIZES = ((16384, 32), (4096, 64), (1024, 128), (256, 256))
# The same for the upsampling's 2x2 phase convolution (``C -> 4 O``; positions: its output's),
# forward and input gradient. On 2 cores, 1 image (ms, direct -> Winograd, forward | input
# gradient), input HxWxC: 256x256x128 347 -> 178 | 259 -> 211; 64x64x256 88 -> 41 | 63 -> 45;
# 64x64x128 19 -> 12 | 17 -> 13; 128x128x64 22 -> 14 | 18 -> 37; 32x32x256 25 -> 16 | 18 -> 27;
# 16x16x512 21 -> 33 | 29 -> 46. (8 images of 32x32x64: 21 -> 9 | 8 -> 12.)
MIN_SIZES_2X2 = ((8192, 64), (4096, 128), (1024, 256))
# Its input and weight gradients (``_phase_bwd``) take it above ``MIN_SIZES_2X2_GRADS``. Weight
# gradient, patch matmul -> Winograd (ms; measured while another job shared the 2 cores), input
# HxWxC -> 4 O: 258x258x128 660 -> 460; 130x130x128 156 -> 115; 66x66x256 142 -> 81; 34x34x256
# 29 -> 29; 18x18x512 41 -> 72; 8 images of 34x34x64 22 -> 31.
MIN_SIZES_2X2_GRADS = ((4096, 128),)
# (positions, channel pairs C x O): a Winograd 3x3 convolution of at most that many positions and
# at least that many channel pairs takes F(2x2, 3x3). There the matmuls have a few dozen tiles and
# reading F(4x4, 3x3)'s 36 transformed weight matrices dominates; F(2x2, 3x3) reads 16.
# ``benchmarks/conv_winograd.py`` and interleaved runs of the three alone, 2 cores, forward ms
# (direct, F(4x4, 3x3), F(2x2, 3x3)), B x H x W x C -> O: 1x16x16x512->512 12.4, 10.8, 8.0 (in
# two earlier runs 16.3, 17.2, 12.3 and 11.7, 10.8, 8.4); 1x16x16x512->256 6.8, 5.1, 4.7;
# 1x16x16x256->512 6.5, 6.1, 5.3; 1x16x16x256->256 4.3, 4.1, 4.7; 2x16x16x512->512 22.7, 14.8,
# 14.5; 2x16x16x256->512 11.5, 7.3, 7.7; 1x32x32x512->256 23.2, 14.2, 14.5 and 21.6, 10.8, 13.2.
SMALL_TILE = (256, 256 * 512)


def applies_to(positions: int, channels: int, sizes=None) -> bool:
    """Whether a convolution of this size is quicker as Winograd on the CPU (``sizes``: a table
    as ``MIN_SIZES``, which is the default)."""
    return any(positions >= p and channels >= c for p, c in (MIN_SIZES if sizes is None else sizes))


def _broadcast_combine(matrix: np.ndarray, parts: list[jax.Array], axis: int) -> jax.Array:
    """``stack([sum_j matrix[i, j] * parts[j] for i], axis)`` as one broadcast multiply-add per
    part: a plain elementwise loop, where the stack would be a concatenation."""
    acc = None
    for col, p in zip(matrix.T, parts, strict=True):
        if not col.any():
            continue
        shape = [1] * (p.ndim + 1)
        shape[axis] = len(col)
        term = jnp.asarray(col.reshape(shape), p.dtype) * jnp.expand_dims(p, axis)
        acc = term if acc is None else acc + term
    return acc


def _tile_rows(x: jax.Array, axis: int, tiles: int, f: Minimal) -> list[jax.Array]:
    """The ``f.span`` overlapping input rows of every tile along ``axis``: ``x[m t + k]``.

    Strided slices, which XLA fuses into the loop that combines them (a reshape of a contiguous
    slice into [tiles, m] blocks is a separate copy of the whole input instead)."""
    last = f.tile * (tiles - 1) + 1
    return [lax.slice_in_dim(x, k, k + last, stride=f.tile, axis=axis) for k in range(f.span)]


def _tiles(out: int, f: Minimal) -> int:
    return -(-out // f.tile)


def input_transform(x: jax.Array, f: Minimal = F4_3, pad: int = 1) -> jax.Array:
    """``B^T d B`` for every input tile of ``x`` zero-padded by ``pad`` on each side, for a
    stride-1 r x r convolution: [s^2, B * tiles, C] (s = m + r - 1 inputs per tile side)."""
    b, h, w, c = x.shape
    ho, wo = h + 2 * pad - f.taps + 1, w + 2 * pad - f.taps + 1
    n, m = _tiles(ho, f), _tiles(wo, f)
    # ``pad`` rows/columns in front; behind, zeros up to the last tile's last input.
    rows_in, cols_in = f.tile * n + f.taps - 1, f.tile * m + f.taps - 1
    xp = jnp.pad(x, ((0, 0), (pad, rows_in - h - pad), (pad, cols_in - w - pad), (0, 0)))
    # Both passes are elementwise loops, each reading every input about once: along rows, the
    # s sums per tile row sit next to each other (row-major [B, n, s, W', C], stored transposed);
    # along columns, one loop per row sum i. (As stacks of s sums, XLA wrote them as
    # concatenations, one pass over the input per sum: 43 -> 29 ms at 512x512x64, 2 cores.)
    rows = _broadcast_combine(f.b_t, _tile_rows(xp, 1, n, f), 2).transpose(2, 0, 1, 3, 4)
    v = jnp.concatenate(
        [_broadcast_combine(f.b_t, _tile_rows(rows[i : i + 1], 3, m, f), 1) for i in range(f.span)],
        0,
    )  # [s, s, B, n, m, C]
    return v.reshape(f.span**2, b * n * m, c)


def weight_transform(w: jax.Array, f: Minimal = F4_3) -> jax.Array:
    """``G g G^T`` for every input/output channel pair: [r, r, C, O] -> [s^2, C, O].

    One [s^2, r^2] @ [r^2, C*O] matmul with ``kron(G, G)``. (As two contractions over one tap axis
    each, [C*O*3, 3] @ [3, 6], it took 270 ms of a 512-px tokenizer forward; as fused sums of the
    taps it was as quick as this but took a second per shape to compile.)"""
    k = jnp.asarray(np.kron(f.g, f.g), w.dtype)
    u = lax.dot_general(
        k, w.reshape(f.taps**2, -1), (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST
    )
    return u.reshape(f.span**2, *w.shape[2:])


def output_transform(m: jax.Array, batch: int, n: int, mm: int, f: Minimal = F4_3) -> jax.Array:
    """``A^T M A`` per tile, tiles put back in place: [s^2, B*n*m, O] -> [B, t n, t m, O] (t
    outputs per tile side).

    One [t^2, s^2] matmul over all tiles and channels (quicker to compile than the unrolled sums
    of the input transform, and as fast), then the t x t blocks are interleaved into the image."""
    o, t = m.shape[-1], f.tile
    a = jnp.asarray(np.kron(f.a_t, f.a_t), m.dtype)
    y = lax.dot_general(a, m.reshape(f.span**2, -1), (((1,), (0,)), ((), ())))  # [t^2, B*n*m*O]
    y = y.reshape(t, t, batch, n, mm, o).transpose(2, 3, 0, 4, 1, 5)
    return y.reshape(batch, t * n, t * mm, o)


def _conv(x: jax.Array, w: jax.Array, f: Minimal, pad: int, precision) -> jax.Array:
    """Stride-1 r x r convolution of ``x`` zero-padded by ``pad`` (NHWC x HWIO -> NHWC)."""
    r = f.taps
    if w.shape[:2] != (r, r) or x.shape[-1] != w.shape[2]:
        raise ValueError(
            f"winograd: expected x [B,H,W,C] and w [{r},{r},C,O], got {x.shape}, {w.shape}"
        )
    b, h, wd, _ = x.shape
    ho, wo = h + 2 * pad - r + 1, wd + 2 * pad - r + 1
    prods = lax.dot_general(
        input_transform(x, f, pad),
        weight_transform(w, f),
        (((2,), (1,)), ((0,), (0,))),
        precision=precision,
    )
    return output_transform(prods, b, _tiles(ho, f), _tiles(wo, f), f)[:, :ho, :wo]


def minimal_3x3(positions: int, channels_in: int, channels_out: int) -> Minimal:
    """F(2x2, 3x3) for the sizes in ``SMALL_TILE``, else F(4x4, 3x3)."""
    max_positions, min_pairs = SMALL_TILE
    small = positions <= max_positions and channels_in * channels_out >= min_pairs
    return F2_3 if small else F4_3


def conv3x3(x: jax.Array, w: jax.Array, precision=None) -> jax.Array:
    """Stride-1 3x3 convolution with one pixel of zero padding (NHWC x HWIO -> NHWC)."""
    f = minimal_3x3(x.shape[0] * x.shape[1] * x.shape[2], *w.shape[2:])
    return _conv(x, w, f, 1, precision)


def conv3x3_input_grad(dy: jax.Array, w: jax.Array, precision=None) -> jax.Array:
    """Gradient of ``conv3x3(x, w)`` with respect to ``x``: ``dy`` against the flipped kernel."""
    return conv3x3(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3), precision)


def _weight_grad(x: jax.Array, dy: jax.Array, f: Minimal, pad: int, precision) -> jax.Array:
    """``dL/dw`` of ``_conv(x, w, f, pad)`` for its output gradient ``dy`` -> [r, r, C, O].

    With ``y = A^T [U * V] A`` per tile and ``U = G g G^T``: ``dM = A dy A^T`` per output tile of
    ``dy``, ``dU[k] = V[k]^T dM[k]`` (one [C, tiles] @ [tiles, O] matmul per k < s^2) and
    ``dg = G^T dU G``: the forward's multiply-add saving, and matmuls instead of XLA:CPU's
    weight-gradient convolution (3x3 at 512x512x64: 169 ms, banded 624 ms)."""
    b, ho, wo, o = dy.shape
    c, n, m = x.shape[-1], _tiles(ho, f), _tiles(wo, f)
    tiles = jax.ShapeDtypeStruct((f.span**2, b * n * m, o), dy.dtype)
    # dM and dg: the transposes of the forward's output and weight transforms.
    (dm,) = jax.linear_transpose(lambda p: output_transform(p, b, n, m, f)[:, :ho, :wo], tiles)(dy)
    v = input_transform(x, f, pad)  # [s^2, B*n*m, C]
    du = lax.dot_general(v, dm, (((1,), (1,)), ((0,), (0,))), precision=precision)  # [s^2, C, O]
    (dg,) = jax.linear_transpose(
        lambda w: weight_transform(w, f), jax.ShapeDtypeStruct((f.taps, f.taps, c, o), du.dtype)
    )(du)
    return dg


def conv3x3_weight_grad(x: jax.Array, dy: jax.Array, precision=None) -> jax.Array:
    """Gradient of ``conv3x3(x, w)`` with respect to ``w``: ``[B, H, W, C], [B, H, W, O] ->
    [3, 3, C, O]``, by the same minimal filtering run backwards (``_weight_grad``)."""
    b, h, wd, c = x.shape
    return _weight_grad(x, dy, minimal_3x3(b * h * wd, c, dy.shape[-1]), 1, precision)


def conv2x2(x: jax.Array, w: jax.Array, precision=None) -> jax.Array:
    """Stride-1 2x2 'VALID' convolution: ``[B, H, W, C] x [2, 2, C, O] -> [B, H-1, W-1, O]``."""
    return _conv(x, w, F4_2, 0, precision)


def conv2x2_weight_grad(x: jax.Array, dy: jax.Array, precision=None) -> jax.Array:
    """Gradient of ``conv2x2(x, w)`` with respect to ``w``: ``[B, H, W, C], [B, H-1, W-1, O] ->
    [2, 2, C, O]`` (``_weight_grad``)."""
    return _weight_grad(x, dy, F4_2, 0, precision)


def conv2x2_input_grad(dy: jax.Array, w: jax.Array, precision=None) -> jax.Array:
    """Gradient of ``conv2x2(x, w)`` with respect to ``x``: the 'FULL' convolution of ``dy``
    (one pixel of zero padding) with the flipped kernel, ``[B, H-1, W-1, O] -> [B, H, W, C]``."""
    return _conv(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3), F4_2, 1, precision)
