"""ART-FR stage II: condition extractor + masked token model (Sec. 3.2, Fig. 3, App. A.1).

The condition extractor is an LQ encoder ``E_l`` with the stage-I encoder's architecture (a
``VQGAN`` of which only ``encode`` is used, so its params are ``encoder`` and ``quant_conv``, the
same names as in the stage-I checkpoint it is initialised from) and a linear projector to the
transformer width. The frozen codebook and HQ decoder stay with the stage-I params.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from artfr_jax.models.transformer import MaskedTokenTransformer
from artfr_jax.models.vqgan import VQGAN, _l2_normalize, nearest_code


class ARTFR(nn.Module):
    """``__call__(lq [B, H, W, 3] in [-1, 1], tokens [B, N]) -> (logits [B, N, K], f_l)``.

    ``f_l [B, h, w, C]``: LQ features in the codebook space (Eq. 5's ``f_l``).
    ``transformer=None`` is the "AR module off" ablation (Table 2): only ``E_l`` is trained and
    restoration takes the nearest codebook entry of ``f_l``.
    Params: ``lq_encoder/{encoder, quant_conv}``, ``projector``, ``transformer``.
    """

    lq_encoder: VQGAN
    transformer: MaskedTokenTransformer | None = None

    def setup(self):
        if self.transformer is not None:
            self.projector = nn.Dense(
                self.transformer.width,
                dtype=self.transformer.dtype,
                param_dtype=self.transformer.param_dtype,
            )

    def encode_condition(self, lq: jax.Array) -> jax.Array:
        """``E_l``: ``[B, H, W, 3] -> f_l [B, h, w, C]``."""
        return self.lq_encoder.encode(lq)

    def token_logits(self, tokens: jax.Array, f_l: jax.Array, *, train: bool = False) -> jax.Array:
        """``A(q_M, f_l)``: ``tokens [B, N], f_l [B, h, w, C] -> logits [B, N, K]``."""
        if self.transformer is None:
            raise ValueError("ARTFR.token_logits: this model has no transformer (AR module off)")
        cond = self.projector(f_l.reshape(f_l.shape[0], -1, f_l.shape[-1]))
        return self.transformer(tokens, cond, train=train)

    def __call__(self, lq: jax.Array, tokens: jax.Array, *, train: bool = False):
        f_l = self.encode_condition(lq)
        if self.transformer is None:
            return None, f_l
        return self.token_logits(tokens, f_l, train=train), f_l


# The frozen stage-I tokenizer as training targets and as the lookup of restoration (Sec. 3.2-3.3).


def hq_targets(tokenizer: VQGAN, tok_params, hq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Frozen ``E_h`` + ``Q``: ``hq [B, H, W, 3] -> (tokens [B, N], f_h quantised [B, h, w, C])``,
    ``f_h`` in float32."""
    z = tokenizer.apply({"params": tok_params}, hq, method=VQGAN.encode)
    _, idx, _ = tokenizer.apply({"params": tok_params}, z, method=VQGAN.quantize)
    f_h = tokenizer.apply({"params": tok_params}, idx, method=VQGAN.lookup)
    return idx.reshape(idx.shape[0], -1), jax.lax.stop_gradient(f_h.astype(jnp.float32))


def codebook_space(tokenizer: VQGAN, f: jax.Array) -> jax.Array:
    """Features as the codebook compares them: float32, l2-normalised for ``normalize_codes``."""
    f = f.astype(jnp.float32)
    return _l2_normalize(f) if tokenizer.normalize_codes else f


def nearest_tokens(tokenizer: VQGAN, tok_params, f_l: jax.Array) -> jax.Array:
    """Plain VQGAN lookup of LQ features (the "AR module off" restoration): ``-> [B, N]``."""
    codebook = tok_params["quantizer"]["codebook"].astype(jnp.float32)
    if tokenizer.normalize_codes:
        codebook = _l2_normalize(codebook)
    idx = nearest_code(codebook_space(tokenizer, f_l), codebook)
    return idx.reshape(idx.shape[0], -1)
