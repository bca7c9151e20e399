"""Stage I: the VQ codebook model on HQ faces (ART-FR Sec. 3.1, Eq. 3-4; VQFR Sec. 3.1, 4.1).

ART-FR (default): L = L_2(I_h, I_rec) + L_P(I_h, I_rec) + lambda_G * L_G + L_vq, with lambda_G = 0.8
after ``loss.adversarial_start`` and a PatchGAN discriminator trained with the hinge loss by its own
Adam. VQFR's codebook (``model.arch='vqfr_v1'``, ``configs/vqgan.py:vqfr``) swaps in its own
encoder/decoder, an L1 pixel loss, the SWAGAN global discriminator with the softplus loss and lazy
R1, no quantisation during a warm-up, and k-means re-estimation of the codebook from a reservoir of
encoder outputs (``config.codebook``, :mod:`artfr_jax.train.kmeans`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from artfr_jax.evaluation import metrics as metrics_lib
from artfr_jax.losses import adversarial
from artfr_jax.models import factory
from artfr_jax.models.stylegan_disc import SWADiscriminator
from artfr_jax.train import autoencoder, gan, kmeans, loop, optimizers, perceptual
from artfr_jax.train import state as state_lib
from artfr_jax.utils import images as image_utils


def make_models(config: ml_collections.ConfigDict):
    """The codebook model (``config.model``, by its ``arch``) and its discriminator, both under the
    ``config.model`` precision and kernel policy."""
    tokenizer = factory.tokenizer(config.model.to_dict())
    disc = factory.discriminator(
        config.discriminator.to_dict(), config.model.to_dict(), "config.discriminator"
    )
    return tokenizer, disc


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Separate Adam for generator (paper: 8e-5) and discriminator, in one multi_transform."""
    opt = config.optimizer
    total = config.num_train_steps
    return optax.multi_transform(
        {
            "generator": optimizers.adam(opt, opt.learning_rate, total),
            "discriminator": optimizers.adam(opt, opt.disc_learning_rate, total),
        },
        {"generator": "generator", "discriminator": "discriminator"},
    )


def init_state(rng, mesh, *, config, vqgan, disc, tx):
    size = config.data.image_size
    x = jnp.zeros((1, size, size, 3), jnp.float32)

    params_rng, extras_rng = jax.random.split(rng)

    def init_params(rng):
        g_rng, d_rng = jax.random.split(rng)
        return {
            "generator": vqgan.init(g_rng, x, train=False)["params"],
            "discriminator": disc.init(d_rng, x)["params"],
        }

    ema_keys = ("generator",) if config.optimizer.ema_decay > 0 else ()
    return state_lib.create_train_state(
        init_params,
        tx,
        params_rng,
        mesh,
        ema_keys=ema_keys,
        min_shard_size=config.mesh.min_shard_size,
        init_extras=functools.partial(
            init_extras, extras_rng, config=config, vqgan=vqgan, disc=disc
        ),
    )


def init_extras(rng, *, config, vqgan, disc):
    """Non-trained state: the k-means reservoir and the SWAGAN's spectral-norm vectors."""
    extras = {}
    cb = config.get("codebook")
    if cb is not None and cb.kmeans:
        extras["reservoir"] = kmeans.reservoir_init(cb.reservoir_size, vqgan.embedding_dim)
    if isinstance(disc, SWADiscriminator):
        size = config.data.image_size
        x = jnp.zeros((2, size, size, 3), jnp.float32)
        extras["spectral"] = disc.init(rng, x)["spectral"]
    return extras or None


