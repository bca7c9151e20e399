"""VQFR v1 networks (Gu et al. 2022): the stage-I codebook VQGAN and the restoration network.

* :class:`VQGANv1` (Sec. 3.1, Eqs. 1-3; Fig. 4a): an encoder of ``len(channel_multipliers)``
  resolution levels (bilinear resize + 3x3 conv between levels, pre-norm residual blocks), a 1x1
  ``quant_conv`` to the ``num_embeddings x embedding_dim`` codebook at the last level (f = 32 at
  the paper config), nearest-code quantisation with a straight-through estimator, a 1x1
  ``post_quant_conv`` and a mirrored decoder.
* :class:`VQFRv1` (Sec. 3.2, Eqs. 4-5; Fig. 3; App. Table 4): the same encoder on the degraded
  face, quantisation against the fixed HQ codebook and the parallel decoder: the texture branch (the
  VQGAN decoder on the quantised code) and the main branch, which at every level warps the texture
  feature with a texture warping module (TWM: offsets from the input feature and the texture
  feature, then a modulated deformable 3x3 conv) and fuses it with the upsampled main feature.

The layout is the official PyTorch release (TencentARC/VQFR, ``vqfr/archs/vqganv1_arch.py``,
``vqfrv1_arch.py``, ``quantizer_arch.py``), so its checkpoints convert with
:mod:`artfr_jax.convert.vqfr`. Where the release differs from the paper's text, the release wins:

* the codebook loss is ``mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)``, i.e. the
  commitment term has weight 1 and the codebook term weight ``beta`` (Eq. 3 has them swapped; both
  terms are returned so a trainer can weight them either way);
* the TWM offset branch is 1x1 conv -> GN -> SiLU -> depthwise 7x7 -> GN -> SiLU -> 1x1 conv, then
  a 3x3 conv -> GN -> SiLU over the concatenation with the previous level's offset feature
  (upsampled bilinearly and doubled); the deformable conv's own 3x3 ``conv_offset`` turns that
  feature into ``2 * G * 9`` offsets and ``G * 9`` sigmoid masks (DCNv2, ``G = deformable_groups``);
* the main branch ends with GN -> SiLU and a 3x3 conv over the concatenation with the input image.

All resizing is bilinear with half-pixel centres and no anti-aliasing (PyTorch
``F.interpolate(mode='bilinear', align_corners=False)``), see :func:`resize_bilinear`.
Tensors are NHWC; images are in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from artfr_jax.models import layers
from artfr_jax.models.deform_conv import deform_conv2d
from artfr_jax.models.kernels import Kernels
from artfr_jax.models.layers import Conv, GroupNorm
from artfr_jax.models.vqgan import code_usage_stats, nearest_code

Dtype = Any
PrecisionLike = Any

__all__ = [
    "DCNv2Pack",
    "MainDecoder",
    "VQFRDecoder",
    "VQFREncoder",
    "VQFRv1",
    "VQGANv1",
    "VQQuantizer",
    "ResnetBlock",
    "TextureWarpingModule",
    "level_name",
    "resize_bilinear",
    "vqfr_params_from_vqgan",
]

# The release initialises every nn.Conv2d with trunc_normal(std=0.02) (truncated at +-2, i.e.
# at 100 sigma, so effectively a normal) and zero bias.
_CONV_INIT = nn.initializers.normal(0.02)


def level_name(index: int) -> str:
    """Name of resolution level ``index`` as in the release: ``Level_{2**index}``."""
    return f"Level_{2**index}"


def _source_index(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # PyTorch's area_pixel_compute_source_index for align_corners=False: half-pixel centres,
    # negative coordinates clamped to 0, the upper neighbour clamped to the last row.
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _resize_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    i0, i1, lam = _source_index(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    lam = jnp.asarray(lam, x.dtype).reshape(shape)
    a = jnp.take(x, jnp.asarray(i0), axis=axis)
    b = jnp.take(x, jnp.asarray(i1), axis=axis)
    return a + (b - a) * lam


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size, mode='bilinear', align_corners=False)`` for NHWC ``x``.

    ``[B, H, W, C] -> [B, size[0], size[1], C]``. No anti-aliasing when shrinking (so a 32x
    reduction averages the two pixels nearest each output centre, as the release does).
    """
    return _resize_axis(_resize_axis(x, 1, size[0]), 2, size[1])


