"""Kernels that only the CPU runs: XLA:CPU's own convolution, reduction and attention code is slow
for the shapes the face models have, and these replace it (``docs/performance.md`` has the
measurements behind every choice and threshold).

* ``conv``: weight gradients in row bands or as one patch matmul, 1x1 convolutions as matmuls,
  Winograd 3x3 convolutions (``winograd``);
* ``upsample``: nearest x2 + 3x3 convolution as four 2x2 phase convolutions;
* ``group_norm``: statistics over ``[B, N1, N2, C]`` and a hand-written backward;
* ``attention``: softmax attention in query blocks with a flash-attention-style backward.

Nothing here is imported by a model directly: ``models/kernels.py`` is the one switch that picks
these or plain XLA ops for the platform a program is lowered for. Their sizes and switches are
one frozen :class:`CpuKernels`, passed in (never module globals). The Winograd and weight-gradient
kernels trace under named scopes (:func:`named`), which label their ops in lowered programs
(``Lowered.as_text(debug_info=True)``) and in profiles: a program lowered for a TPU or GPU carries
none of them (``tests/test_aot_compile.py``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax

Sizes = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class CpuKernels:
    """What the CPU kernels do and from which sizes (measured on 2 cores; docs/performance.md).

    Attributes:
      winograd: run large enough stride-1 'SAME' 3x3 float32 convolutions (forward and both
        gradients) as Winograd F(4x4, 3x3); off gives the direct convolution back.
      winograd_min_sizes: ``(positions, channels)`` pairs; a 3x3 convolution with at least that
        many positions (batch x height x width) and input and output channels takes Winograd.
      winograd_small_tile: ``(max positions, min channel pairs C x O)``: such convolutions take
        F(2x2, 3x3), which reads 16 instead of 36 transformed weight matrices.
      upsample_min_sizes: the same table for the upsampling's 2x2 phase convolution (forward).
      upsample_grad_min_sizes: ... for its input and weight gradients.
      band_positions: output positions per band of the banded weight gradient.
      min_banded_positions: from this many output positions the weight gradient is banded; below,
        one patch matmul while the patches take at most ``max_patch_bytes``, else XLA's own.
      max_patch_bytes: see ``min_banded_positions``.
      attention_block: queries per block of the blocked attention (sequences longer than it and a
        multiple of it take the blocked form).
    """

    winograd: bool = True
    winograd_min_sizes: Sizes = ((16384, 32), (4096, 64), (1024, 128), (256, 256))
    winograd_small_tile: tuple[int, int] = (256, 256 * 512)
    upsample_min_sizes: Sizes = ((8192, 64), (4096, 128), (1024, 256))
    upsample_grad_min_sizes: Sizes = ((4096, 128),)
    band_positions: int = 2048
    min_banded_positions: int = 65536
    max_patch_bytes: int = 256 * 2**20
    attention_block: int = 256


def reaches(sizes: Sizes, positions: int, channels: int) -> bool:
    """Whether ``(positions, channels)`` reaches any ``(min positions, min channels)`` of ``sizes``."""
    return any(positions >= p and channels >= c for p, c in sizes)


SCOPE_PREFIX = "cpu_kernel_"


def named(name: str):
    """Decorator: the function's ops trace under the named scope ``cpu_kernel_<name>`` (in a
    ``custom_vjp`` backward too, where source locations point at the forward's call)."""
    return functools.partial(jax.named_call, name=SCOPE_PREFIX + name)
