"""VGG feature trunk (Simonyan & Zisserman, 2015) for perceptual losses and metrics.

Used by LPIPS (ART-FR Sec. 3.1, Eq. 4, the perceptual term L_P) and meant to be reused by DISTS and
by VQFR's perceptual/style losses. Only the convolutional ``features`` part is built, and only up to
the deepest layer that is asked for.

Parameter names follow torchvision's ``features.{idx}`` indices (``conv{idx}``), so a converter from
a torchvision state dict is a renaming plus a kernel transpose (``artfr_jax.convert.lpips_vgg``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any
PoolFn = Callable[[jax.Array], jax.Array]

VGG16_BLOCKS: tuple[int, ...] = (2, 2, 3, 3, 3)
VGG19_BLOCKS: tuple[int, ...] = (2, 2, 4, 4, 4)
VGG_WIDTHS: tuple[int, ...] = (64, 128, 256, 512, 512)
LPIPS_LAYERS: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")

# torchvision's ImageNet input statistics (inputs in [0, 1]).
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)


def imagenet_normalize(x: jax.Array) -> jax.Array:
    """Maps ``[..., 3]`` RGB in [0, 1] to torchvision's ImageNet-normalised input."""
    mean = jnp.asarray(IMAGENET_MEAN, x.dtype)
    std = jnp.asarray(IMAGENET_STD, x.dtype)
    return (x - mean) / std


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 (torchvision VGG). ``[B, H, W, C] -> [B, H/2, W/2, C]``."""
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def vgg_layers(block_sizes: Sequence[int]) -> Iterator[tuple[str, str, int]]:
    """Yields ``(kind, name, torchvision_index)`` for every layer of a VGG ``features`` trunk.

    ``kind`` is ``conv``, ``relu`` or ``pool``; names are ``conv{b}_{i}``, ``relu{b}_{i}`` and
    ``pool{b}`` (1-based block ``b`` and layer ``i``), e.g. VGG16 ``relu5_3`` is ``features.29``.
    """
    idx = 0
    for b, n in enumerate(block_sizes, start=1):
        for i in range(1, n + 1):
            yield "conv", f"conv{b}_{i}", idx
            yield "relu", f"relu{b}_{i}", idx + 1
            idx += 2
        yield "pool", f"pool{b}", idx
        idx += 1


def vgg_conv_indices(block_sizes: Sequence[int] = VGG16_BLOCKS) -> tuple[int, ...]:
    """torchvision ``features`` indices of the conv layers (VGG16: 0, 2, 5, ..., 28)."""
    return tuple(idx for kind, _, idx in vgg_layers(block_sizes) if kind == "conv")


class VGG(nn.Module):
    """Convolutional trunk of VGG16/VGG19 returning the feature maps at chosen layers.

    The input is what the torchvision network expects (ImageNet-normalised RGB, see
    ``imagenet_normalize``; LPIPS applies its own scaling instead). Only the layers up to the
    deepest requested one are computed.

    Attributes:
      output_layers: layer names to return (``conv{b}_{i}``, ``relu{b}_{i}``, ``pool{b}``).
      block_sizes: convs per block; ``VGG16_BLOCKS`` or ``VGG19_BLOCKS``.
      widths: channels per block.
      pool: downsampling between blocks, ``[B, H, W, C] -> [B, H/2, W/2, C]``; ``None`` is 2x2 max
        pooling. A hook so DISTS can plug in its L2 (Hanning-window) pooling.
      dtype: computation dtype of the convolutions (e.g. ``jnp.bfloat16``).
      param_dtype: parameter dtype.

    Shapes: ``[B, H, W, 3] -> {name: [B, H / 2**k, W / 2**k, C]}``, ``k`` pools before the layer.
    Params: ``conv{idx}/{kernel [3, 3, Cin, Cout], bias [Cout]}`` with torchvision's ``idx``.
    """

    output_layers: Sequence[str] = LPIPS_LAYERS
    block_sizes: Sequence[int] = VGG16_BLOCKS
    widths: Sequence[int] = VGG_WIDTHS
    pool: PoolFn | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> Mapping[str, jax.Array]:
        if len(self.block_sizes) != len(self.widths):
            raise ValueError(
                f"VGG: block_sizes {tuple(self.block_sizes)} and widths {tuple(self.widths)} "
                "must have the same length"
            )
        if x.ndim != 4:
            raise ValueError(f"VGG: expected input [B, H, W, C], got shape {x.shape}")
        layers = list(vgg_layers(self.block_sizes))
        known = {name for _, name, _ in layers}
        wanted = set(self.output_layers)
        if not wanted or not wanted <= known:
            raise ValueError(
                f"VGG.output_layers: unknown {sorted(wanted - known) or 'empty'}; "
                f"expected names like conv1_1, relu5_3, pool4 from {len(self.block_sizes)} blocks"
            )
        pool = self.pool or max_pool_2x2
        out: dict[str, jax.Array] = {}
        h = x.astype(self.dtype)
        block = 0
        for kind, name, idx in layers:
            if kind == "conv":
                block = int(name[4 : name.index("_")]) - 1
                h = nn.Conv(
                    self.widths[block],
                    (3, 3),
                    padding=((1, 1), (1, 1)),
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"conv{idx}",
                )(h)
            elif kind == "relu":
                h = nn.relu(h)
            else:
                h = pool(h)
            if name in wanted:
                out[name] = h
                if len(out) == len(wanted):
                    break
        return out
