"""ART-FR stage II: condition extractor + masked token model (Sec. 3.2, Fig. 3, App. A.1).

The condition extractor is an LQ encoder ``E_l`` with the stage-I encoder's architecture (a
``VQGAN`` of which only ``encode`` is used, so its params are ``encoder`` and ``quant_conv``, the
same names as in the stage-I checkpoint it is initialised from) and a linear projector to the
transformer width. The frozen codebook and HQ decoder stay with the stage-I params.
"""

from __future__ import annotations

import jax
from flax import linen as nn

from artfr_jax.models.transformer import MaskedTokenTransformer
from artfr_jax.models.vqgan import VQGAN


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
