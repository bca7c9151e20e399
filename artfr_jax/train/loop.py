"""The one training loop every stage uses.

A trainer module describes its stage with a :class:`Stage` (how to build the state, a pure train step,
an eval step, its data) and calls :func:`train_and_evaluate`. The loop owns everything else: mesh,
jit with shardings and donation, checkpoint/resume (state + data iterator + config), SIGTERM,
non-finite checks, metric writers, progress, periodic eval with image grids.

Randomness: one root key from ``config.seed``, split into the init key, the train key (folded with
the step number at every step) and the eval key (the same at every eval, so evals compare).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview, periodic_actions
from etils import epath
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils
from tqdm import tqdm

from artfr_jax import workdirs
from artfr_jax.models import kernels as kernels_lib
from artfr_jax.train import checkpoint as ckpt_lib
from artfr_jax.train import sharding as sharding_lib
from artfr_jax.train import writers as writers_lib
from artfr_jax.utils import console
from artfr_jax.utils import images as image_utils

PyTree = Any


class NonFiniteLossError(RuntimeError):
    """Raised when a logged loss is NaN or Inf; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a trainer hands the loop.

    init_state(rng, mesh) -> (state, state_shardings)
    train_step(state, batch, rng, frozen) -> (state, metrics)   pure; jitted here, state donated
    eval_step(state, batch, rng, frozen) -> (sums, images)   ``sums``: per-batch sums of per-image
        metrics plus 'count' (masked by batch['mask']); ``images``: uint8 [B, H, W', 3] grid rows
    train_iterator(seed, shard_index, shard_count) -> grain DatasetIterator of this process's
        rows of each global batch (shard ``shard_index`` of ``shard_count`` equal blocks)
    eval_batches() -> list of host batches (held-out), may be empty
    frozen: pytree of fixed arrays (e.g. LPIPS weights) passed to the steps, not trained
    """

    name: str
    init_state: Callable[[jax.Array, Any], tuple[Any, PyTree]]
    train_step: Callable[..., tuple[Any, dict]]
    eval_step: Callable[..., tuple[dict, jax.Array]]
    train_iterator: Callable[[int, int, int], Iterator[dict]]
    eval_batches: Callable[[], list[dict]]
    frozen: PyTree = dataclasses.field(default_factory=dict)


def jit_train_step(step_fn: Callable[..., tuple[Any, dict]], state_shardings: PyTree, mesh):
    """``jax.jit`` of ``step_fn(state, batch, rng, frozen) -> (state, metrics)`` as training runs it.

    The batch is split over the mesh, rng, frozen arrays and metrics are replicated, the state is
    donated; compiled with the options the mesh's platform needs (``kernels.compiler_options``: on
    the CPU the step keeps its remat barriers, so ``config.model.remat`` lowers memory there too).
    """
    repl = sharding_lib.replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh), repl, repl),
        out_shardings=(state_shardings, repl),
        donate_argnums=0,
        compiler_options=kernels_lib.compiler_options(mesh.devices.flat),
    )


class _Preemption:
    """Turns SIGTERM into a stop after the current step, at the same step on every process.

    One process: a Python handler sets a flag. Several: JAX's preemption sync service (started by
    ``jax.distributed.initialize``) catches SIGTERM on any process, tells the others, and
    :meth:`check` is true on all of them at the same step; no Python handler is installed then,
    since it would replace the service's own.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._synced = jax.process_count() > 1

    def __enter__(self):
        if self._synced:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some notebook runners)
            self._previous = None
        return self

    def check(self, step: int) -> bool:
        """Called after every step on every process: whether to save and stop now."""
        if self._synced and not self.requested:
            if multihost_utils.reached_preemption_sync_point(step):
                logging.warning("Preemption notice: every process saves at step %d.", step)
                self.requested = True
        return self.requested

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint after the current step.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def stage_data(config: ml_collections.ConfigDict) -> dict:
    """The ``train_iterator`` and ``eval_batches`` of a stage that reads ``config.data`` with
    ``config.batch_size`` and evaluates on ``config.eval.num_images`` held-out images."""
    from artfr_jax.data import pipeline  # noqa: PLC0415  (keeps the loop importable alone)

    return dict(
        train_iterator=lambda seed, pi, pc: pipeline.make_train_iterator(
            config.data,
            global_batch_size=config.batch_size,
            seed=seed,
            process_index=pi,
            process_count=pc,
        ),
        eval_batches=lambda: pipeline.make_eval_batches(
            config.data,
            num_images=config.eval.num_images,
            batch_size=config.eval.batch_size,
            seed=config.seed,
        ),
    )


def _pad_to_multiple(batch: dict, multiple: int) -> dict:
    n = len(next(iter(batch.values())))
    pad = (-n) % multiple
    out = {
        k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) if pad else v for k, v in batch.items()
    }
    out["mask"] = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return out


_BARRIER_TIMEOUT_MS = 60 * 60 * 1000
_barrier_count = 0


