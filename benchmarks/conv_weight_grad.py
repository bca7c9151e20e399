"""Weight-gradient time per convolution shape of the VQGAN: XLA's own, banded, and patch matmul.

  python -m benchmarks.conv_weight_grad --config=paper --size=512 --batch=1

Collects the distinct convolution shapes of the tokenizer's forward pass (with their counts) and,
for each, times dL/dw four ways: XLA's transpose of the convolution (what ``jax.grad`` emits),
``models/cpu_kernels/conv.weight_grad`` (row bands), ``conv.weight_grad_patches`` (one matmul of
the input's patches; skipped above ``CpuKernels.max_patch_bytes``) and, when torch is installed,
``torch.nn.grad.conv2d_weight`` on the same data. Median of ``--repeats`` runs after one warm-up
run; totals are weighted by how often each shape occurs in the model, ``as used`` by the path
``conv.weight_grad_path`` picks.
"""

from __future__ import annotations

import argparse
import collections

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax import lax

from artfr_jax.convert import diffusers_vq
from artfr_jax.models.cpu_kernels import CpuKernels, conv
from artfr_jax.models.kernels import Kernels
from artfr_jax.models.vqgan import VQGAN
from benchmarks.vqgan_vs_diffusers import CONFIGS, diffusers_config, timed

DN = ("NHWC", "HWIO", "NHWC")


def conv_shapes(model, x) -> collections.Counter:
    """(x shape, kernel shape, strides, padding) -> count, over the model's forward pass.

    Traced with the CPU kernels and their Winograd path off, so that every convolution appears as
    one (the upsampling as its 2x2 phase convolution)."""
    model = model.clone(kernels=Kernels("cpu", CpuKernels(winograd=False)))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x)
    shapes = collections.Counter()

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                p = eqn.params
                key = (
                    tuple(eqn.invars[0].aval.shape),
                    tuple(eqn.invars[1].aval.shape),
                    tuple(p["window_strides"]),
                    tuple(tuple(pd) for pd in p["padding"]),
                )
                shapes[key] += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return shapes


def median_ms(fn, repeats: int) -> float:
    return timed({"fn": fn}, warmup=1, repeats=repeats)["fn"]["median"] * 1e3


def time_shape(xs, ws, strides, pads, repeats: int, rng) -> dict:
    """Median ms of XLA's, the banded and (if installed) torch's weight gradient for one shape."""
    x = jnp.asarray(rng.standard_normal(xs, np.float32))
    w = jnp.asarray(rng.standard_normal(ws, np.float32) * 0.05)

    def conv_of(w_):
        return lax.conv_general_dilated(x, w_, strides, pads, dimension_numbers=DN)

    dy = conv_of(w)
    xla = jax.jit(lambda dy: jax.vjp(conv_of, w)[1](dy)[0])
    ours = {"banded": jax.jit(lambda x, dy: conv.weight_grad(x, dy, ws, strides, pads))}
    positions = dy.shape[0] * dy.shape[1] * dy.shape[2]
    options = CpuKernels()
    if positions * ws[0] * ws[1] * ws[2] * 4 <= options.max_patch_bytes:
        ours["patches"] = jax.jit(lambda x, dy: conv.weight_grad_patches(x, dy, ws, strides, pads))
    ref = np.asarray(xla(dy))
    t = {"xla": median_ms(lambda: xla(dy).block_until_ready(), repeats)}
    for name, fn in ours.items():
        err = np.abs(np.asarray(fn(x, dy)) - ref).max() / np.abs(ref).max()
        assert err < 1e-4, f"{name} weight gradient differs from XLA's: {err:.1e} of max"
        t[name] = median_ms(lambda fn=fn: fn(x, dy).block_until_ready(), repeats)
    t["as used"] = t[conv.weight_grad_path(positions, ws, np.float32, options)]
    try:
        import torch
        from torch.nn.grad import conv2d_weight
    except ImportError:
        return t
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    dyt = torch.from_numpy(np.asarray(dy).transpose(0, 3, 1, 2).copy())
    xt = torch.nn.functional.pad(xt, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
    wshape = (ws[3], ws[2], ws[0], ws[1])
    t["torch"] = median_ms(lambda: conv2d_weight(xt, wshape, dyt, stride=strides), repeats)
    return t


def parse_and_collect(doc: str, repeats: int, what="convolutions", keep=lambda key: True):
    """The per-shape benchmarks' command line -> (args, input batch, the VQGAN's convolution
    shapes that ``keep`` selects, largest input first); prints a header line."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=repeats)
    args = p.parse_args()
    model = VQGAN(**diffusers_vq.vqgan_kwargs_from_diffusers_config(diffusers_config(args.config)))
    x = jnp.zeros((args.batch, args.size, args.size, 3))
    shapes = {k: n for k, n in conv_shapes(model, x).items() if keep(k)}
    print(
        f"backend={jax.default_backend()} config={args.config} size={args.size} "
        f"batch={args.batch}: {sum(shapes.values())} {what}, {len(shapes)} shapes"
    )
    return args, x, sorted(shapes.items(), key=lambda kv: -np.prod(kv[0][0]))


def main():
    args, _, shapes = parse_and_collect(__doc__, repeats=3)
    totals = collections.Counter()
    rng = np.random.default_rng(0)
    for (xs, ws, strides, pads), count in shapes:
        t = time_shape(xs, ws, strides, pads, args.repeats, rng)
        for k, v in t.items():
            if k != "patches":  # timed only where its patches fit
                totals[k] += count * v
        out_h = (xs[1] + sum(pads[0]) - ws[0]) // strides[0] + 1
        out_w = (xs[2] + sum(pads[1]) - ws[1]) // strides[1] + 1
        rows = conv.band_rows(xs[0], out_h, out_w)
        print(
            f"  {count:2d}x x{xs} w{ws} s{strides[0]} rows/band {rows:3d}: "
            + "  ".join(f"{k} {v:8.1f}" for k, v in t.items())
            + " ms",
            flush=True,
        )
    print("weighted total, ms: " + "  ".join(f"{k} {v:.0f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
