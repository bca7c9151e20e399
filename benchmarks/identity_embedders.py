"""Throughput of the ArcFace identity embedders (metric "Deg.") per backbone.

  python benchmarks/identity_embedders.py --archs=resnet18,iresnet50,iresnet100 --batch=32 \\
      --n_images=256 --image_size=512 [--weights-dir=DIR]

Random weights unless ``--weights-dir`` holds the converted files (``arcface_<arch>.msgpack``).
For each arch it reports, after ``--warmup`` untimed runs, the median (and min) over ``--repeats``
runs of
  end-to-end: ``ArcFaceEmbedder(images)`` on ``--n_images`` uint8 faces (host preprocessing with
              OpenCV + jitted fixed-batch backbone), as images/s;
  host:       the preprocessing alone;
  device:     the jitted backbone alone on already preprocessed batches;
and the lower + compile time of the backbone separately.
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

from artfr_jax.evaluation import arcface  # noqa: E402


def timed(fn, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median": statistics.median(times), "min": min(times)}


def random_variables(arch: str, seed: int = 0):
    module = arcface.arcface_module(arch)
    x = jnp.zeros((1, *arcface.input_shape(arch)), jnp.float32)
    return jax.jit(module.init)(jax.random.key(seed), x)


def bench_arch(arch: str, args) -> dict:
    if args.weights_dir:
        path = os.path.join(args.weights_dir, arcface.ARCFACE_FILES[arch].converted)
        variables = arcface.load_arcface_params(arch, path)
    else:
        variables = random_variables(arch)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    emb = arcface.ArcFaceEmbedder(arch, variables, batch_size=args.batch, dtype=dtype)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.n_images, args.image_size, args.image_size, 3), np.uint8)

    dummy = jnp.zeros((args.batch, *arcface.input_shape(arch)), jnp.float32)
    t = time.perf_counter()
    emb.apply_fn.lower(emb.variables, dummy).compile()
    compile_s = time.perf_counter() - t

    x = arcface.preprocess(arch, images)
    batches = [
        jax.device_put(x[i : i + args.batch]) for i in range(0, len(x) - args.batch + 1, args.batch)
    ]

    def device_only():
        out = [emb.apply_fn(emb.variables, b) for b in batches]
        jax.block_until_ready(out)

    e2e = timed(lambda: emb(images), args.warmup, args.repeats)
    host = timed(lambda: arcface.preprocess(arch, images), args.warmup, args.repeats)
    dev = timed(device_only, args.warmup, args.repeats)
    n_dev = len(batches) * args.batch
    return {
        "arch": arch,
        "name": emb.name,
        "compile_s": compile_s,
        "e2e_img_s": args.n_images / e2e["median"],
        "e2e_img_s_best": args.n_images / e2e["min"],
        "host_img_s": args.n_images / host["median"],
        "device_img_s": n_dev / dev["median"] if n_dev else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default=",".join(arcface.ARCFACE_ARCHS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--n_images", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=512, help="source face size (px)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights-dir", dest="weights_dir", default=None)
    args = parser.parse_args()
    if args.n_images < args.batch:
        parser.error("--n_images must be >= --batch")

    dev = jax.devices()[0]
    print(
        f"device: {dev.platform} {dev.device_kind}; batch {args.batch}, {args.n_images} images "
        f"of {args.image_size}px, {args.dtype}, median of {args.repeats} after {args.warmup} "
        f"warm-up; weights: {args.weights_dir or 'random'}"
    )
    for arch in args.archs.split(","):
        r = bench_arch(arch.strip(), args)
        print(
            f"{r['arch']:>10}: end-to-end {r['e2e_img_s']:8.1f} img/s (best {r['e2e_img_s_best']:.1f})"
            f" | host preprocessing {r['host_img_s']:8.1f} img/s | device {r['device_img_s']:8.1f} "
            f"img/s | compile {r['compile_s']:.1f} s   [{r['name']}]"
        )


if __name__ == "__main__":
    main()
