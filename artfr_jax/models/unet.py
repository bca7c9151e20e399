"""The Stable Diffusion 2.x denoising UNet (diffusers ``UNet2DConditionModel``) in linen, NHWC.

Rombach et al. (2022), "High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3.3 and
App. E.2: a residual UNet over latents whose levels hold ResNet blocks conditioned on a timestep
embedding and, in the cross-attention levels, spatial transformers attending to the text encoder's
token features. OSDFace (Sec. 3.3) runs SD-2.1's UNet once at a fixed timestep on LQ latents.

Submodules are named as diffusers names its attributes, a list entry ``down_blocks.0`` being the
linen module ``down_blocks_0`` (:mod:`artfr_jax.models.naming`), so a diffusers state dict, a PEFT
LoRA file and this module's params are one renaming apart
(:mod:`artfr_jax.convert.diffusers_sd`). The defaults are SD-2.1-base's ``unet/config.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from artfr_jax.models import kernels as kernels_lib
from artfr_jax.models import layers
from artfr_jax.models.kernels import Kernels
from artfr_jax.models.layers import (
    Activation,
    Conv,
    Downsample,
    GroupNorm,
    ResnetBlock,
    Upsample,
    get_activation,
)

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0
) -> jax.Array:
    """Sinusoidal embedding of ``timesteps [B]`` -> float32 ``[B, dim]`` (DDPM, Ho et al. 2020):
    frequencies ``exp(-ln(10^4) i / (dim/2 - freq_shift))``, ``[sin, cos]`` (``[cos, sin]`` when
    ``flip_sin_to_cos``), a zero column appended for odd ``dim``."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _dense(module, features, name, use_bias=True):
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        precision=module.precision,
        name=name,
    )


def _conv(module, features, kernel, name):
    return Conv(
        features,
        (kernel, kernel),
        padding="SAME",
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        precision=module.precision,
        kernels=module.kernels,
        name=name,
    )


def _group_norm(module, num_groups, epsilon, name):
    return GroupNorm(
        num_groups,
        epsilon,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        kernels=module.kernels,
        name=name,
    )


class TimestepEmbedding(nn.Module):
    """``linear_2(act(linear_1(t)))``: ``[B, C_t] -> [B, features]`` (diffusers ``TimestepEmbedding``)."""

    features: int
    act: Activation = nn.swish
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        t = _dense(self, self.features, "linear_1")(t.astype(self.dtype))
        return _dense(self, self.features, "linear_2")(self.act(t))


class Attention(nn.Module):
    """Multi-head attention of ``x [B, T, C]`` over ``context [B, S, C_ctx]`` (``x`` itself when
    None): ``to_out_0(attn(to_q(x), to_k(ctx), to_v(ctx)))``, q/k/v without bias, scale
    ``dim_head^-1/2``, softmax in float32; ``upcast``: the whole attention in float32
    (``kernels.attention``). Shapes: ``-> [B, T, C]``."""

    heads: int
    dim_head: int
    upcast: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        b, t, c = x.shape
        ctx = x if context is None else context
        inner = self.heads * self.dim_head
        heads = lambda y: y.reshape(y.shape[0], y.shape[1], self.heads, self.dim_head)  # noqa: E731
        q = heads(_dense(self, inner, "to_q", use_bias=False)(x))
        k = heads(_dense(self, inner, "to_k", use_bias=False)(ctx))
        v = heads(_dense(self, inner, "to_v", use_bias=False)(ctx))
        if self.upcast:
            q, k, v = (y.astype(jnp.float32) for y in (q, k, v))
        o = kernels_lib.attention(q, k, v, self.kernels, precision=self.precision)
        return _dense(self, c, "to_out_0")(o.reshape(b, t, inner).astype(self.dtype))


