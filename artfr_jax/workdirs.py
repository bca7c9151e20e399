"""What a training run left in its workdir, read without any training code: the newest checkpoint
step, the config saved with it, and parts of its train state.

Layout (written by ``train/checkpoint.py``): ``WORKDIR/checkpoints/<step>/{state,data,config}``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

ITEMS = ("state", "data", "config")


def resolve(path: str) -> str:
    """A local path made absolute; ``gs://`` and other URIs as given."""
    return path if "://" in path else os.path.abspath(path)


def join(path: str, *names: str) -> str:
    """``path/name/...`` for local paths and URIs alike."""
    return os.fspath(epath.Path(path).joinpath(*names))


def checkpoint_dir(workdir: str) -> str:
    """``WORKDIR/checkpoints``; local paths made absolute, ``gs://`` and other URIs kept."""
    return join(resolve(workdir), "checkpoints")


def _manager(directory: str) -> ocp.CheckpointManager:
    """A reader of ``directory`` for this process alone: reading a workdir never waits for the
    other processes of a multi-process job (only training saves are collective)."""
    me = jax.process_index()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_read_only_notes)
    try:
        options = ocp.CheckpointManagerOptions(
            create=False,
            read_only=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"read{me}"
            ),
        )
        return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)
    finally:
        absl_logger.removeFilter(_read_only_notes)


def _read_only_notes(record: logging.LogRecord) -> bool:
    """Drops orbax's warnings that a reader's manager is read-only (what it is asked to be),
    printed on every read of a workdir."""
    message = record.getMessage()
    return not (
        message.startswith("Given directory is read only")
        or "read_only=True, setting save_interval_steps=0" in message
    )


def latest_step(directory: str) -> int | None:
    """The newest checkpoint step under ``directory`` (``WORKDIR/checkpoints``), or None."""
    if not epath.Path(directory).is_dir():
        return None
    return _manager(directory).latest_step()


def _step(manager: ocp.CheckpointManager, directory: str, step: int | None) -> int:
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory}: no checkpoint found")
    return step


def read_config(directory: str, step: int | None = None) -> dict:
    """The config saved with a checkpoint, as a plain dict."""
    manager = _manager(directory)
    step = _step(manager, directory, step)
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(restored["config"])


def restore_subtree(directory: str, target: Any, step: int | None = None) -> Any:
    """Reads only the leaves of the saved train state named by ``target`` (a pytree of
    ``ShapeDtypeStruct`` shaped like a part of the state, e.g. ``{'params': {'generator': ...}}``)
    onto the default device; the rest of the checkpoint (optimizer state, other models) is not read.
    """
    manager = _manager(directory)
    step = _step(manager, directory, step)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
    args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(state=args))
    return restored["state"]


def trained_config(directory: str, trainer: str, what: str) -> tuple[str, dict, str]:
    """``(checkpoint dir, its saved config, 'ema_params' or 'params')`` of a ``trainer`` workdir.

    ``what`` names the flag or field that pointed at ``directory``, for the error messages.
    """
    ckdir = checkpoint_dir(directory)
    if latest_step(ckdir) is None:
        raise FileNotFoundError(f"{what}={directory}: no checkpoint (expected {ckdir}/<step>/)")
    saved = read_config(ckdir)
    if saved.get("trainer") != trainer:
        raise ValueError(
            f"{what}={directory}: expected a {trainer!r} checkpoint, found "
            f"trainer={saved.get('trainer')!r}"
        )
    key = "ema_params" if saved["optimizer"].get("ema_decay", 0.0) > 0 else "params"
    return ckdir, saved, key
