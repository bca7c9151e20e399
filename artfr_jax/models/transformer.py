"""Bidirectional masked-token transformer with U-ViT long skips (ART-FR Sec. 3.2, App. A.1).

Tokens are HQ codebook indices in ``[0, K)`` with ``K`` itself standing for [MASK]. The LQ condition
(already projected to the transformer width) enters in one of the three ways of ART-FR Table 3 /
Fig. 14:

- ``prefix`` (paper default): LQ tokens are prepended to the HQ token embeddings and the whole
  sequence shares one 1-D learned position embedding;
- ``concat``: LQ features are concatenated with the token embeddings along channels and mixed by a
  linear layer (needs as many LQ as HQ tokens);
- ``cross_attention``: every block attends from the HQ tokens to the LQ tokens.

Blocks are pre-LN (LN -> attention -> residual, LN -> MLP -> residual). Following U-ViT (Bao et al.
2023), the blocks are split into in-blocks, one mid-block and out-blocks; each out-block first fuses
the output of its mirrored in-block as ``Linear(Concat(h_main, h_skip))``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from artfr_jax.models import kernels as kernels_lib
from artfr_jax.models import layers

Dtype = Any
CONDITION_MODES = ("prefix", "concat", "cross_attention")

_embed_init = nn.initializers.normal(stddev=0.02)
_dense_init = nn.initializers.xavier_uniform()


class Attention(nn.Module):
    """Multi-head attention ``x [B, T, D]`` attending to ``context [B, S, D]`` (default: ``x``)."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"Attention: width {width} not divisible by {self.num_heads} heads")
        proj = lambda name: nn.DenseGeneral(
            (self.num_heads, width // self.num_heads),
            kernel_init=_dense_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        q, k, v = proj("query")(x), proj("key")(context), proj("value")(context)
        # cuDNN's fused attention where the program is lowered for a GPU in bfloat16, else XLA's.
        out = kernels_lib.dot_product_attention(q, k, v)
        return nn.DenseGeneral(
            width,
            axis=(-2, -1),
            kernel_init=_dense_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(out)


class MlpBlock(nn.Module):
    """``Dense(mlp_dim) -> GELU -> Dense(width)``."""

    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        common = dict(kernel_init=_dense_init, dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.gelu(nn.Dense(self.mlp_dim, name="fc1", **common)(x))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return nn.Dense(x.shape[-1], name="fc2", **common)(h)


class TransformerBlock(nn.Module):
    """Pre-LN block: self-attention, optional cross-attention to ``context``, MLP.

    ``skip``: output of the mirrored in-block, fused first as ``Linear(Concat(x, skip))``.
    """

    num_heads: int
    mlp_dim: int
    cross_attention: bool = False
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None,
        skip: jax.Array | None,
        deterministic: bool = True,
    ) -> jax.Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: nn.LayerNorm(epsilon=1e-6, name=name, **common)
        drop = lambda h: nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        if skip is not None:
            x = nn.Dense(x.shape[-1], kernel_init=_dense_init, name="skip_linear", **common)(
                jnp.concatenate([x, skip], axis=-1)
            )
        x = x + drop(Attention(self.num_heads, name="self_attn", **common)(norm("norm1")(x)))
        if self.cross_attention:
            h = Attention(self.num_heads, name="cross_attn", **common)(
                norm("norm_cross")(x), context
            )
            x = x + drop(h)
        mlp = MlpBlock(self.mlp_dim, self.dropout_rate, name="mlp", **common)
        return x + drop(mlp(norm("norm2")(x), deterministic))


class MaskedTokenTransformer(nn.Module):
    """Bidirectional transformer predicting HQ tokens from masked tokens and the LQ condition.

    ``__call__(tokens [B, N] int32 in [0, K], cond [B, M, width]) -> logits [B, N, K] float32``.
    ``depth`` blocks = ``depth // 2`` in-blocks, one mid-block, ``depth // 2`` out-blocks
    (``depth`` must be odd). Params: ``token_embed``, ``pos_embed`` (``[M + N, width]`` in prefix
    mode, else ``[N, width]``; cross-attention adds ``cond_pos_embed``), ``concat_linear`` (concat
    mode), ``in_{i}``, ``mid``, ``out_{i}``, ``norm_out``, ``head``.
    """

    num_embeddings: int = 1024
    num_tokens: int = 256
    num_condition_tokens: int = 256
    width: int = 768
    depth: int = 17
    num_heads: int = 12
    mlp_dim: int = 3072
    condition_mode: str = "prefix"
    long_skips: bool = True
    dropout_rate: float = 0.0
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def mask_token_id(self) -> int:
        return self.num_embeddings

    @nn.compact
    def __call__(self, tokens: jax.Array, cond: jax.Array, *, train: bool = False) -> jax.Array:
        if self.condition_mode not in CONDITION_MODES:
            raise ValueError(
                f"condition_mode={self.condition_mode!r}: expected one of {CONDITION_MODES}"
            )
        if self.depth % 2 != 1:
            raise ValueError(f"depth={self.depth}: expected an odd number (in + mid + out blocks)")
        b, n = tokens.shape
        m = cond.shape[1]
        if n != self.num_tokens or m != self.num_condition_tokens or cond.shape[-1] != self.width:
            raise ValueError(
                f"MaskedTokenTransformer: expected tokens [B, {self.num_tokens}] and cond "
                f"[B, {self.num_condition_tokens}, {self.width}], got {tokens.shape}, {cond.shape}"
            )
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        deterministic = not train
        x = nn.Embed(
            self.num_embeddings + 1,
            self.width,
            embedding_init=_embed_init,
            name="token_embed",
            **common,
        )(tokens)
        cond = cond.astype(self.dtype)
        mode = self.condition_mode
        if mode == "concat":
            if m != n:
                raise ValueError(f"condition_mode='concat' needs M == N tokens, got M={m}, N={n}")
            x = nn.Dense(self.width, kernel_init=_dense_init, name="concat_linear", **common)(
                jnp.concatenate([x, cond], axis=-1)
            )
        elif mode == "prefix":
            x = jnp.concatenate([cond, x], axis=1)
        seq = x.shape[1]
        pos = self.param("pos_embed", _embed_init, (seq, self.width), self.param_dtype)
        x = x + pos.astype(self.dtype)[None]
        context = None
        if mode == "cross_attention":
            cpos = self.param("cond_pos_embed", _embed_init, (m, self.width), self.param_dtype)
            context = cond + cpos.astype(self.dtype)[None]
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)

        block_cls = layers.remat(TransformerBlock, self.remat, static_argnums=(4,))
        block = lambda name: block_cls(
            self.num_heads,
            self.mlp_dim,
            cross_attention=mode == "cross_attention",
            dropout_rate=self.dropout_rate,
            name=name,
            **common,
        )
        skips = []
        for i in range(self.depth // 2):
            x = block(f"in_{i}")(x, context, None, deterministic)
            skips.append(x)
        x = block("mid")(x, context, None, deterministic)
        for i in range(self.depth // 2):
            skip = skips.pop() if self.long_skips else None
            x = block(f"out_{i}")(x, context, skip, deterministic)

        x = nn.LayerNorm(epsilon=1e-6, name="norm_out", **common)(x)
        if mode == "prefix":
            x = x[:, m:]
        logits = nn.Dense(self.num_embeddings, kernel_init=_dense_init, name="head", **common)(x)
        return logits.astype(jnp.float32)
