"""Nearest x2 upsampling followed by a 3x3 'SAME' convolution (the decoders' ``Upsample``) as
four 2x2 phase convolutions of the input, on the CPU.

Each output phase (even/odd row and column) sees a 2x2 window of the input with folded weights
(``_fold``), so one 2x2 convolution of the input with ``4 O`` outputs replaces the 3x3 convolution
of the 4x larger upsampled image: 16 instead of 36 multiply-adds per input pixel and channel pair,
and the upsampled image is never built. Large enough ones run that 2x2 convolution (and its
gradients) as Winograd F(4x4, 2x2). Equal to the two-step form up to float rounding; the
parameters are the 3x3 convolution's.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from artfr_jax.models.cpu_kernels import CpuKernels, reaches, winograd
from artfr_jax.models.cpu_kernels.conv import weight_grad_patches

Sizes = tuple[tuple[int, int], ...]


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
    options: CpuKernels,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``conv(upsample_nearest2x(lhs), rhs)`` with a 3x3 kernel, stride 1, 'SAME' padding, NHWC /
    HWIO: ``[B, H, W, C], [3, 3, C, O] -> [B, 2H, 2W, O]`` (module docstring)."""
    if rhs.shape[:2] != (3, 3):
        raise ValueError(f"upsample2x_conv: expected a 3x3 kernel, got {rhs.shape}")
    b, h, w, _ = lhs.shape
    o = rhs.shape[3]
    k = _fold(rhs)
    xp = jnp.pad(lhs, ((0, 0), (1, 1), (1, 1), (0, 0)))
    sizes = (
        (options.upsample_min_sizes, options.upsample_grad_min_sizes)
        if options.winograd
        else ((), ())
    )
    z = _phase_conv(xp, k, precision, preferred_element_type, sizes)  # [B, H + 1, W + 1, 4 O]
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


def _phase_winograd(xp, k, preferred_element_type, sizes: Sizes) -> bool:
    """Whether the phase convolution (or its gradients) runs as Winograd F(4x4, 2x2)."""
    b, hp, wp, c = xp.shape
    return (
        xp.dtype == k.dtype == jnp.float32
        and preferred_element_type is None
        and reaches(sizes, b * (hp - 1) * (wp - 1), min(c, k.shape[-1] // 4))
    )


def _phase_forward(xp, k, precision, preferred_element_type, sizes):
    if _phase_winograd(xp, k, preferred_element_type, sizes[0]):
        return winograd.conv2x2(xp, k, precision)
    return _phase_plain(xp, k, precision, preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _phase_conv(xp, k, precision, preferred_element_type, sizes: tuple[Sizes, Sizes]):
    """The 2x2 'VALID' phase convolution; ``sizes``: Winograd tables for the forward and for the
    gradients (``CpuKernels.upsample_min_sizes``, ``upsample_grad_min_sizes``)."""
    return _phase_forward(xp, k, precision, preferred_element_type, sizes)


def _phase_fwd(xp, k, precision, preferred_element_type, sizes):
    return _phase_forward(xp, k, precision, preferred_element_type, sizes), (xp, k)


def _phase_bwd(precision, preferred_element_type, sizes, res, dz):
    # dL/dk as Winograd F(4x4, 2x2) run backwards or one matmul over the 2x2 patches: XLA:CPU's
    # convolution weight gradient for this shape (a 2x2 kernel with 4 O outputs) ran at a quarter
    # of its matmul speed.
    xp, k = res
    if _phase_winograd(xp, k, preferred_element_type, sizes[1]):
        dxp = winograd.conv2x2_input_grad(dz, k, precision)
        dk = winograd.conv2x2_weight_grad(xp, dz, precision)
    else:
        (dxp,) = jax.linear_transpose(
            lambda x_: _phase_plain(x_, k, precision, preferred_element_type),
            jax.ShapeDtypeStruct(xp.shape, xp.dtype),
        )(dz)
        dk = weight_grad_patches(xp, dz, k.shape, (1, 1), ((0, 0), (0, 0)), precision)
    return dxp, dk.astype(k.dtype)


_phase_conv.defvjp(_phase_fwd, _phase_bwd)
