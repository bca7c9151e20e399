"""OSDFace stage I: the visual representation embedder (Sec. 3.2, Eqs. 7-11).

Two VQ autoencoders of one shape (``config.model``; ``models/osdface.py``): ``hq`` learns a
dictionary of HQ faces, ``lq`` one of LQ faces. Three phases (``config.phases``, in steps):

  hq:           L_VQ on the HQ branch (Eq. 8: L1 + lambda_per LPIPS + lambda_dis L_dis + VQ)
  lq:           L_VQ on the LQ branch, reconstructing LQ faces
  association:  L_VQ of the branches in ``phases.association_trains`` + lambda_assoc L_assoc
                (Eq. 11; Eqs. 9-10 on the two ``quant_conv`` feature maps, learnable scale s)

(from step ``hq + lq`` to ``num_train_steps``), with one PatchGAN per branch (the non-saturating loss of Eq. 7, taming's adaptive weight).
A phase updates only its networks: the others' parameters and Adam moments are left as they are.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from artfr_jax.evaluation import metrics as metrics_lib
from artfr_jax.losses import adversarial, association
from artfr_jax.models import factory, osdface
from artfr_jax.train import autoencoder, gan, loop, optimizers, perceptual
from artfr_jax.train import state as state_lib
from artfr_jax.utils import images as image_utils

BRANCHES = ("hq", "lq")
GROUPS = ("hq", "lq", "d_hq", "d_lq", "logit_scale")


def phase_bounds(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """Steps at which the LQ and the association phases start (the association phase runs to
    ``num_train_steps``); one-line errors for phases that do not fit."""
    ph = config.phases
    if min(ph.hq, ph.lq) < 0 or ph.hq + ph.lq > config.num_train_steps:
        raise ValueError(
            f"config.phases: hq={ph.hq} and lq={ph.lq} steps must be >= 0 and fit in "
            f"config.num_train_steps={config.num_train_steps} (the association phase is the rest)"
        )
    bad = [b for b in ph.association_trains if b not in BRANCHES]
    if bad:
        raise ValueError(f"config.phases.association_trains={bad}: expected entries of {BRANCHES}")
    return ph.hq, ph.hq + ph.lq


def phase_groups(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], ...]:
    """The parameter groups each phase trains: (hq phase, lq phase, association phase)."""
    assoc = tuple(config.phases.association_trains)
    return (
        ("hq", "d_hq"),
        ("lq", "d_lq"),
        (*assoc, *(f"d_{b}" for b in assoc), "logit_scale"),
    )


def make_models(config: ml_collections.ConfigDict):
    """One VQ autoencoder (both branches have its shape) and the PatchGAN, under the policy."""
    ae = factory.tokenizer(config.model.to_dict())
    disc = factory.discriminator(
        config.discriminator.to_dict(), config.model.to_dict(), "config.discriminator"
    )
    return ae, disc


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam per parameter group (so a phase can leave the other groups' moments alone)."""
    opt = config.optimizer
    total = config.num_train_steps
    g = optimizers.adam(opt, opt.learning_rate, total)
    d = optimizers.adam(opt, opt.disc_learning_rate, total)
    txs = {"hq": g, "lq": g, "logit_scale": g, "d_hq": d, "d_lq": d}
    return optax.multi_transform(txs, {k: k for k in GROUPS})


def init_state(rng, mesh, *, config, ae, disc, tx):
    size = config.data.image_size
    x = jnp.zeros((1, size, size, 3), jnp.float32)

    def init_params(rng):
        keys = jax.random.split(rng, 4)
        return {
            "hq": ae.init(keys[0], x, train=False)["params"],
            "lq": ae.init(keys[1], x, train=False)["params"],
            "d_hq": disc.init(keys[2], x)["params"],
            "d_lq": disc.init(keys[3], x)["params"],
            "logit_scale": association.LogitScale().init(rng)["params"],
        }

    ema_keys = BRANCHES if config.optimizer.ema_decay > 0 else ()
    return state_lib.create_train_state(
        init_params, tx, rng, mesh, ema_keys=ema_keys, min_shard_size=config.mesh.min_shard_size
    )


def _forward(m, x):
    z = m.encode(x)
    zq, _, aux = m.quantize(z)
    return (m.decode(zq), aux["vq_loss"], z.astype(jnp.float32)), aux


