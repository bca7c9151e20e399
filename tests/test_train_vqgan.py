"""Stage-I training: one real run on a tiny config, sharding parity, resume, non-finite stop."""

import dataclasses
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artfr_jax.train import checkpoint as ckpt_lib
from artfr_jax.train import loop, sharding, vqgan_trainer
from artfr_jax.train import writers as writers_lib
from configs import vqgan as vqgan_config
from tests import overrides as overrides_lib


def tiny_config(**overrides):
    config = vqgan_config.get_config("tiny")
    return overrides_lib.apply(config, overrides)


def _jsonl(workdir):
    return writers_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def _train_losses(workdir):
    return {r["step"]: r["train/loss"] for r in _jsonl(workdir) if "train/loss" in r}


def test_train_and_evaluate_writes_outputs(tmp_path):
    workdir = str(tmp_path / "w")
    result = vqgan_trainer.train_and_evaluate(tiny_config(), workdir)
    assert {"l1", "psnr", "ssim"} <= set(result)
    assert np.isfinite(result["psnr"])
    rows = _jsonl(workdir)
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    assert any("train/perplexity" in r and "train/d_loss" in r for r in rows)
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    grids = sorted(glob.glob(os.path.join(workdir, "samples", "vqgan_step*.png")))
    assert [os.path.basename(g) for g in grids] == [
        "vqgan_step0000003.png",
        "vqgan_step0000006.png",
    ]
    manager = ckpt_lib.make_manager(workdir)
    assert manager.latest_step() == 6
    assert ckpt_lib.read_config(ckpt_lib.checkpoint_dir(workdir))["trainer"] == "vqgan"


def _one_step(config, devices):
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    stage = vqgan_trainer.make_stage(config)
    state, shardings = stage.init_state(jax.random.key(0), mesh)
    batch = next(stage.train_iterator(0, 0, 1))
    with jax.set_mesh(mesh):
        step = jax.jit(
            stage.train_step,
            in_shardings=(shardings, sharding.batch_sharding(mesh), None, None),
            out_shardings=(shardings, None),
        )
        state = state.replace(step=jnp.asarray(5, jnp.int32))  # past adversarial_start
        new_state, metrics = step(
            state, sharding.global_batch_to_devices(batch, mesh), jax.random.key(1), stage.frozen
        )
    return jax.device_get(new_state.params), jax.device_get(metrics), new_state


def test_eight_device_step_matches_one_device():
    # Adam's first update is g/(|g|+eps): for near-zero gradients it turns float round-off into
    # sign flips of size lr. A larger eps keeps the comparison about the step, not about that.
    config = tiny_config(**{"optimizer.eps": 1e-3})
    with jax.default_matmul_precision("highest"):
        p1, m1, _ = _one_step(config, jax.devices()[:1])
        config.mesh.update(data=4, fsdp=2)
        p8, m8, state8 = _one_step(config, jax.devices()[:8])
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state8.params)}
    assert any("fsdp" in s for s in specs), specs  # some parameters really are split
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


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
    lr = vqgan_trainer.learning_rate_schedule(opt, 1e-3, total_steps=110)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(110)), 1e-5, rtol=1e-4)
    assert float(lr(60)) < 1e-3
    opt.update(schedule="constant", warmup_steps=0)
    lr = vqgan_trainer.learning_rate_schedule(opt, 8e-5, total_steps=10)
    assert float(lr(0)) == float(lr(9)) == np.float32(8e-5)
    opt.schedule = "linear"
    with pytest.raises(ValueError, match="config.optimizer.schedule"):
        vqgan_trainer.learning_rate_schedule(opt, 1e-3, total_steps=10)


def test_validation_split_reports_lpips(tmp_path):
    """A split from `evaluate --make_testset` as data.eval_folder: its LQ files are the eval
    inputs, and LPIPS joins the eval metrics when eval.lpips_weights names a file."""
    from flax import serialization

    from artfr_jax import data as data_lib
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

    batches = data_lib.make_eval_batches(config.data, num_images=8, batch_size=2, seed=0)
    assert [len(b["lq"]) for b in batches] == [2, 1]  # all 3 pairs, in name order
    lq_file = tmp_path / "split" / "lq" / "synthetic_00002.png"
    import cv2

    np.testing.assert_array_equal(
        batches[1]["lq"][0], cv2.cvtColor(cv2.imread(str(lq_file)), cv2.COLOR_BGR2RGB)
    )

    result = vqgan_trainer.train_and_evaluate(config, str(tmp_path / "w"))
    assert {"psnr", "ssim", "lpips"} <= set(result) and np.isfinite(result["lpips"])
    assert any("eval/lpips" in r for r in _jsonl(str(tmp_path / "w")))


def test_remat_lowers_the_compiled_step_memory():
    """``model.remat`` must shrink the step the loop compiles, also on CPU, whose XLA pipeline would
    otherwise erase the barriers and merge the recomputation back (``loop.CPU_COMPILER_OPTIONS``)."""
    temp = {}
    for remat in (False, True):
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
    assert temp[True] < 0.8 * temp[False], temp