def sync_processes(name: str) -> None:
    """Waits until every process reaches this point (a no-op on one process).

    It goes through the coordination service, not a device collective: CPU collectives (gloo) give
    up when a peer is 30 s late, and compile times differ that much between hosts. So the loop
    meets here before a program's first collective (after building the state, after compiling).
    """
    global _barrier_count
    client = jax_distributed.global_state.client
    if jax.process_count() == 1 or client is None:
        return
    _barrier_count += 1
    client.wait_at_barrier(f"artfr_jax/{_barrier_count}/{name}", _BARRIER_TIMEOUT_MS)


class _Compiled:
    """A jitted step compiled at its first call for each argument shape, every process meeting
    after the compile (:func:`sync_processes`)."""

    def __init__(self, jitted, name: str):
        self.jitted, self.name, self.compiled = jitted, name, {}

    def __call__(self, *args):
        leaves, treedef = jax.tree.flatten(args)
        key = (treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
        if key not in self.compiled:
            self.compiled[key] = self.jitted.lower(*args).compile()
            sync_processes(f"{self.name} compiled")
        return self.compiled[key](*args)


def to_host(tree: PyTree) -> PyTree:
    """NumPy copies of (possibly multi-process) arrays, on every process: a replicated array is
    read from this process's copy, a split one gathered from all processes (a collective, so
    every process calls it at the same point)."""

    def leaf(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(leaf, tree)


def to_global(tree: PyTree, sharding) -> PyTree:
    """``tree`` placed with ``sharding`` across every process: host (NumPy) values go straight to
    their devices; on several processes a device array is first brought to the host, since a
    process cannot move its own device's array onto another process's devices."""
    if jax.process_count() > 1:
        tree = jax.tree.map(
            lambda x: (
                x if isinstance(x, jax.Array) and not x.is_fully_addressable else np.asarray(x)
            ),
            tree,
        )
    return jax.device_put(tree, sharding)


def evaluate(eval_fn, state, rng, frozen, mesh, batches: list[dict]):
    """Runs the eval step over host batches (every process holds the same batches and feeds its
    rows of them); returns (mean metrics, first batch's grid rows), the same on every process."""
    n_dev = mesh.shape["data"] * mesh.shape["fsdp"]
    totals: dict[str, float] = {}
    grid = None
    for i, batch in enumerate(batches):
        padded = _pad_to_multiple(batch, n_dev)
        rows_here = sharding_lib.process_rows(mesh, len(padded["mask"]))
        local = {k: v[rows_here] for k, v in padded.items()}
        device_batch = sharding_lib.global_batch_to_devices(local, mesh)
        sums, rows = eval_fn(state, device_batch, jax.random.fold_in(rng, i), frozen)
        for k, v in to_host(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
        if grid is None:
            grid = to_host(rows)[: len(batch[next(iter(batch))])]
    count = totals.pop("count", 0.0)
    means = {k: v / max(count, 1.0) for k, v in totals.items()}
    return means, grid


def _check_finite(history: list[tuple[int, dict]]):
    for step, metrics in history:
        for k, v in metrics.items():
            if not np.all(np.isfinite(v)):
                raise NonFiniteLossError(
                    f"non-finite {k}={float(np.asarray(v).mean())} at step {step}; stopping. "
                    "The last good checkpoint is kept; lower the learning rate or check the data."
                )


def _mean_metrics(history: list[tuple[int, dict]]) -> dict[str, float]:
    keys = history[0][1].keys()
    return {k: float(np.mean([np.asarray(m[k]) for _, m in history])) for k in keys}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stage: Stage) -> dict:
    """Trains ``stage`` to ``config.num_train_steps``, resuming from the workdir if possible.

    Returns the last eval metrics (empty if none ran).
    """
    workdir = workdirs.resolve(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = sharding_lib.make_mesh(config.mesh)
    sharding_lib.check_batch_size(config.batch_size, mesh)
    logging.info("Stage %s: mesh %s on %d devices", stage.name, dict(mesh.shape), mesh.size)
    if is_main and (note := sharding_lib.per_device_batch_note(config.batch_size, mesh)):
        logging.warning("%s", note)

    root = jax.random.key(config.seed)
    init_rng, train_rng, eval_rng = jax.random.split(root, 3)
    state, state_shardings = stage.init_state(init_rng, mesh)
    sync_processes(f"{stage.name} state built")

    shard, shard_count = sharding_lib.data_shard(mesh, config.batch_size)
    train_iter = stage.train_iterator(config.seed, shard, shard_count)
    manager = ckpt_lib.make_manager(
        workdir, max_to_keep=config.max_checkpoints_to_keep, async_save=config.async_checkpointing
    )
    state, restored_step = ckpt_lib.restore(manager, state, state_shardings, train_iter)
    start_step = int(to_host(state.step))
    total = config.num_train_steps
    if is_main:
        if restored_step is not None:
            console.say("Resuming %s from step %d", stage.name, start_step)
        platforms = ",".join(sorted({d.platform for d in mesh.devices.flat}))
        console.say(
            "%s: %d steps in %s on %d %s device(s)",
            stage.name,
            total,
            workdir,
            mesh.size,
            platforms,
        )

    writer = writers_lib.create_writer(workdir, is_main_process=is_main)
    if start_step == 0:
        writer.write_hparams(dict(_flatten(config.to_dict())))
        # Statistics would fetch every parameter; across processes only shapes are logged.
        parameter_overview.log_parameter_overview(
            state.params, include_stats=jax.process_count() == 1
        )

    repl = sharding_lib.replicated(mesh)
    batch_sh = sharding_lib.batch_sharding(mesh)
    frozen = to_global(stage.frozen, repl)
    train_fn = _Compiled(jit_train_step(stage.train_step, state_shardings, mesh), "train step")
    eval_fn = _Compiled(
        jax.jit(
            stage.eval_step,
            in_shardings=(state_shardings, batch_sh, repl, repl),
            out_shardings=(repl, batch_sh),
        ),
        "eval step",
    )
    eval_batches = stage.eval_batches() if config.eval_every else []

    hooks = []
    if is_main:
        hooks.append(
            periodic_actions.ReportProgress(
                num_train_steps=total, writer=writer, every_steps=config.log_every, every_secs=None
            )
        )
    if is_main and config.get("profile", False):
        hooks.append(
            periodic_actions.Profile(logdir=workdir, num_profile_steps=5, first_profile=10)
        )
    last_eval: dict = {}
    history: list[tuple[int, dict]] = []
    progress = _Progress(stage.name, start_step, total, enabled=is_main)

    def run_eval(step):
        nonlocal last_eval
        if not eval_batches:
            return
        t0 = time.time()
        with jax.set_mesh(mesh):
            means, grid = evaluate(eval_fn, state, eval_rng, frozen, mesh, eval_batches)
        last_eval = means
        writer.write_scalars(step, {f"eval/{k}": v for k, v in means.items()})
        if is_main and grid is not None:
            writer.write_images(step, {"eval/grid": grid[None] if grid.ndim == 3 else grid})
            path = workdirs.join(workdir, "samples", f"{stage.name}_step{step:07d}.png")
            image_utils.save_grid(grid, path)
        if is_main:
            shown = " ".join(f"{k}={v:.4g}" for k, v in means.items())
            console.say(
                "%s eval at step %d: %s (%.1f s)", stage.name, step, shown, time.time() - t0
            )

    step = start_step
    try:
        with _Preemption() as preemption, jax.set_mesh(mesh), progress:
            while step < total:
                host_batch = next(train_iter)
                batch = sharding_lib.global_batch_to_devices(host_batch, mesh)
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, metrics = train_fn(
                        state, batch, jax.random.fold_in(train_rng, step), frozen
                    )
                step += 1
                history.append((step, metrics))
                for hook in hooks:
                    hook(step)
                progress.update(step)

                at_end = step == total
                log_now = step % config.log_every == 0 or at_end
                stop_now = preemption.check(step)
                save_now = step % config.checkpoint_every == 0 or at_end or stop_now
                if log_now or save_now:
                    history = [(s, to_host(m)) for s, m in history]
                    _check_finite(history)
                if log_now:
                    means = _mean_metrics(history)
                    writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
                    progress.log(step, means.get("loss"))
                    history = []
                if config.eval_every and (step % config.eval_every == 0 or at_end):
                    run_eval(step)
                if save_now:
                    ckpt_lib.save(manager, step, state, train_iter, config, force=True)
                if stop_now:
                    logging.warning("Stopping at step %d after SIGTERM; checkpoint saved.", step)
                    break
            writer.flush()
    finally:
        manager.wait_until_finished()  # an async save in flight is kept even on an error
        manager.close()
        writer.close()
        if hasattr(train_iter, "close"):
            train_iter.close()  # stops grain worker processes
    if is_main and step >= total:
        console.say(
            "%s: done at step %d. Checkpoints: %s; eval grids: %s; TensorBoard events and "
            "metrics.jsonl: %s",
            stage.name,
            step,
            workdirs.checkpoint_dir(workdir),
            workdirs.join(workdir, "samples"),
            workdir,
        )
    return last_eval


class _Progress:
    """Training progress for the user: a bar per stage on a terminal, else a line at every log
    step (log files and CI keep one line per ``config.log_every`` steps, not bar redraws)."""

    def __init__(self, name: str, start: int, total: int, *, enabled: bool):
        self.name, self.total, self.enabled = name, total, enabled
        self.last_step, self.last_time = start, time.perf_counter()
        self.bar = tqdm(
            total=total,
            initial=start,
            desc=name,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not (enabled and sys.stderr.isatty()),
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def update(self, step: int) -> None:
        self.bar.update(step - self.bar.n)

    def log(self, step: int, loss: float | None) -> None:
        if not self.enabled:
            return
        if not self.bar.disable:
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            return
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        eta = (self.total - step) / max(rate, 1e-9)
        shown = f", loss {loss:.4g}" if loss is not None else ""
        console.say(
            "%s step %d/%d%s, %.2f steps/s, %s left",
            self.name,
            step,
            self.total,
            shown,
            rate,
            _duration(eta),
        )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v if isinstance(v, int | float | str | bool) else str(v)
