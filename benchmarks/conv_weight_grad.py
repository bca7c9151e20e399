"""Weight-gradient time per convolution shape of the VQGAN: XLA's own against the banded one.

  python -m benchmarks.conv_weight_grad --config=paper --size=512 --batch=1

Collects the distinct convolution shapes of the tokenizer's forward pass (with their counts) and,
for each, times dL/dw three ways: XLA's transpose of the convolution (what ``jax.grad`` emits),
``artfr_jax.models.conv.weight_grad`` (row bands, what the models use on the CPU) and, when torch
is installed, ``torch.nn.grad.conv2d_weight`` on the same data. Median of ``--repeats`` runs after
one warm-up run; totals are weighted by how often each shape occurs in the model.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax import lax

from artfr_jax.convert import diffusers_vq
from artfr_jax.models import conv
from artfr_jax.models.vqgan import VQGAN
from benchmarks.vqgan_vs_diffusers import CONFIGS, diffusers_config

DN = ("NHWC", "HWIO", "NHWC")


def conv_shapes(model, x) -> collections.Counter:
    """(x shape, kernel shape, strides, padding) -> count, over the model's forward pass."""
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
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    try:
        import torch
        from torch.nn.grad import conv2d_weight
    except ImportError:
        torch = None
    model = VQGAN(**diffusers_vq.vqgan_kwargs_from_diffusers_config(diffusers_config(args.config)))
    shapes = conv_shapes(model, jnp.zeros((args.batch, args.size, args.size, 3)))
    print(
        f"backend={jax.default_backend()} config={args.config} size={args.size} "
        f"batch={args.batch}: {sum(shapes.values())} convolutions, {len(shapes)} shapes"
    )
    totals = collections.Counter()
    rng = np.random.default_rng(0)
    for (xs, ws, strides, pads), count in sorted(shapes.items(), key=lambda kv: -np.prod(kv[0][0])):
        x = jnp.asarray(rng.standard_normal(xs, np.float32))
        w = jnp.asarray(rng.standard_normal(ws, np.float32) * 0.05)
        dy = lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=DN)
        xla = jax.jit(lambda x, dy: jax.vjp(lambda w_: lax.conv_general_dilated(
            x, w_, strides, pads, dimension_numbers=DN), w)[1](dy)[0])
        banded = jax.jit(lambda x, dy: conv.weight_grad(x, dy, ws, strides, pads))
        ref = np.asarray(xla(x, dy))
        err = np.abs(np.asarray(banded(x, dy)) - ref).max() / np.abs(ref).max()
        assert err < 1e-4, f"banded weight gradient differs from XLA's: {err:.1e} of max"
        t = {
            "xla": median_ms(lambda: xla(x, dy).block_until_ready(), args.repeats),
            "banded": median_ms(lambda: banded(x, dy).block_until_ready(), args.repeats),
        }
        if torch is not None:
            xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
            dyt = torch.from_numpy(np.asarray(dy).transpose(0, 3, 1, 2).copy())
            xt = torch.nn.functional.pad(xt, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
            wshape = (ws[3], ws[2], ws[0], ws[1])
            t["torch"] = median_ms(lambda: conv2d_weight(xt, wshape, dyt, stride=strides), args.repeats)
        for k, v in t.items():
            totals[k] += count * v
        rows = conv.band_rows(dy.shape[0], dy.shape[1], dy.shape[2])
        print(
            f"  {count:2d}x x{xs} w{ws} s{strides[0]} rows/band {rows:3d}: "
            + "  ".join(f"{k} {v:8.1f}" for k, v in t.items())
            + " ms",
            flush=True,
        )
    print("weighted total, ms: " + "  ".join(f"{k} {v:.0f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
