"""Stage II of ART-FR: conditional masked visual token modelling (Sec. 3.2, Alg. 1).

The stage-I VQGAN is frozen and supplies the targets: HQ tokens ``q = Q(E_h(I_h))`` and quantised
HQ features ``f_h``. Trained: the LQ encoder ``E_l`` (initialised from ``E_h``), the projector and
the masked token transformer ``A``, with

    L = feature_weight * ||f_l - sg(f_h)||^2 (Eq. 5) + token_weight * CE on masked positions (Eq. 6)

where ``ceil(gamma(r) N)`` of the N HQ tokens are replaced by [MASK], ``r ~ U(0, 1)``. Both losses
are means (over feature elements, over masked tokens) so that their scale does not depend on N.

With ``config.stage1.train_if_missing`` the main command trains (or finishes) stage I first in
``<workdir>/stage1`` with ``config.stage1.config``; this is how the demo runs both stages.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from artfr_jax import inference, workdirs
from artfr_jax.data import pipeline
from artfr_jax.evaluation import metrics as metrics_lib
from artfr_jax.models import factory
from artfr_jax.models.artfr import codebook_space, hq_targets, nearest_tokens
from artfr_jax.sampling import artfr as artfr_sampling
from artfr_jax.sampling import mask_schedule
from artfr_jax.train import loop, optimizers, perceptual, stage1
from artfr_jax.train import state as state_lib
from artfr_jax.utils import console
from artfr_jax.utils import images as image_utils


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with a cosine decay from 2e-4 to 2e-5 over the run (Sec. 4.1)."""
    opt = config.optimizer
    return optimizers.adam(opt, opt.learning_rate, config.num_train_steps)


def init_state(rng, mesh, *, config, art, tx, stage1_params, init_params=None):
    """Random init; ``E_l`` copied from the stage-I encoder (``model.init_lq_encoder_from_stage1``)
    and everything copied from ``init_params`` (a stage-II model to fine-tune) when given."""
    size = config.data.image_size
    n = art.transformer.num_tokens if art.transformer is not None else 1
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    tokens = jnp.zeros((1, n), jnp.int32)

    def init(rng):
        return {"art": art.init({"params": rng}, x, tokens)["params"]}

    ema_keys = ("art",) if config.optimizer.ema_decay > 0 else ()
    state, shardings = state_lib.create_train_state(
        init, tx, rng, mesh, ema_keys=ema_keys, min_shard_size=config.mesh.min_shard_size
    )
    params = dict(state.params["art"])
    if init_params is not None:
        params = state_lib.host_copy(dict(init_params))
    elif config.model.init_lq_encoder_from_stage1:
        # Host copies: the frozen tokenizer keeps its own buffers (the state's are donated), and
        # host values reach the devices of every process.
        copy = state_lib.host_copy
        params["lq_encoder"] = {
            "encoder": copy(stage1_params["encoder"]),
            "quant_conv": copy(stage1_params["quant_conv"]),
        }
    params = jax.device_put({"art": params}, shardings.params)
    ema = jax.tree.map(jnp.copy, params) if ema_keys else None
    return state.replace(params=params, ema_params=ema), shardings


# ------------------------------------------------------------------------------ train / eval


def train_step(state, batch, rng, frozen, *, config, art, tokenizer, tx):
    """One update of ``E_l``, projector and transformer. batch: uint8 'hq', 'lq' ``[B, H, W, 3]``."""
    hq = image_utils.to_float_image(batch["hq"])
    lq = image_utils.to_float_image(batch["lq"])
    targets, f_h = hq_targets(tokenizer, frozen["tokenizer"], hq)
    b, n = targets.shape
    mask_rng, dropout_rng = jax.random.split(rng)
    use_ar = art.transformer is not None
    if use_ar:
        mask = mask_schedule.training_mask(mask_rng, b, n, config.loss.mask_schedule)
        tokens = jnp.where(mask, art.transformer.mask_token_id, targets)
    else:
        mask = jnp.zeros((b, n), bool)
        tokens = targets
    lc = config.loss

    def loss_fn(params):
        logits, f_l = art.apply(
            {"params": params}, lq, tokens, train=True, rngs={"dropout": dropout_rng}
        )
        feat = jnp.mean(jnp.square(codebook_space(tokenizer, f_l) - f_h))
        terms = {"feat_loss": feat}
        loss = lc.feature_weight * feat
        if use_ar:
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            m = mask.astype(jnp.float32)
            n_masked = jnp.maximum(jnp.sum(m), 1.0)
            terms["token_loss"] = jnp.sum(ce * m) / n_masked
            hit = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
            terms["token_acc"] = jnp.sum(hit * m) / n_masked
            terms["mask_ratio"] = jnp.mean(m)
            loss = loss + lc.token_weight * terms["token_loss"]
        return loss, (terms, f_l)

    (loss, (terms, f_l)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["art"])
    terms["lookup_acc"] = jnp.mean(
        (
            nearest_tokens(tokenizer, frozen["tokenizer"], jax.lax.stop_gradient(f_l)) == targets
        ).astype(jnp.float32)
    )
    new_state = state.apply_gradients({"art": grads}, tx, config.optimizer.ema_decay)
    metrics = {
        "loss": loss,
        **terms,
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(new_state.params["art"]),
        "update_norm": optax.global_norm(
            jax.tree.map(jnp.subtract, new_state.params["art"], state.params["art"])
        ),
    }
    return new_state, metrics