def _gated_update(state, grads, tx, gates: dict, ema_decay: float):
    """``apply_gradients`` where group ``k`` moves (params and optimizer moments) only if
    ``gates[k]``; the step counter always advances."""
    new = state.apply_gradients(grads, tx, ema_decay)
    pick = lambda g, a, b: jax.tree.map(lambda x, y: jnp.where(g, x, y), a, b)  # noqa: E731
    params = {k: pick(gates[k], new.params[k], state.params[k]) for k in GROUPS}
    inner = {
        k: pick(gates[k], new.opt_state.inner_states[k], state.opt_state.inner_states[k])
        for k in GROUPS
    }
    opt_state = new.opt_state._replace(inner_states=inner)
    ema = new.ema_params
    if ema is not None:
        ema = {k: pick(gates[k], ema[k], state.ema_params[k]) for k in ema}
    return new.replace(params=params, opt_state=opt_state, ema_params=ema)


def train_step(state, batch, rng, frozen, *, config, ae, disc, lpips, tx):
    """One update of the networks of the current phase. batch: uint8 ``hq``, ``lq``."""
    del rng
    lc = config.loss
    lq_start, assoc_start = phase_bounds(config)
    step = state.step
    phase = (step >= lq_start).astype(jnp.int32) + (step >= assoc_start).astype(jnp.int32)
    groups = phase_groups(config)
    images = {
        "hq": image_utils.to_float_image(batch["hq"]),
        "lq": image_utils.to_float_image(batch["lq"]),
    }
    starts = {"hq": 0, "lq": lq_start}

    def branch_terms(name, with_assoc_cotangent=None):
        """Loss, grads and metrics of one branch (and its discriminator)."""
        p = state.params[name]
        x = images[name]
        (recon, vq_loss, z), vjp_fn, aux = jax.vjp(
            lambda p: ae.apply({"params": p}, x, method=_forward), p, has_aux=True
        )
        zero_z = jnp.zeros_like(z)

        def last_layer_norm(cotangent):
            grads = vjp_fn((cotangent, jnp.zeros_like(vq_loss), zero_z))[0]
            return jnp.linalg.norm(grads["decoder"]["conv_out"]["kernel"])

        d_name = f"d_{name}"
        gate = adversarial.adversarial_weight(step - starts[name], lc.adversarial_start, 1.0)
        nll, g_recon, terms = autoencoder.generator_cotangent(
            recon,
            x,
            frozen=frozen,
            lpips=lpips,
            lc=lc,
            disc=disc,
            d_params=state.params[d_name],
            extras={},
            gate=gate,
            last_layer_norm=last_layer_norm,
        )
        return dict(
            recon=recon,
            z=z,
            vjp=vjp_fn,
            vq_loss=vq_loss,
            loss=nll + vq_loss,
            g_recon=g_recon,
            gate=gate,
            terms={**terms, "vq_loss": vq_loss, "perplexity": aux["perplexity"]},
        )

    def disc_grads(name, out):
        if lc.adversarial_weight <= 0:
            return jax.tree.map(jnp.zeros_like, state.params[f"d_{name}"]), {}
        d_loss, grads, _, d_terms = gan.discriminator_update(
            disc,
            state.params[f"d_{name}"],
            {},
            images[name],
            jax.lax.stop_gradient(out["recon"]),
            step,
            lc,
        )
        grads = jax.tree.map(lambda g: g * out["gate"], grads)
        return grads, {"d_loss": d_loss * out["gate"], **d_terms}

    zeros = jax.tree.map(jnp.zeros_like, state.params)

    def run_phase(index):
        trained = groups[index]
        grads = dict(zeros)
        metrics = {"loss": jnp.float32(0.0), "assoc": jnp.float32(0.0)}
        # The association phase needs both feature maps, also of a branch it does not train.
        outs = {b: branch_terms(b) for b in BRANCHES if b in trained or index == 2}
        z_cts = {b: jnp.zeros_like(o["z"]) for b, o in outs.items()}
        if "logit_scale" in trained and len(outs) == 2:
            s = state.params["logit_scale"]["logit_scale"]

            def assoc_fn(z_hq, z_lq, s):
                return association.association_loss(
                    z_hq, z_lq, s, group_size=lc.association_group_size
                )

            a, (g_hq, g_lq, g_s) = jax.value_and_grad(assoc_fn, argnums=(0, 1, 2))(
                outs["hq"]["z"], outs["lq"]["z"], s
            )
            w = lc.association_weight
            z_cts = {"hq": w * g_hq, "lq": w * g_lq}
            grads["logit_scale"] = {"logit_scale": w * g_s}
            metrics["loss"] += w * a
            metrics["assoc"] = a
        for b, o in outs.items():
            d_terms = {}
            if b in trained:
                grads[b] = o["vjp"]((o["g_recon"], jnp.ones_like(o["vq_loss"]), z_cts[b]))[0]
                grads[f"d_{b}"], d_terms = disc_grads(b, o)
                metrics["loss"] += o["loss"]
            metrics.update({f"{b}_{k}": v for k, v in {**o["terms"], **d_terms}.items()})
        return grads, metrics

    # Every phase reports the same metrics (zeros for the branches it does not train).
    shapes = [jax.eval_shape(functools.partial(run_phase, i))[1] for i in range(3)]
    metric_keys = sorted(set().union(*shapes))

    def branch_fn(index):
        def fn(_):
            grads, metrics = run_phase(index)
            full = {k: metrics.get(k, jnp.float32(0.0)) for k in metric_keys}
            return grads, {k: jnp.asarray(v, jnp.float32) for k, v in full.items()}

        return fn

    grads, metrics = jax.lax.switch(phase, [branch_fn(i) for i in range(3)], None)
    gates = {k: jnp.zeros((), bool) for k in GROUPS}
    for i, trained in enumerate(groups):
        for k in trained:
            gates[k] = gates[k] | (phase == i)
    new_state = _gated_update(state, grads, tx, gates, config.optimizer.ema_decay)
    metrics.update(
        phase=phase.astype(jnp.float32),
        logit_scale=new_state.params["logit_scale"]["logit_scale"],
        grad_norm=optax.global_norm(grads),
    )
    return new_state, metrics


