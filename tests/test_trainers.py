"""What every trainer must do, for each of them (``tests/trainers.py`` lists them): bfloat16
training that learns, one step on 8 devices equal to one on 1 device through the loop's own
``jit_train_step``, and the main command as users run it: train, evaluate and checkpoint on one
process with two devices and on two processes with one device each (localhost, gloo collectives,
as two hosts), SIGKILL of both and resume, SIGTERM (one process; one of two).

One class per trainer (pytest-xdist schedules a class as a unit, so trainers run side by side);
the tests live once, in :class:`TrainerTests`.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
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
    @pytest.mark.multiprocess
    def test_two_processes_train_and_resume_like_one_process_on_two_devices(
        self, stage1_dir, tmp_path
    ):
        """The main command as a two-host user runs it: two processes with one CPU device each
        (gloo collectives) give the losses and eval of one process on two devices, also after
        a SIGKILL of both and a resume. For the stage-I trainer the reference run is itself
        stopped by SIGTERM and resumed (one process), and SIGTERM to one of the two processes
        makes both save at the same step and exit 0."""
        t = self.trainer
        base = [
            f"--config=configs/{t.config}.py:tiny",
            f"--config.num_train_steps={STEPS}",
            f"--config.eval_every={STEPS}",
            "--config.checkpoint_every=2",
            *t.mesh,
            *t.command,
        ]
        full = str(tmp_path / "full")
        every = [f"--config.eval_every={STEPS // 2}"]  # the reference also evaluates mid-run
        if t.name == "vqgan":  # --verbosity=1: the full log on the console
            args = base + every + ["--verbosity=1"]
            (code,), out = _start_and_signal(full, signal.SIGTERM, 2, args, devices=2)
            assert code == 0 and "SIGTERM" in out, out[-3000:]
            assert "CheckpointManager" in out
            assert 2 <= _steps(full)[-1] < STEPS
        extra = [f"--config.stage1.workdir={stage1_dir}"] if t.stage1 else []
        # Uninterrupted from here: a checkpoint at the end is enough.
        res = _run(full, base + extra + every + [f"--config.checkpoint_every={STEPS}"], devices=2)
        assert res.returncode == 0, res.stderr[-3000:]
        _check_outputs(t, full)
        _check_console(t, full, res.stderr)

        part = str(tmp_path / "part")
        stopped_at = 0
        if t.name == "vqgan":
            codes, out = _start_and_signal(part, signal.SIGTERM, 2, base, processes=2, only=1)
            assert codes == [0, 0], out[-3000:]
            stopped_at = _steps(part)[-1]
            assert 2 <= stopped_at < STEPS
            for i in range(2):
                log = _log(part, i)
                assert f"Stopping at step {stopped_at} after SIGTERM" in log, log[-3000:]
        codes, out = _start_and_signal(
            part, signal.SIGKILL, stopped_at + 2, base + extra, processes=2
        )
        assert codes == [-signal.SIGKILL] * 2, out[-3000:]
        killed_after = _steps(part)[-1]
        assert stopped_at < killed_after < STEPS

        codes, out = _start_and_signal(part, None, 0, base + extra, processes=2)
        assert codes == [0, 0], out[-3000:]
        assert f"Resuming {t.name} from step {killed_after}" in out
        a, b = trainers.train_losses(full), trainers.train_losses(part)
        # A logged loss is the mean over its log window: compare the windows after the resume.
        window = t.tiny_config().log_every
        resumed = [s for s in a if s - window >= killed_after]
        assert resumed, (a, killed_after)
        for s in resumed:
            np.testing.assert_allclose(b[s], a[s], rtol=1e-5, err_msg=f"step {s}")
        evals = [r for r in trainers.jsonl(part) if any(k.startswith("eval/") for k in r)]
        assert [r["step"] for r in evals] == [STEPS]  # written once, by process 0
        (ref,) = [
            r for r in trainers.jsonl(full) if f"eval/{t.eval_keys[0]}" in r and r["step"] == STEPS
        ]
        for k in t.eval_keys:
            np.testing.assert_allclose(evals[0][f"eval/{k}"], ref[f"eval/{k}"], rtol=1e-4)
        assert os.path.isfile(os.path.join(part, "train.1.log"))
        split = "--config.mesh.fsdp=-1" in t.mesh  # the run's mesh, as its log names it
        mesh = "{'data': 1, 'fsdp': 2}" if split else "{'data': 2, 'fsdp': 1}"
        assert f"Stage {t.name}: mesh {mesh} on 2 devices" in _log(part, 0)
        assert not glob.glob(os.path.join(part, "train.2.log"))


class TestVQGAN(TrainerTests):
    trainer = TRAINERS["vqgan"]


class TestART(TrainerTests):
    trainer = TRAINERS["art"]


class TestVQFR(TrainerTests):
    trainer = TRAINERS["vqfr"]

    # Three and a half minutes of CI on 2 cores (XLA:CPU compiles of the VQFR step): its bfloat16
    # branches are tested in tests/test_precision.py and the fsdp split of a state by the other
    # trainers' tests; `pytest -m extended` runs them. Its two-process run stays in CI.
    @pytest.mark.extended
    def test_bfloat16_training_learns_a_batch(self, stage1_dir):
        super().test_bfloat16_training_learns_a_batch(stage1_dir)

    @pytest.mark.extended
    def test_eight_device_step_matches_one_device(self, stage1_dir):
        super().test_eight_device_step_matches_one_device(stage1_dir)


class TestOSDFaceVRE(TrainerTests):
    trainer = TRAINERS["osdface_vre"]

    # Ten minutes of CI on 2 cores for the loop's multi-process code, three for its 8-device step
    # and three for its bfloat16 step (its XLA:CPU compile), which the other trainers' runs cover
    # (the OSDFace stage-2 trainer's included); `pytest -m extended` runs them.
    @pytest.mark.extended
    def test_bfloat16_training_learns_a_batch(self, stage1_dir):
        super().test_bfloat16_training_learns_a_batch(stage1_dir)

    @pytest.mark.extended
    def test_eight_device_step_matches_one_device(self, stage1_dir):
        super().test_eight_device_step_matches_one_device(stage1_dir)

    @pytest.mark.extended
    @pytest.mark.slow
    @pytest.mark.multiprocess
    def test_two_processes_train_and_resume_like_one_process_on_two_devices(
        self, stage1_dir, tmp_path
    ):
        super().test_two_processes_train_and_resume_like_one_process_on_two_devices(
            stage1_dir, tmp_path
        )


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


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _check_outputs(t: Trainer, workdir: str) -> None:
    """What a finished run leaves: train losses at every log step, eval metrics, TensorBoard
    events, eval grids, the last checkpoint with its config."""
    config = t.tiny_config()
    logged = sorted(trainers.train_losses(workdir))
    assert logged == list(range(config.log_every, STEPS + 1, config.log_every)), logged
    assert all(np.isfinite(v) for v in trainers.train_losses(workdir).values())
    evals = [r for r in trainers.jsonl(workdir) if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [STEPS // 2, STEPS], evals
    for r in evals:
        assert all(np.isfinite(r[f"eval/{k}"]) for k in t.eval_keys), r
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    grids = sorted(os.path.basename(g) for g in glob.glob(f"{workdir}/samples/{t.name}_*.png"))
    assert grids == [f"{t.name}_step{s:07d}.png" for s in (STEPS // 2, STEPS)], grids
    ckdir = workdirs.checkpoint_dir(workdir)
    assert workdirs.latest_step(ckdir) == STEPS
    assert workdirs.read_config(ckdir)["trainer"] == t.name


def _check_console(t: Trainer, workdir: str, stderr: str) -> None:
    """Not a terminal: a line per log step instead of a bar, eval results, where outputs went, the
    log file's path last; absl/orbax INFO records only in the log file."""
    lines = stderr.splitlines()
    assert any(f"{t.name} step {STEPS}/{STEPS}, loss " in line for line in lines), lines
    assert any(line.startswith(f"{t.name} eval at step {STEPS}: ") for line in lines), lines
    assert any(line.startswith(f"{t.name}: done at step {STEPS}. Checkpoints: ") for line in lines)
    assert lines[-1] == f"Full log: {os.path.join(workdir, 'train.log')}", lines[-3:]
    assert not any(line.startswith(("I1", "I0")) for line in lines), lines[:20]
    with open(os.path.join(workdir, "train.log"), encoding="utf-8") as f:
        log = f.read()
    assert "CheckpointManager" in log and f"{t.name} eval at step {STEPS}" in log


