"""The image-space generator losses of a VQ autoencoder and their cotangent (ART-FR Eq. 3-4;
VQFR Sec. 4.1; OSDFace Eqs. 7-8): pixel, LPIPS and the adversarial term with taming-transformers'
gradient-balanced weight. Shared by the stages that train codebook models (the tokenizer of
``vqgan_trainer``, both autoencoders of ``osdface_vre_trainer``)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from artfr_jax.losses import adversarial
from artfr_jax.train import gan


def reconstruction_terms(recon, target, frozen, lpips, lc):
    """``(lc.pixel_weight * pixel + lc.perceptual_weight * LPIPS, terms)``; ``loss.pixel_loss``:
    'l2' (default) or 'l1'; LPIPS only when ``lpips`` (the module) is given."""
    kind = lc.get("pixel_loss", "l2")
    err = jnp.abs(recon - target) if kind == "l1" else jnp.square(recon - target)
    terms = {kind: jnp.mean(err)}
    loss = lc.pixel_weight * terms[kind]
    if lpips is not None:
        terms["lpips"] = jnp.mean(lpips.apply({"params": frozen["lpips"]}, recon, target))
        loss = loss + lc.perceptual_weight * terms["lpips"]
    return loss, terms


def generator_cotangent(
    recon: jax.Array,
    target: jax.Array,
    *,
    frozen,
    lpips,
    lc,
    disc,
    d_params,
    extras,
    gate: jax.Array,
    last_layer_norm: Callable[[jax.Array], jax.Array],
) -> tuple[jax.Array, jax.Array, dict]:
    """``(loss, d loss / d recon, terms)`` of the image-space terms on one reconstruction.

    With ``lc.adversarial_weight > 0`` the term ``w * L_G(D(recon))`` is added, ``w =
    adversarial_weight * gate`` times, with ``lc.adaptive_adversarial_weight``, taming's ratio
    ``||grad_L rec|| / (||grad_L L_G|| + 1e-4)`` (clipped to [0, 1e4], no gradient), where
    ``last_layer_norm(cotangent)`` is the norm of the decoder's last kernel's gradient under a
    cotangent on ``recon`` (XLA keeps only that layer of its VJP).
    """
    (loss, terms), g_recon = jax.value_and_grad(reconstruction_terms, has_aux=True)(
        recon, target, frozen, lpips, lc
    )
    if lc.adversarial_weight > 0:

        def adv_loss(recon):
            logits, _ = gan.disc_apply(disc, d_params, extras, recon, update_stats=False)
            return adversarial.generator_adv_loss(logits, kind=lc.generator_loss)

        g_adv, g_recon_adv = jax.value_and_grad(adv_loss)(recon)
        adv_w = lc.adversarial_weight * gate
        if lc.adaptive_adversarial_weight:
            ratio = last_layer_norm(g_recon) / (last_layer_norm(g_recon_adv) + 1e-4)
            adv_w = adv_w * jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4))
        g_recon = g_recon + adv_w * g_recon_adv
        loss = loss + adv_w * g_adv
        terms.update(g_adv=g_adv, adv_weight=adv_w)
    return loss, g_recon, terms
