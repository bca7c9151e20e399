"""Orbax checkpointing of train state, data iterator and config in one ``Composite``.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,config}``. Restoring reads the state straight into
its shardings, and the grain iterator continues with exactly the records it would have produced.
Reading a workdir without training code (its latest step, config, parameters): ``artfr_jax.workdirs``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import flags, logging

from artfr_jax import workdirs
from artfr_jax.train import state as state_lib

# Orbax's flag: barriers through the coordination service instead of a device collective.
_ORBAX_BARRIER_FLAG = "experimental_orbax_use_distributed_barrier"


def _use_coordination_barriers() -> None:
    """On several processes, makes orbax meet through the coordination service.

    By default orbax's barrier is a device all-reduce, and an async save runs it on a background
    thread while the main thread runs the train step's collectives. CPU collectives (gloo) are
    matched by their order on each process, so the two interleave differently on two hosts and
    the run hangs at a save. Coordination-service barriers are no device collective at all. A
    value the user gave on the command line is kept.
    """
    if jax.process_count() == 1 or _ORBAX_BARRIER_FLAG not in flags.FLAGS:
        return
    flag = flags.FLAGS[_ORBAX_BARRIER_FLAG]
    if not flag.present:
        flag.parse(True)  # also readable before absl parses argv (notebooks, tests)


def make_manager(
    workdir: str, *, max_to_keep: int = 3, async_save: bool = True
) -> ocp.CheckpointManager:
    _use_coordination_barriers()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(
        workdirs.checkpoint_dir(workdir), options=options, item_names=workdirs.ITEMS
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iterator: Any | None,
    config: ml_collections.ConfigDict,
    *,
    force: bool = False,
) -> bool:
    items = {
        "state": ocp.args.StandardSave(state),
        "config": ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
    }
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
        logging.info("Saving checkpoint at step %d to %s", step, manager.directory)
    return saved


def restore(
    manager: ocp.CheckpointManager,
    state: Any,
    state_shardings: Any,
    data_iterator: Any | None,
    step: int | None = None,
) -> tuple[Any, int | None]:
    """Restores the latest (or given) step in place of ``state``; returns (state, step or None)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return state, None
    target = state_lib.abstract_with_shardings(state_shardings, state)
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )
    if data_iterator is not None:
        _restore_data(manager, step, data_iterator)
    logging.info("Restored checkpoint of step %d from %s", step, manager.directory)
    return restored["state"], step


def _saved_setting(directory: str) -> str:
    """Best effort: the process count and batch size the saved iterator state came from."""
    try:
        name = sorted(f for f in os.listdir(directory) if f.endswith(".json"))[0]
        with open(os.path.join(directory, name)) as f:
            saved = json.load(f)
        return f"process_count={saved['process_count']}, per-process batch={saved['batch_size']}"
    except (OSError, IndexError, ValueError, KeyError, TypeError):
        return "unknown settings"


def _restore_data(manager: ocp.CheckpointManager, step: int, data_iterator: Any) -> None:
    """Puts the saved data-iterator position into ``data_iterator``, or raises a one-line error.

    The position is a record count in the run's global example stream, so it resumes with any
    number of data workers; the source, the seed and the number of processes must stay.
    """
    try:
        manager.restore(
            step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator))
        )
    except (KeyError, ValueError, TypeError, IndexError) as e:
        directory = os.path.join(str(manager.directory), str(step), "data")
        raise ValueError(
            f"{directory}: the saved data-iterator state does not fit this run's data pipeline "
            f"({type(e).__name__}: {e}); it was saved with {_saved_setting(directory)} - resume "
            "with the data source, seed and number of processes the run started with"
        ) from None
