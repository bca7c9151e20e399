"""Entry point: ``python -m artfr_jax.main --config=configs/vqgan.py[:VARIANT] --workdir=DIR``.

``config.trainer`` names the stage; any field can be overridden with ``--config.a.b=value`` and a
misspelt field is an error (the config is locked).
"""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from artfr_jax.utils import compile_cache, host_memory  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Python config file (configs/NAME.py[:VARIANT]).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])

TRAINERS = {
    "vqgan": "artfr_jax.train.vqgan_trainer",
    "art": "artfr_jax.train.art_trainer",
    "vqfr": "artfr_jax.train.vqfr_trainer",
}


def run(config, workdir: str):
    """Dispatches to the trainer named by ``config.trainer`` (usable from notebooks too)."""
    if config.trainer not in TRAINERS:
        raise ValueError(f"config.trainer={config.trainer!r}: expected one of {sorted(TRAINERS)}")
    trainer = importlib.import_module(TRAINERS[config.trainer])
    return trainer.train_and_evaluate(config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    logging.info("XLA compilation cache: %s", compile_cache.enable_persistent_cache() or "off")
    if config.get("distributed", False):
        jax.distributed.initialize()
    logging.info(
        "Process %d/%d, local devices %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_devices(),
    )
    run(config, FLAGS.workdir)


if __name__ == "__main__":
    host_memory.retain_freed_memory()
    app.run(main)
