"""ArcFace identity embedders for the "Deg." metric (VQFR Sec. 6.1; OSDFace Sec. 4.1), in linen.

Two backbones, each with the preprocessing of the code that defines its protocol:

* ``resnet18``: ``resnet_face18(use_se=False)`` of ronghuaiyang/arcface-pytorch (``models/resnet.py``,
  ``ResNetFace`` with ``IRBlock``; checkpoint ``resnet18_110.pth``), as used by VQFR's
  ``metric_paper/calculate_cos_dist.py`` (TencentARC/VQFR @ 239c77a7), the script OSDFace also
  evaluates with. Per image: ``cv2.imread(path, 0)`` (gray), ``cv2.resize(.., (128, 128),
  INTER_LINEAR)``, float32 ``(x - 127.5) / 127.5``, one ``[1, 128, 128]`` input, 512-D output of
  ``bn5``; Deg. = ``arccos(cos(f_gt, f_restored))`` in degrees. The script does not flip; the
  arcface-pytorch LFW test (``test.py``) concatenates the features of the image and its horizontal
  flip (1024-D), available here as ``flip_concat=True``.
* ``iresnet50`` / ``iresnet100``: deepinsight/insightface ``recognition/arcface_torch/backbones/
  iresnet.py`` (checkpoints ``backbone.pth``), preprocessing of ``arcface_torch/inference.py``:
  RGB, 112 x 112, float32 ``(x / 255 - 0.5) / 0.5``; 512-D output of the ``features`` BatchNorm1d.
  Images that are not 112 px are resized with ``cv2.INTER_LINEAR`` like the resnet18 protocol.

Images arrive as uint8 RGB arrays, so ``cv2.imread(path, 0)`` is reproduced by ``png_gray``: for a
PNG file OpenCV lets libpng convert to gray, ``(9797 R + 19234 G + 3737 B) >> 15`` (truncating; it
differs from ``cv2.cvtColor(.., COLOR_RGB2GRAY)`` by one level on about half the pixels). Results
stored as JPEG were turned gray by libjpeg instead and are not reproduced bit for bit.

Weights are never downloaded: convert the PyTorch checkpoints once with ``python -m
artfr_jax.convert.arcface`` and load the file with ``load_arcface_params``. Dropout layers are
identities at inference and are left out. VQFR leaves pairs under 1 degree out of its mean
(``vqfr_deg``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from artfr_jax.utils import params_io

Dtype = Any
Variables = Any

IRESNET_LAYERS: dict[str, tuple[int, ...]] = {
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}
ARCFACE_ARCHS: tuple[str, ...] = ("resnet18", *IRESNET_LAYERS)


class ArcFaceFiles(NamedTuple):
    """Usual checkpoint name (where it comes from) and the converted file the evaluator looks for."""

    checkpoint: str
    converted: str


ARCFACE_FILES: dict[str, ArcFaceFiles] = {
    # VQFR's metric weights (Google Drive of the VQFR README), saved from nn.DataParallel.
    "resnet18": ArcFaceFiles("resnet18_110.pth", "arcface_resnet18.msgpack"),
    # insightface arcface_torch model zoo, e.g. ms1mv3_arcface_r50_fp16/backbone.pth.
    "iresnet50": ArcFaceFiles("backbone.pth", "arcface_iresnet50.msgpack"),
    "iresnet100": ArcFaceFiles("backbone.pth", "arcface_iresnet100.msgpack"),
}

CONVERT_COMMAND = (
    "python -m artfr_jax.convert.arcface --arch={arch} --input={input} --output={output}"
)

_BN_EPS = 1e-5  # torch BatchNorm default; insightface sets it explicitly too


class PReLU(nn.Module):
    """``torch.nn.PReLU(num_parameters)``: ``x`` if ``x >= 0`` else ``a * x``, ``a`` per channel.

    ``num_parameters`` is 1 (one shared slope, arcface-pytorch) or the channel count (insightface).
    Shapes: ``[..., C] -> [..., C]``. Params: ``negative_slope [num_parameters]``.
    """

    num_parameters: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.param(
            "negative_slope",
            nn.initializers.constant(0.25),
            (self.num_parameters,),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        return jnp.where(x >= 0, x, a.astype(self.dtype) * x)


def _layers(dtype: Dtype, param_dtype: Dtype, precision: Any):
    conv = functools.partial(
        nn.Conv,
        use_bias=False,
        padding=((1, 1), (1, 1)),  # torch padding=1 (not 'SAME', which is asymmetric at stride 2)
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
    )
    bn = functools.partial(
        nn.BatchNorm,
        use_running_average=True,
        epsilon=_BN_EPS,
        dtype=dtype,
        param_dtype=param_dtype,
    )
    return conv, bn


def _shortcut(x, planes, stride, conv, bn):
    """torch ``downsample = Sequential(conv1x1(stride), BatchNorm2d)`` when the shape changes."""
    if stride == 1 and x.shape[-1] == planes:
        return x
    x = conv(planes, (1, 1), strides=stride, padding="VALID", name="downsample_conv")(x)
    return bn(name="downsample_bn")(x)


def _flatten_nchw(x: jax.Array) -> jax.Array:
    # torch flattens [B, C, H, W]; keeping its order lets fc weights be copied unpermuted.
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


class IRBlock(nn.Module):
    """arcface-pytorch ``IRBlock`` (``use_se=False``): bn0-conv1-bn1-prelu-conv2(stride)-bn2, add, prelu.

    One PReLU (a single shared slope) is applied twice, after ``bn1`` and after the residual sum.
    Shapes: ``[B, H, W, Cin] -> [B, H/stride, W/stride, planes]``.
    """

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv, bn = _layers(self.dtype, self.param_dtype, self.precision)
        prelu = PReLU(1, dtype=self.dtype, param_dtype=self.param_dtype, name="prelu")
        out = bn(name="bn0")(x)
        out = conv(x.shape[-1], (3, 3), name="conv1")(out)
        out = prelu(bn(name="bn1")(out))
        out = conv(self.planes, (3, 3), strides=self.stride, name="conv2")(out)
        out = bn(name="bn2")(out)
        return prelu(out + _shortcut(x, self.planes, self.stride, conv, bn))


class ResNetFace18(nn.Module):
    """arcface-pytorch ``resnet_face18(use_se=False)``: the VQFR/GFPGAN identity network.

    conv3x3(1->64)-bn1-prelu-maxpool2, four stages of two ``IRBlock`` (64, 128/2, 256/2, 512/2),
    bn4, flatten (torch C,H,W order), fc5 (32768 -> 512), bn5. Inference-mode BatchNorm.

    Shapes: ``[B, 128, 128, 1]`` gray in [-1, 1] (``(x - 127.5) / 127.5``) -> ``[B, 512]`` float32.
    Variables: ``params`` and ``batch_stats`` named like the torch modules (``layer2_0/bn0`` is
    ``layer2.0.bn0``, ``downsample_conv/_bn`` are ``downsample.0/.1``).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[1:] != (128, 128, 1):
            raise ValueError(f"ResNetFace18: expected [B, 128, 128, 1] gray input, got {x.shape}")
        conv, bn = _layers(self.dtype, self.param_dtype, self.precision)
        x = conv(64, (3, 3), name="conv1")(x.astype(self.dtype))
        x = PReLU(1, dtype=self.dtype, param_dtype=self.param_dtype, name="prelu")(
            bn(name="bn1")(x)
        )
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        for i, planes in enumerate((64, 128, 256, 512)):
            for j in range(2):
                x = IRBlock(
                    planes,
                    stride=2 if (i > 0 and j == 0) else 1,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    precision=self.precision,
                    name=f"layer{i + 1}_{j}",
                )(x)
        x = _flatten_nchw(bn(name="bn4")(x))
        x = nn.Dense(
            512,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name="fc5",
        )(x)
        return bn(name="bn5")(x).astype(jnp.float32)


