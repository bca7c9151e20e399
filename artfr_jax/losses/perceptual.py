"""LPIPS perceptual distance (Zhang et al., 2018), the L_P term of ART-FR's stage-I loss (Sec. 3.1,
Eq. 4).

Matches ``lpips.LPIPS(net='vgg', version='0.1', lpips=True, spatial=False)`` called with
``normalize=False`` (inputs in [-1, 1]). Weights are never downloaded: convert torchvision's VGG16
state dict plus the LPIPS linear heads once with ``artfr_jax.convert.lpips_vgg`` and load the file
with ``load_lpips_params``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from artfr_jax.models.vgg import LPIPS_LAYERS, VGG
from artfr_jax.utils import params_io

Dtype = Any
Params = Any

# lpips' ScalingLayer: maps [-1, 1] input to roughly ImageNet-normalised values.
LPIPS_SHIFT: tuple[float, ...] = (-0.030, -0.088, -0.188)
LPIPS_SCALE: tuple[float, ...] = (0.458, 0.448, 0.450)

CONVERT_COMMAND = (
    "python -m artfr_jax.convert.lpips_vgg --vgg16=vgg16-397923af.pth --output={output}"
)


def unit_normalize(f: jax.Array, eps: float = 1e-10) -> jax.Array:
    """``f / (||f||_2 + eps)`` along the channel axis (lpips' ``normalize_tensor``).

    The norm is zero where a ReLU feature vector is all zero; the square root is guarded so its
    gradient stays finite there (the value is unchanged).
    """
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    pos = sq > 0
    norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
    return f / (norm + eps)


class LPIPS(nn.Module):
    """LPIPS distance with a VGG16 trunk and the v0.1 linear heads (ART-FR Sec. 3.1, L_P in Eq. 4).

    Per layer ``relu1_2 ... relu5_3``: unit-normalise channels, squared difference, a 1x1 linear
    head without bias, spatial mean; the five values are summed. The head is linear, so it is
    applied after the spatial mean (same value, ``H*W`` times less work). Both images go through
    the trunk separately, so when ``y`` is a constant target the backward pass only runs for ``x``.

    Attributes:
      dtype: compute dtype of the VGG convolutions (``jnp.bfloat16`` for training at 512 px);
        normalisation, differences and heads always run in float32.
      param_dtype: parameter dtype.
      eps: added to the channel norm, as in lpips.

    Shapes: ``x, y: [B, H, W, 3]`` in [-1, 1] -> ``[B]`` (``per_layer=True`` also returns the five
    ``[B]`` layer terms). H and W of at least 16 keep every layer non-empty.
    Params: ``vgg/conv{idx}/{kernel, bias}`` (torchvision indices), ``lin{k}/kernel [C_k, 1]``.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    eps: float = 1e-10

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, *, per_layer: bool = False):
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"LPIPS: expected two images of the same shape [B, H, W, 3], got {x.shape} and "
                f"{y.shape}"
            )
        shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
        scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
        vgg = VGG(
            output_layers=LPIPS_LAYERS, dtype=self.dtype, param_dtype=self.param_dtype, name="vgg"
        )
        fx = vgg((x.astype(jnp.float32) - shift) / scale)
        fy = vgg((y.astype(jnp.float32) - shift) / scale)
        terms = []
        for k, name in enumerate(LPIPS_LAYERS):
            a = unit_normalize(fx[name].astype(jnp.float32), self.eps)
            b = unit_normalize(fy[name].astype(jnp.float32), self.eps)
            d = jnp.mean(jnp.square(a - b), axis=(1, 2))  # [B, C]
            head = nn.Dense(
                1, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype, name=f"lin{k}"
            )
            terms.append(head(d)[:, 0])
        total = functools.reduce(jnp.add, terms)
        return (total, tuple(terms)) if per_layer else total


def lpips_distance(
    params: Params, x: jax.Array, y: jax.Array, *, dtype: Dtype = jnp.float32
) -> jax.Array:
    """LPIPS distance ``[B]`` between ``x`` and ``y`` ``[B, H, W, 3]`` in [-1, 1].

    ``params`` is the tree from ``load_lpips_params`` (``variables['params']``). As a loss, pass the
    target as ``y`` and average over the batch.
    """
    return LPIPS(dtype=dtype).apply({"params": params}, x, y)


@functools.cache
def lpips_param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened ``{path: shape}`` of the LPIPS params tree (computed abstractly, no FLOPs)."""
    z = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    tree = jax.eval_shape(LPIPS().init, jax.random.key(0), z, z)["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def _convert_hint(path: str) -> str:
    return CONVERT_COMMAND.format(output=path or "lpips_vgg.msgpack")


def load_lpips_params(path: str | None) -> Params:
    """Loads LPIPS params written by ``artfr_jax.convert.lpips_vgg``.

    Returns a nested dict of float32 NumPy arrays (put it on devices once, e.g. replicated, rather
    than passing host arrays to every step). Raises ``ValueError`` when ``path`` is empty or the
    file is not a converted LPIPS params tree and ``FileNotFoundError`` when it does not exist;
    the message names the file and the command that produces it.
    """
    return params_io.load_params_file(
        path,
        label="LPIPS",
        user="LPIPS perceptual loss",
        filename="lpips_vgg.msgpack",
        expected=lpips_param_shapes(),
        hint=_convert_hint,
    )
