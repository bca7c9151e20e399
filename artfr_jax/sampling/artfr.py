"""ART-FR's restoration (Sec. 3.3): LQ features as the condition, T-step iterative decoding of the
HQ tokens, then the frozen stage-I codebook and decoder. Pure functions; jit them whole."""

from __future__ import annotations

import jax

from artfr_jax.models.artfr import ARTFR, nearest_tokens
from artfr_jax.models.vqgan import VQGAN
from artfr_jax.sampling import maskgit


def restore_tokens(art_params, tok_params, lq, rng, *, art: ARTFR, tokenizer: VQGAN, sampling):
    """``lq [B, H, W, 3]`` in [-1, 1] -> (tokens [B, N], f_l).

    With the AR module: T-step MaskGIT decoding conditioned on ``f_l`` (``sampling``: steps,
    temperature, choice_temperature, schedule); without: the nearest code of ``f_l``.
    """
    f_l = art.apply({"params": art_params}, lq, method=ARTFR.encode_condition)
    if art.transformer is None:
        return nearest_tokens(tokenizer, tok_params, f_l), f_l
    logits_fn = lambda t: art.apply({"params": art_params}, t, f_l, method=ARTFR.token_logits)  # noqa: E731
    tokens = maskgit.decode(
        logits_fn,
        rng,
        batch_size=lq.shape[0],
        seq_len=art.transformer.num_tokens,
        mask_token_id=art.transformer.mask_token_id,
        num_steps=sampling.steps,
        temperature=sampling.temperature,
        choice_temperature=sampling.choice_temperature,
        schedule_kind=sampling.schedule,
    )
    return tokens, f_l


def decode_tokens(tok_params, tokens: jax.Array, *, tokenizer: VQGAN) -> jax.Array:
    """Frozen codebook lookup + HQ decoder: ``tokens [B, N] -> image [B, H, W, 3]`` in [-1, 1]."""
    side = int(round(tokens.shape[1] ** 0.5))
    idx = tokens.reshape(tokens.shape[0], side, side)
    return tokenizer.apply({"params": tok_params}, idx, method=VQGAN.decode_indices)


def restore_images(art_params, tok_params, lq, rng, *, art: ARTFR, tokenizer: VQGAN, sampling):
    """The whole restoration: ``lq [B, H, W, 3]`` in [-1, 1] -> (restored, tokens)."""
    tokens, _ = restore_tokens(
        art_params, tok_params, lq, rng, art=art, tokenizer=tokenizer, sampling=sampling
    )
    return decode_tokens(tok_params, tokens, tokenizer=tokenizer), tokens