def train_step(state, batch, rng, frozen, *, config, vqgan, disc, lpips, tx):
    """One generator + discriminator update. batch['hq']: uint8 [B, H, W, 3].

    The generator gradient comes from one VJP of the VQGAN forward: the image-space losses give a
    cotangent on the reconstruction, the VQ loss a unit cotangent. With
    ``loss.adaptive_adversarial_weight`` the adversarial term is scaled as in taming-transformers
    (whose face config uses the same lambda_G = 0.8 and a 30k-step start):
    lambda = lambda_G * ||grad_L nll|| / (||grad_L L_G|| + 1e-4), L = the decoder's last conv kernel.
    Only that kernel's share of the two extra VJPs is used, so XLA keeps just the last layer of them.
    """
    lc = config.loss
    hq = image_utils.to_float_image(batch["hq"])
    gate = adversarial.adversarial_weight(state.step, lc.adversarial_start, 1.0)
    use_adv = lc.adversarial_weight > 0
    d_params = state.params["discriminator"]
    extras = state.extras or {}
    cb = config.get("codebook")
    kw = {}
    if cb is not None and cb.kmeans:  # VQFR: the quantiser is the identity while it warms up
        kw["skip_quantization"] = state.step < cb.warmup_steps

    def forward(g_params):
        recon, aux = vqgan.apply({"params": g_params}, hq, train=True, **kw)
        return (recon, aux["vq_loss"]), aux

    (recon, vq_loss), vjp_fn, aux = jax.vjp(forward, state.params["generator"], has_aux=True)

    def last_layer_norm(cotangent):
        grads = vjp_fn((cotangent, jnp.zeros_like(vq_loss)))[0]
        return jnp.linalg.norm(grads["decoder"]["conv_out"]["kernel"])

    nll, g_recon, terms = autoencoder.generator_cotangent(
        recon,
        hq,
        frozen=frozen,
        lpips=lpips,
        lc=lc,
        disc=disc,
        d_params=d_params,
        extras=extras,
        gate=gate,
        last_layer_norm=last_layer_norm,
    )
    loss = nll + vq_loss
    g_grads = vjp_fn((g_recon, jnp.ones_like(vq_loss)))[0]
    terms.update(vq_loss=vq_loss, perplexity=aux["perplexity"], usage=aux["usage"])

    new_extras = dict(extras)
    if use_adv:
        d_loss, d_grads, spec, d_terms = gan.discriminator_update(
            disc, d_params, extras, hq, jax.lax.stop_gradient(recon), state.step, lc
        )
        d_grads = jax.tree.map(lambda g: g * gate, d_grads)  # nothing before adversarial_start
        terms.update(d_loss=d_loss * gate, **d_terms)
        if spec is not None:
            new_extras["spectral"] = jax.tree.map(
                lambda new, old: jnp.where(gate > 0, new, old), spec, extras["spectral"]
            )
    else:
        d_grads = jax.tree.map(jnp.zeros_like, d_params)
    grads = {"generator": g_grads, "discriminator": d_grads}
    new_state = state.apply_gradients(grads, tx, config.optimizer.ema_decay)
    if "reservoir" in extras:
        new_state, terms["kmeans_reestimated"] = _reestimate_codebook(
            new_state, new_extras, aux["features"], rng, cb
        )
    elif extras:
        new_state = new_state.replace(extras=new_extras)
    metrics = {
        "loss": loss,
        **terms,
        "grad_norm": optax.global_norm(g_grads),
        "param_norm": optax.global_norm(new_state.params["generator"]),
        "update_norm": optax.global_norm(
            jax.tree.map(jnp.subtract, new_state.params["generator"], state.params["generator"])
        ),
    }
    if use_adv:
        metrics["d_grad_norm"] = optax.global_norm(d_grads)
    return new_state, metrics


def _reestimate_codebook(state, extras, features, rng, cb):
    """Adds this batch's encoder outputs to the reservoir and, when due, replaces the codebook
    with their k-means centres (VQFR Sec. 4.1). Returns (state, 1.0 if re-estimated else 0.0)."""
    add_key, km_key = jax.random.split(rng)
    res = extras["reservoir"]
    in_window = (state.step <= cb.max_steps) if cb.max_steps >= 0 else True
    added = kmeans.reservoir_add(res, jax.lax.stop_gradient(features), add_key)
    res = jax.tree.map(lambda a, b: jnp.where(in_window, a, b), added, res)
    q = state.params["generator"]["quantizer"]
    # The update that just happened is step ``state.step``; the release re-estimates at
    # iterations divisible by ``every`` (its iteration counter starts at 1).
    codebook, res, did = kmeans.maybe_reestimate(
        q["embedding"],
        res,
        state.step,
        km_key,
        every=cb.every,
        max_steps=cb.max_steps,
        iters=cb.iters,
    )
    params = dict(state.params)
    params["generator"] = {**params["generator"], "quantizer": {**q, "embedding": codebook}}
    return state.replace(params=params, extras={**extras, "reservoir": res}), did


def eval_step(state, batch, rng, frozen, *, vqgan):
    """Reconstruction metrics (L1, PSNR, SSIM, LPIPS when its weights are loaded) summed over the
    (masked) batch, and input | reconstruction rows. Deterministic: ``rng`` is unused."""
    del rng
    params = (
        state.ema_params["generator"] if state.ema_params is not None else state.params["generator"]
    )
    hq = image_utils.to_float_image(batch["hq"])
    recon, aux = vqgan.apply({"params": params}, hq, train=False)
    recon_u8 = image_utils.to_uint8_image(recon)
    mask = batch["mask"]
    x255 = batch["hq"].astype(jnp.float32)
    r255 = recon_u8.astype(jnp.float32)
    per_image = {
        "l1": jnp.mean(jnp.abs(jnp.clip(recon, -1, 1) - hq), axis=(1, 2, 3)),
        "psnr": metrics_lib.psnr(r255, x255),
        "ssim": metrics_lib.ssim(r255, x255),
        **perceptual.eval_lpips(frozen, recon_u8, batch["hq"]),
    }
    sums = {k: jnp.sum(v * mask) for k, v in per_image.items()}
    sums["count"] = jnp.sum(mask)
    rows = jnp.concatenate([batch["hq"], recon_u8], axis=2)
    return sums, rows


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
    vqgan, disc = make_models(config)
    frozen, lpips = perceptual.loss_lpips(config)
    frozen.update(perceptual.eval_lpips_params(config, frozen))
    tx = make_optimizer(config)
    return loop.Stage(
        name="vqgan",
        init_state=functools.partial(init_state, config=config, vqgan=vqgan, disc=disc, tx=tx),
        train_step=functools.partial(
            train_step, config=config, vqgan=vqgan, disc=disc, lpips=lpips, tx=tx
        ),
        eval_step=functools.partial(eval_step, vqgan=vqgan),
        **loop.stage_data(config),
        frozen=frozen,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    return loop.train_and_evaluate(config, workdir, make_stage(config))