def eval_step(state, batch, rng, frozen, *, ae, num_prompt_tokens: int):
    """Both branches' reconstructions (PSNR of HQ -> HQ and LQ -> LQ), the association's top-1
    accuracy (each HQ position's most similar LQ position is its own) and the number of distinct
    codes in the LQ prompt. Rows: HQ | HQ rec | LQ | LQ rec. ``rng`` is unused."""
    del rng
    params = state.ema_params if state.ema_params is not None else state.params
    out, rows = {}, []
    feats = {}
    for b in BRANCHES:
        x = image_utils.to_float_image(batch[b])
        (recon, _, z), _ = ae.apply({"params": params[b]}, x, method=_forward)
        r_u8 = image_utils.to_uint8_image(recon)
        x255 = batch[b].astype(jnp.float32)
        out[f"{b}_psnr"] = metrics_lib.psnr(r_u8.astype(jnp.float32), x255)
        out[f"{b}_ssim"] = metrics_lib.ssim(r_u8.astype(jnp.float32), x255)
        if b == "hq":
            out.update(perceptual.eval_lpips(frozen, r_u8, batch[b]))
        feats[b] = z
        rows += [batch[b], r_u8]
    b_, h, w, c = feats["hq"].shape
    zh = feats["hq"].reshape(b_, h * w, c)
    zl = feats["lq"].reshape(b_, h * w, c)
    zh = zh / jnp.linalg.norm(zh, axis=-1, keepdims=True).clip(1e-12)
    zl = zl / jnp.linalg.norm(zl, axis=-1, keepdims=True).clip(1e-12)
    sim = jnp.einsum("bic,bjc->bij", zh, zl)
    out["assoc_acc"] = jnp.mean(jnp.argmax(sim, axis=-1) == jnp.arange(h * w), axis=-1)
    codebook = params["lq"]["quantizer"]["codebook"].astype(jnp.float32)
    codes, dist = osdface.nearest_codes(feats["lq"], codebook)
    _, mask = osdface.select_prompt_codes(codes, dist, num_prompt_tokens)
    out["prompt_codes"] = jnp.sum(mask, axis=-1).astype(jnp.float32)
    mask_b = batch["mask"]
    sums = {k: jnp.sum(v * mask_b) for k, v in out.items()}
    sums["count"] = jnp.sum(mask_b)
    return sums, jnp.concatenate(rows, axis=2)


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
    phase_bounds(config)
    ae, disc = make_models(config)
    frozen, lpips = perceptual.loss_lpips(config)
    frozen.update(perceptual.eval_lpips_params(config, frozen))
    tx = make_optimizer(config)
    return loop.Stage(
        name="osdface_vre",
        init_state=functools.partial(init_state, config=config, ae=ae, disc=disc, tx=tx),
        train_step=functools.partial(
            train_step, config=config, ae=ae, disc=disc, lpips=lpips, tx=tx
        ),
        eval_step=functools.partial(eval_step, ae=ae, num_prompt_tokens=osdface.NUM_PROMPT_TOKENS),
        **loop.stage_data(config),
        frozen=frozen,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    return loop.train_and_evaluate(config, workdir, make_stage(config))
