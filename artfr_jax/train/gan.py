"""Discriminator updates shared by the adversarial stages (ART-FR Sec. 3.1 Eq. 4, VQFR Sec. 3.3).

A discriminator is a PatchGAN (hinge loss, taming-transformers) or VQFR's spectrally normalised
SWAGAN (softplus loss with a lazy R1 penalty, StyleGAN2), whose power-iteration vectors are state
the trainers keep in ``TrainState.extras``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from artfr_jax.losses import adversarial
from artfr_jax.models.stylegan_disc import SWADiscriminator


def disc_apply(disc, d_params, extras, x, *, update_stats: bool):
    """Discriminator logits; for the spectral-norm SWAGAN also the advanced power-iteration state
    (``extras['spectral']``). Returns ``(logits, new_spectral or None)``."""
    if isinstance(disc, SWADiscriminator):
        variables = {"params": d_params, "spectral": extras["spectral"]}
        if update_stats:
            logits, upd = disc.apply(variables, x, update_stats=True, mutable=["spectral"])
            return logits, upd["spectral"]
        return disc.apply(variables, x), extras["spectral"]
    return disc.apply({"params": d_params}, x), None


def discriminator_update(disc, d_params, extras, real, fake, step, lc):
    """``(d_loss, d_grads, new_spectral, terms)`` of one discriminator update on detached ``fake``.

    ``loss.disc_loss``: 'hinge' (taming: 0.5 (relu(1-real) + relu(1+fake))) or 'softplus'
    (StyleGAN2/VQFR: softplus(-real) + softplus(fake)). With ``loss.r1_weight > 0`` the lazy R1
    penalty ``r1_weight / 2 * R1 * r1_every`` is added on steps divisible by ``r1_every``.
    """

    def loss_fn(p):
        real_logits, spec = disc_apply(disc, p, extras, real, update_stats=True)
        fake_logits, spec = disc_apply(disc, p, {"spectral": spec}, fake, update_stats=True)
        if lc.get("disc_loss", "hinge") == "softplus":
            loss = adversarial.softplus_d_loss(real_logits, fake_logits)
        else:
            loss = adversarial.hinge_d_loss(real_logits, fake_logits)
        return loss, (spec, jnp.mean(real_logits), jnp.mean(fake_logits))

    (loss, (spec, real_score, fake_score)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        d_params
    )
    terms = {"d_real_score": real_score, "d_fake_score": fake_score}
    r1_weight = lc.get("r1_weight", 0.0)
    if r1_weight > 0:
        every = int(lc.get("r1_every", 16))

        def r1_loss(p):
            d = lambda x: disc_apply(disc, p, {"spectral": spec}, x, update_stats=False)[0]  # noqa: E731
            return r1_weight / 2 * adversarial.r1_penalty(d, real) * every

        def with_r1(_):
            return jax.value_and_grad(r1_loss)(d_params)

        def without(_):
            return jnp.float32(0.0), jax.tree.map(jnp.zeros_like, d_params)

        r1, r1_grads = jax.lax.cond(step % every == 0, with_r1, without, None)
        grads = jax.tree.map(jnp.add, grads, r1_grads)
        terms["d_r1"] = r1
    return loss, grads, spec, terms
