"""Entry point: ``python -m artfr_jax.main --config=configs/vqgan.py[:VARIANT] --workdir=DIR``.

``config.trainer`` names the stage; any field can be overridden with ``--config.a.b=value`` and a
misspelt field is an error (the config is locked). A stage-II config with
``config.stage1.train_if_missing`` trains (or finishes) its stage-I tokenizer first.

The console shows a progress bar (or a line per ``config.log_every`` steps when it is not a
terminal), eval results and where the outputs went; the full log is ``WORKDIR/train.log``, and
``--verbosity=1`` puts it on the console too.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from artfr_jax.utils import compile_cache, console, host_memory  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Python config file (configs/NAME.py[:VARIANT]).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, for multi-process runs started by hand (e.g. two hosts).",
)
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])

TRAINERS = {
    "vqgan": "artfr_jax.train.vqgan_trainer",
    "art": "artfr_jax.train.art_trainer",
    "vqfr": "artfr_jax.train.vqfr_trainer",
    "osdface_vre": "artfr_jax.train.osdface_vre_trainer",
    "osdface": "artfr_jax.train.osdface_trainer",
}


def run(config, workdir: str):
    """Trains the stage named by ``config.trainer`` in ``workdir`` (usable from notebooks too),
    after its stage-I tokenizer when ``config.stage1.train_if_missing`` asks for it."""
    if config.trainer not in TRAINERS:
        raise ValueError(f"config.trainer={config.trainer!r}: expected one of {sorted(TRAINERS)}")
    from artfr_jax.train import stage1  # noqa: PLC0415

    if stage1.needs_training(config, workdir):
        directory = stage1.stage1_dir(config, workdir)
        with _stage1_lock(directory):  # sweep trials sharing one tokenizer train it once
            if stage1.needs_training(config, workdir):
                if jax.process_index() == 0:
                    console.say("Stage I first: %s in %s", config.stage1.config.trainer, directory)
                run(config.stage1.config, directory)
    trainer = importlib.import_module(TRAINERS[config.trainer])
    return trainer.train_and_evaluate(config, workdir)


@contextlib.contextmanager
def _stage1_lock(directory: str):
    """A file lock next to a local stage-I workdir, for one-process runs: a second run that
    needs the same tokenizer waits, then finds it trained. Several processes of one run train it
    together, so they take no lock."""
    if jax.process_count() > 1 or "://" in directory:
        yield
        return
    import filelock  # noqa: PLC0415

    path = os.path.normpath(directory) + ".lock"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=1)
    except filelock.Timeout:
        console.say("Waiting for another run that trains the tokenizer in %s", directory)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def initialize_distributed(from_cluster: bool) -> None:
    """``jax.distributed.initialize`` with the command's flags when they are given, or with the
    cluster's own description (TPU pod slice, SLURM, ...) when ``config.distributed`` is set."""
    given = {
        "coordinator_address": FLAGS.coordinator_address,
        "num_processes": FLAGS.num_processes,
        "process_id": FLAGS.process_id,
    }
    if any(v is not None for v in given.values()):
        missing = [f"--{k}" for k, v in given.items() if v is None]
        if missing:
            raise app.UsageError(
                f"multi-process flags: {', '.join(missing)} missing (give --coordinator_address, "
                "--num_processes and --process_id together)"
            )
        if not 0 <= FLAGS.process_id < FLAGS.num_processes:
            raise app.UsageError(
                f"--process_id={FLAGS.process_id}: expected 0 <= id < --num_processes="
                f"{FLAGS.num_processes}"
            )
        jax.distributed.initialize(**given)
    elif from_cluster:
        jax.distributed.initialize()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    console.route_logs(FLAGS.verbosity)
    console.import_quietly("tensorflow")  # the trainers' clu writers import it
    initialize_distributed(config.get("distributed", False))
    log_file = console.log_to_file(FLAGS.workdir, jax.process_index())
    logging.info("XLA compilation cache: %s", compile_cache.enable_persistent_cache() or "off")
    logging.info(
        "Process %d/%d, local devices %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_devices(),
    )
    try:
        run(config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        # A field or an input the run cannot use (a batch the devices do not divide, a missing
        # folder, a checkpoint of another model): its one line on the console, the traceback in
        # the log file.
        logging.info("Stopped by an error", exc_info=True)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"error: {first} (traceback: {log_file})", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        console.say("Full log: %s", log_file)


if __name__ == "__main__":
    host_memory.retain_freed_memory_on_cpu()  # before JAX starts a backend
    app.run(main)