class GEGLU(nn.Module):
    """``h * gelu(gate)`` with ``[h, gate] = proj(x)`` (Shazeer 2020), exact GELU:
    ``[..., C] -> [..., features]``."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(_dense(self, 2 * self.features, "proj")(x), 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """``net_2(net_0(x))``, ``net_0`` a :class:`GEGLU` to ``mult * C``: ``[..., C] -> [..., C]``
    (diffusers ``FeedForward``; ``net.1`` is its dropout)."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        h = GEGLU(self.mult * c, name="net_0", **kw)(x)
        return _dense(self, c, "net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention ``attn1``, cross-attention ``attn2`` on the
    conditioning, GEGLU ``ff``, each residual (diffusers ``BasicTransformerBlock``).

    Shapes: ``x [B, T, C], context [B, S, C_ctx] -> [B, T, C]``, ``C = heads * dim_head``.
    """

    heads: int
    dim_head: int
    upcast_attention: bool = False
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        attn = dict(heads=self.heads, dim_head=self.dim_head, upcast=self.upcast_attention)
        norm = lambda name: nn.LayerNorm(  # noqa: E731
            self.epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            use_fast_variance=False,
            name=name,
        )
        x = x + Attention(**attn, kernels=self.kernels, name="attn1", **common)(norm("norm1")(x))
        h = norm("norm2")(x)
        x = x + Attention(**attn, kernels=self.kernels, name="attn2", **common)(h, context)
        return x + FeedForward(name="ff", **common)(norm("norm3")(x))


class Transformer2D(nn.Module):
    """Spatial transformer (diffusers ``Transformer2DModel``, continuous input): GroupNorm
    ``norm`` (eps 1e-6), ``proj_in`` to ``heads * dim_head`` (a Dense when
    ``use_linear_projection``, else a 1x1 conv; on NHWC the same map), ``num_layers``
    :class:`BasicTransformerBlock` over the ``H*W`` tokens, ``proj_out`` back, residual.

    Shapes: ``x [B, H, W, C], context [B, S, C_ctx] -> [B, H, W, C]``.
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    use_linear_projection: bool = True
    upcast_attention: bool = False
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        proj = (
            (lambda f, name: _dense(self, f, name))
            if self.use_linear_projection
            else (lambda f, name: _conv(self, f, 1, name))
        )
        y = _group_norm(self, self.num_groups, 1e-6, "norm")(x)
        y = proj(inner, "proj_in")(y).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            y = BasicTransformerBlock(
                self.heads,
                self.dim_head,
                upcast_attention=self.upcast_attention,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                kernels=self.kernels,
                name=f"transformer_blocks_{i}",
            )(y, context)
        y = proj(c, "proj_out")(y.reshape(b, h, w, inner))
        return y + x.astype(y.dtype)


class _Level(nn.Module):
    """Fields shared by the down, mid and up blocks."""

    out_channels: int
    num_layers: int = 2
    add_attention: bool = True
    heads: int = 8
    transformer_layers: int = 1
    use_linear_projection: bool = True
    upcast_attention: bool = False
    num_groups: int = 32
    epsilon: float = 1e-5
    act: Activation = nn.swish
    output_scale_factor: float = 1.0
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernels: Kernels = Kernels()

    def _common(self) -> dict[str, Any]:
        return dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernels=self.kernels,
        )

    def _resnet(self, name: str) -> nn.Module:
        cls = layers.remat(ResnetBlock, self.remat)
        return cls(
            self.out_channels,
            num_groups=self.num_groups,
            epsilon=self.epsilon,
            act=self.act,
            output_scale_factor=self.output_scale_factor,
            name=name,
            **self._common(),
        )

    def _attention(self, name: str) -> nn.Module:
        if self.out_channels % self.heads:
            raise ValueError(
                f"UNet: {self.heads} attention heads must divide the {self.out_channels} channels"
            )
        cls = layers.remat(Transformer2D, self.remat)
        return cls(
            self.heads,
            self.out_channels // self.heads,
            num_layers=self.transformer_layers,
            use_linear_projection=self.use_linear_projection,
            upcast_attention=self.upcast_attention,
            num_groups=self.num_groups,
            name=name,
            **self._common(),
        )


class DownBlock(_Level):
    """``num_layers`` x (resnet, transformer when ``add_attention``), then a stride-2 3x3
    ``downsamplers_0`` when ``add_downsample`` (diffusers ``CrossAttnDownBlock2D`` /
    ``DownBlock2D``). Returns the output and every intermediate for the up path's skips.

    Shapes: ``[B, H, W, C_in] -> ([B, H', W', out_channels], (num_layers [+1] skips))``.
    """

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context):
        states = []
        for i in range(self.num_layers):
            x = self._resnet(f"resnets_{i}")(x, temb)
            if self.add_attention:
                x = self._attention(f"attentions_{i}")(x, context)
            states.append(x)
        if self.add_downsample:
            x = Downsample(
                asymmetric_padding=self.downsample_padding == 0,
                name="downsamplers_0",
                **self._common(),
            )(x)
            states.append(x)
        return x, tuple(states)


