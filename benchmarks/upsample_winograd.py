"""Upsampling time per VQGAN decoder level: the 2x2 phase convolution direct against Winograd.

  python -m benchmarks.upsample_winograd --config=paper --size=512 --batch=1

On the CPU the decoders' nearest x2 + 3x3 convolution runs as one 2x2 'VALID' convolution of the
padded low-resolution input with ``4 O`` outputs (``models/cpu_kernels/upsample.py``). For each of
those convolutions in the tokenizer's forward pass this times the forward and the input gradient
three ways: XLA's direct convolution, Winograd F(4x4, 2x2) (``cpu_kernels/winograd.conv2x2`` and
``conv2x2_input_grad``), and the path the CPU kernels take with the default sizes
(``CpuKernels.upsample_min_sizes``, ``upsample_grad_min_sizes``). Median of ``--repeats``
interleaved runs after one warm-up run; totals are weighted by how often each shape occurs.
"""

from __future__ import annotations

import collections
import time

import jax
import jax.numpy as jnp
import numpy as np

from artfr_jax.models.cpu_kernels import CpuKernels, upsample
from benchmarks.conv_weight_grad import parse_and_collect
from benchmarks.conv_winograd import shape_line
from benchmarks.vqgan_vs_diffusers import timed


def _compiled(fn, args):
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t


def time_shape(xs, ws, repeats: int, rng) -> tuple[dict, dict, float]:
    """Median ms and compile s of each path's forward and input gradient; max relative error."""
    xp = jnp.asarray(rng.standard_normal(xs, np.float32))
    k = jnp.asarray(rng.standard_normal(ws, np.float32) / np.sqrt(4 * ws[2]))
    dz = jnp.asarray(rng.standard_normal((xs[0], xs[1] - 1, xs[2] - 1, ws[3]), np.float32))

    options = CpuKernels()
    paths = {  # Winograd size tables for the forward and the gradients
        "direct": ((), ()),
        "winograd": (((0, 1),), ((0, 1),)),
        "as used": (options.upsample_min_sizes, options.upsample_grad_min_sizes),
    }
    fns, compile_s, outs = {}, {}, {}
    for name, sizes in paths.items():

        def fwd(xp, k, sizes=sizes):
            return upsample._phase_conv(xp, k, None, None, sizes)

        def input_grad(xp, k, dz, fwd=fwd):
            return jax.vjp(lambda x_: fwd(x_, k), xp)[1](dz)[0]

        for kind, fn, args in (("fwd", fwd, (xp, k)), ("dx", input_grad, (xp, k, dz))):
            compiled, compile_s[f"{name} {kind}"] = _compiled(fn, args)
            fns[f"{name} {kind}"] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))
            outs[f"{name} {kind}"] = compiled(*args)
    err = max(
        float(jnp.linalg.norm(outs[f"winograd {kind}"] - ref) / jnp.linalg.norm(ref))
        for kind in ("fwd", "dx")
        for ref in [outs[f"direct {kind}"]]
    )
    ms = {k: v["median"] * 1e3 for k, v in timed(fns, warmup=1, repeats=repeats).items()}
    return ms, compile_s, err


def main():
    args, _, shapes = parse_and_collect(
        __doc__,
        repeats=5,
        what="2x2 phase convolutions (upsampling)",
        keep=lambda key: key[1][:2] == (2, 2) and key[3] == ((0, 0), (0, 0)),
    )
    totals = collections.Counter()
    rng = np.random.default_rng(0)
    for (xs, ws, _, _), count in shapes:
        ms, compile_s, err = time_shape(xs, ws, args.repeats, rng)
        for key, v in ms.items():
            totals[key] += count * v
        print(shape_line(f"  {count:2d}x x{xs} w{ws}: ", ms, compile_s, err), flush=True)
    print("weighted total, ms: " + "  ".join(f"{k} {v:.0f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
