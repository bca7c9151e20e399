"""GAN losses on discriminator logits (the lambda_G * L_G term of ART-FR Sec. 3.1, Eq. 4).

Conventions follow taming-transformers' VQGAN: the discriminator losses average the real and fake
terms (factor 0.5), logits of any shape are averaged over all elements, and everything is
computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

GENERATOR_LOSS_KINDS = ("hinge", "vanilla", "non_saturating")


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """``0.5 * (mean(relu(1 - D(real))) + mean(relu(1 + D(fake))))`` -> scalar."""
    real = jnp.mean(jax.nn.relu(1.0 - _f32(real_logits)))
    fake = jnp.mean(jax.nn.relu(1.0 + _f32(fake_logits)))
    return 0.5 * (real + fake)


def vanilla_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Binary cross-entropy on logits, ``0.5 * (mean(softplus(-real)) + mean(softplus(fake)))``."""
    real = jnp.mean(jax.nn.softplus(-_f32(real_logits)))
    fake = jnp.mean(jax.nn.softplus(_f32(fake_logits)))
    return 0.5 * (real + fake)


def generator_adv_loss(fake_logits: jax.Array, kind: str = "hinge") -> jax.Array:
    """Generator adversarial loss L_G on the discriminator's logits for generated images.

    ``hinge``: ``-mean(D(fake))`` (taming VQGAN). ``vanilla``: BCE against the "real" label,
    ``mean(softplus(-D(fake)))`` = ``-mean(log sigmoid(D(fake)))``, i.e. the non-saturating form
    used by taming and BasicSR for their vanilla GAN; ``non_saturating`` is the same loss.
    """
    f = _f32(fake_logits)
    if kind == "hinge":
        return -jnp.mean(f)
    if kind in ("vanilla", "non_saturating"):
        return jnp.mean(jax.nn.softplus(-f))
    raise ValueError(f"generator_adv_loss: kind={kind!r}; expected one of {GENERATOR_LOSS_KINDS}")


def adversarial_weight(step: jax.Array | int, start_step: int, weight: float) -> jax.Array:
    """GAN loss weight lambda_G: ``0`` while ``step < start_step``, then ``weight`` (ART-FR: 0.8).

    ``step`` may be traced (inside a jitted train step); returns a float32 scalar.
    """
    return jnp.where(jnp.asarray(step) >= start_step, jnp.float32(weight), jnp.float32(0.0))


# VQFR stage II (Sec. 3.3, Eq. 6; official GANLoss types): the global SWAGAN discriminator uses
# ``wgan_softplus`` with the real and fake terms summed (no 0.5) plus lazy R1; the local PatchGAN
# uses ``hinge`` averaged over real and fake, which is ``hinge_d_loss`` above.


def softplus_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Logistic D loss (BasicSR ``wgan_softplus``, real + fake summed as in VQFR's global D):
    ``mean(softplus(-D(real))) + mean(softplus(D(fake)))`` -> scalar."""
    return jnp.mean(jax.nn.softplus(-_f32(real_logits))) + jnp.mean(
        jax.nn.softplus(_f32(fake_logits))
    )


def softplus_g_loss(fake_logits: jax.Array) -> jax.Array:
    """Non-saturating G loss (BasicSR ``wgan_softplus``, target real): ``mean(softplus(-D(fake)))``."""
    return jnp.mean(jax.nn.softplus(-_f32(fake_logits)))


def hinge_g_loss(fake_logits: jax.Array) -> jax.Array:
    """Hinge G loss (BasicSR ``hinge`` for generators): ``-mean(D(fake))`` -> scalar."""
    return -jnp.mean(_f32(fake_logits))


def r1_penalty(d_apply: Callable[[jax.Array], jax.Array], real: jax.Array) -> jax.Array:
    """R1 gradient penalty (Mescheder et al., 2018, Eq. 9) on real images -> float32 scalar.

    ``mean_b ||d/dx_b sum(D(x))||^2``: the gradient of the summed logits w.r.t. ``real``
    ``[B, ...]``, squared and summed per image, averaged over the batch. ``d_apply`` maps images
    to logits and closes over the discriminator params, so ``jax.grad`` of this value w.r.t. those
    params is the R1 update. VQFR adds ``r1_reg_weight / 2 * r1_penalty * net_d_reg_every`` (10 / 2
    x penalty x 16) every 16th discriminator step (lazy regularisation).
    """
    grad = jax.grad(lambda x: jnp.sum(_f32(d_apply(x))))(real)
    grad = _f32(grad).reshape(grad.shape[0], -1)
    return jnp.mean(jnp.sum(jnp.square(grad), axis=1))
