"""Stage-I VQGAN tokenizer of ART-FR (Sec. 3.1, App. A.1 "Visual Tokenizer Structures").

Encoder ``E_h`` with one residual level per entry of ``block_out_channels`` and a downsampling
after every level but the last (512 -> 16 for the paper's six levels), attention at the lowest level
and in the bottleneck; a 1x1 ``quant_conv`` projector to the codebook dimension; nearest-code
quantisation (Eq. 1) against a ``K x C`` codebook with a straight-through estimator and the VQ loss
of Eq. 3; a 1x1 ``post_quant_conv`` back to the latent width and a mirrored decoder ``D_h`` (Eq. 2).

The layout is the taming-transformers VQGAN as packaged by diffusers' ``VQModel``; with the fields
set by :func:`artfr_jax.convert.diffusers_vq.vqgan_kwargs_from_diffusers_config` the module computes
the same function as a given ``VQModel``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from artfr_jax.models.kernels import Kernels
from artfr_jax.models.layers import Conv, GroupNorm, LevelBlock, MidBlock, get_activation

Dtype = Any


def code_usage_stats(indices: jax.Array, num_embeddings: int) -> dict[str, jax.Array]:
    """Codebook usage of a batch of indices (any shape).

    Returns ``perplexity = exp(-sum_k p_k log p_k)`` of the empirical code histogram ``p`` and
    ``usage`` = fraction of the ``num_embeddings`` codes that occur at least once.
    """
    counts = jnp.bincount(indices.reshape(-1), length=num_embeddings).astype(jnp.float32)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {
        "perplexity": jnp.exp(entropy),
        "usage": jnp.mean((counts > 0).astype(jnp.float32)),
    }


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Eq. 1: ``argmin_k ||z - e_k||^2``; ``z [..., C]``, ``codebook [K, C]`` -> int32 ``[...]``.

    Distances are expanded as ``||z||^2 - 2 z.e + ||e||^2`` so the work is one ``[N, C] x [C, K]``
    matmul (float32, highest precision) instead of an ``[N, K, C]`` difference tensor.
    """
    zf = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
    e = codebook.astype(jnp.float32)
    cross = jnp.dot(zf, e.T, precision=jax.lax.Precision.HIGHEST)
    dist = jnp.sum(zf * zf, axis=1, keepdims=True) - 2.0 * cross + jnp.sum(e * e, axis=1)[None]
    return jnp.argmin(dist, axis=-1).astype(jnp.int32).reshape(z.shape[:-1])


