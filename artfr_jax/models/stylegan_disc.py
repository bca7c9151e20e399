"""VQFR's global discriminator D_g: the SWAGAN wavelet discriminator (VQFR Sec. 3.3, Eq. 6;
SWAGAN, Gal et al., 2021).

What the official VQFR code builds (``vqfr/archs/swagan_arch.py``, ``SWADiscriminator``), which
differs from StyleGAN2's residual discriminator:

* the image enters as its Haar wavelet sub-bands (``[B, H/2, W/2, 12]``), and every scale gets a
  ``from_rgb`` skip input: the sub-bands are inverted to an image, blur-downsampled by 2 and
  re-transformed (input skips instead of StyleGAN2's residual blocks);
* convolutions and linears are **spectrally normalised** (one power iteration per call, the
  ``u`` vector kept as state), with plain ``LeakyReLU(0.2)``; no equalised learning rate (the
  official ``equalize=True`` path raises ``NotImplementedError``);
* StyleGAN2's blur-[1,3,3,1] downsampling, minibatch-stddev channel and final ``conv3x3 ->
  linear -> LeakyReLU -> linear`` head.

Spectral state lives in the ``spectral`` collection: ``init`` returns ``{'params', 'spectral'}``;
pass both to ``apply`` and, to advance the power iteration as the official code does on every
call, ``update_stats=True`` with ``mutable=['spectral']``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any

SPECTRAL = "spectral"


def swa_channels(
    channel_multiplier: float = 2,
    narrow: float = 1.0,
    max_channels: int | None = None,
) -> dict[int, int]:
    """``{resolution: channels}`` of the official table, scaled by ``narrow`` and capped."""
    table = {4: 512, 8: 512, 16: 512, 32: 512}
    for r, c in ((64, 256), (128, 128), (256, 64), (512, 32), (1024, 16)):
        table[r] = int(c * channel_multiplier)
    cap = max_channels or max(table.values())
    return {r: max(1, min(int(c * narrow), cap)) for r, c in table.items()}


def haar_dwt(x: jax.Array) -> jax.Array:
    """Haar sub-bands ``[B, H, W, C] -> [B, H/2, W/2, 4C]`` ordered ``LL, LH, HL, HH``.

    Same values as the official ``HaarTransform`` (``upfirdn2d`` with the 2x2 Haar filters).
    """
    a, b = x[:, 0::2, 0::2], x[:, 0::2, 1::2]
    c, d = x[:, 1::2, 0::2], x[:, 1::2, 1::2]
    return 0.5 * jnp.concatenate([a + b + c + d, a + b - c - d, a - b + c - d, a - b - c + d], -1)


def haar_idwt(x: jax.Array) -> jax.Array:
    """Inverse of ``haar_dwt``: ``[B, h, w, 4C] -> [B, 2h, 2w, C]`` (``InverseHaarTransform``)."""
    ll, lh, hl, hh = jnp.split(x, 4, axis=-1)
    a = 0.5 * (ll + lh + hl + hh)
    b = 0.5 * (ll + lh - hl - hh)
    c = 0.5 * (ll - lh + hl - hh)
    d = 0.5 * (ll - lh - hl + hh)
    top = jnp.stack([a, b], axis=3)  # [B, h, w, 2, C]
    bottom = jnp.stack([c, d], axis=3)
    bsz, h, w, ch = ll.shape
    return jnp.stack([top, bottom], axis=2).reshape(bsz, 2 * h, 2 * w, ch)


def blur(x: jax.Array, kernel: Sequence[float], pad: tuple[int, int], stride: int = 1) -> jax.Array:
    """Depthwise FIR filter of ``upfirdn2d(x, outer(k, k) / sum, down=stride, pad=pad)``.

    ``[B, H, W, C] -> [B, (H + pad0 + pad1 - K) // stride + 1, ..., C]``.
    """
    k = np.asarray(kernel, np.float32)
    k2 = np.outer(k, k)
    k2 = (k2 / k2.sum())[::-1, ::-1]  # upfirdn2d convolves (flips the filter)
    c = x.shape[-1]
    w = jnp.asarray(np.broadcast_to(k2[:, :, None, None], (*k2.shape, 1, c)).copy(), x.dtype)
    return jax.lax.conv_general_dilated(
        x,
        w,
        (stride, stride),
        [pad, pad],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
    )


def _l2_normalize(v: jax.Array, eps: float) -> jax.Array:
    return v / (jnp.linalg.norm(v) + eps)


def spectral_normalize(
    w2d: jax.Array, u: jax.Array, eps: float = 1e-12
) -> tuple[jax.Array, jax.Array]:
    """One power iteration: ``(w2d / sigma, u_new)`` for a ``[fan_in, out]`` matrix, ``u [out]``.

    ``v = normalize(W u)``, ``u' = normalize(v W)``, ``sigma = v W u'``; gradients flow through
    ``W`` only (``u``, ``v`` are constants), as in the official ``SpectralNorm``.
    """
    w32 = w2d.astype(jnp.float32)
    wc = jax.lax.stop_gradient(w32)
    hp = jax.lax.Precision.HIGHEST
    v = _l2_normalize(jnp.dot(wc, u, precision=hp), eps)
    u_new = _l2_normalize(jnp.dot(v, wc, precision=hp), eps)
    sigma = jnp.dot(jnp.dot(v, w32, precision=hp), u_new, precision=hp)
    return w32 / sigma, u_new


def _torch_uniform(fan_in: int):
    """PyTorch's default conv/linear init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class SpectralLinear(nn.Module):
    """Spectrally normalised conv (``kernel_size > 0``) or dense layer (``kernel_size = 0``).

    Attributes:
      features: output channels.
      kernel_size: square conv kernel; ``0`` for a dense layer on the last axis.
      stride, padding: conv stride and symmetric zero padding.
      use_bias: add a bias (not normalised).
      eps: power-iteration normaliser epsilon.
      dtype, param_dtype: compute and parameter dtypes; the normalisation runs in float32.

    Params: ``kernel [k, k, Cin, Cout]`` (dense ``[Cin, Cout]``), ``bias [Cout]``;
    state ``spectral/u [Cout]`` (the official ``weight_u``).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    eps: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool = False) -> jax.Array:
        cin, k = x.shape[-1], self.kernel_size
        shape = (k, k, cin, self.features) if k else (cin, self.features)
        fan_in = cin * max(k, 1) ** 2
        kernel = self.param("kernel", _torch_uniform(fan_in), shape, self.param_dtype)
        if not self.is_initializing() and not self.has_variable(SPECTRAL, "u"):
            raise ValueError(
                f"{self.path}: no '{SPECTRAL}' state; pass the variables from init "
                f"({{'params': ..., '{SPECTRAL}': ...}}) to apply"
            )
        u = self.variable(
            SPECTRAL,
            "u",
            lambda: _l2_normalize(
                jax.random.normal(self.make_rng("params"), (self.features,)), self.eps
            ),
        )
        w, u_new = spectral_normalize(kernel.reshape(-1, self.features), u.value, self.eps)
        if update_stats:
            u.value = u_new
        w = w.reshape(shape).astype(self.dtype)
        x = x.astype(self.dtype)
        if k:
            p = (self.padding, self.padding)
            y = jax.lax.conv_general_dilated(
                x, w, (self.stride,) * 2, [p, p], dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        else:
            y = jnp.dot(x, w)
        if self.use_bias:
            bias = self.param("bias", _torch_uniform(fan_in), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def minibatch_stddev(x: jax.Array, group_size: int = 4, num_features: int = 1) -> jax.Array:
    """StyleGAN2's minibatch-stddev channels: ``[B, H, W, C] -> [B, H, W, C + num_features]``.

    Samples ``j, j + B/G, j + 2B/G, ...`` form a group of ``G = min(B, group_size)`` (the
    official ``view(G, -1, ...)``); the extra channel is the group's mean per-feature stddev.
    """
    b, h, w, c = x.shape
    g = min(b, group_size)
    if b % g or c % num_features:
        raise ValueError(
            f"minibatch_stddev: batch {b} must be divisible by the group size {g} and channels "
            f"{c} by num_features {num_features}"
        )
    y = x.astype(jnp.float32).reshape(g, b // g, h, w, num_features, c // num_features)
    std = jnp.sqrt(jnp.var(y, axis=0) + 1e-8)  # [B/G, H, W, F, C/F]
    std = jnp.mean(std, axis=(1, 2, 4))  # [B/G, F]
    std = jnp.tile(std, (g, 1))[:, None, None, :]
    std = jnp.broadcast_to(std, (b, h, w, num_features)).astype(x.dtype)
    return jnp.concatenate([x, std], axis=-1)


class SWADiscriminator(nn.Module):
    """SWAGAN wavelet discriminator with spectral norm, as VQFR's global discriminator D_g.

    Official config: ``out_size=512, channel_multiplier=2, resample_kernel=(1, 3, 3, 1)``.

    Attributes:
      out_size: image size (power of two, 16 ... 1024); the input must be this size.
      channel_multiplier: the StyleGAN2 channel table's multiplier for resolutions >= 64.
      narrow: scales every channel count (``int(c * narrow)``), for small models.
      max_channels: caps every channel count (``None``: no cap), for tiny test models.
      resample_kernel: 1-D blur kernel of both downsamplings.
      stddev_group: minibatch-stddev group size (the batch must be divisible by it, or smaller).
      dtype: compute dtype of convolutions; the logits are float32.
      param_dtype: parameter dtype.

    Shapes: ``[B, out_size, out_size, 3]`` (RGB in [-1, 1]) -> logits ``[B, 1]``.
    Names (torch ``SWADiscriminator`` keys): ``from_rgb{k}`` = ``from_rgbs.k.conv.0.module``,
    ``conv{k}_1`` / ``conv{k}_2`` = ``convs.k.conv1.0.module`` / ``convs.k.conv2.1.module``,
    ``final_conv`` = ``final_conv.0.module``, ``final_linear{0,1}`` = ``final_linear.{0,2}.module``;
    ``kernel`` = ``weight_bar`` (transposed), ``spectral/u`` = ``weight_u``. The final linear reads
    the 4x4 features in torch's ``C, H, W`` order, so its kernel needs no permutation.
    """

    out_size: int = 512
    channel_multiplier: float = 2
    narrow: float = 1.0
    max_channels: int | None = None
    resample_kernel: Sequence[int] = (1, 3, 3, 1)
    stddev_group: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, update_stats: bool = False) -> jax.Array:
        size = self.out_size
        if size < 16 or size > 1024 or size & (size - 1):
            raise ValueError(
                f"SWADiscriminator.out_size={size}; expected a power of two in [16, 1024]"
            )
        if x.ndim != 4 or x.shape[1:] != (size, size, 3):
            raise ValueError(
                f"SWADiscriminator: expected input [B, {size}, {size}, 3], got {x.shape}"
            )
        ch = swa_channels(self.channel_multiplier, self.narrow, self.max_channels)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        k = self.resample_kernel
        pad_down = ((len(k) - 2 + 1) // 2, (len(k) - 2) // 2)  # official Downsample
        pad_smooth = ((len(k) - 2 + 2 + 1) // 2, (len(k) - 2 + 2) // 2)  # UpFirDnSmooth, 3x3

        def act(h):
            return nn.leaky_relu(h, 0.2)

        def from_rgb(wav, skip, idx, features, downsample):
            if downsample:  # back to an image, blur-downsample by 2, wavelet again
                wav = haar_dwt(blur(haar_idwt(wav), k, pad_down, stride=2))
            out = act(
                SpectralLinear(features, 3, padding=1, name=f"from_rgb{idx}", **kw)(
                    wav, update_stats
                )
            )
            return wav, out if skip is None else out + skip

        wav = haar_dwt(x.astype(self.dtype))
        out = None
        log_size = int(math.log2(size)) - 1
        cin = ch[size]
        for idx, i in enumerate(range(log_size, 2, -1)):
            cout = ch[2 ** (i - 1)]
            wav, out = from_rgb(wav, out, idx, cin, downsample=i != log_size)
            out = act(
                SpectralLinear(cin, 3, padding=1, name=f"conv{idx}_1", **kw)(out, update_stats)
            )
            out = blur(out, k, pad_smooth)
            out = act(
                SpectralLinear(cout, 3, stride=2, name=f"conv{idx}_2", **kw)(out, update_stats)
            )
            cin = cout
        _, out = from_rgb(wav, out, log_size - 2, ch[4], downsample=True)

        out = minibatch_stddev(out, self.stddev_group)
        out = act(SpectralLinear(ch[4], 3, padding=1, name="final_conv", **kw)(out, update_stats))
        out = jnp.transpose(out, (0, 3, 1, 2)).reshape(out.shape[0], -1)  # torch's C, H, W order
        out = act(SpectralLinear(ch[4], 0, name="final_linear0", **kw)(out, update_stats))
        out = SpectralLinear(1, 0, name="final_linear1", **kw)(out, update_stats)
        return out.astype(jnp.float32)
