"""Every trainer's main command on two processes (localhost, one CPU device each, gloo
collectives), as a two-host user runs it: train, evaluate, checkpoint, SIGKILL of both and resume,
with the losses of one process on two devices; for the stage-I trainer also SIGTERM, on one
process (the Python handler) and to one of two processes (JAX's preemption sync).

Marked ``multiprocess`` and left out of the default run (``pyproject.toml``) for CI time:
``pytest -m multiprocess tests/test_multiprocess.py``.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import tempfile
import time

import numpy as np
import pytest

from artfr_jax import workdirs
from tests import trainers
from tests.test_trainers import _cmd, _steps, command_env
from tests.trainers import TRAINERS, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10  # of the main-command runs
pytestmark = pytest.mark.multiprocess


class MultiProcessTests:
    trainer: Trainer

    @pytest.fixture(scope="class")
    def stage1_dir(self, tmp_path_factory) -> str | None:
        if not self.trainer.stage1:
            return None
        return self.trainer.train_stage1(str(tmp_path_factory.mktemp(f"{self.trainer.name}_s1")))

    @pytest.mark.slow
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
            "--config.mesh.data=-1",
        ]
        full = str(tmp_path / "full")
        if t.name == "vqgan":
            (code,), out = _start_and_signal(full, signal.SIGTERM, 2, base, devices=2)
            assert code == 0 and "SIGTERM" in out, out[-3000:]
            assert 2 <= _steps(full)[-1] < STEPS
        extra = [f"--config.stage1.workdir={stage1_dir}"] if t.stage1 else []
        res = _run(full, base + extra, devices=2)
        assert res.returncode == 0, res.stderr[-3000:]
        _check_outputs(t, full)

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
        resumed = [s for s in a if s > killed_after]
        assert resumed, (a, killed_after)
        for s in resumed:
            np.testing.assert_allclose(b[s], a[s], rtol=1e-5, err_msg=f"step {s}")
        evals = [r for r in trainers.jsonl(part) if any(k.startswith("eval/") for k in r)]
        assert [r["step"] for r in evals] == [STEPS]  # written once, by process 0
        (ref,) = [r for r in trainers.jsonl(full) if any(k.startswith("eval/") for k in r)]
        for k in t.eval_keys:
            np.testing.assert_allclose(evals[0][f"eval/{k}"], ref[f"eval/{k}"], rtol=1e-4)
        assert os.path.isfile(os.path.join(part, "train.1.log"))
        assert not glob.glob(os.path.join(part, "train.2.log"))


class TestVQGAN(MultiProcessTests):
    trainer = TRAINERS["vqgan"]


class TestART(MultiProcessTests):
    trainer = TRAINERS["art"]


class TestVQFR(MultiProcessTests):
    trainer = TRAINERS["vqfr"]


class TestOSDFaceVRE(MultiProcessTests):
    trainer = TRAINERS["osdface_vre"]


class TestOSDFace(MultiProcessTests):
    trainer = TRAINERS["osdface"]


def _check_outputs(t: Trainer, workdir: str) -> None:
    """What a finished run leaves: train losses at every log step, eval metrics, TensorBoard
    events, eval grids, the last checkpoint with its config."""
    config = t.tiny_config()
    logged = sorted(trainers.train_losses(workdir))
    assert logged == list(range(config.log_every, STEPS + 1, config.log_every)), logged
    assert all(np.isfinite(v) for v in trainers.train_losses(workdir).values())
    (last,) = [r for r in trainers.jsonl(workdir) if any(k.startswith("eval/") for k in r)]
    assert all(np.isfinite(last[f"eval/{k}"]) for k in t.eval_keys), last
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    grids = sorted(os.path.basename(g) for g in glob.glob(f"{workdir}/samples/{t.name}_*.png"))
    assert grids == [f"{t.name}_step{STEPS:07d}.png"], grids
    ckdir = workdirs.checkpoint_dir(workdir)
    assert workdirs.latest_step(ckdir) == STEPS
    assert workdirs.read_config(ckdir)["trainer"] == t.name


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
