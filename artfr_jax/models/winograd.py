"""3x3 convolution by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray, 2016).

Each 4x4 block of outputs is computed from the 6x6 block of inputs around it with 36 element-wise
products per channel pair instead of 144:

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (one tile; * is element-wise)

Summed over input channels, the 36 element-wise products become 36 matmuls
``[tiles, C_in] @ [C_in, C_out]``, a quarter of the direct convolution's multiply-adds. The input
transform is sums of tile rows that XLA fuses into memory-bound loops; the output transform is one
small matmul.

Used by ``models.conv`` on the CPU only, for stride-1 'SAME' 3x3 convolutions in float32 of the
sizes in ``MIN_SIZES`` (``benchmarks/conv_winograd.py`` times it per shape). The result differs
from the direct sum by rounding only (about 3e-6 relative in float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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
TILE = 4  # outputs per tile side; inputs per tile side are TILE + 2

# (positions, channels) pairs: a convolution of at least that many positions (batch x height x
# width) and input and output channels runs as Winograd, if it meets either pair. Below them the
# direct convolution is as fast or faster on the CPU: with few tiles, reading the 36 transformed
# weight matrices (4x the direct weights) dominates, and with few channels the transforms do. On 2
# cores (forward, forward+backward in ms, direct -> Winograd): 1x64x64x128 9.9 -> 9.8, 36 -> 40;
# 1x64x64x256 35 -> 22, 143 -> 129; 4x32x32x256 38 -> 25, 192 -> 133; 1x32x32x512 41 -> 71,
# 182 -> 247. The small configurations (tiny, smoke, demo) stay below both.
MIN_SIZES = ((16384, 64), (4096, 256))


def applies_to(positions: int, channels: int) -> bool:
    """Whether a stride-1 'SAME' 3x3 convolution of this size is quicker as Winograd on the CPU."""
    return any(positions >= p and channels >= c for p, c in MIN_SIZES)


def _combine(matrix: np.ndarray, parts: list[jax.Array]) -> list[jax.Array]:
    """``[sum_j matrix[i, j] * parts[j] for i]`` with the zero terms left out."""
    out = []
    for row in matrix:
        acc = None
        for c, p in zip(row, parts, strict=True):
            if c == 0:
                continue
            term = p if c == 1 else -p if c == -1 else p * jnp.asarray(c, p.dtype)
            acc = term if acc is None else acc + term
        out.append(acc)
    return out


def _tile_rows(x: jax.Array, axis: int, tiles: int) -> list[jax.Array]:
    """The six overlapping input rows of every tile along ``axis``: ``x[4t + k]`` for k < 6.

    Strided slices, which XLA fuses into the loop that combines them (a reshape of a contiguous
    slice into [tiles, 4] blocks is a separate copy of the whole input instead)."""
    last = TILE * (tiles - 1) + 1
    return [lax.slice_in_dim(x, k, k + last, stride=TILE, axis=axis) for k in range(TILE + 2)]


def input_transform(x: jax.Array) -> jax.Array:
    """``B^T d B`` for every 6x6 input tile of the zero-padded ``x``: [36, B*n*m, C]."""
    b, h, w, c = x.shape
    n, m = -(-h // TILE), -(-w // TILE)
    # One row/column of 'SAME' padding in front; behind it, up to the last tile's 6th entry.
    xp = jnp.pad(x, ((0, 0), (1, TILE * n + 3 - h), (1, TILE * m + 3 - w), (0, 0)))
    rows = jnp.stack(_combine(B_T, _tile_rows(xp, 1, n)), 0)  # [6, B, n, W', C]
    v = jnp.stack(_combine(B_T, _tile_rows(rows, 3, m)), 1)  # [6, 6, B, n, m, C]
    return v.reshape(36, b * n * m, c)


def weight_transform(w: jax.Array) -> jax.Array:
    """``G g G^T`` for every input/output channel pair: [3, 3, C, O] -> [36, C, O].

    One [36, 9] @ [9, C*O] matmul with ``kron(G, G)``. (As two contractions over one tap axis each,
    [C*O*3, 3] @ [3, 6], it took 270 ms of a 512-px tokenizer forward; as fused sums of the taps it
    was as quick as this but took a second per shape to compile.)"""
    k = jnp.asarray(np.kron(G, G), w.dtype)
    u = lax.dot_general(
        k, w.reshape(9, -1), (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST
    )
    return u.reshape(36, *w.shape[2:])


def output_transform(m: jax.Array, batch: int, n: int, mm: int) -> jax.Array:
    """``A^T M A`` per tile, tiles put back in place: [36, B*n*m, O] -> [B, 4n, 4m, O].

    One [16, 36] matmul over all tiles and channels (quicker to compile than the unrolled sums
    of the input transform, and as fast), then the 4x4 blocks are interleaved into the image."""
    o = m.shape[-1]
    a = jnp.asarray(np.kron(A_T, A_T), m.dtype)
    y = lax.dot_general(a, m.reshape(36, -1), (((1,), (0,)), ((), ())))  # [16, B*n*m*O]
    y = y.reshape(TILE, TILE, batch, n, mm, o).transpose(2, 3, 0, 4, 1, 5)
    return y.reshape(batch, TILE * n, TILE * mm, o)


def conv3x3(x: jax.Array, w: jax.Array, precision=None) -> jax.Array:
    """Stride-1 3x3 convolution with one pixel of zero padding (NHWC x HWIO -> NHWC)."""
    if w.shape[:2] != (3, 3) or x.shape[-1] != w.shape[2]:
        raise ValueError(f"conv3x3: expected x [B,H,W,C] and w [3,3,C,O], got {x.shape}, {w.shape}")
    b, h, wd, _ = x.shape
    n, m = -(-h // TILE), -(-wd // TILE)
    prods = lax.dot_general(
        input_transform(x), weight_transform(w), (((2,), (1,)), ((0,), (0,))), precision=precision
    )
    return output_transform(prods, b, n, m)[:, :h, :wd]


def conv3x3_input_grad(dy: jax.Array, w: jax.Array, precision=None) -> jax.Array:
    """Gradient of ``conv3x3(x, w)`` with respect to ``x``: ``dy`` against the flipped kernel."""
    return conv3x3(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3), precision)
