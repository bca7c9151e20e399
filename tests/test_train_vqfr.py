"""VQFR beyond what every trainer does (tests/test_trainers.py): stage I with k-means
re-estimation, the stage-II losses, the restore command on a VQFR workdir, ``init_from``."""

import os

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from artfr_jax import inference, restore, workdirs
from artfr_jax.models import factory
from artfr_jax.train import sharding, vqfr_trainer, vqgan_trainer
from configs import vqfr as vqfr_config
from tests import photos, trainers
from tests.test_restore_cli import _mixed_folder, _snapshot

VQFR = trainers.TRAINERS["vqfr"]
tiny_config = VQFR.tiny_config
_rows = trainers.jsonl


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    return VQFR.train_stage1(str(tmp_path_factory.mktemp("vqfr_stage1")))


@pytest.fixture(scope="module")
def trained(stage1, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("vqfr"))
    return workdir, vqfr_trainer.train_and_evaluate(tiny_config(stage1), workdir)


def test_stage_one_reestimates_the_codebook_with_kmeans(stage1):
    rows = [r for r in _rows(stage1) if "train/kmeans_reestimated" in r]
    assert rows and sum(r["train/kmeans_reestimated"] for r in rows) > 0
    assert workdirs.read_config(workdirs.checkpoint_dir(stage1))["model"]["arch"] == "vqfr_v1"


def test_reestimation_replaces_the_codebook_by_reservoir_centres():
    from artfr_jax.train import kmeans
    from artfr_jax.train import state as state_lib

    cb = vqfr_config.get_config("tiny").stage1.config.codebook
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (16, 8)).astype(np.float32)
    feats = centres[rng.integers(0, 16, 200)] + rng.normal(0, 0.05, (200, 8)).astype(np.float32)
    emb = jax.numpy.zeros((16, 8))
    state = state_lib.TrainState(
        step=jax.numpy.int32(cb.every),
        params={"generator": {"quantizer": {"embedding": emb}}},
        opt_state=None,
        extras={"reservoir": kmeans.reservoir_init(cb.reservoir_size, 8)},
    )
    new, did = vqgan_trainer._reestimate_codebook(
        state, state.extras, jax.numpy.asarray(feats), jax.random.key(0), cb
    )
    assert float(did) == 1.0 and int(new.extras["reservoir"].seen) == 0
    got = np.asarray(new.params["generator"]["quantizer"]["embedding"])
    d = np.linalg.norm(got[:, None] - centres[None], axis=-1).min(axis=1)
    assert np.all(d < 0.5)  # every new code sits on one of the feature clusters
    late = state.replace(step=jax.numpy.int32(cb.max_steps + cb.every))
    new, did = vqgan_trainer._reestimate_codebook(
        late, late.extras, jax.numpy.asarray(feats), jax.random.key(0), cb
    )
    assert float(did) == 0.0 and int(new.extras["reservoir"].seen) == 0  # past max_steps


def test_train_and_evaluate_then_restore_a_mixed_folder(trained, tmp_path):
    workdir, result = trained
    for k in ("psnr", "ssim", "psnr_texture", "psnr_input"):
        assert np.isfinite(result[k]), k
    rows = [r for r in _rows(workdir) if "train/loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(np.isfinite(r["train/loss"]) and r["train/code"] >= 0 for r in rows)
    assert rows[-1]["train/d_main_local_loss"] > 0  # the main branch's GAN started at step 3
    assert os.path.exists(os.path.join(workdir, "samples", "vqfr_step0000006.png"))
    assert workdirs.read_config(workdirs.checkpoint_dir(workdir))["trainer"] == "vqfr"

    src = tmp_path / "in"
    good, bad = _mixed_folder(src)
    before = _snapshot(src)
    fv = flags.FlagValues()
    restore.define_flags(fv)
    fv(
        [
            "restore",
            "--mode=aligned",
            f"--workdir={workdir}",
            f"--input={src}",
            f"--output={tmp_path / 'main'}",
        ]
    )
    assert restore.main(["restore"], fv) == 1  # the broken files failed, the rest was restored
    names = sorted(os.path.splitext(os.path.basename(p))[0] + ".png" for p in good)
    assert sorted(f for f in os.listdir(tmp_path / "main") if f.endswith(".png")) == names
    assert _snapshot(src) == before
    fv = flags.FlagValues()
    restore.define_flags(fv)
    fv(
        [
            "restore",
            "--mode=aligned",
            f"--workdir={workdir}",
            f"--input={good[0]}",
            f"--output={tmp_path / 'tex'}",
            "--texture",
            "--method=vqfr",
        ]
    )
    assert restore.main(["restore"], fv) == 0
    main = np.asarray(Image.open(tmp_path / "main" / names[names.index("small.png")]))
    tex = np.asarray(Image.open(tmp_path / "tex" / "small.png"))
    assert main.shape == tex.shape == (32, 32, 3) and not np.array_equal(main, tex)
    fv = flags.FlagValues()
    restore.define_flags(fv)
    fv(
        [
            "restore",
            "--mode=aligned",
            f"--workdir={workdir}",
            f"--input={src}",
            f"--output={tmp_path / 'x'}",
            "--method=art",
        ]
    )
    assert restore.main(["restore"], fv) == 2  # the workdir holds VQFR, not ART-FR

    r = inference.load_restorer(workdir)
    lq = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    np.testing.assert_array_equal(r(lq, jax.random.key(0)), r(lq, jax.random.key(1)))


def test_stage_one_must_be_vqfr_codebook(tmp_path):
    config = vqfr_config.get_config("tiny")
    config.stage1.config.model.arch = "taming"
    with pytest.raises(ValueError, match="'vqfr_v1' codebook model"):
        factory.vqfr(config)


def test_init_from_a_workdir_or_a_converted_file(stage1, trained, tmp_path):
    workdir, _ = trained
    config = tiny_config(stage1, init_from=workdir)
    stage = vqfr_trainer.make_stage(config, str(tmp_path / "new"))
    state, _ = stage.init_state(jax.random.key(3), sharding.make_mesh(config.mesh))
    _, want, _ = inference.load_vqfr(workdir)
    for a, b in zip(jax.tree.leaves(state.params["sr"]), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    remat = tiny_config(stage1, init_from=workdir)
    remat.model.remat = "full"  # a compute setting: the same network, so the start is allowed
    vqfr_trainer.make_stage(remat, str(tmp_path / "remat"))
    with pytest.raises(ValueError, match=r"config.init_from=.*expected a 'vqfr' checkpoint"):
        vqfr_trainer.make_stage(tiny_config(stage1, init_from=stage1), str(tmp_path / "x"))
    missing = str(tmp_path / "vqfr_v1.msgpack")
    with pytest.raises(FileNotFoundError, match=r"config.init_from: .*python -m artfr_jax"):
        vqfr_trainer.make_stage(tiny_config(stage1, init_from=missing), str(tmp_path / "y"))


def test_whole_photos_with_the_trained_workdir(trained, tmp_path):
    """Real photos (astronaut, a group of six): every face found, restored, pasted back."""
    photos.check_whole_photos(tmp_path, f"--workdir={trained[0]}")
