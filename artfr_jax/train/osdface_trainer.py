"""OSDFace stage II: one-step restoration with the SD UNet's LoRA (Sec. 3.1, 3.3; Eqs. 5-6, 12-16).

Generator ``G(I_L) = D_vae((z_L - sqrt(1 - abar_T) eps(z_L, T, c)) / sqrt(abar_T))`` with
``z_L = E_vae(I_L)`` (a posterior sample), ``T = model.timestep`` and ``c`` the projected visual
prompt of the frozen VRE's LQ branch. Trained: the UNet's LoRA and the prompt projection; the SD
UNet, VAE and VRE stay frozen. Generator loss (Eq. 12):

  L_gen = MSE + lambda_per EA-DISTS (Eq. 14) + lambda_ID (1 - cos ArcFace) (Eq. 13)
          + lambda_dis softplus(-D(F(z_hat_H, t)))                               (Eq. 15)

The latent discriminator (Eq. 16, DFOSD's design): the frozen UNet's down and mid blocks with a
LoRA of their own and a small head, on latents noised to a random ``t``; real = the HQ face's
latent. Generator and discriminator alternate: each step updates G, then D on the detached
output of the same batch; AdamW for both.
"""

from __future__ import annotations

import functools
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from artfr_jax import inference, workdirs
from artfr_jax.evaluation import arcface
from artfr_jax.evaluation import metrics as metrics_lib
from artfr_jax.losses import dists as dists_lib
from artfr_jax.losses import edge_aware, identity
from artfr_jax.models import factory, lora, osdface
from artfr_jax.models.unet import UNet
from artfr_jax.models.vae import AutoencoderKL
from artfr_jax.sampling import noise_schedule, one_step
from artfr_jax.train import loop, optimizers, perceptual
from artfr_jax.train import state as state_lib
from artfr_jax.utils import console
from artfr_jax.utils import images as image_utils

GENERATOR = ("lora", "projection")
DISCRIMINATOR = ("d_lora", "d_head")


def discriminator_targets(targets) -> str:
    """The LoRA targets of the discriminator: the generator's, within the down and mid blocks
    (a regular expression over the UNet's dotted module names)."""
    names = "|".join(t.replace(".", r"\.") for t in targets)
    return rf"(down_blocks|mid_block)\..*(^|\.)({names})"


def lora_configs(config) -> tuple[lora.LoraConfig, lora.LoraConfig]:
    m, d = config.model, config.discriminator
    targets = tuple(m.lora_targets)
    return (
        lora.LoraConfig(m.lora_rank, m.lora_alpha, targets),
        lora.LoraConfig(d.lora_rank, d.lora_alpha, discriminator_targets(targets)),
    )


