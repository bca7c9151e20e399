"""Test helpers shared by every trainer's tests: tiny configs, the stage-I tokenizer a stage II
needs, one step on a mesh through the loop's own jit, metrics.jsonl rows. A new trainer adds one
:class:`Trainer` to :data:`TRAINERS` and gets ``tests/test_trainers.py`` for free."""

from __future__ import annotations

import dataclasses
import importlib
import os

import jax
import jax.numpy as jnp
import ml_collections

from artfr_jax.train import loop, sharding
from artfr_jax.train import writers as writers_lib
from tests import overrides as overrides_lib


@dataclasses.dataclass(frozen=True)
class Trainer:
    """How to run one trainer in the tests.

    name: ``config.trainer``; config: ``configs/<config>.py``; stage1: whether a stage-I tokenizer
    is needed first; eval_keys: metrics its eval step must report; learn: overrides under which a
    fixed batch must be learnt fast (a short schedule without GAN terms); watch: the metric that
    must fall; all_terms_step: a step at which every loss term (GANs, R1) is on; parity: overrides
    for the 8-device test (e.g. dropout on, so that its randomness is compared too); command:
    flags added to the main-command runs of the two-process test; mesh: the mesh flags of those
    runs (all devices on ``data``, or split parameters across the processes).
    """

    name: str
    config: str
    stage1: bool
    eval_keys: tuple[str, ...]
    learn: dict
    watch: str
    all_terms_step: int
    parity: dict = dataclasses.field(default_factory=dict)
    command: tuple[str, ...] = ()
    mesh: tuple[str, ...] = ("--config.mesh.data=-1",)

    @property
    def module(self):
        return importlib.import_module(f"artfr_jax.train.{self.name}_trainer")

    def tiny_config(self, stage1_dir: str | None = None, **overrides) -> ml_collections.ConfigDict:
        config = importlib.import_module(f"configs.{self.config}").get_config("tiny")
        if self.stage1:
            config.stage1.update(workdir=stage1_dir or "", train_if_missing=False)
        return overrides_lib.apply(config, overrides)

    def make_stage(self, config, workdir: str = "/unused") -> loop.Stage:
        if self.stage1:
            return self.module.make_stage(config, workdir)
        return self.module.make_stage(config)

    def train_stage1(self, workdir: str) -> str:
        """Trains the tiny stage-I model of this trainer's tiny config into ``workdir``."""
        config = self.tiny_config().stage1.config
        config.eval_every = 0
        module = importlib.import_module(f"artfr_jax.train.{config.trainer}_trainer")
        module.train_and_evaluate(config, workdir)
        return workdir


TRAINERS = {
    t.name: t
    for t in (
        Trainer(
            name="vqgan",
            config="vqgan",
            stage1=False,
            eval_keys=("l1", "psnr", "ssim"),
            learn={"loss.adversarial_start": 10**6, "optimizer.learning_rate": 3e-3},
            watch="l2",
            all_terms_step=5,
        ),
        Trainer(
            name="art",
            config="art",
            stage1=True,
            eval_keys=("psnr", "psnr_input", "ssim", "token_acc", "lookup_acc"),
            learn={"num_train_steps": 1000, "optimizer.learning_rate": 1e-3},
            watch="loss",
            all_terms_step=0,
            parity={"model.dropout_rate": 0.1},
            # Parameters and optimizer state split over the two processes' devices (fsdp), as
            # docs/scaling.md recommends for TPU slices.
            mesh=("--config.mesh.data=1", "--config.mesh.fsdp=-1"),
        ),
        Trainer(
            name="vqfr",
            config="vqfr",
            stage1=True,
            eval_keys=("psnr", "ssim", "psnr_texture", "psnr_input"),
            learn={
                "loss.gan_start": 10**6,
                "loss.main_gan_start": 10**6,
                "loss.main_pixel_weight": 1.0,
                "optimizer.learning_rate": 1e-3,
            },
            watch="rec_main",
            all_terms_step=16,
        ),
        Trainer(
            name="osdface_vre",
            config="osdface_vre",
            stage1=False,
            eval_keys=("hq_psnr", "lq_psnr", "hq_ssim", "assoc_acc", "prompt_codes"),
            learn={
                "phases.hq": 1000,
                "num_train_steps": 2000,
                "loss.adversarial_weight": 0.0,
                "optimizer.learning_rate": 3e-3,
            },
            watch="hq_l1",
            all_terms_step=4,  # the association phase of the tiny config
            # One program (the association phase, both branches) instead of three per start; the
            # phase is a function of the restored step (test_train_osdface.py).
            command=("--config.phases.hq=0", "--config.phases.lq=0"),
        ),
        Trainer(
            name="osdface",
            config="osdface",
            stage1=True,
            eval_keys=("psnr", "ssim", "psnr_input"),
            learn={"loss.gan_weight": 0.0, "optimizer.learning_rate": 1e-2},
            watch="mse",
            all_terms_step=0,
        ),
    )
}


def jsonl(workdir: str) -> list[dict]:
    return writers_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def train_losses(workdir: str) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in jsonl(workdir) if "train/loss" in r}


def setup_step(config, stage: loop.Stage, devices, step: int = 0):
    """``(jitted step, state, device batch, frozen, mesh)``: the stage's state on a mesh of
    ``devices`` at ``step``, its first batch and its step jitted as the loop jits it."""
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    state, shardings = stage.init_state(jax.random.key(0), mesh)
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    batch = sharding.global_batch_to_devices(next(stage.train_iterator(0, 0, 1)), mesh)
    frozen = jax.device_put(stage.frozen, sharding.replicated(mesh))
    return loop.jit_train_step(stage.train_step, shardings, mesh), state, batch, frozen, mesh
