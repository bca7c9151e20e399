"""What every trainer must do, for each of them (``tests/trainers.py`` lists them): a real
train-and-evaluate on its tiny config, bfloat16 training that learns, one step on 8 devices equal to
one on 1 device through the loop's own ``jit_train_step``, and SIGTERM / SIGKILL + resume from the
main command as a user runs it.

One class per trainer (pytest-xdist schedules a class as a unit, so trainers run side by side);
the tests live once, in :class:`TrainerTests`.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artfr_jax import workdirs
from tests import trainers
from tests.trainers import TRAINERS, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10  # of the main-command runs


class TrainerTests:
    trainer: Trainer

    @pytest.fixture(scope="class")
    def stage1_dir(self, tmp_path_factory) -> str | None:
        if not self.trainer.stage1:
            return None
        return self.trainer.train_stage1(str(tmp_path_factory.mktemp(f"{self.trainer.name}_s1")))

    def test_train_and_evaluate_writes_outputs(self, stage1_dir, tmp_path):
        t = self.trainer
        config = t.tiny_config(stage1_dir)
        workdir = str(tmp_path / "w")
        result = t.module.train_and_evaluate(config, workdir)
        assert set(t.eval_keys) <= set(result), result
        assert all(np.isfinite(result[k]) for k in t.eval_keys), result
        steps = config.num_train_steps
        logged = sorted(trainers.train_losses(workdir))
        assert logged == list(range(config.log_every, steps + 1, config.log_every))
        assert all(np.isfinite(v) for v in trainers.train_losses(workdir).values())
        assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
        evals = range(config.eval_every, steps + 1, config.eval_every)
        grids = sorted(os.path.basename(g) for g in glob.glob(f"{workdir}/samples/{t.name}_*.png"))
        assert grids == [f"{t.name}_step{s:07d}.png" for s in evals]
        ckdir = workdirs.checkpoint_dir(workdir)
        assert workdirs.latest_step(ckdir) == steps
        assert workdirs.read_config(ckdir)["trainer"] == t.name

    def test_bfloat16_training_learns_a_batch(self, stage1_dir):
        """In bfloat16 compute (float32 parameters) repeated steps on one batch lower its loss."""
        t = self.trainer
        config = t.tiny_config(stage1_dir, **t.learn, **{"model.dtype": "bfloat16"})
        stage = t.make_stage(config)
        step, state, batch, frozen, _ = trainers.setup_step(config, stage, jax.devices()[:1])
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
        watched = []
        for i in range(12):
            state, metrics = step(state, batch, jax.random.key(i), frozen)
            watched.append(float(metrics[t.watch]))
        assert all(np.isfinite(watched)), watched
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
        assert np.mean(watched[-3:]) < 0.8 * np.mean(watched[:3]), watched

    def test_eight_device_step_matches_one_device(self, stage1_dir):
        # Adam's first update is g/(|g|+eps): for near-zero gradients it turns float round-off
        # into sign flips of size lr. A larger eps keeps the comparison about the step.
        t = self.trainer
        config = t.tiny_config(stage1_dir, **{"optimizer.eps": 1e-3, **t.parity})
        stage = t.make_stage(config)
        results = {}
        with jax.default_matmul_precision("highest"):
            for n, mesh in ((1, dict(data=1, fsdp=1)), (8, dict(data=4, fsdp=2))):
                config.mesh.update(**mesh)
                step, state, batch, frozen, m = trainers.setup_step(
                    config, stage, jax.devices()[:n], t.all_terms_step
                )
                with jax.set_mesh(m):
                    new, metrics = step(state, batch, jax.random.key(1), frozen)
                results[n] = (jax.device_get(new.params), jax.device_get(metrics), new)
        (p1, m1, _), (p8, m8, state8) = results[1], results[8]
        specs = {str(x.sharding.spec) for x in jax.tree.leaves(state8.params)}
        assert any("fsdp" in s for s in specs), specs  # some parameters really are split
        for k in m1:
            np.testing.assert_allclose(m8[k], m1[k], rtol=2e-4, atol=1e-5, err_msg=k)
        for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    @pytest.mark.slow
    def test_sigterm_saves_and_sigkill_resumes_like_an_uninterrupted_run(self, tmp_path):
        t = self.trainer
        base = [
            f"--config=configs/{t.config}.py:tiny",
            f"--config.num_train_steps={STEPS}",
            "--config.eval_every=0",
        ]
        full = str(tmp_path / "full")
        res = _run(full, base)  # a stage II trains its tokenizer first, in <workdir>/stage1
        assert res.returncode == 0, res.stderr[-3000:]
        extra = [f"--config.stage1.workdir={full}/stage1"] if t.stage1 else []

        part = str(tmp_path / "part")
        code, out = _start_and_signal(part, signal.SIGTERM, 2, base + extra)
        assert code == 0, out[-3000:]
        assert "SIGTERM" in out
        stopped_at = _steps(part)[-1]
        assert 2 <= stopped_at < STEPS

        code, out = _start_and_signal(part, signal.SIGKILL, stopped_at + 2, base + extra)
        assert code == -signal.SIGKILL, out[-3000:]
        killed_after = _steps(part)[-1]
        assert killed_after > stopped_at

        res = _run(part, base + extra)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"Resuming {t.name} from step {killed_after}" in res.stderr
        a, b = trainers.train_losses(full), trainers.train_losses(part)
        resumed = [s for s in a if s > killed_after]
        assert resumed, (a, killed_after)
        for s in resumed:
            np.testing.assert_allclose(b[s], a[s], rtol=1e-6, err_msg=f"step {s}")


class TestVQGAN(TrainerTests):
    trainer = TRAINERS["vqgan"]


class TestART(TrainerTests):
    trainer = TRAINERS["art"]


class TestVQFR(TrainerTests):
    trainer = TRAINERS["vqfr"]


class TestOSDFaceVRE(TrainerTests):
    trainer = TRAINERS["osdface_vre"]
    # Minutes of CI for what the loop's resume tests of the other trainers cover; the VRE's
    # phases follow the restored ``state.step``.
    test_sigterm_saves_and_sigkill_resumes_like_an_uninterrupted_run = None


class TestOSDFace(TrainerTests):
    trainer = TRAINERS["osdface"]


def test_every_trainer_is_tested():
    from artfr_jax import main

    assert set(main.TRAINERS) == set(TRAINERS)
    classes = [c for c in globals().values() if isinstance(c, type) and issubclass(c, TrainerTests)]
    assert {c.trainer.name for c in classes if c is not TrainerTests} == set(TRAINERS)


# ----------------------------------------------------------------- the main command, as run


def command_env() -> dict[str, str]:
    env = dict(os.environ)
    # One CPU device, as a user's machine; the session's other XLA flags (conftest) stay.
    flags = os.environ.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "device_count" not in f)
    # glibc's defaults compile about 15% faster; these runs are mostly compilation.
    env["ARTFR_JAX_HOST_MALLOC"] = "system"
    env["JAX_PLATFORMS"] = "cpu"
    # The command's own cache setting (utils/compile_cache.py), pointed at the session's cache.
    cache = env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if cache:
        env["ARTFR_JAX_COMPILATION_CACHE"] = cache
    return env


def _cmd(workdir, args):
    return [sys.executable, "-m", "artfr_jax.main", *args, f"--workdir={workdir}"]


def _run(workdir, args, timeout=600):
    return subprocess.run(
        _cmd(workdir, args),
        cwd=ROOT,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _start_and_signal(workdir, sig, after_step, args):
    """Starts a run and sends ``sig`` once a checkpoint of at least ``after_step`` exists.

    The run's output goes to a file, not a pipe: nothing reads a pipe while the run trains, and a
    full pipe would block the run's logging (and so the run) before its first checkpoint."""
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            _cmd(workdir, [*args, "--config.checkpoint_every=2"]),
            cwd=ROOT,
            env=command_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if any(s >= after_step for s in _steps(workdir)):
                os.killpg(proc.pid, sig)
                break
            time.sleep(0.2)
        proc.wait(timeout=300)
        log.seek(0)
        return proc.returncode, log.read()
