"""3x3 convolution time per VQGAN shape: XLA's direct convolution against Winograd.

  python -m benchmarks.conv_winograd --config=paper --size=512 --batch=1

Collects the distinct stride-1 'SAME' 3x3 convolution shapes of the tokenizer's forward pass (with
their counts) and times, for each, the forward and the forward+backward (gradients for input and
kernel) of the CPU convolution (``models/cpu_kernels/conv.py``) direct and as Winograd
(``cpu_kernels/winograd.py``), plus the compile time of each. Median of ``--repeats`` interleaved
runs after one warm-up run; totals are weighted by how often each shape occurs, for the direct
convolution throughout and for the path the CPU kernels take per shape (``uses``). The Winograd
column is F(4x4, 3x3), or F(2x2, 3x3) where ``CpuKernels.winograd_small_tile`` picks it (``F2x2``).
"""

from __future__ import annotations

import collections
import time

import jax
import jax.numpy as jnp
import numpy as np

from artfr_jax.models.cpu_kernels import CpuKernels, conv, winograd
from benchmarks.conv_weight_grad import DN, parse_and_collect
from benchmarks.vqgan_vs_diffusers import timed


def time_shape(xs, ws, repeats: int, rng) -> tuple[dict, dict, float]:
    """Median ms and compile s of direct and Winograd forward and fwd+bwd; max relative error."""
    x = jnp.asarray(rng.standard_normal(xs, np.float32))
    w = jnp.asarray(rng.standard_normal(ws, np.float32) / np.sqrt(9 * ws[2]))
    pads = ((1, 1), (1, 1))
    options = CpuKernels()
    wgrad = conv.weight_grad_path(xs[0] * xs[1] * xs[2], ws, np.float32, options)  # as the models
    fns, compile_s, outs = {}, {}, {}
    for name in ("direct", "winograd"):
        plan = conv.Plan(name, (1, 1), pads, wgrad, options.winograd_small_tile)

        def fwd(x, w, plan=plan):
            return conv.conv(x, w, plan)

        def loss(x, w, fwd=fwd):
            return jnp.sum(fwd(x, w) ** 2) * 0.5

        for kind, fn in (("fwd", fwd), ("fwd+bwd", jax.grad(loss, argnums=(0, 1)))):
            t = time.perf_counter()
            compiled = jax.jit(fn).lower(x, w).compile()
            compile_s[f"{name} {kind}"] = time.perf_counter() - t
            fns[f"{name} {kind}"] = lambda c=compiled: jax.block_until_ready(c(x, w))
            outs[f"{name} {kind}"] = compiled(x, w)
    err = 0.0
    for kind in ("fwd", "fwd+bwd"):
        a, b = jax.tree.leaves(outs[f"direct {kind}"]), jax.tree.leaves(outs[f"winograd {kind}"])
        for ra, rb in zip(a, b, strict=True):
            err = max(err, float(jnp.linalg.norm(ra - rb) / jnp.linalg.norm(ra)))
    ms = {k: v["median"] * 1e3 for k, v in timed(fns, warmup=1, repeats=repeats).items()}
    return ms, compile_s, err


def shape_line(head: str, ms: dict, compile_s: dict, err: float) -> str:
    """One shape's printed row: median ms and compile s per path, and the paths' difference."""
    times = "  ".join(f"{k} {v:7.1f}" for k, v in ms.items())
    compiles = " ".join(f"{v:.2f}" for v in compile_s.values())
    return f"{head}{times} ms | compile s: {compiles} | rel. diff {err:.1e}"


def main():
    args, x, shapes = parse_and_collect(
        __doc__,
        repeats=5,
        what="stride-1 3x3 convolutions",
        keep=lambda k: k[1][:2] == (3, 3) and k[2:] == ((1, 1), ((1, 1), (1, 1))),
    )
    totals = collections.Counter()
    rng = np.random.default_rng(0)
    options = CpuKernels()
    for (xs, ws, strides, pads), count in shapes:
        plan = conv.plan(xs, ws, x.dtype, strides, pads, options, dimension_numbers=DN)
        uses = plan is not None and plan.kind == "winograd"
        ms, compile_s, err = time_shape(xs, ws, args.repeats, rng)
        for kind in ("fwd", "fwd+bwd"):
            totals[f"direct {kind}"] += count * ms[f"direct {kind}"]
            totals[f"as used {kind}"] += count * ms[f"{'winograd' if uses else 'direct'} {kind}"]
        small = options.winograd_small_tile
        tile = winograd.minimal_3x3(xs[0] * xs[1] * xs[2], *ws[2:], small).tile
        path = f"winograd F{tile}x{tile}" if uses else "direct"
        head = f"  {count:2d}x x{xs} w{ws} uses {path}: "
        print(shape_line(head, ms, compile_s, err), flush=True)
    print("weighted total, ms: " + "  ".join(f"{k} {v:.0f}" for k, v in sorted(totals.items())))


if __name__ == "__main__":
    main()
