"""The main command as a user runs it: a misspelt field (what the console shows, what the log file
keeps, SIGTERM and SIGKILL + resume, for every trainer: tests/test_trainers.py)."""

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
