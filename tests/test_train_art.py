"""ART-FR stage II beyond what every trainer does (tests/test_trainers.py): its loss terms, the
frozen stage-I checks, the final restoration, the restorer and the restore command on a real
checkpoint, the ablations, the token-accuracy experiment."""

import csv
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from artfr_jax import inference, restore, workdirs
from artfr_jax.train import art_trainer, sharding
from experiments import token_accuracy
from tests import photos, trainers

ART = trainers.TRAINERS["art"]
tiny_config = ART.tiny_config


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """One tiny stage-I tokenizer shared by every test here."""
    return ART.train_stage1(str(tmp_path_factory.mktemp("stage1")))


def _losses(workdir):
    return {r["step"]: r for r in trainers.jsonl(workdir) if "train/loss" in r}


@pytest.fixture(scope="module")
def trained(stage1, tmp_path_factory):
    """(workdir, result) of one tiny stage-II run with the final restoration."""
    workdir = str(tmp_path_factory.mktemp("art"))
    config = tiny_config(stage1, **{"final_restore.num_images": 4})
    result = art_trainer.train_and_evaluate(config, workdir)
    # The finished run started again: nothing to train, and its restored faces are kept.
    first = os.path.join(workdir, "samples", "restored", "0000.png")
    os.utime(first, (1, 1))
    again = art_trainer.train_and_evaluate(config, workdir)
    assert again["final"] == result["final"] and os.path.getmtime(first) == 1
    return workdir, result


def test_train_and_evaluate_then_restore(trained, tmp_path):
    workdir, result = trained
    for k in ("psnr", "psnr_input", "ssim", "token_acc", "lookup_acc"):
        assert np.isfinite(result[k]), k
    losses = _losses(workdir)
    assert sorted(losses) == [2, 4]
    for row in losses.values():
        assert 0.0 < row["train/mask_ratio"] <= 1.0
        assert np.isfinite(row["train/token_loss"]) and np.isfinite(row["train/feat_loss"])
    assert os.path.exists(os.path.join(workdir, "samples", "art_step0000004.png"))
    assert len(glob.glob(os.path.join(workdir, "samples", "restored", "*.png"))) == 4
    with open(os.path.join(workdir, "samples", "restored_summary.json")) as f:
        summary = json.load(f)
    assert summary["num_images"] == 4 and np.isfinite(summary["psnr_restored"])
    assert summary["step"] == 4 and summary == result["final"]

    restorer = inference.load_restorer(workdir)
    assert restorer.image_size == 32
    lq = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    a = restorer(lq, jax.random.key(0))
    b = restorer(lq, jax.random.key(1))
    assert a.shape == lq.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)  # temperature 0 is greedy: the key does not matter
    hot = inference.load_restorer(workdir, temperature=5.0)
    assert not np.array_equal(hot(lq, jax.random.key(0)), hot(lq, jax.random.key(1)))
    with pytest.raises(ValueError, match="uint8"):
        restorer(lq.astype(np.float32), jax.random.key(0))

    # The restore command on this checkpoint: a good image and a broken one.
    src = tmp_path / "in"
    src.mkdir()
    from PIL import Image

    Image.fromarray(lq[0]).resize((48, 40)).save(src / "face.png")
    (src / "broken.jpg").write_text("not an image")
    fv = flags.FlagValues()
    restore.define_flags(fv)
    fv(
        [
            "restore",
            "--mode=aligned",
            f"--workdir={workdir}",
            f"--input={src}",
            f"--output={tmp_path / 'out'}",
        ]
    )
    assert restore.main(["restore"], fv) == 1
    out = np.asarray(Image.open(tmp_path / "out" / "face.png"))
    assert out.shape == (32, 32, 3)
    assert sorted(os.listdir(src)) == ["broken.jpg", "face.png"]