def _env(devices: int) -> dict[str, str]:
    env = command_env()
    env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    return env


def _run(workdir, args, timeout=600, devices=1):
    return subprocess.run(
        _cmd(workdir, args),
        cwd=ROOT,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _log(workdir, process):
    name = "train.log" if process == 0 else f"train.{process}.log"
    with open(os.path.join(workdir, name), encoding="utf-8") as f:
        return f.read()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_and_signal(workdir, sig, after_step, args, *, processes=1, devices=1, only=None):
    """Starts a run (``processes`` processes on localhost, ``devices`` CPU devices each) and,
    unless ``sig`` is None, sends ``sig`` once a checkpoint of at least ``after_step`` exists:
    to process ``only``, or to all. Returns (exit codes, output of all processes).

    The output goes to files, not pipes: nothing reads a pipe while the run trains, and a full
    pipe would block the run's logging (and so the run) before its first checkpoint."""
    os.makedirs(workdir, exist_ok=True)
    flags = []
    if processes > 1:
        flags = [f"--coordinator_address=127.0.0.1:{_free_port()}", f"--num_processes={processes}"]
    logs, procs = [], []
    try:
        for i in range(processes):
            logs.append(tempfile.TemporaryFile("w+"))
            ids = [f"--process_id={i}"] if processes > 1 else []
            procs.append(
                subprocess.Popen(
                    _cmd(workdir, [*args, *flags, *ids]),
                    cwd=ROOT,
                    env=_env(devices),
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
            )
        deadline = time.time() + 900
        while sig is not None and time.time() < deadline and procs[0].poll() is None:
            if any(s >= after_step for s in _steps(workdir)):
                for i, proc in enumerate(procs):
                    if only is None or i == only:
                        os.killpg(proc.pid, sig)
                break
            time.sleep(0.2)
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(60, deadline - time.time())))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes.append(proc.wait())
        out = []
        for i, log in enumerate(logs):
            log.seek(0)
            out.append(f"--- process {i} ---\n{log.read()}")
        return codes, "\n".join(out)
    finally:
        for log in logs:
            log.close()
