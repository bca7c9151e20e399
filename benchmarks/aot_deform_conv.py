r"""One deformable 3x3 convolution (DCNv2, ``models/deform_conv.py``) against a plain 3x3
convolution of the same shape, compiled ahead of time for a TPU chip on this CPU host: the
temporaries and bytes accessed of forward + backward, from XLA's own analyses.

    .tpu-venv/bin/python -m benchmarks.aot_deform_conv --size=256 --channels=64 [--batch=1] \
        [--groups=4] [--topology=v5e:1x1]

VQFR's texture warping modules run this layer at every decoder level up to 512 px; the table of
``benchmarks/aot_compile.py`` shows VQFR's step not fitting a v5e chip, and this isolates the
layer. ``--topology=cpu:1`` compiles the same for this host's CPU. GFLOP and GB accessed include every
chunk of the layer's loop (``aot_compile.loop_cost``).
"""

from __future__ import annotations

import argparse
import os
import time

# As benchmarks/aot_compile.py: compile-only, no TPU probing on this host.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from artfr_jax.models.deform_conv import deform_conv2d  # noqa: E402
from benchmarks import aot_compile  # noqa: E402

GIB = 2**30


def losses(groups: int):
    def dcn(x, offset, mask, kernel):
        y = deform_conv2d(x, offset, mask, kernel, offset_groups=groups)
        return jnp.sum(jnp.square(y.astype(jnp.float32)))

    def conv(x, offset, mask, kernel):
        del offset, mask
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(jnp.square(y.astype(jnp.float32)))

    return {"deformable": dcn, "plain": conv}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", default="v5e:1x1", help="one chip: v5e:1x1, v5p:1x1x1, cpu:1")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=256, help="height = width of the feature map")
    p.add_argument("--channels", type=int, default=64, help="input = output channels")
    p.add_argument("--groups", type=int, default=4, help="offset groups (VQFR: 4)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = p.parse_args(argv)
    topo = aot_compile.parse_topology(args.topology)
    device = aot_compile.topology_devices(topo)[0]
    mesh = Mesh([device], ("d",))
    rep = NamedSharding(mesh, P())
    b, s, c, g, dt = args.batch, args.size, args.channels, args.groups, jnp.dtype(args.dtype)
    shapes = ((b, s, s, c), (b, s, s, g * 18), (b, s, s, g * 9), (3, 3, c, c))
    abstract = [jax.ShapeDtypeStruct(shape, dt, sharding=rep) for shape in shapes]
    rows = []
    for name, fn in losses(g).items():
        t0 = time.perf_counter()
        lowered = jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3))).lower(*abstract)
        compiled = lowered.compile()
        mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
        # the layer runs in chunks (a loop), whose body cost_analysis counts once
        loop_flops, loop_bytes = aot_compile.loop_cost(lowered, compiled.as_text(), 1)
        rows.append(
            dict(
                layer=name,
                temp_gib=mem.temp_size_in_bytes / GIB,
                args_gib=mem.argument_size_in_bytes / GIB,
                gflop=(cost.get("flops", 0.0) + loop_flops) / 1e9,
                gb_accessed=(cost.get("bytes accessed", 0.0) + loop_bytes) / 1e9,
                compile_s=time.perf_counter() - t0,
            )
        )
    print(
        f"{args.topology}, batch {b}, {s}x{s}x{c}, {g} offset groups, {args.dtype}, forward + backward"
    )
    print("| layer | temporaries GiB | arguments GiB | GFLOP | GB accessed | compile s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layer']} | {r['temp_gib']:.3f} | {r['args_gib']:.3f} | {r['gflop']:.1f} | "
            f"{r['gb_accessed']:.2f} | {r['compile_s']:.1f} |"
        )
    return rows


if __name__ == "__main__":
    main()