def _check_levels(
    who: str,
    base_channels: int,
    channel_multipliers: Sequence[int],
    resolution_scale_rates: Sequence[int],
    norm_groups: int,
) -> tuple[int, ...]:
    """Validates the level fields; returns the channels per level."""
    if len(channel_multipliers) != len(resolution_scale_rates) or not channel_multipliers:
        raise ValueError(
            f"{who}: channel_multipliers {tuple(channel_multipliers)} and resolution_scale_rates "
            f"{tuple(resolution_scale_rates)} must be non-empty and of equal length"
        )
    chans = tuple(int(m) * base_channels for m in channel_multipliers)
    for c in chans:
        if c % norm_groups:
            raise ValueError(
                f"{who}: norm_groups={norm_groups} must divide every level width {chans}"
            )
    for r in resolution_scale_rates:
        if int(r) != r or r < 1:
            raise ValueError(
                f"{who}: resolution_scale_rates must be positive ints, got "
                f"{tuple(resolution_scale_rates)}"
            )
    return chans


def _conv(features, k, name, module, *, groups=1) -> nn.Conv:
    """A k x k conv (padding k // 2, the release's init) with ``module``'s dtype fields."""
    return Conv(
        features,
        (k, k),
        padding=k // 2,
        feature_group_count=groups,
        kernel_init=_CONV_INIT,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        precision=module.precision,
        kernels=module.kernels,
        name=name,
    )


def _norm(name, module) -> GroupNorm:
    return GroupNorm(
        module.norm_groups,
        module.norm_eps,
        module.dtype,
        module.param_dtype,
        kernels=module.kernels,
        name=name,
    )


class ResnetBlock(nn.Module):
    """Pre-norm residual block of the release: ``skip(x) + conv2(act(gn2(conv1(act(gn1(x))))))``.

    ``skip`` is a 1x1 ``shortcut_conv`` when the width changes, else the identity.
    ``[B, H, W, C_in] -> [B, H, W, out_channels]``.
    """

    out_channels: int
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.out_channels
        h = _conv(c, 3, "conv1", self)(nn.swish(_norm("norm1", self)(x)))
        h = _conv(c, 3, "conv2", self)(nn.swish(_norm("norm2", self)(h)))
        if x.shape[-1] != c:
            x = _conv(c, 1, "shortcut_conv", self)(x)
        return x.astype(h.dtype) + h


def _block_cls(module) -> type[ResnetBlock]:
    """``ResnetBlock``, recomputed in the backward pass as ``module.remat`` asks (``layers.remat``):
    less activation memory at 512 px (on CPU only in programs compiled with
    ``kernels.compiler_options``, which keep XLA from merging the recomputation away)."""
    return layers.remat(ResnetBlock, module.remat)


class _Levels(nn.Module):
    """Fields shared by :class:`VQFREncoder` and :class:`VQFRDecoder`: the level widths
    ``C_i = base_channels * channel_multipliers[i]``, the resolution change per level, residual
    blocks per level and the layers' settings."""

    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 2, 4)
    resolution_scale_rates: tuple[int, ...] = (1, 2, 2, 2, 2, 2)
    num_blocks: int = 2
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    remat: bool | str = False
    kernels: Kernels = Kernels()

    def _channels(self) -> tuple[int, ...]:
        return _check_levels(
            type(self).__name__,
            self.base_channels,
            self.channel_multipliers,
            self.resolution_scale_rates,
            self.norm_groups,
        )

    def _blocks(self, x: jax.Array, level: int, channels: int) -> jax.Array:
        """The level's ``num_blocks`` residual blocks ``Level_{2^i}_block_{j}``; a level without a
        resampling conv (rate 1) cannot change the width."""
        if x.shape[-1] != channels:
            raise ValueError(
                f"{type(self).__name__}: level {level} has rate 1 so it has no conv to change the "
                f"width {x.shape[-1]} -> {channels}; use equal multipliers there"
            )
        for j in range(self.num_blocks):
            x = _block_cls(self)(
                channels,
                self.norm_groups,
                self.norm_eps,
                self.dtype,
                self.param_dtype,
                self.precision,
                self.kernels,
                name=f"{level_name(level)}_block_{j}",
            )(x)
        return x