def write_random_base(config, workdir: str) -> None:
    """``model.init='random'``: draws the frozen UNet and VAE from ``config.seed`` and writes them
    to ``WORKDIR/base_weights`` (once; a resumed run and the restorer read the same files)."""
    from artfr_jax.convert import diffusers_sd  # noqa: PLC0415

    folder = inference.base_weights_dir(workdir)
    written = all(os.path.isfile(os.path.join(folder, f"{c}.msgpack")) for c in ("unet", "vae"))
    if jax.process_count() > 1:  # process 0 decides and writes; the others wait for the files
        loop.sync_processes("base weights checked")
        written = bool(multihost_utils.broadcast_one_to_all(np.bool_(written)))
    if written:
        return
    m = config.model
    unet_kw = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in m.unet.items()}
    vae_kw = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in m.vae.items()}
    unet, vae = UNet(**unet_kw), AutoencoderKL(**vae_kw)
    size = config.data.image_size
    f = vae.downsample_factor
    z = jnp.zeros((1, size // f, size // f, vae.latent_channels), jnp.float32)
    ctx = jnp.zeros((1, 1, unet.cross_attention_dim), jnp.float32)
    k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 7))
    unet_params = jax.jit(lambda k: unet.init(k, z, 0, ctx)["params"])(k1)
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    vae_params = jax.jit(lambda k: vae.init(k, x)["params"])(k2)
    if jax.process_index() == 0:
        os.makedirs(folder, exist_ok=True)
        diffusers_sd.save_converted(
            os.path.join(folder, "unet.msgpack"), "unet", unet_kw, unet_params
        )
        diffusers_sd.save_converted(os.path.join(folder, "vae.msgpack"), "vae", vae_kw, vae_params)
    if jax.process_count() > 1:
        loop.sync_processes("base weights written")


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW for the generator (LoRA + projection) and the discriminator (LoRA + head)."""
    opt = config.optimizer
    total = config.num_train_steps

    def adamw(peak):
        lr = optimizers.learning_rate_schedule(opt, peak, total)
        chain = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip else []
        return optax.chain(
            *chain,
            optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay),
        )

    labels = {**{k: "g" for k in GENERATOR}, **{k: "d" for k in DISCRIMINATOR}}
    return optax.multi_transform(
        {"g": adamw(opt.learning_rate), "d": adamw(opt.disc_learning_rate)}, labels
    )


@flax.struct.dataclass
class Networks:
    """The modules of the stage (static) and how to call them."""

    unet: UNet = flax.struct.field(pytree_node=False)
    vae: AutoencoderKL = flax.struct.field(pytree_node=False)
    vre: object = flax.struct.field(pytree_node=False)
    projection: osdface.PromptProjection = flax.struct.field(pytree_node=False)
    head: osdface.LatentDiscriminatorHead = flax.struct.field(pytree_node=False)
    g_lora: lora.LoraConfig = flax.struct.field(pytree_node=False)
    d_lora: lora.LoraConfig = flax.struct.field(pytree_node=False)
    arcface: object = flax.struct.field(pytree_node=False, default=None)


def init_state(rng, mesh, *, config, nets: Networks, unet_shapes, tx):
    size = config.data.image_size
    c = nets.vre.embedding_dim
    f = nets.vae.downsample_factor * nets.unet.downsample_factor
    mid = jnp.zeros((1, size // f, size // f, nets.unet.block_out_channels[-1]), jnp.float32)

    def init_params(rng):
        k = jax.random.split(rng, 4)
        return {
            "lora": lora.init(k[0], unet_shapes, nets.g_lora),
            "projection": nets.projection.init(k[1], jnp.zeros((1, 1, c), jnp.float32))["params"],
            "d_lora": lora.init(k[2], unet_shapes, nets.d_lora),
            "d_head": nets.head.init(k[3], mid)["params"],
        }

    ema_keys = GENERATOR if config.optimizer.ema_decay > 0 else ()
    return state_lib.create_train_state(
        init_params, tx, rng, mesh, ema_keys=ema_keys, min_shard_size=config.mesh.min_shard_size
    )


def _discriminate(nets, frozen, d_params, z, t, context):
    """Eq. 15-16's ``D(F(z, t))`` for noised latents ``z``: per-position logits ``[B, h, w]``."""
    feats = lora.apply(
        nets.unet.clone(mid_only=True),
        {"params": frozen["unet"], "lora": d_params["d_lora"]},
        z,
        t,
        context,
        scale=nets.d_lora.scale,
    )
    return nets.head.apply({"params": d_params["d_head"]}, feats)


def generate(nets, frozen, g_params, lq, rng, timestep, schedule):
    """Eqs. 5-6 with the LoRA: ``(restored [B, H, W, 3], z_hat_H, context)``."""
    p = osdface.lq_prompt(nets.vre, frozen["vre"], lq)
    context = nets.projection.apply({"params": g_params["projection"]}, p)
    z_lq = one_step.encode_latents(nets.vae, frozen["vae"], lq, rng)

    def eps_fn(z, t, c):
        return lora.apply(
            nets.unet,
            {"params": frozen["unet"], "lora": g_params["lora"]},
            z,
            t,
            c,
            scale=nets.g_lora.scale,
        )

    z_hq = one_step.one_step_latents(eps_fn, schedule, z_lq, context, timestep)
    return one_step.decode_latents(nets.vae, frozen["vae"], z_hq), z_hq, context


