"""The main command as a user runs it: overrides, a misspelt field, what the console shows and what
the log file keeps (SIGTERM and SIGKILL + resume for every trainer: tests/test_trainers.py)."""

import os

from tests.test_trainers import _run

BASE = [
    "--config=configs/vqgan.py:tiny",
    "--config.num_train_steps=4",
    "--config.log_every=2",
    "--config.eval_every=4",
]


def test_misspelt_config_field_is_an_error(tmp_path):
    res = _run(str(tmp_path / "w"), [*BASE, "--config.optimizer.learnig_rate=1e-3"], timeout=300)
    assert res.returncode != 0
    assert "learnig_rate" in res.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_console_shows_progress_and_results_and_the_log_file_keeps_the_rest(tmp_path):
    workdir = tmp_path / "w"
    res = _run(str(workdir), BASE)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stderr.splitlines()
    # Not a terminal: a line per log step instead of a bar; then eval results and the outputs.
    assert any(line.startswith("vqgan step 2/4, loss ") for line in lines), lines
    assert any(line.startswith("vqgan eval at step 4: ") and "psnr=" in line for line in lines)
    assert any(line.startswith("vqgan: done at step 4. Checkpoints: ") for line in lines)
    assert lines[-1] == f"Full log: {workdir / 'train.log'}"
    # No absl/orbax INFO records on the console: they are in the log file.
    assert not any(line.startswith("I1") or line.startswith("I0") for line in lines), lines[:20]
    assert len(lines) < 20, lines
    log = (workdir / "train.log").read_text()
    assert "CheckpointManager" in log and "vqgan eval at step 4" in log

    verbose = _run(str(tmp_path / "v"), [*BASE, "--verbosity=1"])
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "CheckpointManager" in verbose.stderr  # the full log on the console too
    assert "vqgan eval at step 4" in verbose.stderr
