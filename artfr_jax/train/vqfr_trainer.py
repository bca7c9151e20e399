"""VQFR stage II: the restoration network on a fixed HQ codebook (VQFR Sec. 3.2-3.3, 4.2).

``x_lq -> VQFRv1 -> (x_m main, x_t texture)``, initialised from the stage-I ``VQGANv1`` (encoder,
codebook, texture decoder) whose frozen copy supplies the code targets. Generator loss, as in the
release's ``VQFRv1Model``:

  L = l_pix * L1(x_t, I_h) + l_code * mean((z_d - sg[z_hq])^2)
      + sum over x in {x_t, x_m}: LPIPS(x, I_h) + 2000 * style(x, I_h)        (losses.style)
      + 0.5 * L_G^global(x_t) + 0.5 * w_t * L_G^local(x_t)                       (after gan_start)
      + 0.5 * L_G^global(x_m) + 0.5 * w_m * L_G^local(x_m)                       (after main_gan_start)

with a SWAGAN global discriminator (softplus loss, lazy R1) and a PatchGAN local one (hinge) per
branch, and ``w`` the gradient-balanced weight of taming-transformers on each branch's last conv
(``||grad rec|| / (||grad L_G^local|| + 1e-4)``). The codebook stays fixed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from artfr_jax import inference
from artfr_jax.evaluation import metrics as metrics_lib
from artfr_jax.losses import adversarial, style
from artfr_jax.models import factory
from artfr_jax.models.vqfr import VQFRv1, vqfr_params_from_vqgan
from artfr_jax.train import gan, loop, optimizers, perceptual, stage1
from artfr_jax.train import state as state_lib
from artfr_jax.utils import images as image_utils

DISCS = ("d_global", "d_local", "d_main_global", "d_main_local")


def make_discriminators(config: ml_collections.ConfigDict) -> dict:
    model = config.model.to_dict()
    g = factory.discriminator(
        config.global_discriminator.to_dict(), model, "config.global_discriminator"
    )
    loc = factory.discriminator(
        config.local_discriminator.to_dict(), model, "config.local_discriminator"
    )
    return {"d_global": g, "d_local": loc, "d_main_global": g, "d_main_local": loc}


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam for the network and each discriminator (release: 1e-5, betas (0.5, 0.9))."""
    opt = config.optimizer
    total = config.num_train_steps
    labels = {"sr": "sr", **{k: "disc" for k in DISCS}}
    return optax.multi_transform(
        {
            "sr": optimizers.adam(opt, opt.learning_rate, total),
            "disc": optimizers.adam(opt, opt.disc_learning_rate, total),
        },
        labels,
    )


def init_state(rng, mesh, *, config, vqfr, discs, tx, stage1_params, init_params=None):
    """Fresh state; the network starts from ``init_params`` (``config.init_from``) if given, else
    from the stage-I encoder, codebook and decoder (both branches' decoders, VQFR Sec. 4.2)."""
    size = config.data.image_size
    x = jnp.zeros((2, size, size, 3), jnp.float32)

    params_rng, extras_rng = jax.random.split(rng)

    def init(rng):
        keys = jax.random.split(rng, 1 + len(DISCS))
        params = {"sr": vqfr.init(keys[0], x)["params"]}
        for k, name in zip(keys[1:], DISCS, strict=True):
            params[name] = discs[name].init(k, x)["params"]
        return params

    def extras():
        """The SWAGAN discriminators' spectral-norm vectors."""
        out = {}
        for k, name in zip(jax.random.split(extras_rng, len(DISCS)), DISCS, strict=True):
            variables = discs[name].init(k, x)
            if "spectral" in variables:
                out[name] = variables["spectral"]
        return out

    ema_keys = ("sr",) if config.optimizer.ema_decay > 0 else ()
    state, shardings = state_lib.create_train_state(
        init,
        tx,
        params_rng,
        mesh,
        ema_keys=ema_keys,
        min_shard_size=config.mesh.min_shard_size,
        init_extras=extras,
    )
    copy = state_lib.host_copy  # host copies: see art_trainer
    params = dict(state.params)
    if init_params is not None:
        params["sr"] = copy(init_params)
    else:
        params["sr"] = vqfr_params_from_vqgan(params["sr"], copy(stage1_params))
    params = jax.device_put(params, shardings.params)
    ema = jax.tree.map(jnp.copy, {"sr": params["sr"]}) if ema_keys else None
    return state.replace(params=params, ema_params=ema), shardings


def _last_layer_norm(vjp_fn, cotangents, path):
    grads = vjp_fn(cotangents)[0]
    for k in path:
        grads = grads[k]
    return jnp.linalg.norm(grads)


