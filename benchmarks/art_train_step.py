r"""Stage-II (ART-FR) train step: compile time, median step time, FLOPs and share of peak.

    python -m benchmarks.art_train_step --config=smoke
    python -m benchmarks.art_train_step --config=paper --batch=1 --steps=2
    python -m benchmarks.art_train_step --config=paper --batch=24 --dtype=bfloat16   # on a GPU
    python -m benchmarks.art_train_step --config=tiny --batch=2 --steps=1   # the tests' model

Random uint8 batches and random tokenizer weights (same compute as trained ones) are placed on the
devices once, so the numbers are the step alone. FLOPs come from XLA's cost analysis of the compiled
step; utilisation = FLOPs / step time / ``--peak-tflops`` (default: the dense bf16 peak of known
accelerators, none on CPU). Times: median of ``--steps`` runs after ``--warmup`` runs. A step whose
compiled buffers do not fit in the free memory is not run, and the script exits with status 3
(``EXIT_DOES_NOT_FIT``).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from artfr_jax import hyper  # noqa: E402
from artfr_jax.models import factory, layers  # noqa: E402
from artfr_jax.train import art_trainer, loop, sharding  # noqa: E402
from benchmarks import results  # noqa: E402
from configs import art as art_config  # noqa: E402

# Dense bf16 peak TFLOP/s per chip, without sparsity: NVIDIA's H100 and H200 data sheets (SXM 1979,
# H100 PCIe 1513, NVL 1671 TFLOP/s "with sparsity", halved), the A100 data sheet (312),
# Google Cloud's TPU v5p and v4 pages. The first name found in ``device_kind`` wins, so the PCIe and
# NVL cards come before the SXM one ("NVIDIA H100 80GB HBM3").
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200 NVL": 835.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v5p": 459.0,
    "TPU v4": 275.0,
}
EXIT_DOES_NOT_FIT = 3  # exit status of the step benchmarks when the step does not fit in memory


def peak_tflops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def compiled_flops(compiled) -> float:
    """FLOPs of one run of a compiled program by XLA's cost analysis (0 when not reported). XLA
    counts what the optimised program executes, per device: recomputation under remat included,
    custom calls it cannot see into (cuDNN's fused attention) not."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def time_steps_and_record(
    name, compiled, state, batch, frozen, *, args, n, size, flops, dev, compile_s
) -> None:
    """Times ``args.steps`` calls of a compiled train step after ``args.warmup``, prints the step
    report and writes its record (``benchmarks/results.py``)."""
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, jax.random.key(i), frozen)
        jax.block_until_ready(metrics)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    report = print_step_report(compile_s, times, n, flops, dev, args.peak_tflops)
    results.record(
        name,
        fits=True,
        config=args.config,
        batch=n,
        image_size=size,
        dtype=args.dtype,
        remat=args.remat,
        device=dev.device_kind,
        **report,
    )


def print_step_report(compile_s, times, n, flops, dev, peak_arg=None) -> dict:
    """Prints compile time, median step time (images/s) and FLOP utilisation of a timed train
    step; returns them (seconds, TFLOP/s, percent) for :mod:`benchmarks.results`."""
    med = statistics.median(times)
    report = dict(compile_s=compile_s, step_s=med, images_per_s=n / med, steps=len(times))
    print(f"compile: {compile_s:.1f} s")
    print(
        f"step: median {med * 1e3:.1f} ms over {len(times)} runs "
        f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}); "
        f"{n / med:.2f} images/s"
    )
    if flops:
        achieved = flops / med / 1e12
        peak = peak_arg or peak_tflops(dev)
        report.update(gflops=flops / 1e9, tflops_per_s=achieved, peak_tflops=peak)
        line = f"flops/step (XLA, per device): {flops / 1e9:.1f} GFLOP; achieved {achieved:.2f} TFLOP/s"
        if peak:
            report["peak_percent"] = 100 * achieved / peak
            line += f" = {100 * achieved / peak:.1f}% of {peak:.0f} TFLOP/s bf16 peak"
        print(line)
    return report


