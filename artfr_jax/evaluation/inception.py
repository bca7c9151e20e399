"""The Inception-v3 of FID (TensorFlow's 2015-12-05 graph as ported by pytorch-fid 0.3.0).

FID (Heusel et al., NeurIPS 2017) compares Gaussians fitted to the 2048-d pool3 activations of
this network. pytorch-fid's ``InceptionV3([3], resize_input=True, normalize_input=True,
use_fid_inception=True)`` differs from torchvision's Inception-v3 in its blocks: the average pools
of the A/C/E blocks exclude padding (``count_include_pad=False``, as TensorFlow) and the last E
block (``Mixed_7c``) max-pools. ``FIDInceptionV3`` reproduces that network in linen, including the
input pipeline: bilinear resize to 299x299 without antialiasing (``F.interpolate(...,
mode='bilinear', align_corners=False)``), then scaling from [0, 1] to [-1, 1].

Weights are never downloaded: convert pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
once with ``artfr_jax.convert.fid_inception`` and load it with ``load_inception_params``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from artfr_jax.utils import params_io

Dtype = Any
Params = Any

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_PARAMS_FILENAME = "inception_fid.msgpack"
CONVERTED_FILE = FID_PARAMS_FILENAME
CONVERT_COMMAND = (
    f"python -m artfr_jax.convert.fid_inception --input={FID_WEIGHTS_FILENAME} --output={{output}}"
)
INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, kept by the port


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``i0, i1`` and weight of ``i1`` per output pixel (half-pixel centres).

    Same arithmetic as torch's ``align_corners=False`` linear kernel: float32 scale ``in / out``,
    source coordinate ``scale * (o + 0.5) - 0.5`` rounded once to float32 (torch's compiled kernels
    fuse it into one FMA; float64 emulates that exactly), clamped at 0, right tap clamped at the
    last pixel. No antialiasing: downsampling only looks at the two nearest pixels.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    src = (scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.floor(src).astype(np.int32)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, w1


def _resize_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    i0, i1, w1 = _linear_taps(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    w1 = jnp.asarray(w1, x.dtype).reshape(shape)
    a = jnp.take(x, jnp.asarray(i0), axis=axis)
    b = jnp.take(x, jnp.asarray(i1), axis=axis)
    return a * (1 - w1) + b * w1


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size, mode='bilinear', align_corners=False)`` for NHWC, no antialias.

    ``[B, H, W, C] -> [B, size[0], size[1], C]``. ``jax.image.resize`` antialiases when shrinking,
    which would change FID on images larger than 299 px; this one does what pytorch-fid does.
    """
    return _resize_axis(_resize_axis(x, 2, size[1]), 1, size[0])


class FrozenBatchNorm(nn.Module):
    """Inference-only batch norm with its statistics as parameters (``mean``, ``var``)."""

    eps: float = BN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        mean = self.param("mean", nn.initializers.zeros, (c,), self.param_dtype)
        var = self.param("var", nn.initializers.ones, (c,), self.param_dtype)
        mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var.astype(jnp.float32) + self.eps)
        add = bias.astype(jnp.float32) - mean.astype(jnp.float32) * mul
        return (x * mul.astype(self.dtype) + add.astype(self.dtype)).astype(self.dtype)


