"""Orbax checkpointing of train state, data iterator and config in one ``Composite``.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,config}``. Restoring reads the state straight into
its shardings, and the grain iterator continues with exactly the records it would have produced.
Reading a workdir without training code (its latest step, config, parameters): ``artfr_jax.workdirs``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import flags, logging
from etils import epath

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
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
    except Exception as e:  # noqa: BLE001 - orbax raises a bare Exception for unreadable arrays
        earlier = [s for s in manager.all_steps() if s < step]
        hint = f" to resume from step {max(earlier)}" if earlier else ""
        first = _root_message(e)
        raise ValueError(
            f"{os.path.join(str(manager.directory), str(step), 'state')}: cannot be read "
            f"({first}); if its files are damaged, move that step's folder out of the "
            f"checkpoints folder{hint}"
        ) from e
    if data_iterator is not None:
        _restore_data(manager, step, data_iterator)
    logging.info("Restored checkpoint of step %d from %s", step, manager.directory)
    return restored["state"], step


def _root_message(error: BaseException, limit: int = 300) -> str:
    """The first line of the innermost cause of ``error`` (orbax wraps tensorstore's own message
    in exceptions that print the whole array spec)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _saved_states(directory: str) -> dict[tuple[int, int], dict]:
    """The per-process iterator states grain wrote (``process_<i>-of-<n>.json``), by (i, n)."""
    states = {}
    for path in epath.Path(directory).glob("process_*-of-*.json"):
        match = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", path.name)
        if match:
            try:
                states[(int(match[1]), int(match[2]))] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
    return states


def _saved_setting(states: dict[tuple[int, int], dict]) -> str:
    """Best effort: the process count and batch size the saved iterator state came from."""
    try:
        saved = next(iter(states.values()))
        return f"process_count={saved['process_count']}, per-process batch={saved['batch_size']}"
    except (StopIteration, KeyError, TypeError):
        return "unknown settings"


def _restore_data(manager: ocp.CheckpointManager, step: int, data_iterator: Any) -> None:
    """Puts the saved data-iterator position into ``data_iterator``, or raises a one-line error.

    The position is a record count in the run's global example stream, so it resumes with any
    number of data workers, and with another number of processes when the global batch is the
    same (every process reads its own block of each global batch: the global batch count fixes
    everyone's position); the source and the seed must stay.
    """
    try:
        manager.restore(
            step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator))
        )
        return
    except (KeyError, ValueError, TypeError, IndexError, FileNotFoundError) as e:
        error = f"{type(e).__name__}: {e}"
    directory = os.path.join(str(manager.directory), str(step), "data")
    states = _saved_states(directory)
    state, why = _state_for_this_process_count(states, data_iterator)
    if state is None:
        raise ValueError(
            f"{directory}: the saved data-iterator state does not fit this run's data pipeline "
            f"({why or error}); it was saved with {_saved_setting(states)} - resume with the data "
            "source, seed and global batch the run started with"
        )
    data_iterator.set_state(state)
    saved = next(iter(states.values()))
    logging.info(
        "Data stream of %d processes resumed on %d at global batch %d",
        saved["process_count"],
        data_iterator.process_count,
        state["next_record"] // data_iterator.batch_size,
    )


def _state_for_this_process_count(
    states: dict[tuple[int, int], dict], data_iterator: Any
) -> tuple[dict | None, str]:
    """This process's iterator state from the states of a run with another number of processes
    and the same global batch; (None, why) when they do not give one."""
    count = getattr(data_iterator, "process_count", None)
    batch = getattr(data_iterator, "batch_size", None)
    if count is None or batch is None or not states:
        return None, ""
    counts = {n for _, n in states}
    if len(counts) != 1 or count in counts:
        return None, ""
    (saved_count,) = counts
    if len(states) != saved_count:
        return None, f"{len(states)} of the {saved_count} processes' states are readable"
    try:
        batches = {int(s["next_record"]) // int(s["batch_size"]) for s in states.values()}
        saved_global = {int(s["batch_size"]) * saved_count for s in states.values()}
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None, ""
    if saved_global != {batch * count}:
        return None, (
            f"saved with a global batch of {sorted(saved_global)[0]}, this run's is "
            f"{batch * count}: the position in the record stream would not fall on a batch"
        )
    if len(batches) != 1:
        return None, f"the saved processes stopped at different batches {sorted(batches)}"
    state = dict(data_iterator.get_state())
    state["next_record"] = batches.pop() * batch
    return state, ""