def eval_step(state, batch, rng, frozen, *, config, art, tokenizer):
    """Restores the held-out LQ faces; PSNR/SSIM (and LPIPS when its weights are loaded) of input
    and output against HQ, token accuracy of the decoded tokens and of the plain lookup.
    Rows: LQ | restored | HQ."""
    params = state.ema_params["art"] if state.ema_params is not None else state.params["art"]
    tok = frozen["tokenizer"]
    hq = image_utils.to_float_image(batch["hq"])
    lq = image_utils.to_float_image(batch["lq"])
    targets, _ = hq_targets(tokenizer, tok, hq)
    tokens, f_l = artfr_sampling.restore_tokens(
        params, tok, lq, rng, art=art, tokenizer=tokenizer, sampling=config.sampling
    )
    restored = artfr_sampling.decode_tokens(tok, tokens, tokenizer=tokenizer)
    restored = image_utils.to_uint8_image(restored)
    x255 = batch["hq"].astype(jnp.float32)
    per_image = {
        "psnr": metrics_lib.psnr(restored.astype(jnp.float32), x255),
        "ssim": metrics_lib.ssim(restored.astype(jnp.float32), x255),
        "psnr_input": metrics_lib.psnr(batch["lq"].astype(jnp.float32), x255),
        "token_acc": jnp.mean((tokens == targets).astype(jnp.float32), axis=1),
        "lookup_acc": jnp.mean(
            (nearest_tokens(tokenizer, tok, f_l) == targets).astype(jnp.float32), axis=1
        ),
        **perceptual.eval_lpips(frozen, restored, batch["hq"]),
    }
    mask = batch["mask"]
    sums = {k: jnp.sum(v * mask) for k, v in per_image.items()}
    sums["count"] = jnp.sum(mask)
    rows = jnp.concatenate([batch["lq"], restored, batch["hq"]], axis=2)
    return sums, rows


def make_stage(config: ml_collections.ConfigDict, workdir: str) -> loop.Stage:
    tokenizer, tok_params = stage1.load_stage1(config, workdir)
    art = factory.art(config, tokenizer)
    tx = make_optimizer(config)
    init_params = None
    if config.init_from:
        init_params = inference.load_art_params(
            config.init_from, art, config.data.image_size, "config.init_from"
        )
    return loop.Stage(
        name="art",
        init_state=functools.partial(
            init_state,
            config=config,
            art=art,
            tx=tx,
            stage1_params=tok_params,
            init_params=init_params,
        ),
        train_step=functools.partial(
            train_step, config=config, art=art, tokenizer=tokenizer, tx=tx
        ),
        eval_step=functools.partial(eval_step, config=config, art=art, tokenizer=tokenizer),
        **loop.stage_data(config),
        frozen={"tokenizer": tok_params, **perceptual.eval_lpips_params(config, {})},
    )


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def final_restoration(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Restores ``final_restore.num_images`` held-out degraded faces with the trained model (the
    same path as ``python -m artfr_jax.restore``), writes them to ``samples/restored/`` with a
    grid LQ | restored | HQ, and reports PSNR of input and output against HQ. A workdir whose
    summary is already of its last checkpoint (a finished run started again) keeps it."""
    step = workdirs.latest_step(workdirs.checkpoint_dir(workdir))
    summary_path = os.path.join(workdir, "samples", "restored_summary.json")
    previous = _read_json(summary_path)
    if (
        previous.get("step") == step
        and previous.get("num_images") == config.final_restore.num_images
    ):
        console.say(
            "Held-out faces already restored at step %d: PSNR %.2f dB -> %.2f dB (%s)",
            step,
            previous["psnr_input"],
            previous["psnr_restored"],
            summary_path,
        )
        return previous
    restorer = inference.load_restorer(workdir)
    batches = pipeline.make_eval_batches(
        config.data,
        num_images=config.final_restore.num_images,
        batch_size=config.eval.batch_size,
        seed=config.seed + 1,
    )
    out_dir = os.path.join(workdir, "samples", "restored")
    os.makedirs(out_dir, exist_ok=True)
    psnr_in, psnr_out, rows = [], [], []
    t0 = time.time()
    for i, batch in enumerate(batches):
        restored = restorer(batch["lq"], jax.random.fold_in(jax.random.key(config.seed), i))
        hq = batch["hq"].astype(np.float32)
        psnr_in.extend(np.asarray(metrics_lib.psnr(batch["lq"].astype(np.float32), hq)))
        psnr_out.extend(np.asarray(metrics_lib.psnr(restored.astype(np.float32), hq)))
        for j in range(len(restored)):
            k = len(rows)
            image_utils.save_grid(restored[j][None], os.path.join(out_dir, f"{k:04d}.png"))
            rows.append(np.concatenate([batch["lq"][j], restored[j], batch["hq"][j]], axis=1))
    grid = image_utils.tile(np.stack(rows), columns=4, gap=max(2, rows[0].shape[0] // 16))
    image_utils.save_grid(grid, os.path.join(workdir, "samples", "restored_grid.png"))
    summary = {
        "step": step,
        "num_images": len(rows),
        "psnr_input": float(np.mean(psnr_in)),
        "psnr_restored": float(np.mean(psnr_out)),
        "seconds": time.time() - t0,
    }
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    console.say(
        "Restored %d held-out faces into %s: PSNR of the degraded input %.2f dB -> restored "
        "%.2f dB (grid LQ | restored | HQ: samples/restored_grid.png)",
        summary["num_images"],
        out_dir,
        summary["psnr_input"],
        summary["psnr_restored"],
    )
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    result = loop.train_and_evaluate(config, workdir, make_stage(config, workdir))
    if config.final_restore.num_images and jax.process_index() == 0:
        result = {**result, "final": final_restoration(config, workdir)}
    return result