class IBasicBlock(nn.Module):
    """insightface ``IBasicBlock``: bn1-conv1-bn2-prelu(C)-conv2(stride)-bn3 plus the shortcut.

    No activation after the sum. Shapes: ``[B, H, W, Cin] -> [B, H/stride, W/stride, planes]``.
    """

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv, bn = _layers(self.dtype, self.param_dtype, self.precision)
        out = bn(name="bn1")(x)
        out = conv(self.planes, (3, 3), name="conv1")(out)
        out = bn(name="bn2")(out)
        out = PReLU(self.planes, dtype=self.dtype, param_dtype=self.param_dtype, name="prelu")(out)
        out = conv(self.planes, (3, 3), strides=self.stride, name="conv2")(out)
        out = bn(name="bn3")(out)
        return out + _shortcut(x, self.planes, self.stride, conv, bn)


class IResNet(nn.Module):
    """insightface arcface_torch ``IResNet`` (``iresnet50``: (3, 4, 14, 3), ``iresnet100``: (3, 13, 30, 3)).

    conv3x3(3->64)-bn1-prelu(64), four stages of ``IBasicBlock`` each starting with stride 2
    (64, 128, 256, 512), bn2, flatten (torch C,H,W order), fc (25088 -> num_features), ``features``
    BatchNorm1d. Inference-mode BatchNorm.

    Shapes: ``[B, 112, 112, 3]`` RGB in [-1, 1] (``(x / 255 - 0.5) / 0.5``) -> ``[B, num_features]``.
    Variables named like the torch modules (``layer3_7/bn2`` is ``layer3.7.bn2``).
    """

    layers: Sequence[int]
    num_features: int = 512
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[1:] != (112, 112, 3):
            raise ValueError(f"IResNet: expected [B, 112, 112, 3] RGB input, got {x.shape}")
        conv, bn = _layers(self.dtype, self.param_dtype, self.precision)
        x = conv(64, (3, 3), name="conv1")(x.astype(self.dtype))
        x = PReLU(64, dtype=self.dtype, param_dtype=self.param_dtype, name="prelu")(
            bn(name="bn1")(x)
        )
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), self.layers, strict=True)):
            for j in range(n):
                x = IBasicBlock(
                    planes,
                    stride=2 if j == 0 else 1,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    precision=self.precision,
                    name=f"layer{i + 1}_{j}",
                )(x)
        x = _flatten_nchw(bn(name="bn2")(x))
        x = nn.Dense(
            self.num_features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name="fc",
        )(x)
        return bn(name="features")(x).astype(jnp.float32)


