"""OSDFace beyond what every trainer does (tests/test_trainers.py): the VRE's phases, what the
stage-II step trains, the restore command on an OSDFace workdir, missing SD weights."""

import jax
import numpy as np
import pytest
from absl import flags
from flax import traverse_util

from artfr_jax import restore
from artfr_jax.models import naming
from artfr_jax.train import osdface_trainer, osdface_vre_trainer
from configs import osdface as osdface_config
from tests import photos, trainers
from tests.test_restore_cli import _mixed_folder, _snapshot

OSD = trainers.TRAINERS["osdface"]
VRE = trainers.TRAINERS["osdface_vre"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    return OSD.train_stage1(str(tmp_path_factory.mktemp("osdface_vre")))


@pytest.fixture(scope="module")
def trained(stage1, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("osdface"))
    osdface_trainer.train_and_evaluate(OSD.tiny_config(stage1), workdir)
    return workdir


def _changed(before, after) -> dict[str, bool]:
    return {
        k: any(
            not np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k]), strict=True)
        )
        for k in before
    }


def test_vre_phases_train_only_their_networks():
    """Tiny phases: HQ steps 0-1, LQ steps 2-3, association from step 4."""
    config = VRE.tiny_config(**{"optimizer.eps": 1e-3})
    stage = VRE.make_stage(config)
    moved = {}
    step, state0, batch, frozen, _ = trainers.setup_step(config, stage, jax.devices()[:1])
    host = jax.device_get(state0)  # the step donates its state: a fresh copy per phase
    for step_number in (0, 2, 4):
        state = jax.device_put(host.replace(step=np.int32(step_number)), state0_shardings(state0))
        before = jax.device_get(state.params)
        new, metrics = step(state, batch, jax.random.key(0), frozen)
        moved[step_number] = _changed(before, jax.device_get(new.params))
        assert float(metrics["phase"]) == step_number // 2
        assert np.isfinite(float(metrics["loss"]))
    assert moved[0] == {"hq": True, "lq": False, "d_hq": True, "d_lq": False, "logit_scale": False}
    assert moved[2] == {"hq": False, "lq": True, "d_hq": False, "d_lq": True, "logit_scale": False}
    assert all(moved[4].values()), moved[4]


def state0_shardings(state):
    return jax.tree.map(lambda a: a.sharding, state)


def test_vre_phases_must_fit(tmp_path):
    config = VRE.tiny_config(**{"phases.hq": 5, "phases.lq": 5})
    with pytest.raises(ValueError, match=r"config.phases: hq=5 and lq=5 .*num_train_steps=6"):
        osdface_vre_trainer.make_stage(config)


def test_stage_two_trains_lora_projection_and_discriminator_only(stage1, tmp_path):
    config = OSD.tiny_config(stage1)
    stage = OSD.make_stage(config, str(tmp_path))
    step, state, batch, frozen, _ = trainers.setup_step(config, stage, jax.devices()[:1])
    assert set(state.params) == {"lora", "projection", "d_lora", "d_head"}
    g_paths = {naming.torch_name(p[:-1]) for p in traverse_util.flatten_dict(state.params["lora"])}
    d_paths = {
        naming.torch_name(p[:-1]) for p in traverse_util.flatten_dict(state.params["d_lora"])
    }
    assert any(p.startswith("up_blocks") for p in g_paths)
    assert d_paths and all(p.startswith(("down_blocks", "mid_block")) for p in d_paths)
    assert d_paths < g_paths
    frozen_before = jax.device_get(frozen)
    before = jax.device_get(state.params)
    new, metrics = step(state, batch, jax.random.key(0), frozen)
    assert all(_changed(before, jax.device_get(new.params)).values())
    for a, b in zip(
        jax.tree.leaves(frozen_before), jax.tree.leaves(jax.device_get(frozen)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert {"mse", "g_gan", "d_loss"} <= set(metrics)


def test_restore_command_on_an_osdface_workdir(trained, tmp_path):
    src = tmp_path / "in"
    good, bad = _mixed_folder(src)
    before = _snapshot(src)
    out = tmp_path / "out"
    fv = flags.FlagValues()
    restore.define_flags(fv)
    fv(
        [
            "restore",
            "--mode=aligned",
            f"--workdir={trained}",
            f"--input={src}",
            f"--output={out}",
            "--method=osdface",
        ]
    )
    assert restore.main(["restore"], fv) == 1  # the broken files fail, the rest is restored
    assert len(list(out.glob("*.png"))) == len(good)
    assert _snapshot(src) == before
    fv = flags.FlagValues()
    restore.define_flags(fv)
    fv(
        [
            "restore",
            "--mode=aligned",
            f"--workdir={trained}",
            f"--input={src}",
            f"--output={tmp_path / 'x'}",
        ]
    )
    fv.method = "vqfr"
    assert restore.main(["restore"], fv) == 2  # the workdir holds OSDFace, not VQFR


def test_paper_config_needs_sd_weights(stage1, tmp_path):
    config = osdface_config.get_config()
    config.stage1.workdir = stage1
    config.stage1.config = OSD.tiny_config().stage1.config
    config.data.image_size = 32
    with pytest.raises(FileNotFoundError) as e:
        osdface_trainer.make_stage(config, str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    assert "config.model.sd_weights" in msg and "artfr_jax.convert.diffusers_sd" in msg


def test_whole_photos_with_the_trained_workdir(trained, tmp_path):
    """Real photos (astronaut, a group of six): every face found, restored, pasted back."""
    photos.check_whole_photos(tmp_path, f"--workdir={trained}")