def test_lq_encoder_starts_from_stage_one(stage1):
    config = tiny_config(stage1)
    stage = art_trainer.make_stage(config, "/unused")
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    state, _ = stage.init_state(jax.random.key(0), mesh)
    tok = stage.frozen["tokenizer"]
    for name in ("encoder", "quant_conv"):
        for a, b in zip(
            jax.tree.leaves(state.params["art"]["lq_encoder"][name]),
            jax.tree.leaves(tok[name]),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    config.model.init_lq_encoder_from_stage1 = False
    state, _ = art_trainer.make_stage(config, "/unused").init_state(jax.random.key(0), mesh)
    kernel = state.params["art"]["lq_encoder"]["encoder"]["conv_in"]["kernel"]
    assert not np.allclose(kernel, tok["encoder"]["conv_in"]["kernel"])


def test_missing_and_mismatched_stage_one_are_clear_errors(stage1, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.stage1.workdir.*configs/vqgan.py"):
        art_trainer.make_stage(tiny_config(str(tmp_path / "nothing")), str(tmp_path))
    config = tiny_config(stage1)
    config.stage1.config.model.num_embeddings = 64
    with pytest.raises(ValueError, match="num_embeddings: checkpoint 32 vs config 64"):
        art_trainer.make_stage(config, str(tmp_path))
    config = tiny_config(stage1)
    config.data.image_size = 64
    with pytest.raises(ValueError, match="image_size=64.*trained at 32"):
        art_trainer.make_stage(config, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        inference.load_restorer(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="'vqgan' checkpoint"):
        inference.load_restorer(stage1)


@pytest.mark.parametrize(
    "overrides",
    [
        {"model.use_transformer": False},
        {"model.long_skips": False, "loss.feature_weight": 0.0},
        {"model.condition_mode": "cross_attention"},
    ],
    ids=["ar_off", "no_skips_no_feat", "cross_attention"],
)
def test_ablations_train(stage1, tmp_path, overrides):
    config = tiny_config(stage1, eval_every=0, num_train_steps=2, **overrides)
    stage = art_trainer.make_stage(config, "/unused")
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    state, shardings = stage.init_state(jax.random.key(0), mesh)
    batch = sharding.global_batch_to_devices(next(stage.train_iterator(0, 0, 1)), mesh)
    with jax.set_mesh(mesh):
        state, metrics = jax.jit(stage.train_step)(state, batch, jax.random.key(1), stage.frozen)
    assert np.isfinite(float(metrics["loss"]))
    if not config.model.use_transformer:
        assert set(state.params["art"]) == {"lq_encoder"}
        np.testing.assert_allclose(float(metrics["loss"]), float(metrics["feat_loss"]))
        sums, rows = jax.jit(stage.eval_step)(
            state,
            {**batch, "mask": jnp.ones(batch["hq"].shape[0])},
            jax.random.key(2),
            stage.frozen,
        )
        # Without the AR module, restoration is exactly the plain lookup.
        assert float(sums["token_acc"]) == pytest.approx(float(sums["lookup_acc"]))
    elif config.loss.feature_weight == 0:
        np.testing.assert_allclose(float(metrics["loss"]), float(metrics["token_loss"]))


def test_checkpoint_config_names_the_trainer(stage1, tmp_path):
    workdir = str(tmp_path / "art")
    art_trainer.train_and_evaluate(tiny_config(stage1, eval_every=0, num_train_steps=2), workdir)
    saved = workdirs.read_config(workdirs.checkpoint_dir(workdir))
    assert saved["trainer"] == "art" and saved["stage1"]["workdir"] == stage1


def test_token_accuracy_experiment_writes_csv_and_plot(trained, tmp_path):
    workdir, _ = trained
    out = str(tmp_path / "acc")
    rows = token_accuracy.run(workdir, out, levels=[0.0, 1.0], num_images=4, batch_size=4)
    with open(os.path.join(out, "token_accuracy.csv")) as f:
        table = list(csv.DictReader(f))
    assert [float(r["level"]) for r in table] == [0.0, 1.0]
    for r in table:
        for k in ("acc_lookup", "acc_T=1", "acc_T=8"):
            assert 0.0 <= float(r[k]) <= 1.0
    # Level 0 is the HQ image itself; level 1 degrades it with every knob at its maximum.
    assert rows[0]["psnr_input"] == float("inf") or rows[0]["psnr_input"] > 60
    assert rows[1]["psnr_input"] < 30 and rows[1]["downscale"] > 1 and rows[1]["jpeg"] > 0
    from PIL import Image

    assert Image.open(os.path.join(out, "token_accuracy.png")).size[0] > 100


def test_restoring_loads_no_training_code(trained, tmp_path):
    """``artfr_jax.restore`` / ``inference`` restore a workdir without importing a trainer, the
    training loop, optax or grain (a fresh interpreter: this one has imported them all)."""
    import subprocess
    import sys

    workdir, _ = trained
    code = (
        "import sys, numpy as np, jax\n"
        "from artfr_jax import inference, restore\n"
        f"r = inference.load_restorer({workdir!r})\n"
        "out = r(np.zeros((2, r.image_size, r.image_size, 3), np.uint8), jax.random.key(0))\n"
        "assert out.shape == (2, r.image_size, r.image_size, 3)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('optax', 'grain')\n"
        "             or m.startswith(('artfr_jax.train', 'artfr_jax.data.pipeline')))\n"
        "print('LOADED', bad)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout, out.stdout


def test_whole_photos_with_the_trained_workdir(trained, tmp_path):
    """Real photos (astronaut, a group of six): every face found, restored, pasted back."""
    photos.check_whole_photos(tmp_path, f"--workdir={trained[0]}")
