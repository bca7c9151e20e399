"""The main command as a user runs it: overrides, a misspelt field, SIGTERM and SIGKILL + resume
(stage I, ART-FR stage II and VQFR stage II)."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from artfr_jax.train import writers as writers_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10
BASE = [
    "--config=configs/vqgan.py:tiny",
    f"--config.num_train_steps={STEPS}",
    "--config.eval_every=0",
]
# Stage II trains its tiny tokenizer first (in <workdir>/stage1) when none is named.
BASES = {
    "vqgan": BASE,
    **{
        t: [
            f"--config=configs/{t}.py:tiny",
            f"--config.num_train_steps={STEPS}",
            "--config.eval_every=0",
        ]
        for t in ("art", "vqfr")
    },
}


def _env():
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


def _cmd(workdir, *extra, base=BASE):
    return [sys.executable, "-m", "artfr_jax.main", *base, f"--workdir={workdir}", *extra]


def _run(workdir, *extra, timeout=600, base=BASE):
    return subprocess.run(
        _cmd(workdir, *extra, base=base),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _start_and_signal(workdir, sig, after_step, *extra, base=BASE):
    """Starts a run and sends ``sig`` once a checkpoint of at least ``after_step`` exists.

    The run's output goes to a file, not a pipe: nothing reads a pipe while the run trains, and a
    full pipe would block the run's logging (and so the run) before its first checkpoint."""
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            _cmd(workdir, "--config.checkpoint_every=2", *extra, base=base),
            cwd=ROOT,
            env=_env(),
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


def _losses(workdir):
    rows = writers_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_misspelt_config_field_is_an_error(tmp_path):
    res = _run(str(tmp_path / "w"), "--config.optimizer.learnig_rate=1e-3", timeout=300)
    assert res.returncode != 0
    assert "learnig_rate" in res.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.slow
@pytest.mark.parametrize("trainer", sorted(BASES))
def test_sigterm_saves_and_sigkill_resumes_like_an_uninterrupted_run(tmp_path, trainer):
    base = BASES[trainer]
    full = str(tmp_path / "full")
    res = _run(full, base=base)
    assert res.returncode == 0, res.stderr[-3000:]
    # The interrupted stage-II run reuses the tokenizer the full run trained.
    extra = [f"--config.stage1.workdir={full}/stage1"] if trainer != "vqgan" else []

    part = str(tmp_path / "part")
    code, out = _start_and_signal(part, signal.SIGTERM, 2, *extra, base=base)
    assert code == 0, out[-3000:]
    assert "SIGTERM" in out
    stopped_at = _steps(part)[-1]
    assert 2 <= stopped_at < STEPS

    code, out = _start_and_signal(part, signal.SIGKILL, stopped_at + 2, *extra, base=base)
    assert code == -signal.SIGKILL, out[-3000:]
    killed_after = _steps(part)[-1]
    assert killed_after > stopped_at

    res = _run(part, *extra, base=base)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Resuming {trainer} from step {killed_after}" in res.stderr
    a, b = _losses(full), _losses(part)
    resumed = [s for s in a if s > killed_after]
    assert resumed, (a, killed_after)
    for s in resumed:
        np.testing.assert_allclose(b[s], a[s], rtol=1e-6, err_msg=f"step {s}")
