"""Stage I: the VQGAN tokenizer on HQ faces (ART-FR Sec. 3.1, Eq. 3-4).

L = L_2(I_h, I_rec) + L_P(I_h, I_rec) + lambda_G * L_G + L_vq, with lambda_G = 0.8 after
``loss.adversarial_start`` and a PatchGAN discriminator trained with the hinge loss by its own Adam.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from artfr_jax.evaluation import metrics as metrics_lib
from artfr_jax.losses import adversarial, perceptual
from artfr_jax.models.discriminators import PatchDiscriminator
from artfr_jax.models.vqgan import VQGAN
from artfr_jax.train import loop
from artfr_jax.train import state as state_lib


def make_models(config: ml_collections.ConfigDict):
    vqgan = VQGAN(**config.model.to_dict())
    disc = PatchDiscriminator(**config.discriminator.to_dict())
    return vqgan, disc


def load_frozen(config: ml_collections.ConfigDict) -> tuple[dict, perceptual.LPIPS | None]:
    """LPIPS weights when the perceptual loss is on; a clear error when they are required but absent.

    ``loss.perceptual``: 'required' (paper default: a missing file is an error), 'if_available'
    (used when ``loss.lpips_weights`` names a file, else the term is dropped) or 'off'.
    """
    mode = config.loss.perceptual
    if mode not in ("required", "if_available", "off"):
        raise ValueError(
            f"config.loss.perceptual={mode!r}: expected 'required', 'if_available' or 'off'"
        )
    path = config.loss.lpips_weights
    if mode == "off" or config.loss.perceptual_weight == 0 or (mode == "if_available" and not path):
        return {}, None
    if not path:
        raise FileNotFoundError(
            "config.loss.lpips_weights is empty but config.loss.perceptual='required': convert "
            "LPIPS weights with `python -m artfr_jax.convert.lpips_vgg --vgg16=vgg16-397923af.pth "
            "--output=lpips_vgg.msgpack` and pass --config.loss.lpips_weights=lpips_vgg.msgpack "
            "(or set --config.loss.perceptual=off)"
        )
    params = perceptual.load_lpips_params(path)
    return {"lpips": params}, perceptual.LPIPS()


def learning_rate_schedule(opt: ml_collections.ConfigDict, peak: float, total_steps: int):
    """'constant' (paper stage I) or 'cosine' from ``peak`` to ``end_learning_rate``, both after a
    linear warm-up of ``warmup_steps``."""
    if opt.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif opt.schedule == "cosine":
        decay = max(total_steps - opt.warmup_steps, 1)
        main = optax.cosine_decay_schedule(peak, decay, alpha=opt.end_learning_rate / peak)
    else:
        raise ValueError(
            f"config.optimizer.schedule={opt.schedule!r}: expected 'constant' or 'cosine'"
        )
    if not opt.warmup_steps:
        return main
    warmup = optax.linear_schedule(0.0, peak, opt.warmup_steps)
    return optax.join_schedules([warmup, main], [opt.warmup_steps])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Separate Adam for generator (paper: 8e-5) and discriminator, in one multi_transform."""
    opt = config.optimizer

    def adam(peak):
        lr = learning_rate_schedule(opt, peak, config.num_train_steps)
        chain = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip else []
        return optax.chain(*chain, optax.adam(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps))

    return optax.multi_transform(
        {"generator": adam(opt.learning_rate), "discriminator": adam(opt.disc_learning_rate)},
        {"generator": "generator", "discriminator": "discriminator"},
    )


def init_state(rng, mesh, *, config, vqgan, disc, tx):
    size = config.data.image_size
    x = jnp.zeros((1, size, size, 3), jnp.float32)

    def init_params(rng):
        g_rng, d_rng = jax.random.split(rng)
        return {
            "generator": vqgan.init(g_rng, x, train=False)["params"],
            "discriminator": disc.init(d_rng, x)["params"],
        }

    ema_keys = ("generator",) if config.optimizer.ema_decay > 0 else ()
    return state_lib.create_train_state(
        init_params, tx, rng, mesh, ema_keys=ema_keys, min_shard_size=config.mesh.min_shard_size
    )


