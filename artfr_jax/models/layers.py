"""Generic convolutional building blocks (NHWC) shared by the VQGAN, VQFR and other models.

The blocks follow the VQGAN layout of Esser et al. (2021) that ART-FR adopts (ART-FR App. A.1,
"Visual Tokenizer Structures"): pre-norm residual blocks (GroupNorm -> act -> 3x3 conv, twice),
single-head spatial self-attention with a residual connection, strided-conv downsampling and
nearest-neighbour upsampling followed by a 3x3 conv. Parameter names mirror the diffusers modules so
that checkpoint converters are a plain renaming.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from artfr_jax.models import attention as attention_lib
from artfr_jax.models import conv as conv_lib

Dtype = Any
Activation = Callable[[jax.Array], jax.Array]

ACTIVATIONS: dict[str, Activation] = {
    "silu": nn.swish,
    "swish": nn.swish,
    "gelu": nn.gelu,
    "relu": nn.relu,
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
}


def get_activation(name: str) -> Activation:
    """Activation function by name (``silu``/``swish``, ``gelu``, ``relu``, ``mish``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation: unknown name {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None


def _as_4d(x: jax.Array) -> jax.Array:
    """``[B, ..., C]`` as float32 ``[B, N1, N2, C]`` with ``N1 * N2`` the positions, ``N1 ~ sqrt``.

    XLA:CPU reduces ``[1, N, C]`` over ``N`` up to 70x slower than the same data as
    ``[1, N1, N2, C]`` over ``(N1, N2)`` (950 vs 13.5 ms at 512 x 512 x 128); other batch sizes
    are as fast either way.
    """
    b, c = x.shape[0], x.shape[-1]
    n = x.size // (b * c)
    n1 = math.isqrt(n)
    while n % n1:
        n1 -= 1
    return x.astype(jnp.float32).reshape(b, n1, n // n1, c)


def _sum_positions(x: jax.Array) -> jax.Array:
    """``[B, N1, N2, C] -> [B, C]``."""
    return jnp.sum(x, axis=(1, 2))


def _per_position(v: jax.Array) -> jax.Array:
    """``[B, C] -> [B, 1, 1, C]``, to broadcast against ``[B, N1, N2, C]``."""
    return v[:, None, None, :]


def _group_stats(xf: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
    """Two-pass per-(sample, group) mean and variance of ``xf [B, N1, N2, C]`` -> ``[B, G]``.

    Each pass reduces over the positions first (a contiguous, vectorised column reduction that
    XLA fuses with the elementwise producer), then the tiny ``[B, G, C/G]`` remainder; this is
    3-4x faster on CPU than reducing ``[B, N, G, C/G]`` over axes (1, 3) at once.
    """
    b, n1, n2, c = xf.shape
    cg = c // num_groups
    count = n1 * n2 * cg
    mean = _sum_positions(xf).reshape(b, num_groups, cg).sum(-1) / count
    centred = xf - _per_position(jnp.repeat(mean, cg, axis=1))
    var = _sum_positions(jnp.square(centred)).reshape(b, num_groups, cg).sum(-1) / count
    return mean, var


def _gn_forward(x, scale, bias, num_groups, epsilon):
    b, c = x.shape[0], x.shape[-1]
    cg = c // num_groups
    xf = _as_4d(x)
    mean, var = _group_stats(xf, num_groups)
    inv = jax.lax.rsqrt(var + epsilon)
    a = (inv[:, :, None] * scale.astype(jnp.float32).reshape(num_groups, cg)).reshape(b, c)
    shift = bias.astype(jnp.float32) - jnp.repeat(mean, cg, axis=1) * a
    y = xf * _per_position(a) + _per_position(shift)
    return y.reshape(x.shape), (mean, inv)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float
) -> jax.Array:
    """Group norm of ``x [B, ..., C]`` with affine ``scale, bias [C]``; float32 result.

    The hand-written backward needs one fused reduction pass over ``(dy, x)`` and one elementwise
    pass, where autodiff of the forward emits several (the backward dominates training on CPU).
    """
    return _gn_forward(x, scale, bias, num_groups, epsilon)[0]


def _gn_fwd(x, scale, bias, num_groups, epsilon):
    y, (mean, inv) = _gn_forward(x, scale, bias, num_groups, epsilon)
    return y, (x, scale, bias, mean, inv)


def _gn_bwd(num_groups, epsilon, res, dy):
    x, scale, bias, mean, inv = res
    b, c = x.shape[0], x.shape[-1]
    cg = c // num_groups
    xf, dyf = _as_4d(x), _as_4d(dy)
    count = xf.shape[1] * xf.shape[2] * cg
    gamma = scale.astype(jnp.float32)
    mc, ic = jnp.repeat(mean, cg, axis=1), jnp.repeat(inv, cg, axis=1)  # [B, C]
    s_dy = _sum_positions(dyf)
    s_dyxhat = (_sum_positions(dyf * xf) - mc * s_dy) * ic  # sum_n dy * xhat
    # With g = gamma * dy: dx = inv * (g - mean_group(g) - xhat * mean_group(g * xhat)).
    m1 = jnp.repeat((gamma * s_dy).reshape(b, num_groups, cg).sum(-1) / count, cg, axis=1)
    m2 = jnp.repeat((gamma * s_dyxhat).reshape(b, num_groups, cg).sum(-1) / count, cg, axis=1)
    k_dy = ic * gamma
    k_x = ic * ic * m2
    k_0 = ic * (mc * ic * m2 - m1)
    dx = _per_position(k_dy) * dyf - _per_position(k_x) * xf + _per_position(k_0)
    dscale = jnp.sum(s_dyxhat, axis=0).astype(scale.dtype)
    dbias = jnp.sum(s_dy, axis=0).astype(bias.dtype)
    return dx.reshape(x.shape).astype(x.dtype), dscale, dbias


group_norm.defvjp(_gn_fwd, _gn_bwd)


class GroupNorm(nn.Module):
    """Group normalisation over the channel axis of an NHWC tensor (:func:`group_norm`).

    Statistics are computed in float32 (also for bfloat16 activations), two-pass for accuracy.

    Attributes:
      num_groups: number of channel groups; must divide the channel count.
      epsilon: added to the variance.

    Shapes: ``[B, ..., C] -> [B, ..., C]``. Params: ``scale [C]``, ``bias [C]``.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: num_groups={self.num_groups} must divide channels {c}")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        return group_norm(x, scale, bias, self.num_groups, self.epsilon).astype(self.dtype)


def Conv(*args, **kwargs) -> nn.Conv:
    """``nn.Conv`` whose weight gradient XLA:CPU computes in row bands (``models/conv.py``).

    Same module, parameter names and results as ``nn.Conv``; only the CPU backward pass differs.
    """
    return nn.Conv(*args, conv_general_dilated=conv_lib.conv_general_dilated, **kwargs)


def _conv(features, kernel, name, dtype, param_dtype, padding="SAME", strides=1, precision=None):
    return Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        name=name,
    )


class ResnetBlock(nn.Module):
    """Pre-norm residual block: ``x + conv2(act(norm2(conv1(act(norm1(x))))))``.

    A 1x1 ``conv_shortcut`` projects the skip path when the channel count changes (VQGAN,
    Esser et al. 2021; diffusers ``ResnetBlock2D`` without time embedding).

    Shapes: ``[B, H, W, C_in] -> [B, H, W, out_channels]``.
    """

    out_channels: int
    num_groups: int = 32
    epsilon: float = 1e-6
    act: Activation = nn.swish
    norm: Callable[..., nn.Module] = GroupNorm
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        norm = lambda name: self.norm(  # noqa: E731
            num_groups=self.num_groups,
            epsilon=self.epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        conv = lambda f, k, name: _conv(  # noqa: E731
            f, k, name, self.dtype, self.param_dtype, precision=self.precision
        )
        h = self.act(norm("norm1")(x))
        h = conv(self.out_channels, 3, "conv1")(h)
        h = self.act(norm("norm2")(h))
        h = conv(self.out_channels, 3, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut")(x)
        out = x.astype(h.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class AttentionBlock(nn.Module):
    """Spatial self-attention with group norm and residual connection (VQGAN ``AttnBlock``).

    ``x + out(softmax(q k^T / sqrt(d)) v)`` over the ``H*W`` positions, with ``q, k, v`` linear maps
    of ``norm(x)``. Softmax is computed in float32; on the CPU long sequences take query blocks
    (``models/attention.py``).

    Attributes:
      num_heads: attention heads; the VQGAN uses one head of width C.

    Shapes: ``[B, H, W, C] -> [B, H, W, C]``.
    """

    num_heads: int = 1
    num_groups: int = 32
    epsilon: float = 1e-6
    norm: Callable[..., nn.Module] = GroupNorm
    rescale_output_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"AttentionBlock: num_heads={self.num_heads} must divide channels {c}")
        d = c // self.num_heads
        y = self.norm(
            num_groups=self.num_groups,
            epsilon=self.epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="norm",
        )(x)
        y = y.reshape(b, h * w, c)
        dense = lambda name: nn.Dense(  # noqa: E731
            c, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, name=name
        )
        q = dense("q")(y).reshape(b, h * w, self.num_heads, d)
        k = dense("k")(y).reshape(b, h * w, self.num_heads, d)
        v = dense("v")(y).reshape(b, h * w, self.num_heads, d)
        o = attention_lib.dot_product_attention(q, k, v, precision=self.precision)
        o = dense("out")(o.reshape(b, h * w, c)).reshape(b, h, w, c)
        out = x.astype(o.dtype) + o
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


class Downsample(nn.Module):
    """Stride-2 3x3 conv that halves H and W.

    ``asymmetric_padding=True`` pads one zero row/column at the bottom/right only (taming VQGAN and
    diffusers ``Downsample2D(padding=0)``); otherwise the conv pads 1 on every side.

    Shapes: ``[B, H, W, C] -> [B, H/2, W/2, out_channels or C]``.
    """

    out_channels: int | None = None
    asymmetric_padding: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f = self.out_channels or x.shape[-1]
        pad = ((0, 1), (0, 1)) if self.asymmetric_padding else ((1, 1), (1, 1))
        conv = _conv(f, 3, "conv", self.dtype, self.param_dtype, pad, 2, self.precision)
        return conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv (``upsample/conv`` params).

    Computed as four 2x2 phase convolutions of the input (``conv.upsample2x_conv``): the same
    result with 4/9 of the multiply-adds and no upsampled copy of the input.
    Shapes: ``[B, H, W, C] -> [B, 2H, 2W, out_channels or C]``.
    """

    out_channels: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f = self.out_channels or x.shape[-1]
        conv = nn.Conv(
            f,
            (3, 3),
            padding="SAME",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            conv_general_dilated=conv_lib.upsample2x_conv,
            name="conv",
        )
        return conv(x)


def _maybe_remat(cls, remat: bool):
    # Recomputing the block's activations in the backward pass trades compute for memory.
    return nn.remat(cls) if remat else cls


class LevelBlock(nn.Module):
    """One resolution level: ``num_layers`` residual blocks (each optionally followed by attention),
    then an optional resampling: ``'down'`` = stride-2 conv (diffusers ``[Attn]DownEncoderBlock2D``),
    ``'up'`` = nearest x2 + conv (``[Attn]UpDecoderBlock2D``), ``None`` = none.

    Shapes: ``[B, H, W, C_in] -> [B, H', W', out_channels]``, ``H' = H/2, 2H or H``.
    Params: ``resnet_{i}``, ``attn_{i}``, ``downsample/conv`` or ``upsample/conv``.
    """

    out_channels: int
    num_layers: int = 2
    add_attention: bool = False
    resample: str | None = None
    asymmetric_padding: bool = True
    num_groups: int = 32
    epsilon: float = 1e-6
    act: Activation = nn.swish
    norm: Callable[..., nn.Module] = GroupNorm
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        norm_kw = dict(num_groups=self.num_groups, epsilon=self.epsilon, norm=self.norm)
        block = _maybe_remat(ResnetBlock, self.remat)
        for i in range(self.num_layers):
            x = block(self.out_channels, act=self.act, name=f"resnet_{i}", **norm_kw, **common)(x)
            if self.add_attention:
                x = AttentionBlock(name=f"attn_{i}", **norm_kw, **common)(x)
        if self.resample == "down":
            pad = self.asymmetric_padding
            x = Downsample(asymmetric_padding=pad, name="downsample", **common)(x)
        elif self.resample == "up":
            x = Upsample(name="upsample", **common)(x)
        elif self.resample is not None:
            raise ValueError(
                f"LevelBlock.resample={self.resample!r}: expected 'down', 'up' or None"
            )
        return x


class MidBlock(nn.Module):
    """Bottleneck: residual block, ``num_layers`` x (optional attention, residual block).

    Shapes: ``[B, H, W, C] -> [B, H, W, C]``. Params: ``resnet_{0..num_layers}``, ``attn_{i}``.
    """

    num_layers: int = 1
    add_attention: bool = True
    num_groups: int = 32
    epsilon: float = 1e-6
    act: Activation = nn.swish
    norm: Callable[..., nn.Module] = GroupNorm
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        norm_kw = dict(num_groups=self.num_groups, epsilon=self.epsilon, norm=self.norm)
        block = _maybe_remat(ResnetBlock, self.remat)
        c = x.shape[-1]
        x = block(c, act=self.act, name="resnet_0", **norm_kw, **common)(x)
        for i in range(self.num_layers):
            if self.add_attention:
                x = AttentionBlock(name=f"attn_{i}", **norm_kw, **common)(x)
            x = block(c, act=self.act, name=f"resnet_{i + 1}", **norm_kw, **common)(x)
        return x