class VQFREncoder(_Levels):
    """Encoder E (Sec. 3.1; release ``VQGANEncoder``) with its output head.

    ``conv_in``; then per level ``i``: bilinear shrink by ``resolution_scale_rates[i]`` followed
    by a 3x3 conv (``Level_{2^i}_downsample``, absent when the rate is 1) and
    ``num_blocks`` residual blocks; after the last level GN -> SiLU -> 3x3 conv
    (``Level_{2^L}_convout_norm``, ``_convout_conv``); blocks are ``Level_{2^i}_block_{j}``.
    ``[B, H, W, 3] -> [B, H / prod(rates), W / prod(rates), C_L]``, ``C_i = base * mult[i]``.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        chans = self._channels()
        x = _conv(chans[0], 3, "conv_in", self)(x.astype(self.dtype))
        for i, (c, rate) in enumerate(zip(chans, self.resolution_scale_rates, strict=True)):
            if rate != 1:
                b, h, w, _ = x.shape
                x = resize_bilinear(x, (h // rate, w // rate))
                x = _conv(c, 3, f"{level_name(i)}_downsample", self)(x)
            x = self._blocks(x, i, c)
        lvl = level_name(len(chans) - 1)
        x = nn.swish(_norm(f"{lvl}_convout_norm", self)(x))
        return _conv(chans[-1], 3, f"{lvl}_convout_conv", self)(x)


class VQFRDecoder(_Levels):
    """Decoder G (Sec. 3.1) / texture branch G_t of the parallel decoder (Sec. 3.2).

    Release ``VQGANDecoder``. From the last level down to level 0: upsample (3x3 conv, then
    bilinear x ``rate``; ``Level_{2^i}_upsample``, absent at rate 1) with the decoder rate of level
    ``i`` being ``resolution_scale_rates[L - i]`` (the release reverses the list), then
    ``num_blocks`` residual blocks; finally GN -> SiLU -> 3x3 conv to RGB.

    ``[B, h, w, C_L] -> [B, H, W, 3]``; with ``return_features`` also the per-level features
    ``F^t = (F^t_0, ..., F^t_L)`` (level 0 first), ``F^t_i [B, H_i, W_i, C_i]``.
    """

    num_blocks: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, return_features: bool = False):
        chans = self._channels()
        rates = tuple(self.resolution_scale_rates)[::-1]
        n = len(chans)
        feats: list[jax.Array] = [None] * n  # type: ignore[list-item]
        x = x.astype(self.dtype)
        for i in range(n - 1, -1, -1):
            c, rate = chans[i], rates[i]
            if rate != 1:
                b, h, w, _ = x.shape
                x = _conv(c, 3, f"{level_name(i)}_upsample", self)(x)
                x = resize_bilinear(x, (h * rate, w * rate))
            x = self._blocks(x, i, c)
            feats[i] = x
        img = _conv(3, 3, "conv_out", self)(nn.swish(_norm("norm_out", self)(x)))
        return (img, tuple(feats)) if return_features else img


class VQQuantizer(nn.Module):
    """Vector quantiser of the release (``L2VectorQuantizerKmeans``; Sec. 3.1, Eq. 1).

    Params: ``quant_conv`` (1x1, ``in_dim -> embedding_dim``), ``embedding [K, embedding_dim]``
    (initialised U(-1/K, 1/K)), ``post_quant_conv`` (1x1 back to ``in_dim``). The k-means
    re-initialisation from a reservoir (Sec. 4.1) lives in the trainer
    (:mod:`artfr_jax.train.kmeans`); it replaces ``embedding``.
    ``freeze_codebook`` stops every gradient to ``embedding`` (stage II keeps the HQ codebook).
    """

    in_dim: int = 512
    num_embeddings: int = 1024
    embedding_dim: int = 256
    beta: float = 0.25
    freeze_codebook: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernels: Kernels = Kernels()

    def setup(self):
        k = self.num_embeddings
        common = dict(
            kernel_init=_CONV_INIT,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernels=self.kernels,
        )
        self.quant_conv = Conv(self.embedding_dim, (1, 1), **common)
        self.post_quant_conv = Conv(self.in_dim, (1, 1), **common)
        self.embedding = self.param(
            "embedding",
            lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k),
            (k, self.embedding_dim),
            self.param_dtype,
        )

    def _codebook(self) -> jax.Array:
        e = self.embedding.astype(jnp.float32)
        return jax.lax.stop_gradient(e) if self.freeze_codebook else e

    def project(self, h: jax.Array) -> jax.Array:
        """``quant_conv``: ``[B, h, w, in_dim] -> z [B, h, w, embedding_dim]``."""
        return self.quant_conv(h)

    def quantize(
        self, z: jax.Array, skip_quantization: bool | jax.Array = False
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Eq. 1 with straight-through gradients: ``z [B, h, w, C] -> (z_q, indices, aux)``.

        ``z_q = z + sg[e_idx - z]`` ([B, h, w, C], ``dtype``); ``indices [B, h, w]`` int32;
        ``aux`` (float32 scalars): ``commit_loss = mean((z - sg[e])^2)`` (gradient to the encoder),
        ``codebook_loss = mean((sg[z] - e)^2)`` (gradient to the codebook),
        ``vq_loss = commit_loss + beta * codebook_loss`` (the release's weighting), ``perplexity``,
        ``usage``. ``skip_quantization`` (bool or traced scalar): the release's warm-up, where
        ``z_q = z`` and the losses are zero.
        """
        if z.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"VQQuantizer: last axis of z is {z.shape[-1]}, expected "
                f"embedding_dim={self.embedding_dim}"
            )
        zf = z.astype(jnp.float32)
        codebook = self._codebook()
        indices = nearest_code(jax.lax.stop_gradient(zf), codebook)
        e = jnp.take(codebook, indices, axis=0)
        commit = jnp.mean(jnp.square(zf - jax.lax.stop_gradient(e)))
        cb = jnp.mean(jnp.square(jax.lax.stop_gradient(zf) - e))
        zq = zf + jax.lax.stop_gradient(e - zf)
        skip = jnp.asarray(skip_quantization)
        keep = jnp.where(skip, 0.0, 1.0).astype(jnp.float32)
        zq = jnp.where(skip, zf, zq)
        aux = {
            "vq_loss": keep * (commit + self.beta * cb),
            "commit_loss": keep * commit,
            "codebook_loss": keep * cb,
            **code_usage_stats(indices, self.num_embeddings),
        }
        return zq.astype(self.dtype), indices, aux

    def post(self, zq: jax.Array) -> jax.Array:
        """``post_quant_conv``: ``[B, h, w, embedding_dim] -> [B, h, w, in_dim]``."""
        return self.post_quant_conv(zq.astype(self.dtype))

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codebook rows: ``[...]`` int -> ``[..., embedding_dim]``."""
        return jnp.take(self._codebook(), indices, axis=0).astype(self.dtype)

    def __call__(self, h: jax.Array, skip_quantization: bool | jax.Array = False):
        """``h [B, h, w, in_dim] -> (post_quant_conv(z_q), z, z_q, indices, aux)``."""
        z = self.project(h)
        zq, indices, aux = self.quantize(z, skip_quantization)
        return self.post(zq), z, zq, indices, aux


def _level_fields(m) -> dict[str, Any]:
    return dict(
        base_channels=m.base_channels,
        channel_multipliers=tuple(m.channel_multipliers),
        resolution_scale_rates=tuple(m.resolution_scale_rates),
        norm_groups=m.norm_groups,
        norm_eps=m.norm_eps,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        precision=m.precision,
        remat=m.remat,
        kernels=m.kernels,
    )


def _check_image(who: str, x: jax.Array, factor: int) -> None:
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{who}: expected an image batch [B, H, W, 3], got shape {x.shape}")
    if x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(
            f"{who}: H and W must be multiples of the downsampling factor {factor}, got "
            f"{x.shape[1:3]}"
        )


class VQGANv1(nn.Module):
    """Stage-I codebook model of VQFR (Sec. 3.1, Eqs. 1-3; Fig. 4a; release ``VQGANv1``).

    Paper config (defaults): 512 px, six levels of widths ``128 * (1, 1, 2, 2, 2, 4)``, rates
    ``(1, 2, 2, 2, 2, 2)`` (f = 32), 2 encoder / 3 decoder residual blocks per level, a
    ``1024 x 256`` codebook at Level_32, beta = 0.25.

    ``__call__(x [B, H, W, 3], skip_quantization=False) -> (recon [B, H, W, 3], aux)`` with
    ``aux``: ``z [B, h, w, embedding_dim]`` (pre-quantisation code, the release's ``z_conv``),
    ``features [B*h*w, embedding_dim]`` (``z`` flattened, float32, for the k-means reservoir),
    ``zq`` (quantised code before ``post_quant_conv``, the release's ``z_quant_before_conv``),
    ``indices [B, h, w]`` int32 and the loss / usage scalars of :meth:`VQQuantizer.quantize`;
    ``h = H / prod(resolution_scale_rates)``. ``freeze_codebook`` stops every gradient to the
    codebook (:class:`VQFRv1`, which starts from this model, keeps the HQ codebook).
    """

    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 2, 4)
    resolution_scale_rates: tuple[int, ...] = (1, 2, 2, 2, 2, 2)
    encoder_num_blocks: int = 2
    decoder_num_blocks: int = 3
    num_embeddings: int = 1024
    embedding_dim: int = 256
    beta: float = 0.25
    freeze_codebook: bool = False
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernels: Kernels = Kernels()
    remat: bool | str = False

    def setup(self):
        fields = _level_fields(self)
        self.encoder = VQFREncoder(num_blocks=self.encoder_num_blocks, **fields)
        self.quantizer = VQQuantizer(
            in_dim=self.base_channels * self.channel_multipliers[-1],
            num_embeddings=self.num_embeddings,
            embedding_dim=self.embedding_dim,
            beta=self.beta,
            freeze_codebook=self.freeze_codebook,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernels=self.kernels,
        )
        self.decoder = VQFRDecoder(num_blocks=self.decoder_num_blocks, **fields)

    @property
    def downsample_factor(self) -> int:
        return math.prod(self.resolution_scale_rates)

    def encode(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, 3] -> z [B, h, w, embedding_dim]`` (encoder + ``quant_conv``)."""
        _check_image(f"{type(self).__name__}.encode", x, self.downsample_factor)
        return self.quantizer.project(self.encoder(x))

    def quantize(self, z: jax.Array, skip_quantization: bool | jax.Array = False):
        """``z -> (z_q, indices, aux)``, see :meth:`VQQuantizer.quantize`."""
        return self.quantizer.quantize(z, skip_quantization)

    def decode(self, zq: jax.Array) -> jax.Array:
        """Eq. 2: ``z_q [B, h, w, embedding_dim] -> [B, H, W, 3]`` (post_quant_conv + decoder), in
        float32."""
        return self.decoder(self.quantizer.post(zq)).astype(jnp.float32)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """``[B, h, w]`` int -> codes ``[B, h, w, embedding_dim]``."""
        return self.quantizer.lookup(indices)

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        """``[B, h, w]`` int -> ``[B, H, W, 3]``."""
        return self.decode(self.lookup(indices))

    def __call__(
        self, x: jax.Array, *, skip_quantization: bool | jax.Array = False, train: bool = True
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        del train  # no stochastic layers; accepted for the trainers' uniform call
        z = self.encode(x)
        zq, indices, aux = self.quantize(z, skip_quantization)
        recon = self.decode(zq)
        feats = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
        return recon, {**aux, "z": z, "zq": zq, "features": feats, "indices": indices}


class DCNv2Pack(nn.Module):
    """Modulated deformable 3x3 conv whose offsets come from a separate feature (release
    ``DCNv2Pack``; VQFR Eq. 5 "Dconv", App. Table 4 "DConv").

    ``conv_offset`` (3x3, ``feat -> 3 * G * 9``) yields ``[o1 | o2 | m]``; ``[o1 | o2]`` are the
    ``2 * G * 9`` offsets in the torchvision layout and ``sigmoid(m)`` the masks. Params: ``kernel
    [3, 3, C_in, features]`` (init U(+-1/sqrt(9 C_in)) as DCNv2), ``bias``, ``conv_offset``.
    ``(x [B, H, W, C_in], feat [B, H, W, C_f]) -> [B, H, W, features]``.
    """

    features: int
    deformable_groups: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: jax.Array, feat: jax.Array) -> jax.Array:
        g, k = self.deformable_groups, 9
        cin = x.shape[-1]
        if cin % g:
            raise ValueError(
                f"DCNv2Pack({self.name}): deformable_groups={g} must divide the {cin} channels"
            )
        out = _conv(3 * g * k, 3, "conv_offset", self)(feat)
        offset = out[..., : 2 * g * k]
        mask = jax.nn.sigmoid(out[..., 2 * g * k :].astype(jnp.float32))
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
            (3, 3, cin, self.features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return deform_conv2d(
            x,
            offset,
            mask,
            kernel,
            bias,
            padding=(1, 1),
            offset_groups=g,
            precision=self.precision,
        )


class TextureWarpingModule(nn.Module):
    """TWM (Sec. 3.2, Eq. 5; App. Table 4; release ``TextureWarpingModule``).

    The input feature ``prior [B, H, W, cond]`` is shrunk to the level (bilinear, then a 3x3 conv
    ``cond_downsample`` unless ``cond_downscale_rate`` is 1) and concatenated *before* the texture
    feature ``x [B, h, w, C]``; the offset feature is
    ``offset_out(act(gn(dw7x7(act(gn(offset_in(.)))))))``, then
    ``act(gn(offset_fuse(concat(., previous_offset))))``; ``dcn`` warps ``x`` with it.
    Returns ``(F^w [B, h, w, C], offset feature [B, h, w, C])``.
    """

    channels: int
    cond_downscale_rate: int
    deformable_groups: int = 4
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(
        self, x: jax.Array, prior: jax.Array, previous_offset: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        c, rate = self.channels, self.cond_downscale_rate
        if rate != 1:
            b, h, w, cc = prior.shape
            prior = resize_bilinear(prior, (h // rate, w // rate))
            prior = _conv(cc, 3, "cond_downsample", self)(prior)
        if prior.shape[1:3] != x.shape[1:3]:
            raise ValueError(
                f"TextureWarpingModule({self.name}): input feature shrunk by {rate} is "
                f"{prior.shape[1:3]} but the texture feature is {x.shape[1:3]}"
            )
        off = jnp.concatenate([prior.astype(self.dtype), x.astype(self.dtype)], axis=-1)
        off = nn.swish(_norm("offset_norm1", self)(_conv(c, 1, "offset_in", self)(off)))
        off = nn.swish(_norm("offset_norm2", self)(_conv(c, 7, "offset_dw", self, groups=c)(off)))
        off = _conv(c, 1, "offset_out", self)(off)
        if previous_offset is not None:
            off = jnp.concatenate([off, previous_offset.astype(off.dtype)], axis=-1)
        off = nn.swish(_norm("offset_fuse_norm", self)(_conv(c, 3, "offset_fuse", self)(off)))
        warped = DCNv2Pack(
            c,
            self.deformable_groups,
            self.dtype,
            self.param_dtype,
            self.precision,
            self.kernels,
            name="dcn",
        )(x, off)
        return warped, off


class MainDecoder(nn.Module):
    """Main branch G_m of the parallel decoder (Sec. 3.2, Eq. 4; release ``MainDecoder``).

    At the last level ``F_L = TWM_L(F^t_L, F^d)``; then for ``i = L-1 .. 0``:
    ``F_i = fuse_i(concat(upsample_i(F_{i+1}), TWM_i(F^t_i, F^d, 2 * up2(offset_{i+1}))))`` where
    ``upsample_i`` is a 3x3 conv then bilinear x2 and ``fuse_i`` a residual block ``2 C_i -> C_i``;
    finally ``conv_out(concat(act(gn(F_0)), x_lq))``.

    ``(texture_features (F^t_0..F^t_L), prior [B, H, W, cond], x_lq [B, H, W, 3]) -> [B, H, W, 3]``.
    """

    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 2, 4)
    deformable_groups: int = 4
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernels: Kernels = Kernels()
    remat: bool | str = False

    @nn.compact
    def __call__(
        self, texture_features: Sequence[jax.Array], prior: jax.Array, x_lq: jax.Array
    ) -> jax.Array:
        chans = tuple(m * self.base_channels for m in self.channel_multipliers)
        n = len(chans)
        if len(texture_features) != n:
            raise ValueError(
                f"MainDecoder: got {len(texture_features)} texture features, expected {n}"
            )
        common = dict(
            norm_groups=self.norm_groups,
            norm_eps=self.norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernels=self.kernels,
        )

        twm_cls = layers.remat(TextureWarpingModule, self.remat)

        def twm(i):
            return twm_cls(
                chans[i], 2**i, self.deformable_groups, **common, name=f"{level_name(i)}_twm"
            )

        x, offset = twm(n - 1)(texture_features[n - 1], prior)
        for i in range(n - 2, -1, -1):
            lvl = level_name(i)
            b, h, w, _ = x.shape
            x = resize_bilinear(_conv(chans[i], 3, f"{lvl}_upsample", self)(x), (2 * h, 2 * w))
            up_offset = resize_bilinear(offset, (2 * h, 2 * w)) * 2
            warped, offset = twm(i)(texture_features[i], prior, up_offset)
            x = _block_cls(self)(chans[i], **common, name=f"{lvl}_fuse")(
                jnp.concatenate([x, warped.astype(x.dtype)], axis=-1)
            )
        x = nn.swish(_norm("norm_out", self)(x))
        x = jnp.concatenate([x, x_lq.astype(x.dtype)], axis=-1)
        return _conv(3, 3, "conv_out", self)(x)


class VQFRv1(VQGANv1):
    """VQFR restoration network (Sec. 3.2; Figs. 3, 4d; App. Table 4; release ``VQFRv1``).

    ``x_lq -> E -> quant_conv -> z_d -> nearest HQ code z_q -> post_quant_conv -> texture decoder
    G_t -> (x_t, F^t)``; ``F^d = inpfeat_conv(x_lq)`` (3x3 conv, ``cond_channels`` wide);
    ``x_m = G_m(F^t, F^d, x_lq)``. The encoder, quantiser and (texture) decoder are
    :class:`VQGANv1`'s, with its fields and submodule names, so stage II starts from the stage-I
    params (:func:`vqfr_params_from_vqgan`); the codebook is frozen by default. The multi-level
    structure requires ``resolution_scale_rates = (1, 2, ..., 2)`` (the main branch doubles
    offsets from level to level).

    ``__call__(x_lq [B, H, W, 3]) -> (main [B, H, W, 3], texture [B, H, W, 3], aux)`` (float32
    images) with ``aux``: ``z [B, h, w, embedding_dim]`` (the LQ code before quantisation; the
    code-alignment loss of Sec. 3.3 is ``mean((z - sg[VQGANv1 aux['zq'] of the HQ face])^2)``),
    ``zq``, ``indices [B, h, w]`` and the quantiser's loss / usage scalars (unused by the release's
    stage II).
    """

    freeze_codebook: bool = True
    cond_channels: int = 32
    deformable_groups: int = 4

    def setup(self):
        rates = tuple(self.resolution_scale_rates)
        if not rates or rates[0] != 1 or any(r != 2 for r in rates[1:]):
            raise ValueError(
                f"VQFRv1: resolution_scale_rates must be (1, 2, ..., 2) (the main decoder doubles "
                f"the offsets from level to level), got {rates}"
            )
        super().setup()
        self.inpfeat_conv = _conv(self.cond_channels, 3, None, self)
        self.main_decoder = MainDecoder(
            remat=self.remat,
            base_channels=self.base_channels,
            channel_multipliers=tuple(self.channel_multipliers),
            deformable_groups=self.deformable_groups,
            norm_groups=self.norm_groups,
            norm_eps=self.norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernels=self.kernels,
        )

    def decode_texture(self, zq: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Texture branch: ``z_q -> (x_t [B, H, W, 3], (F^t_0, ..., F^t_L))``."""
        return self.decoder(self.quantizer.post(zq), return_features=True)

    def decode_main(self, texture_features: Sequence[jax.Array], x_lq: jax.Array) -> jax.Array:
        """Main branch: ``(F^t, x_lq) -> x_m [B, H, W, 3]``."""
        prior = self.inpfeat_conv(x_lq.astype(self.dtype))
        return self.main_decoder(texture_features, prior, x_lq)

    def restore(self, x_lq: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One forward pass: ``x_lq -> (x_m main, x_t texture)``, both ``[B, H, W, 3]``."""
        main, texture, _ = self(x_lq)
        return main, texture

    def __call__(
        self, x_lq: jax.Array, *, train: bool = True
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        del train  # no stochastic layers
        z = self.encode(x_lq)
        zq, indices, aux = self.quantize(z)
        texture, feats = self.decode_texture(zq)
        main = self.decode_main(feats, x_lq)
        images = main.astype(jnp.float32), texture.astype(jnp.float32)
        return *images, {**aux, "z": z, "zq": zq, "indices": indices}


def vqfr_params_from_vqgan(vqfr_params: dict, vqgan_params: dict) -> dict:
    """Stage-II start: ``vqfr_params`` with ``encoder``, ``quantizer`` and ``decoder`` taken from
    stage-I :class:`VQGANv1` params (the release loads the codebook checkpoint non-strictly).

    Both trees are ``params`` collections (no ``{'params': ...}`` wrapper); shapes must match.
    """
    out = dict(vqfr_params)
    for name in ("encoder", "quantizer", "decoder"):
        if name not in vqgan_params:
            raise ValueError(f"vqfr_params_from_vqgan: VQGANv1 params lack '{name}'")
        src, dst = vqgan_params[name], vqfr_params[name]
        s_shapes = jax.tree_util.tree_map(jnp.shape, src)
        d_shapes = jax.tree_util.tree_map(jnp.shape, dst)
        if s_shapes != d_shapes:
            raise ValueError(
                f"vqfr_params_from_vqgan: '{name}' shapes differ between VQGANv1 and VQFRv1 "
                "(do the two configs match?)"
            )
        out[name] = src
    return out
