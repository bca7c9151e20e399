r"""VQFR stage-II train step: compile time, median step time, FLOPs and share of peak.

    python -m benchmarks.vqfr_train_step --config=smoke
    python -m benchmarks.vqfr_train_step --config=paper --batch=1 --steps=2
    python -m benchmarks.vqfr_train_step --config=paper --batch=2 --memory-only [--remat]
    [--dtype=bfloat16]    (compute dtype, ``config.model.dtype``; float32 unless given)

Random uint8 batches, random stage-I and LPIPS weights (same compute as trained ones; the
perceptual + style terms are included), all four discriminators and the lazy R1 step switched on
(the step counter is set past both GAN starts and to a multiple of ``r1_every``, so this is the
most expensive step of the run). Times: median of ``--steps`` runs after ``--warmup`` runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from artfr_jax.losses import perceptual  # noqa: E402
from artfr_jax.models import factory, layers  # noqa: E402
from artfr_jax.train import loop, sharding, vqfr_trainer  # noqa: E402
from benchmarks.art_train_step import print_memory_analysis, print_step_report  # noqa: E402
from configs import vqfr as vqfr_config  # noqa: E402


def build(
    config_name: str, per_device_batch: int | None, remat: bool = False, dtype: str = "float32"
):
    config = vqfr_config.get_config(None if config_name == "paper" else config_name)
    config.model.update(remat=layers.remat_mode(remat), dtype=dtype)
    config.mesh.update(data=-1, fsdp=1)
    if per_device_batch is not None:
        config.batch_size = per_device_batch * len(jax.devices())
    size = config.data.image_size
    x = jnp.zeros((1, size, size, 3))
    vqgan = factory.tokenizer(config.stage1.config.model.to_dict(), config.model.to_dict())
    vqgan_params = jax.jit(lambda k: vqgan.init(k, x)["params"])(jax.random.key(1))
    lpips_params = jax.jit(lambda k: perceptual.LPIPS().init(k, x, x)["params"])(jax.random.key(2))
    vqfr = factory.vqfr(config)
    discs = vqfr_trainer.make_discriminators(config)
    tx = vqfr_trainer.make_optimizer(config)
    init = functools.partial(
        vqfr_trainer.init_state,
        config=config,
        vqfr=vqfr,
        discs=discs,
        tx=tx,
        stage1_params=vqgan_params,
    )
    step = functools.partial(
        vqfr_trainer.train_step,
        config=config,
        vqfr=vqfr,
        vqgan=vqgan,
        discs=discs,
        lpips_on=True,
        tx=tx,
    )
    return config, init, step, {"vqgan": vqgan_params, "lpips": lpips_params}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=["smoke", "tiny", "paper"], default="smoke")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch size")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument(
        "--memory-only", action="store_true", help="compile and print memory; do not run"
    )
    parser.add_argument("--remat", action="store_true", help="config.model.remat=True")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()

    config, init, step_fn, frozen = build(args.config, args.batch, args.remat, args.dtype)
    mesh = sharding.make_mesh(config.mesh)
    size, n = config.data.image_size, config.batch_size
    dev = jax.devices()[0]
    print(
        f"backend={jax.default_backend()} device={dev.device_kind} devices={len(jax.devices())} "
        f"config={args.config} image={size}px global_batch={n} remat={args.remat} "
        f"dtype={args.dtype}"
    )
    state, shardings = init(jax.random.key(0), mesh)
    start = max(config.loss.gan_start, config.loss.main_gan_start) + 1
    start += (-start) % config.loss.r1_every
    state = state.replace(step=jnp.asarray(start, jnp.int32))
    rng = np.random.default_rng(0)
    host = {k: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for k in ("hq", "lq")}
    with jax.set_mesh(mesh):
        batch = sharding.global_batch_to_devices(host, mesh)
        repl = sharding.replicated(mesh)
        frozen = jax.device_put(frozen, repl)
        jitted = loop.jit_train_step(step_fn, shardings, mesh)  # as training compiles it
        t0 = time.perf_counter()
        compiled = jitted.lower(state, batch, jax.random.key(0), frozen).compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
        fits = print_memory_analysis(compiled, dev)
        if args.memory_only or not fits:
            print(
                f"compile: {compile_s:.1f} s; flops/step (XLA, per device): {flops / 1e9:.1f} GFLOP"
            )
            return
        times = []
        for i in range(args.warmup + args.steps):
            # the same (most expensive) step each time: reset the counter of the donated state
            state = state.replace(
                step=jax.device_put(jnp.asarray(start, jnp.int32), shardings.step)
            )
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch, jax.random.key(i), frozen)
            jax.block_until_ready(metrics)
            dt = time.perf_counter() - t0
            print(f"{'warm-up' if i < args.warmup else 'timed'} step {i}: {dt:.2f} s", flush=True)
            if i >= args.warmup:
                times.append(dt)
    print_step_report(compile_s, times, n, flops, dev, args.peak_tflops)


if __name__ == "__main__":
    main()