def train_step(state, batch, rng, frozen, *, config, vqfr, vqgan, discs, lpips_on, tx):
    """One update of the network and the four discriminators. batch: uint8 ``hq``, ``lq``."""
    del rng
    lc = config.loss
    hq = image_utils.to_float_image(batch["hq"])
    lq = image_utils.to_float_image(batch["lq"])
    step = state.step
    params = state.params
    extras = state.extras or {}

    # Code targets: the frozen stage-I encoder's quantised code of the HQ face.
    _, hq_aux = vqgan.apply({"params": frozen["vqgan"]}, hq, train=False)
    z_hq = jax.lax.stop_gradient(hq_aux["zq"]).astype(jnp.float32)

    def forward(p):
        main, texture, aux = vqfr.apply({"params": p}, lq, train=True)
        return main, texture, aux["z"].astype(jnp.float32)

    (main, texture, z), vjp_fn = jax.vjp(forward, params["sr"])
    zeros = (jnp.zeros_like(main), jnp.zeros_like(texture), jnp.zeros_like(z))
    terms = {}

    def reconstruction(x, pixel_weight):
        loss = pixel_weight * jnp.mean(jnp.abs(x - hq))
        out = {"l1": jnp.mean(jnp.abs(x - hq))}
        if lpips_on:
            total, parts = style.perceptual_style_loss(
                frozen["lpips"],
                x,
                hq,
                perceptual_weight=lc.perceptual_weight,
                style_weight=lc.style_weight,
                dtype=vqfr.dtype,
            )
            loss = loss + total
            out.update(parts)
        return loss, out

    (rec_t, t_terms), g_tex = jax.value_and_grad(reconstruction, has_aux=True)(
        texture, lc.pixel_weight
    )
    (rec_m, m_terms), g_main = jax.value_and_grad(reconstruction, has_aux=True)(
        main, lc.main_pixel_weight
    )
    code, g_z = jax.value_and_grad(lambda z: jnp.mean(jnp.square(z - z_hq)))(z)
    g_z = lc.code_weight * g_z
    loss = rec_t + rec_m + lc.code_weight * code
    terms.update(
        rec_texture=rec_t,
        rec_main=rec_m,
        code=code,
        **{f"texture_{k}": v for k, v in t_terms.items()},
        **{f"main_{k}": v for k, v in m_terms.items()},
    )

    new_extras = dict(extras)
    d_grads = {}
    for branch, x, g_x, start, prefix, last in (
        ("texture", texture, g_tex, lc.gan_start, "d_", ("decoder", "conv_out", "kernel")),
        (
            "main",
            main,
            g_main,
            lc.main_gan_start,
            "d_main_",
            ("main_decoder", "conv_out", "kernel"),
        ),
    ):
        gate = jnp.where(step >= start, 1.0, 0.0).astype(jnp.float32)
        g_name, l_name = f"{prefix}global", f"{prefix}local"

        def g_global(x, g_name=g_name):
            logits, _ = gan.disc_apply(
                discs[g_name],
                params[g_name],
                {"spectral": extras.get(g_name)},
                x,
                update_stats=False,
            )
            return adversarial.softplus_g_loss(logits)

        def g_local(x, l_name=l_name):
            logits, _ = gan.disc_apply(discs[l_name], params[l_name], {}, x, update_stats=False)
            return adversarial.hinge_g_loss(logits)

        adv_g, grad_g = jax.value_and_grad(g_global)(x)
        adv_l, grad_l = jax.value_and_grad(g_local)(x)
        idx = 1 if branch == "texture" else 0

        def on_branch(ct, idx=idx):
            cts = list(zeros)
            cts[idx] = ct
            return tuple(cts)

        ratio = _last_layer_norm(vjp_fn, on_branch(g_x), last) / (
            _last_layer_norm(vjp_fn, on_branch(grad_l), last) + 1e-4
        )
        w_local = lc.local_weight * jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4))
        w_global = lc.global_weight
        g_x_total = g_x + gate * (w_global * grad_g + w_local * grad_l)
        if branch == "texture":
            g_tex = g_x_total
        else:
            g_main = g_x_total
        loss = loss + gate * (w_global * adv_g + w_local * adv_l)
        terms.update(
            {f"{branch}_g_global": adv_g, f"{branch}_g_local": adv_l, f"{branch}_local_w": w_local}
        )

        # Discriminators on the detached output (release: after the generator update, same batch).
        fake = jax.lax.stop_gradient(x)
        for name, d_lc in (
            (g_name, {"disc_loss": "softplus", "r1_weight": lc.r1_weight, "r1_every": lc.r1_every}),
            (l_name, {"disc_loss": "hinge"}),
        ):
            d_loss, grads, spec, d_terms = gan.discriminator_update(
                discs[name], params[name], {"spectral": extras.get(name)}, hq, fake, step, d_lc
            )
            d_grads[name] = jax.tree.map(lambda g: g * gate, grads)  # noqa: B023
            terms[f"{name}_loss"] = d_loss * gate
            terms.update({f"{name}_{k}": v for k, v in d_terms.items()})
            if spec is not None:
                new_extras[name] = jax.tree.map(
                    lambda new, old: jnp.where(gate > 0, new, old),  # noqa: B023
                    spec,
                    extras[name],
                )

    sr_grads = vjp_fn((g_main, g_tex, g_z))[0]
    grads = {"sr": sr_grads, **d_grads}
    new_state = state.apply_gradients(grads, tx, config.optimizer.ema_decay)
    new_state = new_state.replace(extras=new_extras or None)
    metrics = {
        "loss": loss,
        **terms,
        "grad_norm": optax.global_norm(sr_grads),
        "param_norm": optax.global_norm(new_state.params["sr"]),
    }
    return new_state, metrics


