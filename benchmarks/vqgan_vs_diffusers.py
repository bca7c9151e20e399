"""Time our VQGAN against diffusers' VQModel at the same configuration and weights.

  python benchmarks/vqgan_vs_diffusers.py --config=paper --size=128 --batch=2

Both models compute the same function (weights copied with the converter; the script checks the
outputs agree). Reports the median (and min) over ``--repeats`` interleaved timed runs after
``--warmup`` runs of
  forward:          x -> reconstruction
  forward+backward: gradient of mean(reconstruction) with respect to all parameters
and, for JAX, the compile time of each function separately. Targets (issue): JAX/torch ratio
<= 0.7 forward and <= 0.9 forward+backward. torch and JAX both run with their default thread
counts unless ``--torch_threads`` is given. Both run in one process, so both get the host
allocator setting of ``artfr_jax.utils.host_memory`` (``ARTFR_JAX_HOST_MALLOC=system`` to compare
with glibc's defaults).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from artfr_jax.convert import diffusers_vq  # noqa: E402
from artfr_jax.models.vqgan import VQGAN  # noqa: E402
from artfr_jax.utils import compile_cache, host_memory  # noqa: E402

CONFIGS = {
    "smoke": dict(
        block_out_channels=[32, 64],
        layers_per_block=1,
        latent_channels=32,
        num_vq_embeddings=64,
        vq_embed_dim=16,
        norm_num_groups=8,
    ),
    "mid": dict(
        block_out_channels=[64, 128, 256],
        layers_per_block=2,
        latent_channels=256,
        num_vq_embeddings=1024,
        vq_embed_dim=256,
        norm_num_groups=32,
    ),
    "paper": dict(
        block_out_channels=[64, 128, 128, 256, 256, 512],
        layers_per_block=2,
        latent_channels=256,
        num_vq_embeddings=1024,
        vq_embed_dim=256,
        norm_num_groups=32,
    ),
}


def diffusers_config(name: str) -> dict:
    cfg = dict(CONFIGS[name])
    n = len(cfg["block_out_channels"])
    cfg["down_block_types"] = ["DownEncoderBlock2D"] * (n - 1) + ["AttnDownEncoderBlock2D"]
    cfg["up_block_types"] = ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (n - 1)
    return cfg


def timed(fns: dict, warmup: int, repeats: int) -> dict:
    """Run each function ``warmup`` times, then ``repeats`` rounds of all of them in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: {"median": statistics.median(v), "min": min(v)} for k, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--remat", action="store_true", help="JAX: rematerialise residual blocks")
    p.add_argument("--torch_threads", type=int, default=0, help="0 = torch default")
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--forward_only", action="store_true", help="time and compile the forward only")
    p.add_argument(
        "--compiler_option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="XLA option for the JAX programs, e.g. xla_cpu_experimental_ynn_fusion_type= "
        "(XLA:CPU's own convolution kernels instead of YNNPACK's); repeatable",
    )
    args = p.parse_args(argv)
    options = {}
    for item in args.compiler_option:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--compiler_option {item!r}: expected NAME=VALUE")
        options[name] = value
    # Before JAX's first computation; also when run as a script, outside the benchmarks package.
    host_malloc = "retain" if host_memory.retain_freed_memory_on_cpu() else "system"
    compile_cache.disable_persistent_cache()

    from tests.torch_compat import register_torchvision_schemas

    register_torchvision_schemas()
    import torch
    from diffusers import VQModel

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cfg = diffusers_config(args.config)
    torch.manual_seed(0)
    tm = VQModel(**cfg).eval()
    kwargs = diffusers_vq.vqgan_kwargs_from_diffusers_config(cfg)
    params = jax.device_put(diffusers_vq.convert_state_dict(tm.state_dict(), kwargs))
    model = VQGAN(**kwargs, remat=args.remat)
    f = model.downsample_factor
    if args.size % f:
        raise SystemExit(f"--size must be a multiple of {f} for --config={args.config}")
    x_np = np.random.default_rng(0).uniform(-1, 1, (args.batch, args.size, args.size, 3))
    x_np = x_np.astype(np.float32)
    x = jnp.asarray(x_np)
    xt = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))
    n_params = sum(p.numel() for p in tm.parameters())
    print(
        f"config={args.config} batch={args.batch} size={args.size} params={n_params / 1e6:.2f}M "
        f"torch_threads={torch.get_num_threads()} jax_devices={jax.devices()} remat={args.remat} "
        f"host_malloc={host_malloc} (both frameworks) xla_options={options}"
    )

    fwd = jax.jit(lambda v, x: model.apply(v, x)[0])
    grad = jax.jit(jax.grad(lambda v, x: jnp.mean(model.apply(v, x)[0])))
    variables = {"params": params}
    # Traced under a mesh of the device it runs on, as training and restoring trace: the kernel
    # switch's 'auto' then decides at trace time (models/kernels.py).
    mesh = jax.sharding.Mesh(
        np.asarray(jax.devices()[:1]), ("batch",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    t = time.perf_counter()
    with jax.set_mesh(mesh):
        fwd_c = fwd.lower(variables, x).compile(compiler_options=options or None)
    c_fwd = time.perf_counter() - t
    run_fwd = lambda: jax.block_until_ready(fwd_c(variables, x))  # noqa: E731
    jax_fns = {"fwd": run_fwd}
    compiled = f"forward {c_fwd:.2f}s"
    if not args.forward_only:
        t = time.perf_counter()
        with jax.set_mesh(mesh):
            grad_c = grad.lower(variables, x).compile(compiler_options=options or None)
        compiled += f"  forward+backward {time.perf_counter() - t:.2f}s"
        jax_fns["grad"] = lambda: jax.block_until_ready(grad_c(variables, x))
    print(f"jax   compile: {compiled}")
    if args.skip_torch:
        report("jax", timed(jax_fns, args.warmup, args.repeats))
        return

    with torch.no_grad():
        ref = tm(xt).sample.numpy().transpose(0, 2, 3, 1)
    rel = np.linalg.norm(np.asarray(run_fwd()) - ref) / np.linalg.norm(ref)
    print(f"same function: rel. difference of reconstructions {rel:.2e}")

    def t_fwd():
        with torch.no_grad():
            tm(xt)

    def t_grad():
        tm.zero_grad(set_to_none=True)
        tm(xt).sample.mean().backward()

    # Interleaved so that both frameworks see the same background load.
    fns = {"jax_fwd": run_fwd, "torch_fwd": t_fwd}
    if not args.forward_only:
        fns.update(jax_grad=jax_fns["grad"], torch_grad=t_grad)
    t = timed(fns, args.warmup, args.repeats)
    for stat in ("median", "min"):
        ms = f"{stat:6s} ms: jax forward {t['jax_fwd'][stat] * 1e3:8.1f}  torch forward "
        ms += f"{t['torch_fwd'][stat] * 1e3:8.1f}"
        ratio = f"{stat:6s} ratio jax/torch: forward "
        ratio += f"{t['jax_fwd'][stat] / t['torch_fwd'][stat]:.2f} (target <= 0.7)"
        if not args.forward_only:
            ms += f"  | jax fwd+bwd {t['jax_grad'][stat] * 1e3:8.1f}  "
            ms += f"torch fwd+bwd {t['torch_grad'][stat] * 1e3:8.1f}"
            ratio += "  forward+backward "
            ratio += f"{t['jax_grad'][stat] / t['torch_grad'][stat]:.2f} (target <= 0.9)"
        print(ms)
        print(ratio)


def report(name, t):
    for k, v in t.items():
        print(f"{name} {k}: median {v['median'] * 1e3:.1f} ms  min {v['min'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
