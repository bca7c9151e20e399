"""OSDFace's visual representation embedder (VRE) and visual prompt (Sec. 3.2, Eqs. 5-6; Sec. 4.1).

Stage I trains two VQ autoencoders of one shape, ``hq`` on HQ faces and ``lq`` on LQ faces, each a
:class:`artfr_jax.models.vqgan.VQGAN` (encoder, 1x1 ``quant_conv``, codebook, mirrored decoder);
the association loss (Eqs. 9-10, ``losses/association.py``) ties their ``quant_conv`` features.
Stage II keeps the LQ encoder and codebook only: the visual tokenizer ``M o E_L`` (Eq. 5) gives
every latent position its nearest code, and the VQ embedder (Eq. 6) turns the 77 nearest distinct
codes into the prompt ``p_L`` that replaces SD's text embedding, after :class:`PromptProjection`
maps it to the UNet's cross-attention width.

Paper model (Sec. 4.1 and the official code): 512 px -> 16 x 16 = 256 tokens, codebook 1024 x 512.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from artfr_jax.models.vqgan import VQGAN

Dtype = Any

NUM_PROMPT_TOKENS = 77  # SD's text context length, which the visual prompt takes the place of


def vre_autoencoder_kwargs(
    base_channels: int = 64,
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 2, 4, 8),
    layers_per_block: int = 2,
    latent_channels: int = 512,
    num_embeddings: int = 1024,
    embedding_dim: int = 512,
    norm_num_groups: int = 32,
    beta: float = 0.25,
) -> dict[str, Any]:
    """:class:`VQGAN` fields of one VRE autoencoder; the defaults are the paper's (Sec. 4.1).

    Widths ``base_channels * m`` per level, a downsampling after every level but the last,
    ``layers_per_block`` residual blocks per encoder level (``+ 1`` per decoder level, mirrored),
    single-head self-attention after each residual block of the last (lowest-resolution) level
    and in the bottleneck, GroupNorm eps 1e-6, encoder output ``latent_channels`` then the 1x1
    ``quant_conv`` to ``embedding_dim``; codebook ``num_embeddings x embedding_dim``; ``beta``
    is Eq. 7's commitment weight. Defaults: (64, 128, 128, 128, 256, 512), 512 px -> 16 x 16.
    """
    levels = len(channel_multipliers)
    return dict(
        block_out_channels=tuple(base_channels * m for m in channel_multipliers),
        layers_per_block=layers_per_block,
        decoder_layers_per_block=layers_per_block + 1,
        attention_levels=(levels - 1,),
        mid_attention=True,
        latent_channels=latent_channels,
        num_embeddings=num_embeddings,
        embedding_dim=embedding_dim,
        norm_num_groups=norm_num_groups,
        norm_eps=1e-6,
        act_fn="silu",
        beta=beta,
    )


def code_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Squared distances ``||z - e_k||^2``: ``z [..., C], codebook [K, C] -> [..., K]`` float32.

    Expanded as ``||z||^2 - 2 z.e + ||e||^2`` (one matmul at highest precision), the same
    arithmetic as :func:`artfr_jax.models.vqgan.nearest_code`, so the argmin agrees with it.
    """
    zf = z.astype(jnp.float32)
    e = codebook.astype(jnp.float32)
    cross = jnp.einsum("...c,kc->...k", zf, e, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(zf * zf, axis=-1, keepdims=True) - 2.0 * cross + jnp.sum(e * e, axis=-1)


def nearest_codes(z: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Matching function ``M`` (Eq. 5) with its distances: ``z [..., C] -> (codes [...] int32,
    distances [...] float32)``, ``distances = min_k ||z - e_k||^2`` (first index on ties)."""
    d = code_distances(z, codebook)
    codes = jnp.argmin(d, axis=-1).astype(jnp.int32)
    return codes, jnp.take_along_axis(d, codes[..., None], axis=-1)[..., 0]


def select_prompt_codes(
    codes: jax.Array, distances: jax.Array, num_tokens: int = NUM_PROMPT_TOKENS
) -> tuple[jax.Array, jax.Array]:
    """The first ``num_tokens`` distinct codes of each example in order of distance (Eq. 6).

    ``codes, distances [B, ...]`` (one entry per latent position, any spatial shape) ->
    ``(selected [B, num_tokens] int32, mask [B, num_tokens] bool)``. Positions are ordered by
    ascending distance (stable: equal distances keep raster order); a code is taken at its
    first (closest) position; slots past the number of distinct codes hold code 0 and mask
    False. Static shapes, no data-dependent control flow: jit-able for any batch size
    (``num_tokens`` static); each example's result does not depend on the others.
    """
    b = codes.shape[0]
    codes = codes.reshape(b, -1).astype(jnp.int32)
    distances = distances.reshape(b, -1)
    n = codes.shape[1]

    def one(c, d):
        order = jnp.argsort(d, stable=True)
        by_rank = c[order]  # codes in order of distance
        rank = jnp.arange(n, dtype=jnp.int32)
        # Sorting (code, rank) pairs groups each code's occurrences with the closest first.
        sorted_code, sorted_rank = jax.lax.sort((by_rank, rank), num_keys=2)
        head = jnp.concatenate([jnp.ones((1,), bool), sorted_code[1:] != sorted_code[:-1]])
        is_first = jnp.zeros((n,), bool).at[sorted_rank].set(head)
        slot = jnp.cumsum(is_first) - 1  # output slot of each first occurrence
        target = jnp.where(is_first, slot, num_tokens)  # num_tokens: dropped
        selected = jnp.zeros((num_tokens,), jnp.int32).at[target].set(by_rank, mode="drop")
        mask = jnp.arange(num_tokens) < jnp.sum(is_first)
        return selected, mask

    return jax.vmap(one)(codes, distances)


def visual_prompt(
    codes: jax.Array,
    distances: jax.Array,
    codebook: jax.Array,
    num_tokens: int = NUM_PROMPT_TOKENS,
) -> tuple[jax.Array, jax.Array]:
    """VQ embedder (Eq. 6): the visual prompt ``p_L`` from the LQ tokens.

    ``codes, distances [B, ...]`` (from :func:`nearest_codes`), ``codebook [K, C]`` ->
    ``(p_L [B, num_tokens, C], mask [B, num_tokens] bool)``: the codebook rows of
    :func:`select_prompt_codes`, zero rows where ``mask`` is False, in the codebook's dtype.
    """
    selected, mask = select_prompt_codes(codes, distances, num_tokens)
    rows = jnp.take(codebook, selected, axis=0)
    return jnp.where(mask[..., None], rows, jnp.zeros((), rows.dtype)), mask


class VisualRepresentationEmbedder(nn.Module):
    """The VRE of stage I (Sec. 3.2, Fig. 3): HQ and LQ VQ autoencoders of one shape.

    Build with :func:`make_vre` (or pass two :class:`VQGAN` with equal fields). Params ``hq`` and
    ``lq`` are each exactly a :class:`VQGAN`'s params, so a branch can be trained, converted or
    frozen on its own with the plain ``VQGAN``. Images NHWC in [-1, 1].

    ``__call__(hq [B, H, W, 3], lq [B, H, W, 3])`` -> dict with ``hq_recon``, ``lq_recon``
    ``[B, H, W, 3]`` float32, ``hq_aux``, ``lq_aux`` (the VQGAN's VQ losses/statistics/indices) and
    ``hq_features``, ``lq_features`` ``[B, h, w, C]``: the ``quant_conv`` outputs (pre-quantisation,
    ``z_H`` and ``z_L`` of the association loss, Eqs. 9-10).
    """

    hq: VQGAN
    lq: VQGAN

    def __call__(self, hq: jax.Array, lq: jax.Array, *, train: bool = True) -> dict[str, Any]:
        del train  # no stochastic layer; accepted for the trainers' uniform signature
        out = {}
        for name, branch, x in (("hq", self.hq, hq), ("lq", self.lq, lq)):
            z = branch.encode(x)
            zq, indices, aux = branch.quantize(z)
            out[f"{name}_recon"] = branch.decode(zq)
            out[f"{name}_aux"] = {**aux, "indices": indices}
            out[f"{name}_features"] = z
        return out

    def features(self, hq: jax.Array, lq: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``quant_conv`` features of both branches: ``-> (z_H, z_L)``, each ``[B, h, w, C]``."""
        return self.hq.encode(hq), self.lq.encode(lq)

    def lq_codebook(self) -> jax.Array:
        """The LQ dictionary ``C_L`` as stored: ``[K, C]`` in ``param_dtype``."""
        return self.lq.variables["params"]["quantizer"]["codebook"]

    def tokenize(self, lq: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Visual tokenizer ``M o E_L`` (Eq. 5): ``lq [B, H, W, 3] -> (codes [B, h, w] int32,
        distances [B, h, w] float32)`` (squared distance of each position to its code)."""
        return nearest_codes(self.lq.encode(lq), self.lq_codebook())

    def prompt(
        self, lq: jax.Array, num_tokens: int = NUM_PROMPT_TOKENS
    ) -> tuple[jax.Array, jax.Array]:
        """``p_L = VRE(I_L)`` (Eqs. 5-6): ``lq [B, H, W, 3] -> (p_L [B, num_tokens, C] float32,
        mask [B, num_tokens])``; see :func:`visual_prompt`."""
        codes, distances = self.tokenize(lq)
        codebook = self.lq_codebook().astype(jnp.float32)
        return visual_prompt(codes, distances, codebook, num_tokens)


def make_vre(**vqgan_fields: Any) -> VisualRepresentationEmbedder:
    """A VRE whose two branches are ``VQGAN(**vqgan_fields)``; e.g.
    ``make_vre(**vre_autoencoder_kwargs(), dtype=jnp.bfloat16)`` is the paper's model."""
    return VisualRepresentationEmbedder(hq=VQGAN(**vqgan_fields), lq=VQGAN(**vqgan_fields))


class PromptProjection(nn.Module):
    """Per-token map of ``p_L`` to the UNet's cross-attention width (Sec. 3.2, stage II).

    Two 1x1 convolutions over the token axis, each followed by SiLU, as in the official
    ``embedding_change_weights.pth``: ``[B, T, C_in] -> [B, T, features]`` (512 -> 256 -> 1024).
    Params ``conv1``, ``conv2`` (``kernel [in, out]``, ``bias [out]``; a PyTorch ``Conv1d``
    weight ``[out, in, 1]`` maps as ``weight[:, :, 0].T``). Output float32.
    """

    hidden_features: int = 256
    features: int = 1024
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, p: jax.Array) -> jax.Array:
        h = nn.silu(_conv1x1(self, self.hidden_features, p.shape[-1], "conv1")(p))
        h = nn.silu(_conv1x1(self, self.features, self.hidden_features, "conv2")(h))
        return h.astype(jnp.float32)


def _conv1x1(module: PromptProjection, features: int, fan_in: int, name: str) -> nn.Dense:
    """A per-token 1x1 conv as ``nn.Dense``, initialised as PyTorch's ``Conv1d``:
    ``U(+-1/sqrt(fan_in))`` for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Dense(
        features,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        precision=module.precision,
        kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        bias_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
        name=name,
    )


class LatentDiscriminatorHead(nn.Module):
    """The trainable head of OSDFace's latent discriminator (Sec. 3.3, Eqs. 15-16, after DFOSD):
    on the frozen UNet's mid-block features of a noised latent, GroupNorm, SiLU, a 3x3 conv to
    ``features``, SiLU and a 1x1 conv to one logit per position.

    ``[B, h, w, C] -> [B, h, w]`` float32 logits (real: high).
    """

    features: int = 256
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        groups = math.gcd(self.num_groups, h.shape[-1])
        x = nn.GroupNorm(groups, epsilon=1e-5, dtype=jnp.float32, name="norm")(h)
        x = nn.silu(x.astype(self.dtype))
        conv = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.silu(nn.Conv(self.features, (3, 3), padding=1, name="conv1", **conv)(x))
        x = nn.Conv(1, (1, 1), name="conv2", **conv)(x)
        return x[..., 0].astype(jnp.float32)


def lq_prompt(
    vre_lq: VQGAN,
    vre_params: Any,
    lq: jax.Array,
    *,
    num_tokens: int = NUM_PROMPT_TOKENS,
    double_normalized: bool = False,
) -> jax.Array:
    """``p_L = VRE(I_L)`` (Eqs. 5-6) from the LQ branch alone: ``lq [B, H, W, 3]`` in [-1, 1] ->
    ``[B, num_tokens, C]`` float32, no gradient. ``double_normalized``: the official release
    normalises its VRE input a second time (``2 x - 1`` of the [-1, 1] image, so [-3, 1]); its
    converted weights need that, weights trained here do not."""
    x = 2.0 * lq - 1.0 if double_normalized else lq
    z = vre_lq.apply({"params": vre_params}, x, method="encode")
    codebook = vre_params["quantizer"]["codebook"].astype(jnp.float32)
    codes, distances = nearest_codes(z, codebook)
    p, _ = visual_prompt(codes, distances, codebook, num_tokens)
    return jax.lax.stop_gradient(p)
