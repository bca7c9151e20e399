"""The main command as a user runs it: a misspelt field, runs sharing a tokenizer, native import
lines kept off the console (what the console shows, what the log file keeps, SIGTERM and SIGKILL +
resume, for every trainer: tests/test_trainers.py)."""

import logging
import os
import sys

import pytest

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


def test_a_shared_tokenizer_is_trained_by_one_run_at_a_time(tmp_path):
    """Sweep trials that share ``config.stage1.workdir``: while one run holds the stage-I lock,
    another waits for it (and then re-checks whether stage I still needs training)."""
    import threading
    import time

    import filelock

    from artfr_jax import main

    stage1 = str(tmp_path / "stage1")
    entered = threading.Event()

    def second_run():
        with main._stage1_lock(stage1):
            entered.set()

    with filelock.FileLock(stage1 + ".lock"):  # the first run trains the tokenizer
        waiter = threading.Thread(target=second_run)
        waiter.start()
        time.sleep(2.0)
        assert not entered.is_set()
    waiter.join(timeout=30)
    assert entered.is_set()


def test_native_import_lines_go_to_the_log_not_the_console(tmp_path, monkeypatch, capfd, caplog):
    """TensorFlow prints C++ INFO lines on import on some CPUs whatever its log level: the main
    command imports it with stderr captured and logs the lines instead."""
    from artfr_jax.utils import console

    (tmp_path / "noisy_native.py").write_text("import os\nos.write(2, b'I0000 native note\\n')\n")
    (tmp_path / "broken_native.py").write_text(
        "import os\nos.write(2, b'E0000 why it failed\\n')\nraise ImportError('broken')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="artfr_jax.imports"):
        console.import_quietly("noisy_native")
    assert "I0000" not in capfd.readouterr().err
    assert "I0000 native note" in caplog.text
    with pytest.raises(ImportError, match="broken"):
        console.import_quietly("broken_native")
    assert "E0000 why it failed" in capfd.readouterr().err  # a failure keeps its own words
    console.import_quietly("no_such_module_here")  # left to the code that needs it
    for name in ("noisy_native", "broken_native"):
        sys.modules.pop(name, None)


def test_a_batch_the_devices_do_not_divide_is_a_one_line_error(tmp_path):
    """Three devices (three hosts of one device each behave the same) cannot split a batch of 8:
    one line naming the field on the console, the traceback in the log file."""
    workdir = tmp_path / "w"
    res = _run(str(workdir), [*BASE, "--config.mesh.data=-1"], timeout=300, devices=3)
    assert res.returncode == 1, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config.batch_size=8 must be divisible by the number"), last
    assert last.endswith(f"(traceback: {workdir / 'train.log'})"), last
    assert "Traceback" not in res.stderr
    assert "Traceback" in (workdir / "train.log").read_text()