def _check_arch(arch: str) -> None:
    if arch not in ARCFACE_ARCHS:
        raise ValueError(f"unknown ArcFace arch {arch!r}; expected one of {list(ARCFACE_ARCHS)}")


def arcface_module(
    arch: str,
    *,
    layers: Sequence[int] | None = None,
    dtype: Dtype = jnp.float32,
    precision: Any = None,
) -> nn.Module:
    """The linen backbone for ``arch``; ``layers`` overrides the IResNet depth (tests)."""
    _check_arch(arch)
    if arch == "resnet18":
        if layers is not None:
            raise ValueError("layers= applies to the iresnet archs only")
        return ResNetFace18(dtype=dtype, precision=precision)
    return IResNet(tuple(layers or IRESNET_LAYERS[arch]), dtype=dtype, precision=precision)


def input_shape(arch: str) -> tuple[int, int, int]:
    """``(H, W, C)`` the backbone takes."""
    _check_arch(arch)
    return (128, 128, 1) if arch == "resnet18" else (112, 112, 3)


@functools.cache
def arcface_variable_shapes(
    arch: str, layers: tuple[int, ...] | None = None
) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened ``{('params' | 'batch_stats', ...): shape}`` of ``arch`` (abstract, no FLOPs)."""
    module = arcface_module(arch, layers=layers)
    x = jax.ShapeDtypeStruct((1, *input_shape(arch)), jnp.float32)
    tree = jax.eval_shape(module.init, jax.random.key(0), x)
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def _convert_hint(arch: str, path: str) -> str:
    return CONVERT_COMMAND.format(
        arch=arch,
        input=ARCFACE_FILES[arch].checkpoint,
        output=path or ARCFACE_FILES[arch].converted,
    )


def load_arcface_params(arch: str, path: str | None) -> Variables:
    """Loads ``{'params', 'batch_stats'}`` written by ``artfr_jax.convert.arcface`` for ``arch``.

    Raises ``ValueError`` for an empty path or a file that is not a converted ``arch`` backbone and
    ``FileNotFoundError`` for a missing one; messages name the file and the converter command.
    """
    _check_arch(arch)
    return params_io.load_params_file(
        path,
        label=f"ArcFace {arch}",
        user=f"the identity metric Deg. (ArcFace {arch})",
        filename=ARCFACE_FILES[arch].converted,
        expected=arcface_variable_shapes(arch),
        hint=functools.partial(_convert_hint, arch),
    )


def png_gray(rgb: np.ndarray) -> np.ndarray:
    """``cv2.imread(png_path, cv2.IMREAD_GRAYSCALE)`` of an RGB image, without the file.

    OpenCV's PNG decoder asks libpng for gray (``png_set_rgb_to_gray(.., 0.299, 0.587)``), which
    uses 15-bit coefficients 9797 / 19234 / 3737 and truncates. uint8 ``[..., 3]`` -> ``[...]``.
    """
    c = rgb.astype(np.uint32)
    return ((9797 * c[..., 0] + 19234 * c[..., 1] + 3737 * c[..., 2]) >> 15).astype(np.uint8)


def preprocess(arch: str, images: np.ndarray) -> np.ndarray:
    """Host-side protocol preprocessing: uint8 RGB ``[N, H, W, 3]`` -> float32 network input.

    resnet18: gray as ``cv2.imread(png, 0)`` (``png_gray``), resize to 128 (``INTER_LINEAR``,
    which VQFR calls even at 128 px), ``(x - 127.5) / 127.5`` -> ``[N, 128, 128, 1]``.
    iresnet: resize to 112 (``INTER_LINEAR``), ``(x / 255 - 0.5) / 0.5`` -> ``[N, 112, 112, 3]``.
    """
    _check_arch(arch)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"ArcFace {arch}: expected uint8 RGB images [N, H, W, 3], got {images.dtype} "
            f"{images.shape}"
        )
    h, w, c = input_shape(arch)
    out = np.empty((len(images), h, w, c), np.float32)
    for i, img in enumerate(images):
        if arch == "resnet18":
            gray = cv2.resize(png_gray(img), (w, h), interpolation=cv2.INTER_LINEAR)
            gray = gray.astype(np.float32)
            gray -= 127.5
            gray /= 127.5
            out[i, ..., 0] = gray
        else:
            rgb = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
            out[i] = (rgb / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    return out


class ArcFaceEmbedder:
    """Identity embeddings of uint8 RGB faces with the protocol of ``arch`` (module docstring).

    ``params`` is the tree from ``load_arcface_params``. Preprocessing runs on the host (OpenCV);
    the backbone runs jitted on fixed batches of ``batch_size`` (the last one zero-padded), so it
    compiles once. ``precision`` defaults to HIGHEST so GPU/TPU results match the float32
    reference. ``flip_concat`` (resnet18 only) appends the features of the mirrored image
    (arcface-pytorch ``test.py``), giving 1024-D. ``layers`` overrides the IResNet depth (tests).

    ``embedder(images [N, H, W, 3] uint8) -> np.ndarray [N, dim] float32``.
    """

    def __init__(
        self,
        arch: str,
        params: Variables,
        batch_size: int = 32,
        *,
        dtype: Dtype = jnp.float32,
        precision: Any = jax.lax.Precision.HIGHEST,
        flip_concat: bool = False,
        layers: Sequence[int] | None = None,
    ):
        _check_arch(arch)
        if batch_size < 1:
            raise ValueError(f"ArcFaceEmbedder: batch_size must be >= 1, got {batch_size}")
        if flip_concat and arch != "resnet18":
            raise ValueError("ArcFaceEmbedder: flip_concat is part of the resnet18 protocol only")
        self.arch = arch
        self.batch_size = batch_size
        self.flip_concat = flip_concat
        self.module = arcface_module(arch, layers=layers, dtype=dtype, precision=precision)
        self.dim = 512 * (2 if flip_concat else 1)
        if arch == "resnet18":
            self.name = "ArcFace ResNet-18 (arcface-pytorch, 128px gray" + (
                ", flip-concat)" if flip_concat else ")"
            )
        else:
            self.name = f"ArcFace IResNet-{arch[len('iresnet') :]} (insightface, 112px RGB)"
        self.variables = jax.device_put(
            {"params": params["params"], "batch_stats": params["batch_stats"]}
        )

        def apply(variables, x):
            f = self.module.apply(variables, x)
            if self.flip_concat:
                f = jnp.concatenate([f, self.module.apply(variables, x[:, :, ::-1])], axis=-1)
            return f

        # (variables, x [batch_size, *input_shape] float32) -> [batch_size, dim] float32.
        self.apply_fn = jax.jit(apply)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = preprocess(self.arch, images)
        n, b = len(x), self.batch_size
        out = np.empty((n, self.dim), np.float32)
        for start in range(0, n, b):
            chunk = x[start : start + b]
            if len(chunk) < b:
                chunk = np.concatenate([chunk, np.zeros((b - len(chunk), *x.shape[1:]), x.dtype)])
            f = np.asarray(self.apply_fn(self.variables, chunk))
            out[start : start + b] = f[: min(b, n - start)]
        return out


def vqfr_deg(angles: np.ndarray, identical_below: float = 1.0) -> tuple[float, int]:
    """VQFR's reduction of per-image angles: mean over angles ``>= identical_below`` degrees.

    ``calculate_cos_dist.py`` counts pairs under 1 degree as "almost identical" and leaves them out
    of the mean. Returns ``(mean, identical_count)``; the mean is NaN when every pair is identical.
    """
    a = np.asarray(angles, np.float64).reshape(-1)
    kept = a[a >= identical_below]
    return (float(kept.mean()) if kept.size else float("nan")), int(a.size - kept.size)
