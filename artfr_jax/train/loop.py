"""The one training loop every stage uses.

A trainer module describes its stage with a :class:`Stage` (how to build the state, a pure train step,
an eval step, its data) and calls :func:`train_and_evaluate`. The loop owns everything else: mesh,
jit with shardings and donation, checkpoint/resume (state + data iterator + config), SIGTERM,
non-finite checks, metric writers, progress, periodic eval with image grids.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview, periodic_actions

from artfr_jax.train import checkpoint as ckpt_lib
from artfr_jax.train import sharding as sharding_lib
from artfr_jax.train import writers as writers_lib
from artfr_jax.utils import images as image_utils

PyTree = Any


class NonFiniteLossError(RuntimeError):
    """Raised when a logged loss is NaN or Inf; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a trainer hands the loop.

    init_state(rng, mesh) -> (state, state_shardings)
    train_step(state, batch, rng, frozen) -> (state, metrics)   pure; jitted here, state donated
    eval_step(state, batch, frozen) -> (sums, images)   ``sums``: per-batch sums of per-image metrics
        plus 'count' (masked by batch['mask']); ``images``: uint8 [B, H, W', 3] grid rows
    train_iterator(seed, process_index, process_count) -> grain DatasetIterator of host batches
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


# XLA's CPU pipeline erases optimisation barriers (pass ``cse_barrier_expander``) before its last
# CSE pass, which then merges every ``jax.checkpoint`` recomputation back into the forward pass, so
# remat would save no memory. GPU/TPU pipelines keep the barriers until after CSE by default.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def jit_train_step(step_fn: Callable[..., tuple[Any, dict]], state_shardings: PyTree, mesh):
    """``jax.jit`` of ``step_fn(state, batch, rng, frozen) -> (state, metrics)`` as training runs it.

    The batch is split over the mesh, rng, frozen arrays and metrics are replicated, the state is
    donated; on CPU the step keeps its remat barriers (:data:`CPU_COMPILER_OPTIONS`), so
    ``config.model.remat`` lowers memory there as it does on GPU/TPU.
    """
    repl = sharding_lib.replicated(mesh)
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh), repl, repl),
        out_shardings=(state_shardings, repl),
        donate_argnums=0,
        compiler_options=CPU_COMPILER_OPTIONS if on_cpu else None,
    )