class VectorQuantizer(nn.Module):
    """Codebook ``Z in R^{K x C}`` with nearest-code lookup and straight-through gradients.

    ``__call__(z [B, h, w, C]) -> (zq, indices [B, h, w] int32, aux)`` with ``zq = z + sg[z_q - z]``
    (forward value: codebook rows; gradient: identity to ``z``) and ``aux`` holds, in float32,
    ``codebook_loss = ||sg[f] - z_q||^2``, ``commit_loss = ||f - sg[z_q]||^2`` (element means),
    ``vq_loss = codebook_loss + beta * commit_loss`` (Eq. 3), ``perplexity`` and ``usage``.
    The codebook is initialised ``U(-1/K, 1/K)`` (taming-transformers).

    ``normalize_codes``: l2-normalise ``z`` and the codebook rows before lookup and loss
    (ViT-VQGAN, Yu et al. 2021, Sec. 3.2): every code starts on the same sphere as the features, which
    keeps small codebooks from collapsing onto a few entries. Off for the paper / diffusers layout.
    """

    num_embeddings: int = 1024
    embedding_dim: int = 256
    beta: float = 0.25
    normalize_codes: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        k = self.num_embeddings
        self.codebook = self.param(
            "codebook",
            lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k),
            (k, self.embedding_dim),
            self.param_dtype,
        )

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        if z.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"VectorQuantizer: last axis of z is {z.shape[-1]}, expected "
                f"embedding_dim={self.embedding_dim}"
            )
        zf = z.astype(jnp.float32)
        codebook = self.codebook.astype(jnp.float32)
        if self.normalize_codes:
            zf, codebook = _l2_normalize(zf), _l2_normalize(codebook)
        indices = nearest_code(jax.lax.stop_gradient(zf), codebook)
        zq = jnp.take(codebook, indices, axis=0)
        codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(zf) - zq))
        commit_loss = jnp.mean(jnp.square(zf - jax.lax.stop_gradient(zq)))
        aux = {
            "vq_loss": codebook_loss + self.beta * commit_loss,
            "codebook_loss": codebook_loss,
            "commit_loss": commit_loss,
            **code_usage_stats(indices, self.num_embeddings),
        }
        zq_st = zf + jax.lax.stop_gradient(zq - zf)
        return zq_st.astype(self.dtype), indices, aux

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codebook rows for integer ``indices [...]`` -> ``[..., C]`` (Eq. 2, first part)."""
        codebook = self.codebook
        if self.normalize_codes:
            codebook = _l2_normalize(codebook.astype(jnp.float32))
        return jnp.take(codebook, indices, axis=0).astype(self.dtype)


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class Encoder(nn.Module):
    """VQGAN encoder ``E_h``: conv_in, levels of residual blocks with downsampling between them,
    bottleneck, GroupNorm + act + conv_out to ``out_channels``.

    Shapes: ``[B, H, W, C_in] -> [B, H / 2^(L-1), W / 2^(L-1), out_channels]``.
    """

    block_out_channels: tuple[int, ...] = (64, 128, 128, 256, 256, 512)
    layers_per_block: int = 2
    attention_levels: tuple[int, ...] = (5,)
    mid_attention: bool = True
    out_channels: int = 256
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    act_fn: str = "silu"
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.act_fn)
        common = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernels=self.kernels,
        )
        blk = dict(
            num_groups=self.norm_num_groups, epsilon=self.norm_eps, act=act, remat=self.remat
        )
        chans = self.block_out_channels
        x = Conv(chans[0], (3, 3), padding="SAME", name="conv_in", **common)(x)
        for i, c in enumerate(chans):
            x = LevelBlock(
                c,
                num_layers=self.layers_per_block,
                add_attention=i in self.attention_levels,
                resample="down" if i < len(chans) - 1 else None,
                name=f"down_{i}",
                **blk,
                **common,
            )(x)
        x = MidBlock(add_attention=self.mid_attention, name="mid", **blk, **common)(x)
        x = GroupNorm(
            self.norm_num_groups,
            self.norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernels=self.kernels,
            name="norm_out",
        )(x)
        x = Conv(self.out_channels, (3, 3), padding="SAME", name="conv_out", **common)(act(x))
        return x


class Decoder(nn.Module):
    """VQGAN decoder ``D_h``, the mirror of :class:`Encoder`: conv_in, bottleneck, levels from the
    lowest resolution up (``up_0`` has ``block_out_channels[-1]`` channels), norm, act, conv_out.

    ``attention_levels`` uses encoder level numbers: ``up_i`` gets attention if ``L-1-i`` is listed.

    Shapes: ``[B, h, w, C_lat] -> [B, h * 2^(L-1), w * 2^(L-1), out_channels]``.
    """

    block_out_channels: tuple[int, ...] = (64, 128, 128, 256, 256, 512)
    layers_per_block: int = 3
    attention_levels: tuple[int, ...] = (5,)
    mid_attention: bool = True
    out_channels: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    act_fn: str = "silu"
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        act = get_activation(self.act_fn)
        common = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernels=self.kernels,
        )
        blk = dict(
            num_groups=self.norm_num_groups, epsilon=self.norm_eps, act=act, remat=self.remat
        )
        chans = tuple(reversed(self.block_out_channels))
        n = len(chans)
        x = Conv(chans[0], (3, 3), padding="SAME", name="conv_in", **common)(z)
        x = MidBlock(add_attention=self.mid_attention, name="mid", **blk, **common)(x)
        for i, c in enumerate(chans):
            x = LevelBlock(
                c,
                num_layers=self.layers_per_block,
                add_attention=(n - 1 - i) in self.attention_levels,
                resample="up" if i < n - 1 else None,
                name=f"up_{i}",
                **blk,
                **common,
            )(x)
        x = GroupNorm(
            self.norm_num_groups,
            self.norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernels=self.kernels,
            name="norm_out",
        )(x)
        x = Conv(self.out_channels, (3, 3), padding="SAME", name="conv_out", **common)(act(x))
        return x


class VQGAN(nn.Module):
    """ART-FR stage-I tokenizer (Sec. 3.1, Eqs. 1-3; App. A.1). Defaults are the paper's model.

    Attributes:
      in_channels / out_channels: image channels.
      block_out_channels: encoder widths per level; a downsampling follows every level but the last.
      layers_per_block: residual blocks per encoder level.
      decoder_layers_per_block: per decoder level; ``None`` -> ``layers_per_block + 1`` (taming).
      attention_levels: encoder levels whose residual blocks are each followed by attention.
      decoder_attention_levels: same for the decoder in encoder level numbers; ``None`` -> mirror.
      mid_attention: attention between the two bottleneck residual blocks.
      latent_channels: encoder ``conv_out`` width (input width of the decoder's ``conv_in``).
      num_embeddings, embedding_dim: codebook ``K x C``; ``quant_conv`` / ``post_quant_conv`` are
        the 1x1 projectors between ``latent_channels`` and ``embedding_dim``.
      norm_num_groups, norm_eps, act_fn: GroupNorm groups / epsilon, activation name.
      beta: commitment weight of Eq. 3.
      normalize_codes: l2-normalised code lookup (see ``VectorQuantizer``); off in the paper model.
      remat: rematerialise residual blocks in the backward pass (activation memory for one extra
        forward pass; on CPU only in steps compiled with ``kernels.compiler_options``).
      dtype, param_dtype: compute and parameter dtypes (norm statistics, the VQ distances and the
        losses stay float32; images leave :meth:`decode` in float32).
      precision: matmul/conv precision for every layer (``None`` = JAX default).
      kernels: CPU kernels or plain XLA ops (``models/kernels.py``).

    ``__call__(x [B, H, W, in_channels] in [-1, 1]) -> (recon [B, H, W, out_channels], aux)`` with
    ``aux`` = ``vq_loss``, ``codebook_loss``, ``commit_loss``, ``perplexity``, ``usage`` (float32
    scalars) and ``indices [B, h, w]`` int32, ``h = H / 2^(len(block_out_channels) - 1)``.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64, 128, 128, 256, 256, 512)
    layers_per_block: int = 2
    decoder_layers_per_block: int | None = None
    attention_levels: tuple[int, ...] = (5,)
    decoder_attention_levels: tuple[int, ...] | None = None
    mid_attention: bool = True
    latent_channels: int = 256
    num_embeddings: int = 1024
    embedding_dim: int = 256
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    act_fn: str = "silu"
    beta: float = 0.25
    normalize_codes: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool | str = False
    precision: Any = None
    kernels: Kernels = Kernels()

    def setup(self):
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"VQGAN: norm_num_groups={self.norm_num_groups} must divide every entry of "
                    f"block_out_channels={self.block_out_channels}"
                )
        common = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernels=self.kernels,
        )
        arch = dict(
            block_out_channels=tuple(self.block_out_channels),
            mid_attention=self.mid_attention,
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            act_fn=self.act_fn,
            remat=self.remat,
        )
        dec_layers = self.decoder_layers_per_block
        dec_attn = self.decoder_attention_levels
        self.encoder = Encoder(
            layers_per_block=self.layers_per_block,
            attention_levels=tuple(self.attention_levels),
            out_channels=self.latent_channels,
            **arch,
            **common,
        )
        self.quant_conv = Conv(self.embedding_dim, (1, 1), **common)
        self.quantizer = VectorQuantizer(
            self.num_embeddings,
            self.embedding_dim,
            self.beta,
            normalize_codes=self.normalize_codes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.post_quant_conv = Conv(self.latent_channels, (1, 1), **common)
        self.decoder = Decoder(
            layers_per_block=self.layers_per_block + 1 if dec_layers is None else dec_layers,
            attention_levels=tuple(self.attention_levels if dec_attn is None else dec_attn),
            out_channels=self.out_channels,
            **arch,
            **common,
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, in_channels] -> [B, h, w, embedding_dim]`` pre-quantisation features f_h."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"VQGAN.encode: expected x of shape [B, H, W, {self.in_channels}], got {x.shape}"
            )
        f = self.downsample_factor
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"VQGAN.encode: H and W must be multiples of {f} (2^(levels-1)), got {x.shape[1:3]}"
            )
        return self.quant_conv(self.encoder(x.astype(self.dtype)))

    def quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Eq. 1 + straight-through: ``z [B, h, w, C] -> (zq, indices [B, h, w], aux)``."""
        return self.quantizer(z)

    def decode(self, zq: jax.Array) -> jax.Array:
        """Eq. 2: ``[B, h, w, embedding_dim] -> [B, H, W, out_channels]`` in float32."""
        return self.decoder(self.post_quant_conv(zq)).astype(jnp.float32)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codebook rows: ``[B, h, w]`` int -> ``[B, h, w, embedding_dim]``."""
        return self.quantizer.lookup(indices)

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        """``[B, h, w]`` int -> ``[B, H, W, out_channels]``."""
        return self.decode(self.lookup(indices))

    def __call__(
        self, x: jax.Array, *, train: bool = True
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        # ``train`` is accepted for the trainer's uniform call signature; no layer is stochastic.
        del train
        z = self.encode(x)
        zq, indices, aux = self.quantize(z)
        recon = self.decode(zq)
        return recon, {**aux, "indices": indices}