def train_step(state, batch, rng, frozen, *, config, nets: Networks, schedule, tx):
    """One generator update, then one discriminator update. batch: uint8 ``hq``, ``lq``."""
    lc = config.loss
    dc = config.discriminator
    hq = image_utils.to_float_image(batch["hq"])
    lq = image_utils.to_float_image(batch["lq"])
    b = hq.shape[0]
    r_post, r_t, r_noise_f, r_noise_r = jax.random.split(rng, 4)
    t = jax.random.randint(r_t, (b,), dc.t_min, dc.t_max)
    gan_on = jnp.where(state.step >= lc.gan_start, 1.0, 0.0).astype(jnp.float32)
    use_gan = lc.gan_weight > 0
    params = state.params
    d_params = {k: params[k] for k in DISCRIMINATOR}

    def noised(z, key):
        return noise_schedule.add_noise(schedule, z, jax.random.normal(key, z.shape), t)

    def g_loss(g_params):
        restored, z_hat, context = generate(
            nets, frozen, g_params, lq, r_post, config.model.timestep, schedule
        )
        terms = {"mse": jnp.mean(jnp.square(restored - hq))}
        loss = lc.mse_weight * terms["mse"]
        if "dists" in frozen:
            img, edge = edge_aware.ea_dists_terms(
                frozen["dists"],
                (jnp.clip(restored, -1, 1) + 1) / 2,
                (hq + 1) / 2,
                dtype=nets.unet.dtype,
            )
            terms.update(dists=jnp.mean(img), dists_edge=jnp.mean(edge))
            loss += lc.ea_dists_weight * (terms["dists"] + terms["dists_edge"])
        if "arcface" in frozen:
            terms["identity"] = jnp.mean(
                identity.identity_loss(
                    nets.arcface, frozen["arcface"], restored, hq, lc.arcface_arch
                )
            )
            loss += lc.identity_weight * terms["identity"]
        if use_gan:
            ctx = jax.lax.stop_gradient(context)
            logits = _discriminate(nets, frozen, d_params, noised(z_hat, r_noise_f), t, ctx)
            terms["g_gan"] = jnp.mean(jax.nn.softplus(-logits))
            loss += gan_on * lc.gan_weight * terms["g_gan"]
        terms["loss_g"] = loss
        return loss, (terms, jax.lax.stop_gradient(z_hat), jax.lax.stop_gradient(context))

    g_params = {k: params[k] for k in GENERATOR}
    (loss, (terms, z_hat, context)), g_grads = jax.value_and_grad(g_loss, has_aux=True)(g_params)
    grads = dict(g_grads)
    metrics = {"loss": loss, **terms}

    if use_gan:
        z_real = one_step.encode_latents(nets.vae, frozen["vae"], hq)

        def d_loss(dp):
            real = _discriminate(nets, frozen, dp, noised(z_real, r_noise_r), t, context)
            fake = _discriminate(nets, frozen, dp, noised(z_hat, r_noise_f), t, context)
            loss = jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))
            return loss, (jnp.mean(real), jnp.mean(fake))

        (dl, (real_score, fake_score)), d_grads = jax.value_and_grad(d_loss, has_aux=True)(d_params)
        grads.update(jax.tree.map(lambda g: g * gan_on, d_grads))
        metrics.update(d_loss=dl, d_real_score=real_score, d_fake_score=fake_score)
    else:
        grads.update(jax.tree.map(jnp.zeros_like, d_params))
    new_state = state.apply_gradients(grads, tx, config.optimizer.ema_decay)
    metrics.update(
        grad_norm=optax.global_norm(g_grads),
        lora_norm=optax.global_norm(new_state.params["lora"]),
    )
    return new_state, metrics


def eval_step(state, batch, rng, frozen, *, config, nets: Networks, schedule):
    """Restores the held-out LQ faces (posterior mean, no sampling): PSNR/SSIM (LPIPS when
    loaded) against HQ and PSNR of the input. Rows: LQ | restored | HQ."""
    del rng
    params = state.ema_params if state.ema_params is not None else state.params
    lq = image_utils.to_float_image(batch["lq"])
    restored, _, _ = generate(nets, frozen, params, lq, None, config.model.timestep, schedule)
    out_u8 = image_utils.to_uint8_image(restored)
    x255 = batch["hq"].astype(jnp.float32)
    per_image = {
        "psnr": metrics_lib.psnr(out_u8.astype(jnp.float32), x255),
        "ssim": metrics_lib.ssim(out_u8.astype(jnp.float32), x255),
        "psnr_input": metrics_lib.psnr(batch["lq"].astype(jnp.float32), x255),
        **perceptual.eval_lpips(frozen, out_u8, batch["hq"]),
    }
    mask = batch["mask"]
    sums = {k: jnp.sum(v * mask) for k, v in per_image.items()}
    sums["count"] = jnp.sum(mask)
    return sums, jnp.concatenate([batch["lq"], out_u8, batch["hq"]], axis=2)