class _Preemption:
    """Turns SIGTERM into a flag checked between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some notebook runners)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint after the current step.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def stage_data(config: ml_collections.ConfigDict) -> dict:
    """The ``train_iterator`` and ``eval_batches`` of a stage that reads ``config.data`` with
    ``config.batch_size`` and evaluates on ``config.eval.num_images`` held-out images."""
    from artfr_jax import data as data_lib  # noqa: PLC0415  (keeps the loop importable alone)

    return dict(
        train_iterator=lambda seed, pi, pc: data_lib.make_train_iterator(
            config.data,
            global_batch_size=config.batch_size,
            seed=seed,
            process_index=pi,
            process_count=pc,
        ),
        eval_batches=lambda: data_lib.make_eval_batches(
            config.data,
            num_images=config.eval.num_images,
            batch_size=config.eval.batch_size,
            seed=config.seed,
        ),
    )


def eval_lpips_params(config: ml_collections.ConfigDict, frozen: dict) -> dict:
    """``{'eval_lpips': params}`` for eval-time LPIPS, or ``{}``.

    The file is ``config.eval.lpips_weights``, else the perceptual loss's ``loss.lpips_weights``
    (then the loss's already loaded ``frozen['lpips']`` is reused rather than loaded twice).
    """
    path = config.eval.get("lpips_weights", "")
    if not path:
        if "lpips" in frozen:
            return {}
        loss = config.get("loss")
        path = loss.get("lpips_weights", "") if loss is not None else ""
    if not path:
        return {}
    from artfr_jax.losses import perceptual  # noqa: PLC0415

    return {"eval_lpips": perceptual.load_lpips_params(path)}


def eval_lpips(frozen: dict, x_u8: jax.Array, y_u8: jax.Array) -> dict:
    """``{'lpips': [B]}`` between uint8 images when eval LPIPS weights are loaded, else ``{}``."""
    params = frozen.get("eval_lpips", frozen.get("lpips"))
    if params is None:
        return {}
    from artfr_jax.losses import perceptual  # noqa: PLC0415

    x = x_u8.astype(jnp.float32) / 127.5 - 1.0
    y = y_u8.astype(jnp.float32) / 127.5 - 1.0
    return {"lpips": perceptual.lpips_distance(params, x, y)}


def _pad_to_multiple(batch: dict, multiple: int) -> dict:
    n = len(next(iter(batch.values())))
    pad = (-n) % multiple
    out = {
        k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) if pad else v for k, v in batch.items()
    }
    out["mask"] = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return out


def evaluate(eval_fn, state, frozen, mesh, batches: list[dict]):
    """Runs the eval step over host batches; returns (mean metrics, first batch's grid rows)."""
    n_dev = mesh.shape["data"] * mesh.shape["fsdp"]
    totals: dict[str, float] = {}
    grid = None
    for batch in batches:
        device_batch = sharding_lib.global_batch_to_devices(_pad_to_multiple(batch, n_dev), mesh)
        sums, rows = eval_fn(state, device_batch, frozen)
        sums = jax.device_get(sums)
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        if grid is None:
            grid = np.asarray(jax.device_get(rows))[: len(batch[next(iter(batch))])]
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
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = sharding_lib.make_mesh(config.mesh)
    sharding_lib.check_batch_size(config.batch_size, mesh)
    logging.info("Stage %s: mesh %s on %d devices", stage.name, dict(mesh.shape), mesh.size)

    root = jax.random.key(config.seed)
    init_rng, train_rng = jax.random.split(root)
    state, state_shardings = stage.init_state(init_rng, mesh)

    train_iter = stage.train_iterator(config.seed, jax.process_index(), jax.process_count())
    manager = ckpt_lib.make_manager(
        workdir, max_to_keep=config.max_checkpoints_to_keep, async_save=config.async_checkpointing
    )
    state, restored_step = ckpt_lib.restore(manager, state, state_shardings, train_iter)
    start_step = int(jax.device_get(state.step))
    if restored_step is not None:
        logging.info("Resuming %s from step %d", stage.name, start_step)

    writer = writers_lib.create_writer(workdir, is_main_process=is_main)
    if start_step == 0:
        writer.write_hparams(dict(_flatten(config.to_dict())))
        parameter_overview.log_parameter_overview(state.params)

    repl = sharding_lib.replicated(mesh)
    batch_sh = sharding_lib.batch_sharding(mesh)
    frozen = jax.device_put(stage.frozen, repl)
    train_fn = jit_train_step(stage.train_step, state_shardings, mesh)
    eval_fn = jax.jit(stage.eval_step, in_shardings=(state_shardings, batch_sh, repl))
    eval_batches = stage.eval_batches() if config.eval_every else []

    total = config.num_train_steps
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

    def run_eval(step):
        nonlocal last_eval
        if not eval_batches:
            return
        t0 = time.time()
        with jax.set_mesh(mesh):
            means, grid = evaluate(eval_fn, state, frozen, mesh, eval_batches)
        last_eval = means
        writer.write_scalars(step, {f"eval/{k}": v for k, v in means.items()})
        if is_main and grid is not None:
            writer.write_images(step, {"eval/grid": grid[None] if grid.ndim == 3 else grid})
            path = os.path.join(workdir, "samples", f"{stage.name}_step{step:07d}.png")
            image_utils.save_grid(grid, path)
        logging.info("Eval at step %d (%.1fs): %s", step, time.time() - t0, means)

    try:
        with _Preemption() as preemption, jax.set_mesh(mesh):
            step = start_step
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

                at_end = step == total
                log_now = step % config.log_every == 0 or at_end
                save_now = step % config.checkpoint_every == 0 or at_end or preemption.requested
                if log_now or save_now:
                    history = [(s, jax.device_get(m)) for s, m in history]
                    _check_finite(history)
                if log_now:
                    writer.write_scalars(
                        step, {f"train/{k}": v for k, v in _mean_metrics(history).items()}
                    )
                    history = []
                if config.eval_every and (step % config.eval_every == 0 or at_end):
                    run_eval(step)
                if save_now:
                    ckpt_lib.save(manager, step, state, train_iter, config, force=True)
                if preemption.requested:
                    logging.warning("Stopping at step %d after SIGTERM; checkpoint saved.", step)
                    break
            writer.flush()
    finally:
        manager.wait_until_finished()  # an async save in flight is kept even on an error
        manager.close()
        writer.close()
        if hasattr(train_iter, "close"):
            train_iter.close()  # stops grain worker processes
    return last_eval


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v if isinstance(v, int | float | str | bool) else str(v)


def to_float_image(x: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1] (done on device: uint8 moves 4x less data)."""
    return x.astype(jnp.float32) / 127.5 - 1.0


def to_uint8_image(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