def train_step(state, batch, rng, frozen, *, config, vqgan, disc, lpips, tx):
    """One generator + discriminator update. batch['hq']: uint8 [B, H, W, 3].

    The generator gradient comes from one VJP of the VQGAN forward: the image-space losses give a
    cotangent on the reconstruction, the VQ loss a unit cotangent. With
    ``loss.adaptive_adversarial_weight`` the adversarial term is scaled as in taming-transformers
    (whose face config uses the same lambda_G = 0.8 and a 30k-step start):
    lambda = lambda_G * ||grad_L nll|| / (||grad_L L_G|| + 1e-4), L = the decoder's last conv kernel.
    Only that kernel's share of the two extra VJPs is used, so XLA keeps just the last layer of them.
    """
    del rng  # stage I is deterministic given the batch
    lc = config.loss
    hq = loop.to_float_image(batch["hq"])
    gate = adversarial.adversarial_weight(state.step, lc.adversarial_start, 1.0)
    use_adv = lc.adversarial_weight > 0
    d_params = state.params["discriminator"]

    def forward(g_params):
        recon, aux = vqgan.apply({"params": g_params}, hq, train=True)
        return (recon, aux["vq_loss"]), aux

    (recon, vq_loss), vjp_fn, aux = jax.vjp(forward, state.params["generator"], has_aux=True)

    def reconstruction_loss(recon):
        terms = {"l2": jnp.mean((recon - hq) ** 2)}
        loss = lc.pixel_weight * terms["l2"]
        if lpips is not None:
            terms["lpips"] = jnp.mean(lpips.apply({"params": frozen["lpips"]}, recon, hq))
            loss = loss + lc.perceptual_weight * terms["lpips"]
        return loss, terms

    (nll, terms), g_recon = jax.value_and_grad(reconstruction_loss, has_aux=True)(recon)
    loss = nll + vq_loss
    if use_adv:

        def adv_loss(recon):
            logits = disc.apply({"params": d_params}, recon)
            return adversarial.generator_adv_loss(logits, kind=lc.generator_loss)

        g_adv, g_recon_adv = jax.value_and_grad(adv_loss)(recon)
        adv_w = lc.adversarial_weight * gate
        if lc.adaptive_adversarial_weight:

            def last_layer_norm(cotangent):
                grads = vjp_fn((cotangent, jnp.zeros_like(vq_loss)))[0]
                return jnp.linalg.norm(grads["decoder"]["conv_out"]["kernel"])

            ratio = last_layer_norm(g_recon) / (last_layer_norm(g_recon_adv) + 1e-4)
            adv_w = adv_w * jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4))
        g_recon = g_recon + adv_w * g_recon_adv
        loss = loss + adv_w * g_adv
        terms.update(g_adv=g_adv, adv_weight=adv_w)
    g_grads = vjp_fn((g_recon, jnp.ones_like(vq_loss)))[0]
    terms.update(vq_loss=vq_loss, perplexity=aux["perplexity"], usage=aux["usage"])

    def discriminator_loss(d_params):
        real = disc.apply({"params": d_params}, hq)
        fake = disc.apply({"params": d_params}, jax.lax.stop_gradient(recon))
        return adversarial.hinge_d_loss(real, fake) * gate

    if use_adv:
        d_loss, d_grads = jax.value_and_grad(discriminator_loss)(d_params)
        terms["d_loss"] = d_loss
    else:
        d_grads = jax.tree.map(jnp.zeros_like, d_params)
    grads = {"generator": g_grads, "discriminator": d_grads}
    new_state = state.apply_gradients(grads, tx, config.optimizer.ema_decay)
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


def eval_step(state, batch, frozen, *, vqgan):
    """Reconstruction metrics (L1, PSNR, SSIM, LPIPS when its weights are loaded) summed over the
    (masked) batch, and input | reconstruction rows."""
    params = (
        state.ema_params["generator"] if state.ema_params is not None else state.params["generator"]
    )
    hq = loop.to_float_image(batch["hq"])
    recon, aux = vqgan.apply({"params": params}, hq, train=False)
    recon_u8 = loop.to_uint8_image(recon)
    mask = batch["mask"]
    x255 = batch["hq"].astype(jnp.float32)
    r255 = recon_u8.astype(jnp.float32)
    per_image = {
        "l1": jnp.mean(jnp.abs(jnp.clip(recon, -1, 1) - hq), axis=(1, 2, 3)),
        "psnr": metrics_lib.psnr(r255, x255),
        "ssim": metrics_lib.ssim(r255, x255),
        **loop.eval_lpips(frozen, recon_u8, batch["hq"]),
    }
    sums = {k: jnp.sum(v * mask) for k, v in per_image.items()}
    sums["count"] = jnp.sum(mask)
    rows = jnp.concatenate([batch["hq"], recon_u8], axis=2)
    return sums, rows


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
    vqgan, disc = make_models(config)
    frozen, lpips = load_frozen(config)
    frozen.update(loop.eval_lpips_params(config, frozen))
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
