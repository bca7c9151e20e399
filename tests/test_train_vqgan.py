"""Stage I beyond what every trainer does (tests/test_trainers.py): its loss terms, a non-finite
stop, LPIPS weights, learning-rate schedules, a validation split, remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artfr_jax.train import checkpoint as ckpt_lib
from artfr_jax.train import loop, optimizers, sharding, vqgan_trainer
from tests import trainers

VQGAN = trainers.TRAINERS["vqgan"]
tiny_config = VQGAN.tiny_config


def test_step_reports_every_loss_term():
    """Past ``loss.adversarial_start`` (2 in the tiny config) the step trains the discriminator
    and weighs the generator's GAN term; codebook statistics come with every step."""
    config = tiny_config()
    step, state, batch, frozen, _ = trainers.setup_step(
        config, VQGAN.make_stage(config), jax.devices()[:1], step=3
    )
    _, m = step(state, batch, jax.random.key(0), frozen)
    assert {"l2", "vq_loss", "perplexity", "usage", "g_adv", "adv_weight"} <= set(m)
    assert float(m["d_loss"]) > 0 and float(m["adv_weight"]) > 0
    assert 1.0 <= float(m["perplexity"]) <= config.model.num_embeddings


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_config(eval_every=0)
    base = vqgan_trainer.make_stage(config)

    def poisoned(state, batch, rng, frozen):
        new_state, metrics = base.train_step(state, batch, rng, frozen)
        metrics["loss"] = jnp.where(state.step >= 3, jnp.nan, metrics["loss"])
        return new_state, metrics

    stage = dataclasses.replace(base, train_step=poisoned)
    workdir = str(tmp_path / "nan")
    with pytest.raises(loop.NonFiniteLossError, match="at step 4"):
        loop.train_and_evaluate(config, workdir, stage)
    assert ckpt_lib.make_manager(workdir).latest_step() == 2


def test_missing_lpips_weights_is_a_clear_error():
    config = tiny_config()
    config.loss.perceptual = "required"
    config.loss.lpips_weights = "/nonexistent/lpips_vgg.msgpack"
    with pytest.raises((FileNotFoundError, ValueError), match="convert"):
        vqgan_trainer.make_stage(config)
    config.loss.lpips_weights = ""
    with pytest.raises((FileNotFoundError, ValueError), match="convert"):
        vqgan_trainer.make_stage(config)


def test_learning_rate_schedules():
    config = tiny_config()
    opt = config.optimizer
    opt.update(schedule="cosine", end_learning_rate=1e-5, warmup_steps=10)
    lr = optimizers.learning_rate_schedule(opt, 1e-3, total_steps=110)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(110)), 1e-5, rtol=1e-4)
    assert float(lr(60)) < 1e-3
    opt.update(schedule="constant", warmup_steps=0)
    lr = optimizers.learning_rate_schedule(opt, 8e-5, total_steps=10)
    assert float(lr(0)) == float(lr(9)) == np.float32(8e-5)
    opt.schedule = "linear"
    with pytest.raises(ValueError, match="config.optimizer.schedule"):
        optimizers.learning_rate_schedule(opt, 1e-3, total_steps=10)


def test_validation_split_reports_lpips(tmp_path):
    """A split from `evaluate --make_testset` as data.eval_folder: its LQ files are the eval
    inputs, and LPIPS joins the eval metrics when eval.lpips_weights names a file."""
    from flax import serialization

    from artfr_jax.data import pipeline
    from artfr_jax.evaluation import testset
    from artfr_jax.losses import perceptual

    config = tiny_config(eval_every=3)
    size = config.data.image_size
    testset.make_testset(str(tmp_path / "split"), synthetic=3, size=size, progress=False)
    z = jnp.zeros((1, size, size, 3))
    params = perceptual.LPIPS().init(jax.random.key(0), z, z)["params"]
    (tmp_path / "lpips.msgpack").write_bytes(serialization.msgpack_serialize(params))
    config.data.eval_folder = str(tmp_path / "split")
    config.eval.lpips_weights = str(tmp_path / "lpips.msgpack")

    batches = pipeline.make_eval_batches(config.data, num_images=8, batch_size=2, seed=0)
    assert [len(b["lq"]) for b in batches] == [2, 1]  # all 3 pairs, in name order
    lq_file = tmp_path / "split" / "lq" / "synthetic_00002.png"
    import cv2

    np.testing.assert_array_equal(
        batches[1]["lq"][0], cv2.cvtColor(cv2.imread(str(lq_file)), cv2.COLOR_BGR2RGB)
    )

    result = vqgan_trainer.train_and_evaluate(config, str(tmp_path / "w"))
    assert {"psnr", "ssim", "lpips"} <= set(result) and np.isfinite(result["lpips"])
    assert any("eval/lpips" in r for r in trainers.jsonl(str(tmp_path / "w")))


def test_remat_lowers_the_compiled_step_memory():
    """``model.remat`` must shrink the step the loop compiles, also on CPU, whose XLA pipeline would
    otherwise erase the barriers and merge the recomputation back (``kernels.compiler_options``)."""
    temp = {}
    for remat in ("none", "full"):
        config = tiny_config(**{"model.remat": remat})
        mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
        stage = vqgan_trainer.make_stage(config)
        state, shardings = stage.init_state(jax.random.key(0), mesh)
        batch = next(stage.train_iterator(0, 0, 1))
        with jax.set_mesh(mesh):
            batch = sharding.global_batch_to_devices(batch, mesh)
            step = loop.jit_train_step(stage.train_step, shardings, mesh)
            compiled = step.lower(state, batch, jax.random.key(1), stage.frozen).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["full"] < 0.8 * temp["none"], temp
