r"""Stage-I (VQGAN) train step: compile time, median step time, compiled memory analysis.

    python -m benchmarks.train_step --config=smoke
    python -m benchmarks.train_step --config=paper --batch=2 --steps=3
    python -m benchmarks.train_step --config=paper --memory-only --batch=6 [--dtype=bfloat16]
    python -m benchmarks.train_step --config=paper --batch=24 --remat --dtype=bfloat16  # a GPU
    python -m benchmarks.train_step --config=tiny --batch=2 --steps=1   # the tests' model

The batch is random uint8 data placed on the devices once, so the numbers are the step alone (the
input pipeline has its own benchmark). The paper config includes the LPIPS term with random VGG weights
(same compute as the real ones). ``--dtype`` is the compute dtype (``config.model.dtype``; float32
unless given, the CPU's), ``--kernels`` the kernel switch (``config.model.kernels``). Times: median
of ``--steps`` runs after ``--warmup`` runs; the compile time includes tracing and lowering. FLOPs
and share of peak as in ``benchmarks.art_train_step``; a step that does not fit in the free memory
is not run, and the script exits with status 3.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from artfr_jax.losses import perceptual  # noqa: E402
from artfr_jax.models import factory, layers  # noqa: E402
from artfr_jax.train import loop, sharding, vqgan_trainer  # noqa: E402
from benchmarks import results  # noqa: E402
from benchmarks.art_train_step import (  # noqa: E402
    EXIT_DOES_NOT_FIT,
    compiled_flops,
    print_memory_analysis,
    time_steps_and_record,
)
from configs import vqgan as vqgan_config  # noqa: E402


def build(
    config_name: str,
    batch: int | None,
    remat: bool = False,
    dtype: str = "float32",
    kernels: str = "auto",
):
    config = vqgan_config.get_config(None if config_name == "paper" else config_name)
    config.model.update(remat=layers.remat_mode(remat), dtype=dtype, kernels=kernels)
    config.mesh.update(data=-1, fsdp=1)
    n_dev = len(jax.devices())
    if batch is not None:
        config.batch_size = batch * n_dev
    config.loss.perceptual = "off"
    stage = vqgan_trainer.make_stage(config)
    frozen, lpips = {}, None
    if config_name == "paper":
        lpips = perceptual.LPIPS(dtype=factory.policy(config.model)["dtype"])
        size = config.data.image_size
        x = jnp.zeros((1, size, size, 3))
        frozen = {"lpips": lpips.init(jax.random.key(1), x, x)["params"]}
    vqgan, disc = vqgan_trainer.make_models(config)
    tx = vqgan_trainer.make_optimizer(config)
    step_fn = lambda s, b, r, f: vqgan_trainer.train_step(  # noqa: E731
        s, b, r, f, config=config, vqgan=vqgan, disc=disc, lpips=lpips, tx=tx
    )
    return config, stage, step_fn, frozen


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=["smoke", "tiny", "paper"], default="smoke")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch size")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--remat", action="store_true", help="rematerialise VQGAN residual blocks")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--kernels", choices=["auto", "xla", "cpu"], default="auto")
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()

    config, stage, step_fn, frozen = build(
        args.config, args.batch, args.remat, args.dtype, args.kernels
    )
    mesh = sharding.make_mesh(config.mesh)
    size = config.data.image_size
    n = config.batch_size
    dev = jax.devices()[0]
    print(
        f"backend={jax.default_backend()} device={dev.device_kind} devices={len(jax.devices())} "
        f"config={args.config} image={size}px global_batch={n} dtype={args.dtype} "
        f"kernels={args.kernels} remat={args.remat}"
    )
    state, shardings = stage.init_state(jax.random.key(0), mesh)
    host = {"hq": np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)}
    with jax.set_mesh(mesh):
        batch = sharding.global_batch_to_devices(host, mesh)
        jitted = loop.jit_train_step(step_fn, shardings, mesh)  # as training compiles it
        t0 = time.perf_counter()
        lowered = jitted.lower(state, batch, jax.random.key(0), frozen)
        lower_s = time.perf_counter() - t0
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        print(f"compile_time_s={compile_s:.2f} (trace and lower {lower_s:.2f})")
        flops = compiled_flops(compiled)
        fits = print_memory_analysis(compiled, dev)
        if not fits:
            results.record("train_step", fits=False, batch=n, remat=args.remat)
        if args.memory_only:
            return
        if not fits:
            sys.exit(EXIT_DOES_NOT_FIT)
        time_steps_and_record(
            "train_step",
            compiled,
            state,
            batch,
            frozen,
            args=args,
            n=n,
            size=size,
            flops=flops,
            dev=dev,
            compile_s=compile_s,
        )


if __name__ == "__main__":
    main()