def available_bytes(device) -> int | None:
    """Memory a step may use on ``device``: the allocator's free bytes on an accelerator, the
    host's ``MemAvailable`` on CPU; ``None`` when unknown."""
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def print_memory_analysis(compiled, device=None) -> bool:
    """Prints XLA's compiled memory analysis per device and, for ``device``, what is free.

    Returns False only when the step's new buffers (temp + non-aliased outputs) are known not to fit
    in what is free (the arguments are already placed), so a benchmark can stop with a line instead
    of being killed by the OS.
    """
    mem = compiled.memory_analysis()
    if mem is None:
        print("memory_analysis: not reported by this backend")
        return True
    gib = 1 / 2**30
    print(
        "memory_analysis (per device, GiB): "
        f"arguments={mem.argument_size_in_bytes * gib:.3f} "
        f"outputs={mem.output_size_in_bytes * gib:.3f} "
        f"temp={mem.temp_size_in_bytes * gib:.3f} "
        f"generated_code={mem.generated_code_size_in_bytes * gib:.4f} "
        f"alias={mem.alias_size_in_bytes * gib:.3f}"
    )
    free = None if device is None else available_bytes(device)
    if free is None:
        return True
    new = mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    print(f"memory: the step needs {new * gib:.2f} GiB beyond its arguments; {free * gib:.2f} free")
    if new > free:
        print(
            "memory: the step does not fit here; not running it (try --remat or a smaller --batch)"
        )
    return new <= free


def build(config_name: str, per_device_batch: int | None, dtype: str, remat: bool, sets=()):
    config = art_config.get_config(None if config_name == "paper" else config_name)
    for assignment in sets:
        hyper.apply_assignment(config, assignment)
    config.model.dtype = dtype
    if remat:  # else the config's (or a --set's)
        config.model.remat = layers.remat_mode(remat)
    config.mesh.update(data=-1, fsdp=1)
    if per_device_batch is not None:
        config.batch_size = per_device_batch * len(jax.devices())
    tokenizer = factory.tokenizer(config.stage1.config.model.to_dict(), config.model.to_dict())
    size = config.data.image_size
    x = jnp.zeros((1, size, size, 3))
    tok_params = jax.jit(lambda k: tokenizer.init(k, x, train=False)["params"])(jax.random.key(1))
    art = factory.art(config, tokenizer)
    tx = art_trainer.make_optimizer(config)
    init = functools.partial(
        art_trainer.init_state, config=config, art=art, tx=tx, stage1_params=tok_params
    )
    step = functools.partial(
        art_trainer.train_step, config=config, art=art, tokenizer=tokenizer, tx=tx
    )
    return config, init, step, {"tokenizer": tok_params}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=["smoke", "demo", "tiny", "paper"], default="smoke")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch size")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument(
        "--set", action="append", default=[], help="config override, e.g. model.width=128"
    )
    args = parser.parse_args()

    config, init, step_fn, frozen = build(args.config, args.batch, args.dtype, args.remat, args.set)
    mesh = sharding.make_mesh(config.mesh)
    size, n = config.data.image_size, config.batch_size
    dev = jax.devices()[0]
    print(
        f"backend={jax.default_backend()} device={dev.device_kind} devices={len(jax.devices())} "
        f"config={args.config} image={size}px global_batch={n} dtype={args.dtype} "
        f"width={config.model.width} depth={config.model.depth}"
    )
    state, shardings = init(jax.random.key(0), mesh)
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
        flops = compiled_flops(compiled)
        if not print_memory_analysis(compiled, dev):
            results.record("art_train_step", fits=False, batch=n, remat=args.remat)
            sys.exit(EXIT_DOES_NOT_FIT)
        time_steps_and_record(
            "art_train_step",
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