class BasicConv2d(nn.Module):
    """Conv (no bias) + frozen BN (eps 1e-3) + ReLU; torch padding ``(ph, pw)`` on both sides.

    Params: ``conv/kernel [kh, kw, Cin, Cout]``, ``bn/{scale, bias, mean, var} [Cout]``.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name="conv",
        )(x)
        x = FrozenBatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool divides by the number of real (unpadded) pixels in the window.
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class _Block(nn.Module):
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    def conv(self, name: str, features: int, kernel, strides=1, padding=0) -> BasicConv2d:
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        return BasicConv2d(
            features,
            pair(kernel),
            strides=pair(strides),
            padding=pair(padding),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name=name,
        )


class InceptionA(_Block):
    """35x35 block (``Mixed_5b..5d``): 64 + 64 + 96 + ``pool_features`` channels."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv("branch1x1", 64, 1)(x)
        b5 = self.conv("branch5x5_1", 48, 1)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(b5)
        b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
        b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
        bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """35 -> 17 reduction (``Mixed_6a``): 384 + 96 + Cin channels."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv("branch3x3", 384, 3, strides=2)(x)
        bd = self.conv("branch3x3dbl_1", 64, 1)(x)
        bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
        bd = self.conv("branch3x3dbl_3", 96, 3, strides=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
    """17x17 block with factorised 7x7 convolutions (``Mixed_6b..6e``): 4 x 192 channels."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = self.conv("branch1x1", 192, 1)(x)
        b7 = self.conv("branch7x7_1", c7, 1)(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c7, 1)(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
        bp = self.conv("branch_pool", 192, 1)(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """17 -> 8 reduction (``Mixed_7a``): 320 + 192 + Cin channels."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv("branch3x3_1", 192, 1)(x)
        b3 = self.conv("branch3x3_2", 320, 3, strides=2)(b3)
        b7 = self.conv("branch7x7x3_1", 192, 1)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, strides=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
    """8x8 block with split 3x3 convolutions (``Mixed_7b/7c``): 320 + 768 + 768 + 192 channels.

    ``max_pool``: pool branch max-pools (pytorch-fid's ``FIDInceptionE_2``, the TF graph's
    ``Mixed_7c``) instead of the padding-excluding average pool.
    """

    max_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv("branch1x1", 320, 1)(x)
        b3 = self.conv("branch3x3_1", 384, 1)(x)
        b3 = jnp.concatenate(
            [
                self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3),
            ],
            axis=-1,
        )
        bd = self.conv("branch3x3dbl_1", 448, 1)(x)
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
        bd = jnp.concatenate(
            [
                self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd),
            ],
            axis=-1,
        )
        pooled = _max_pool_3x3_same(x) if self.max_pool else _avg_pool_3x3_same(x)
        bp = self.conv("branch_pool", 192, 1)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(_Block):
    """pytorch-fid's Inception-v3 up to pool3 (the FID feature extractor, Heusel et al. 2017).

    Attributes:
      dtype: compute dtype (float32 for reference FID; bfloat16 changes the score).
      param_dtype: parameter dtype.
      precision: convolution precision; HIGHEST so accelerators do not round to TF32/bf16.

    Shapes: ``x [B, H, W, 3]`` float RGB in [0, 1], any ``H, W`` -> ``[B, 2048]`` float32.
    Params (torch-like names): ``Conv2d_1a_3x3 ... Conv2d_4a_3x3``, ``Mixed_5b ... Mixed_7c``,
    each ``BasicConv2d`` holding ``conv/kernel`` and ``bn/{scale, bias, mean, var}``.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"FIDInceptionV3: expected [B, H, W, 3] RGB in [0, 1], got {x.shape}")
        x = resize_bilinear(x.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE))
        x = (2.0 * x - 1.0).astype(self.dtype)

        x = self.conv("Conv2d_1a_3x3", 32, 3, strides=2)(x)
        x = self.conv("Conv2d_2a_3x3", 32, 3)(x)
        x = self.conv("Conv2d_2b_3x3", 64, 3, padding=1)(x)
        x = _max_pool_3x3_s2(x)
        x = self.conv("Conv2d_3b_1x1", 80, 1)(x)
        x = self.conv("Conv2d_4a_3x3", 192, 3)(x)
        x = _max_pool_3x3_s2(x)

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = InceptionC(channels_7x7=c7, name=name, **kw)(x)
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = InceptionE(max_pool=False, name="Mixed_7b", **kw)(x)
        x = InceptionE(max_pool=True, name="Mixed_7c", **kw)(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


@functools.cache
def inception_param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened ``{path: shape}`` of the ``FIDInceptionV3`` params tree (abstract, no FLOPs)."""
    z = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    tree = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), z)["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def convert_command(output: str = "") -> str:
    """The shell command that writes the converted weights to ``output``."""
    return CONVERT_COMMAND.format(output=output or FID_PARAMS_FILENAME)


def load_inception_params(path: str | None) -> Params:
    """Loads ``FIDInceptionV3`` params written by ``artfr_jax.convert.fid_inception``.

    Returns a nested dict of float32 NumPy arrays. Raises ``ValueError`` for an empty path or a
    file that is not a converted FID Inception and ``FileNotFoundError`` for a missing one; the
    message names the file and the command that produces it.
    """
    return params_io.load_params_file(
        path,
        label="FID Inception",
        user="FID",
        filename=FID_PARAMS_FILENAME,
        expected=inception_param_shapes(),
        hint=convert_command,
    )