class MidBlock(_Level):
    """resnet, ``num_layers`` x (transformer, resnet) (diffusers ``UNetMidBlock2DCrossAttn``).

    Shapes: ``[B, H, W, C] -> [B, H, W, C]`` (``out_channels = C``).
    """

    num_layers: int = 1

    @nn.compact
    def __call__(self, x, temb, context):
        x = self._resnet("resnets_0")(x, temb)
        for i in range(self.num_layers):
            x = self._attention(f"attentions_{i}")(x, context)
            x = self._resnet(f"resnets_{i + 1}")(x, temb)
        return x


class UpBlock(_Level):
    """``num_layers`` x (concat the last skip on channels, resnet, transformer when
    ``add_attention``), then nearest x2 + 3x3 ``upsamplers_0`` when ``add_upsample`` (diffusers
    ``CrossAttnUpBlock2D`` / ``UpBlock2D``). ``skips`` are consumed from the end.

    Shapes: ``[B, H, W, C] -> [B, H', W', out_channels]``, ``H' = 2H`` with upsampling.
    """

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context):
        if len(skips) != self.num_layers:
            raise ValueError(f"UpBlock: {len(skips)} skips for {self.num_layers} layers")
        for i in range(self.num_layers):
            skip = skips[-1 - i]
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x = self._resnet(f"resnets_{i}")(x, temb)
            if self.add_attention:
                x = self._attention(f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample(name="upsamplers_0", **self._common())(x)
        return x


def _per_block(value: int | Sequence[int] | None, n: int, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"UNet: {name}={value} must have one entry per block ({n})")
    return value


class UNet(nn.Module):
    """SD-2.x conditional UNet, ``epsilon``/``v`` prediction (Rombach et al. 2022, Sec. 3.3).

    Attributes (diffusers ``UNet2DConditionModel`` config keys and semantics; defaults SD-2.1-base):
      in_channels / out_channels: latent channels.
      down_block_types / up_block_types: ``CrossAttnDownBlock2D`` | ``DownBlock2D`` and
        ``CrossAttnUpBlock2D`` | ``UpBlock2D`` per level (up blocks from the lowest resolution).
      block_out_channels: width per level; a down/upsampling between levels.
      layers_per_block: resnets per down level (up levels have one more); one value or per level.
      attention_head_dim: read as diffusers reads it: the number of HEADS per level unless
        ``num_attention_heads`` is given (SD-2.x's ``[5, 10, 20, 20]`` are head counts; width per
        head = channels / heads). One value or per level.
      num_attention_heads: head counts, overriding ``attention_head_dim`` (diffusers rejects it).
      cross_attention_dim: width of ``encoder_hidden_states``.
      transformer_layers_per_block: transformer blocks per spatial transformer; one or per level
        (the up path reads it reversed, the mid block takes the last).
      use_linear_projection: Dense (True) or 1x1 conv ``proj_in``/``proj_out``.
      upcast_attention: attention in float32 under a bfloat16 ``dtype`` (SD-2.1 768-v).
      norm_num_groups / norm_eps: GroupNorm of the resnets and ``conv_norm_out``.
      flip_sin_to_cos / freq_shift: timestep embedding (:func:`timestep_embedding`).
      act_fn, downsample_padding, mid_block_scale_factor, resnet_out_scale_factor,
        time_embedding_dim: as in diffusers.
      remat: rematerialise each resnet and spatial transformer in the backward pass.
      mid_only: stop after the mid block and return its output ``[B, H/f, W/f, C_last]`` float32
        (the encoder half that a latent discriminator builds on; the up blocks' params are unused).
      dtype / param_dtype / precision / kernels: compute dtype (norm statistics, softmax and the
        timestep embedding stay float32), parameter dtype, matmul precision, kernel switch.

    ``__call__(sample [B, H, W, in_channels], timesteps (scalar or [B], int or float),
    encoder_hidden_states [B, S, cross_attention_dim]) -> [B, H, W, out_channels]`` float32;
    ``H, W`` multiples of ``2^(levels - 1)``.
    """

    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    attention_head_dim: int | tuple[int, ...] = (5, 10, 20, 20)
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 1024
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = True
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    act_fn: str = "silu"
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    resnet_out_scale_factor: float = 1.0
    time_embedding_dim: int | None = None
    remat: bool | str = False
    mid_only: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernels: Kernels = Kernels()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def _check(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"UNet: down_block_types ({len(self.down_block_types)}) and up_block_types "
                f"({len(self.up_block_types)}) need one entry per block_out_channels ({n})"
            )
        for field, types, known in (
            ("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
            ("up_block_types", self.up_block_types, UP_BLOCK_TYPES),
        ):
            for t in types:
                if t not in known:
                    raise ValueError(f"UNet: {field} entry {t!r} unsupported; expected {known}")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"UNet: downsample_padding={self.downsample_padding}; expected 0 or 1")

    @nn.compact
    def __call__(
        self, sample: jax.Array, timesteps: jax.Array | int | float, encoder_hidden_states
    ) -> jax.Array:
        self._check()
        n = len(self.block_out_channels)
        b, h, w, c = sample.shape
        f = self.downsample_factor
        if c != self.in_channels or h % f or w % f:
            raise ValueError(
                f"UNet: sample must be [B, H, W, {self.in_channels}] with H, W multiples of {f}; "
                f"got {sample.shape}"
            )
        heads = _per_block(
            self.num_attention_heads or self.attention_head_dim, n, "attention heads"
        )
        layers = _per_block(self.layers_per_block, n, "layers_per_block")
        tlayers = _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        act = get_activation(self.act_fn)
        common = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernels=self.kernels,
        )
        level = dict(
            use_linear_projection=self.use_linear_projection,
            upcast_attention=self.upcast_attention,
            num_groups=self.norm_num_groups,
            epsilon=self.norm_eps,
            act=act,
            remat=self.remat,
            **common,
        )
        chans = self.block_out_channels

        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        temb = timestep_embedding(t, chans[0], self.flip_sin_to_cos, self.freq_shift)
        temb = TimestepEmbedding(
            self.time_embedding_dim or 4 * chans[0],
            act=act,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name="time_embedding",
        )(temb)
        context = jnp.asarray(encoder_hidden_states).astype(self.dtype)

        x = _conv(self, chans[0], 3, "conv_in")(sample.astype(self.dtype))
        skips = [x]
        for i, kind in enumerate(self.down_block_types):
            x, states = DownBlock(
                chans[i],
                num_layers=layers[i],
                add_attention=kind == "CrossAttnDownBlock2D",
                heads=heads[i],
                transformer_layers=tlayers[i],
                output_scale_factor=self.resnet_out_scale_factor,
                add_downsample=i < n - 1,
                downsample_padding=self.downsample_padding,
                name=f"down_blocks_{i}",
                **level,
            )(x, temb, context)
            skips.extend(states)

        x = MidBlock(
            chans[-1],
            heads=heads[-1],
            transformer_layers=tlayers[-1],
            output_scale_factor=self.mid_block_scale_factor,
            name="mid_block",
            **level,
        )(x, temb, context)
        if self.mid_only:
            return x.astype(jnp.float32)

        for i, kind in enumerate(self.up_block_types):
            j = n - 1 - i  # the down level at this resolution
            m = layers[j] + 1
            x = UpBlock(
                chans[j],
                num_layers=m,
                add_attention=kind == "CrossAttnUpBlock2D",
                heads=heads[j],
                transformer_layers=tlayers[j],
                output_scale_factor=self.resnet_out_scale_factor,
                add_upsample=i < n - 1,
                name=f"up_blocks_{i}",
                **level,
            )(x, tuple(skips[-m:]), temb, context)
            del skips[-m:]

        x = act(_group_norm(self, self.norm_num_groups, self.norm_eps, "conv_norm_out")(x))
        x = _conv(self, self.out_channels, 3, "conv_out")(x)
        return x.astype(jnp.float32)