def _optional_losses(config) -> tuple[dict, object]:
    """Frozen DISTS and ArcFace params when their files are named; a log line for each term
    that is off."""
    lc = config.loss
    frozen, module = {}, None
    say = console.say if jax.process_index() == 0 else logging.info
    if lc.ea_dists_weight > 0 and lc.dists_weights:
        frozen["dists"] = dists_lib.load_dists_params(lc.dists_weights)
    elif lc.ea_dists_weight > 0:
        say(
            "EA-DISTS loss off: config.loss.dists_weights is empty (%s)",
            dists_lib.CONVERT_COMMAND.format(output="dists.msgpack"),
        )
    if lc.identity_weight > 0 and lc.arcface_weights:
        frozen["arcface"] = arcface.load_arcface_params(lc.arcface_arch, lc.arcface_weights)
        module = arcface.arcface_module(
            lc.arcface_arch, dtype=factory.compute_dtype(config.model.dtype)
        )
    elif lc.identity_weight > 0:
        say(
            "Identity loss off: config.loss.arcface_weights is empty (convert ArcFace %s with "
            "python -m artfr_jax.convert.arcface)",
            lc.arcface_arch,
        )
    return frozen, module


def make_networks(config, unet, vae, vre, arcface_module=None) -> Networks:
    """:class:`Networks` around the frozen UNet, VAE and VRE: the prompt projection, the
    discriminator head and both LoRA configs from ``config``."""
    g_cfg, d_cfg = lora_configs(config)
    pol = factory.policy(config.model)
    return Networks(
        unet=unet,
        vae=vae,
        vre=vre,
        projection=inference.osdface_projection(config.model, vre, unet),
        head=osdface.LatentDiscriminatorHead(
            features=config.discriminator.head_features,
            dtype=pol["dtype"],
            param_dtype=pol["param_dtype"],
        ),
        g_lora=g_cfg,
        d_lora=d_cfg,
        arcface=arcface_module,
    )


def make_stage(config: ml_collections.ConfigDict, workdir: str) -> loop.Stage:
    from artfr_jax.train import stage1  # noqa: PLC0415

    if config.model.init not in ("pretrained", "random"):
        raise ValueError(
            f"config.model.init={config.model.init!r}: expected 'pretrained' or 'random'"
        )
    workdir = workdirs.resolve(workdir)
    directory = stage1.stage1_dir(config, workdir)
    if workdirs.latest_step(workdirs.checkpoint_dir(directory)) is None:
        raise FileNotFoundError(
            f"config.stage1.workdir: no VRE checkpoint in {directory}; train one with "
            f"`python -m artfr_jax.main --config=configs/osdface_vre.py --workdir={directory}` or "
            "set --config.stage1.train_if_missing=true"
        )
    vre, vre_params, _ = inference.load_vre_lq(
        directory, policy_from=config.model, what="config.stage1.workdir"
    )
    if config.model.init == "random":
        write_random_base(config, workdir)
    unet, unet_params, vae, vae_params = inference.load_sd(config.model.to_dict(), workdir)
    if config.data.image_size % (vae.downsample_factor * unet.downsample_factor):
        raise ValueError(
            f"config.data.image_size={config.data.image_size} must be a multiple of "
            f"{vae.downsample_factor * unet.downsample_factor} (VAE x UNet downsampling)"
        )
    unet = unet.clone(remat=config.model.remat)
    extra, arcface_module = _optional_losses(config)
    nets = make_networks(config, unet, vae, vre, arcface_module)
    frozen = {"unet": unet_params, "vae": vae_params, "vre": vre_params, **extra}
    frozen.update(perceptual.eval_lpips_params(config, frozen))
    unet_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), unet_params)
    tx = make_optimizer(config)
    schedule = noise_schedule.make_schedule()
    return loop.Stage(
        name="osdface",
        init_state=functools.partial(
            init_state, config=config, nets=nets, unet_shapes=unet_shapes, tx=tx
        ),
        train_step=functools.partial(
            train_step, config=config, nets=nets, schedule=schedule, tx=tx
        ),
        eval_step=functools.partial(eval_step, config=config, nets=nets, schedule=schedule),
        **loop.stage_data(config),
        frozen=frozen,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    return loop.train_and_evaluate(config, workdir, make_stage(config, workdir))
