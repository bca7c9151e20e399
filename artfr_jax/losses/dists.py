"""DISTS: Deep Image Structure and Texture Similarity (Ding et al., TPAMI 2020), full-reference.

Matches ``DISTS_pytorch.DISTS()(x, y)`` (package ``DISTS_pytorch==0.1``): a VGG16 trunk whose max
pools are replaced by L2 pooling (Sec. 3.1), then per-channel structure and texture similarities of
the input and of the five stages ``relu1_2 ... relu5_3`` (Sec. 3.2, Eqs. 6-8), combined with the
learned weights alpha/beta normalised by their joint sum. Lower is more similar; 0 for ``x == y``.

Weights are never downloaded: convert torchvision's ImageNet VGG16 state dict plus the package's
``weights.pt`` once with ``artfr_jax.convert.dists`` and load the file with ``load_dists_params``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from artfr_jax.models.vgg import LPIPS_LAYERS, VGG, imagenet_normalize
from artfr_jax.utils import params_io

Dtype = Any
Params = Any

# Channels of the compared representations: the raw image, then relu1_2 ... relu5_3.
DISTS_CHANNELS: tuple[int, ...] = (3, 64, 128, 256, 512, 512)
DISTS_LAYERS: tuple[str, ...] = LPIPS_LAYERS

CONVERT_COMMAND = "python -m artfr_jax.convert.dists --vgg16=vgg16-397923af.pth --output={output}"


def _l2_pool_filter() -> np.ndarray:
    # np.hanning(5)[1:-1] = [0.5, 1, 0.5]; the 2-D window is normalised to sum 1.
    a = np.hanning(5)[1:-1]
    g = a[:, None] * a[None, :]
    return (g / g.sum()).astype(np.float32)


def l2_pool(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """DISTS' L2 pooling (Sec. 3.1): ``sqrt(hanning3x3 * x**2 + eps)``, stride 2, zero padding 1.

    Depthwise, no parameters. ``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]``. ``eps`` keeps the
    square root differentiable where the pooled energy is zero.
    """
    c = x.shape[-1]
    kernel = jnp.asarray(np.tile(_l2_pool_filter()[:, :, None, None], (1, 1, 1, c)), x.dtype)
    out = jax.lax.conv_general_dilated(
        jnp.square(x),
        kernel,
        window_strides=(2, 2),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.sqrt(out + eps)


class DISTS(nn.Module):
    """DISTS distance between a distorted image ``x`` and a reference ``y`` (Ding et al., Eq. 9).

    For each representation ``k`` (image, relu1_2 ... relu5_3) and channel ``j`` with spatial means
    ``mu``, variances ``sigma^2`` and covariance ``sigma_xy``:
    structure ``S1 = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1)`` and texture
    ``S2 = (2 sigma_xy + c2) / (sigma_x^2 + sigma_y^2 + c2)``;
    ``D = 1 - sum_kj (alpha_kj S1 + beta_kj S2) / (sum alpha + sum beta)``.

    Attributes:
      dtype: compute dtype of the VGG convolutions and pooling; statistics always run in float32.
      param_dtype: parameter dtype.
      c1: structure stabiliser (1e-6 as in DISTS_pytorch).
      c2: texture stabiliser (1e-6 as in DISTS_pytorch).

    Shapes: ``x, y: [B, H, W, 3]`` RGB in [0, 1] (NOT [-1, 1]; ImageNet normalisation happens
    inside) -> ``[B]``. Any ``H, W >= 1`` works; the reference model is used at 256 px or more.
    Params: ``vgg/conv{idx}/{kernel, bias}`` (torchvision indices), ``alpha [1475]``,
    ``beta [1475]`` (channels ordered image, relu1_2, ..., relu5_3).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    c1: float = 1e-6
    c2: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"DISTS: expected two images of the same shape [B, H, W, 3] in [0, 1], got "
                f"{x.shape} and {y.shape}"
            )
        n = sum(DISTS_CHANNELS)
        init = lambda key, shape, dtype: 0.1 + 0.01 * jax.random.normal(key, shape, dtype)  # noqa: E731
        alpha = self.param("alpha", init, (n,), self.param_dtype).astype(jnp.float32)
        beta = self.param("beta", init, (n,), self.param_dtype).astype(jnp.float32)
        w_sum = jnp.sum(alpha) + jnp.sum(beta)
        alpha, beta = alpha / w_sum, beta / w_sum

        vgg = VGG(
            output_layers=DISTS_LAYERS,
            pool=l2_pool,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="vgg",
        )
        x = x.astype(jnp.float32)
        y = y.astype(jnp.float32)
        fx, fy = vgg(imagenet_normalize(x)), vgg(imagenet_normalize(y))
        feats_x = [x] + [fx[name].astype(jnp.float32) for name in DISTS_LAYERS]
        feats_y = [y] + [fy[name].astype(jnp.float32) for name in DISTS_LAYERS]

        total = jnp.zeros((x.shape[0],), jnp.float32)
        start = 0
        for a, b, c in zip(feats_x, feats_y, DISTS_CHANNELS, strict=True):
            mx = jnp.mean(a, axis=(1, 2))  # [B, C]
            my = jnp.mean(b, axis=(1, 2))
            s1 = (2 * mx * my + self.c1) / (mx**2 + my**2 + self.c1)
            vx = jnp.mean(jnp.square(a - mx[:, None, None]), axis=(1, 2))
            vy = jnp.mean(jnp.square(b - my[:, None, None]), axis=(1, 2))
            # Same covariance formula as the reference (E[xy] - E[x]E[y]) for bitwise-close parity.
            cov = jnp.mean(a * b, axis=(1, 2)) - mx * my
            s2 = (2 * cov + self.c2) / (vx + vy + self.c2)
            total = total + s1 @ alpha[start : start + c] + s2 @ beta[start : start + c]
            start += c
        return 1.0 - total


def dists(params: Params, x: jax.Array, y: jax.Array, *, dtype: Dtype = jnp.float32) -> jax.Array:
    """DISTS distance ``[B]`` between ``x`` and reference ``y`` ``[B, H, W, 3]`` in [0, 1].

    ``params`` is the tree from ``load_dists_params`` (``variables['params']``). Jittable.
    """
    return DISTS(dtype=dtype).apply({"params": params}, x, y)


@functools.cache
def dists_param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened ``{path: shape}`` of the DISTS params tree (computed abstractly, no FLOPs)."""
    z = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    tree = jax.eval_shape(DISTS().init, jax.random.key(0), z, z)["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def _convert_hint(path: str) -> str:
    return CONVERT_COMMAND.format(output=path or "dists.msgpack")


def load_dists_params(path: str | None) -> Params:
    """Loads DISTS params written by ``artfr_jax.convert.dists``.

    Returns a nested dict of float32 NumPy arrays. Raises ``ValueError`` when ``path`` is empty or
    the file is not a converted DISTS params tree and ``FileNotFoundError`` when it does not exist;
    the message names the file and the command that produces it.
    """
    return params_io.load_params_file(
        path,
        label="DISTS",
        user="DISTS",
        filename="dists.msgpack",
        expected=dists_param_shapes(),
        hint=_convert_hint,
    )