def eval_step(state, batch, rng, frozen, *, vqfr):
    """Restores the held-out LQ faces; PSNR/SSIM (and LPIPS when loaded) of the main output, PSNR
    of the texture branch and of the input. Rows: LQ | texture | main | HQ. ``rng`` is unused."""
    del rng
    params = state.ema_params["sr"] if state.ema_params is not None else state.params["sr"]
    lq = image_utils.to_float_image(batch["lq"])
    main, texture, _ = vqfr.apply({"params": params}, lq, train=False)
    main_u8, tex_u8 = image_utils.to_uint8_image(main), image_utils.to_uint8_image(texture)
    x255 = batch["hq"].astype(jnp.float32)
    per_image = {
        "psnr": metrics_lib.psnr(main_u8.astype(jnp.float32), x255),
        "ssim": metrics_lib.ssim(main_u8.astype(jnp.float32), x255),
        "psnr_texture": metrics_lib.psnr(tex_u8.astype(jnp.float32), x255),
        "psnr_input": metrics_lib.psnr(batch["lq"].astype(jnp.float32), x255),
        **perceptual.eval_lpips(frozen, main_u8, batch["hq"]),
    }
    mask = batch["mask"]
    sums = {k: jnp.sum(v * mask) for k, v in per_image.items()}
    sums["count"] = jnp.sum(mask)
    rows = jnp.concatenate([batch["lq"], tex_u8, main_u8, batch["hq"]], axis=2)
    return sums, rows


def make_stage(config: ml_collections.ConfigDict, workdir: str) -> loop.Stage:
    vqgan, vqgan_params = stage1.load_stage1(config, workdir)
    vqfr = factory.vqfr(config)
    discs = make_discriminators(config)
    tx = make_optimizer(config)
    lpips_frozen, lpips = perceptual.loss_lpips(config)
    init_params = load_init_params(config.init_from, vqfr, config.data.image_size)
    frozen = {"vqgan": vqgan_params, **lpips_frozen}
    frozen.update(perceptual.eval_lpips_params(config, frozen))
    return loop.Stage(
        name="vqfr",
        init_state=functools.partial(
            init_state,
            config=config,
            vqfr=vqfr,
            discs=discs,
            tx=tx,
            stage1_params=vqgan_params,
            init_params=init_params,
        ),
        train_step=functools.partial(
            train_step,
            config=config,
            vqfr=vqfr,
            vqgan=vqgan,
            discs=discs,
            lpips_on=lpips is not None,
            tx=tx,
        ),
        eval_step=functools.partial(eval_step, vqfr=vqfr),
        **loop.stage_data(config),
        frozen=frozen,
    )


def load_init_params(init_from: str, vqfr: VQFRv1, image_size: int) -> dict | None:
    """``config.init_from``: a VQFR workdir (its latest network, EMA if kept) or a ``.msgpack``
    written by ``python -m artfr_jax.convert.vqfr --arch=vqfr_v1`` (official weights); None if
    empty. Errors name the field and say what differs."""
    if not init_from:
        return None
    if init_from.endswith(".msgpack"):
        from artfr_jax.convert import vqfr as convert_vqfr  # noqa: PLC0415

        try:
            return convert_vqfr.load_vqfr_v1_params(init_from, vqfr)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"config.init_from: {e}") from None
    other, params, size = inference.load_vqfr(init_from, what="config.init_from")
    compute = {k: getattr(vqfr, k) for k in factory.COMPUTE_FIELDS}
    if other.clone(**compute) != vqfr or size != image_size:  # these leave the params alone
        raise ValueError(
            f"config.init_from={init_from}: its network ({size} px) differs from this config's "
            f"({image_size} px); the model fields must be equal"
        )
    return params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    return loop.train_and_evaluate(config, workdir, make_stage(config, workdir))
