"""Generic convolutional building blocks (NHWC) shared by the VQGAN, VQFR and other models.

The blocks follow the VQGAN layout of Esser et al. (2021) that ART-FR adopts (ART-FR App. A.1,
"Visual Tokenizer Structures"): pre-norm residual blocks (GroupNorm -> act -> 3x3 conv, twice),
single-head spatial self-attention with a residual connection, strided-conv downsampling and
nearest-neighbour upsampling followed by a 3x3 conv. Parameter names mirror the diffusers modules so
that checkpoint converters are a plain renaming.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from artfr_jax.models import kernels as kernels_lib
from artfr_jax.models.kernels import Kernels

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


class GroupNorm(nn.Module):
    """Group normalisation over the channel axis of an NHWC tensor (``kernels.group_norm``).

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
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: num_groups={self.num_groups} must divide channels {c}")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        y = kernels_lib.group_norm(x, scale, bias, self.num_groups, self.epsilon, self.kernels)
        return y.astype(self.dtype)


def Conv(*args, kernels: Kernels = Kernels(), **kwargs) -> nn.Conv:
    """``nn.Conv`` whose convolution goes through the kernel switch (``models/kernels.py``).

    Same module, parameter names and results as ``nn.Conv``; on the CPU the CPU kernels run it.
    """
    return nn.Conv(*args, conv_general_dilated=kernels_lib.conv_fn(kernels), **kwargs)


def _conv(features, kernel, name, module, padding="SAME", strides=1):
    """A ``kernel x kernel`` conv with ``module``'s dtype, param_dtype, precision and kernels."""
    return Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        precision=module.precision,
        kernels=module.kernels,
        name=name,
    )


def _norm(module, name):
    """``module.norm`` with the module's groups, epsilon, dtypes and kernels."""
    return module.norm(
        num_groups=module.num_groups,
        epsilon=module.epsilon,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        kernels=module.kernels,
        name=name,
    )


class ResnetBlock(nn.Module):
    """Pre-norm residual block: ``x + conv2(act(norm2(conv1(act(norm1(x))) [+ t])))``.

    A 1x1 ``conv_shortcut`` projects the skip path when the channel count changes (VQGAN,
    Esser et al. 2021; diffusers ``ResnetBlock2D``). Given a timestep embedding ``temb [B, C_t]``
    (diffusion UNets, Ho et al. 2020), ``t = time_emb_proj(act(temb))`` is added per channel.

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
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        norm = lambda name: _norm(self, name)  # noqa: E731
        conv = lambda f, k, name: _conv(f, k, name, self)  # noqa: E731
        h = self.act(norm("norm1")(x))
        h = conv(self.out_channels, 3, "conv1")(h)
        if temb is not None:
            t = nn.Dense(
                self.out_channels,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                name="time_emb_proj",
            )(self.act(temb))
            h = h + t[:, None, None, :].astype(h.dtype)
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
    (``kernels.spatial_attention``).

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
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"AttentionBlock: num_heads={self.num_heads} must divide channels {c}")
        d = c // self.num_heads
        y = _norm(self, "norm")(x)
        y = y.reshape(b, h * w, c)
        dense = lambda name: nn.Dense(  # noqa: E731
            c, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, name=name
        )
        q = dense("q")(y).reshape(b, h * w, self.num_heads, d)
        k = dense("k")(y).reshape(b, h * w, self.num_heads, d)
        v = dense("v")(y).reshape(b, h * w, self.num_heads, d)
        o = kernels_lib.spatial_attention(q, k, v, self.kernels, precision=self.precision)
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
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f = self.out_channels or x.shape[-1]
        pad = ((0, 1), (0, 1)) if self.asymmetric_padding else ((1, 1), (1, 1))
        return _conv(f, 3, "conv", self, pad, 2)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv (``upsample/conv`` params).

    On the CPU computed as four 2x2 phase convolutions of the input (``kernels.upsample2x_conv``):
    the same result with 4/9 of the multiply-adds and no upsampled copy of the input.
    Shapes: ``[B, H, W, C] -> [B, 2H, 2W, out_channels or C]``.
    """

    out_channels: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernels: Kernels = Kernels()

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
            conv_general_dilated=kernels_lib.upsample_conv_fn(self.kernels),
            name="conv",
        )
        return conv(x)


REMAT_MODES = ("none", "matmuls", "full")
_REMAT_ALIASES = {"false": "none", "off": "none", "true": "full", "on": "full"}


def remat_mode(remat: bool | str, field: str = "config.model.remat") -> str:
    """``remat`` as one of :data:`REMAT_MODES`; ``True`` / ``False`` (and ``'true'``, ``'on'``,
    ``'false'``, ``'off'``) are ``'full'`` / ``'none'``. Anything else is an error naming ``field``.

    ``none`` keeps every activation the backward pass needs; ``matmuls`` keeps only the outputs of
    convolutions and matrix products and recomputes norms, activations and sums from them in the
    backward pass (no extra MXU work; on TPU fewer bytes moved and less memory than ``none``, see
    docs/performance.md; under the CPU kernels a convolution is not one XLA op, and ``matmuls``
    recomputes it as ``full`` does); ``full`` recomputes whole blocks (one more forward pass).
    """
    if isinstance(remat, bool):
        return "full" if remat else "none"
    mode = _REMAT_ALIASES.get(str(remat).lower(), str(remat).lower())
    if mode not in REMAT_MODES:
        raise ValueError(f"{field}={remat!r}: expected one of {REMAT_MODES} (or true / false)")
    return mode


def _saves_matmul_outputs(prim, *_, **__) -> bool:
    return prim in (lax.conv_general_dilated_p, lax.dot_general_p)


def remat(cls, mode: bool | str, **kwargs):
    """``cls`` (a module class) as ``mode`` asks (:func:`remat_mode`): itself, or ``nn.remat`` of
    it with the policy that keeps convolution and matmul outputs, or recomputing everything.
    ``kwargs`` go to ``nn.remat`` (``static_argnums``)."""
    mode = remat_mode(mode)
    if mode == "none":
        return cls
    if mode == "matmuls":
        return nn.remat(cls, policy=_saves_matmul_outputs, **kwargs)
    return nn.remat(cls, **kwargs)


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
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        common = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernels=self.kernels,
        )
        norm_kw = dict(num_groups=self.num_groups, epsilon=self.epsilon, norm=self.norm)
        block = remat(ResnetBlock, self.remat)
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
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        common = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernels=self.kernels,
        )
        norm_kw = dict(num_groups=self.num_groups, epsilon=self.epsilon, norm=self.norm)
        block = remat(ResnetBlock, self.remat)
        c = x.shape[-1]
        x = block(c, act=self.act, name="resnet_0", **norm_kw, **common)(x)
        for i in range(self.num_layers):
            if self.add_attention:
                x = AttentionBlock(name=f"attn_{i}", **norm_kw, **common)(x)
            x = block(c, act=self.act, name=f"resnet_{i + 1}", **norm_kw, **common)(x)
        return x
