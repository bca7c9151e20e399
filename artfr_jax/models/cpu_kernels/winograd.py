"""Small convolutions by Winograd's minimal filtering F(m x m, r x r) (Lavin & Gray, 2016).

Each m x m block of outputs of an r x r convolution is computed from the (m + r - 1)^2 block of
inputs around it with (m + r - 1)^2 element-wise products per channel pair instead of m^2 r^2:

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (one tile; * is element-wise)

Summed over input channels, the element-wise products become (m + r - 1)^2 matmuls
``[tiles, C_in] @ [C_in, C_out]``: for F(4x4, 3x3) 36 instead of 144 multiply-adds per tile, a
quarter; for F(4x4, 2x2) 25 instead of 64; for F(2x2, 3x3) 16 instead of 36, with 16 instead of 36
transformed weight matrices to read (``conv3x3`` takes it for few positions and many channels,
``small_tile``). The input transform is sums of tile rows that XLA fuses into memory-bound loops;
the output transform is one small matmul.

Used by ``cpu_kernels.conv`` in float32 for stride-1 'SAME' 3x3 convolutions of the sizes in
``CpuKernels.winograd_min_sizes`` and by ``cpu_kernels.upsample`` for the 2x2 phase convolution of
the decoders' upsampling. The result differs from the direct sum by rounding only (about 3e-6
relative in float32).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from artfr_jax.models.cpu_kernels import named


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


@named("winograd")
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


# ``small_tile`` below is ``CpuKernels.winograd_small_tile``: (max positions, min channel pairs).
SmallTile = tuple[int, int]
NO_SMALL_TILE: SmallTile = (0, 0)


def minimal_3x3(
    positions: int, channels_in: int, channels_out: int, small_tile: SmallTile = NO_SMALL_TILE
) -> Minimal:
    """F(2x2, 3x3) for at most ``small_tile[0]`` positions and at least ``small_tile[1]`` channel
    pairs (there the matmuls have a few dozen tiles and reading F(4x4, 3x3)'s 36 transformed weight
    matrices dominates), else F(4x4, 3x3)."""
    max_positions, min_pairs = small_tile
    small = positions <= max_positions and channels_in * channels_out >= min_pairs
    return F2_3 if small else F4_3


def conv3x3(
    x: jax.Array, w: jax.Array, precision=None, small_tile: SmallTile = NO_SMALL_TILE
) -> jax.Array:
    """Stride-1 3x3 convolution with one pixel of zero padding (NHWC x HWIO -> NHWC)."""
    f = minimal_3x3(x.shape[0] * x.shape[1] * x.shape[2], *w.shape[2:], small_tile)
    return _conv(x, w, f, 1, precision)


def conv3x3_input_grad(
    dy: jax.Array, w: jax.Array, precision=None, small_tile: SmallTile = NO_SMALL_TILE
) -> jax.Array:
    """Gradient of ``conv3x3(x, w)`` with respect to ``x``: ``dy`` against the flipped kernel."""
    return conv3x3(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3), precision, small_tile)


@named("winograd_weight_grad")
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


def conv3x3_weight_grad(
    x: jax.Array, dy: jax.Array, precision=None, small_tile: SmallTile = NO_SMALL_TILE
) -> jax.Array:
    """Gradient of ``conv3x3(x, w)`` with respect to ``w``: ``[B, H, W, C], [B, H, W, O] ->
    [3, 3, C, O]``, by the same minimal filtering run backwards (``_weight_grad``)."""
    b, h, wd, c = x.shape
    f = minimal_3x3(b * h * wd, c, dy.shape[-1], small_tile)
    return _weight_grad(x, dy, f, 1, precision)


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
