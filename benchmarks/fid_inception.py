r"""FID feature extraction speed: images/s of ``InceptionExtractor`` on the current JAX backend.

    python -m benchmarks.fid_inception                          # batch 50, 512 px (FFHQ-512 refs)
    python -m benchmarks.fid_inception --batch=4 --size=128 --repeats=3   # quick CPU run
    python -m benchmarks.fid_inception --weights=inception_fid.msgpack --dtype=bfloat16

Random weights unless ``--weights`` is given (same compute as the real ones). One call of the
extractor = host->device copy of uint8 ``[batch, size, size, 3]``, resize to 299, Inception to pool3
and the float64 copy back, i.e. what ``folder_statistics`` does per batch (image decoding not
included). Compile time is reported separately; throughput is the median of ``--repeats`` timed
calls after ``--warmup`` untimed ones.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from artfr_jax.evaluation.fid import InceptionExtractor  # noqa: E402
from artfr_jax.evaluation.inception import FIDInceptionV3, load_inception_params  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=50, help="images per device call")
    parser.add_argument("--size", type=int, default=512, help="input side in pixels")
    parser.add_argument("--weights", default=None, help="converted inception_fid.msgpack")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    if args.weights:
        params = load_inception_params(args.weights)
    else:
        z = jnp.zeros((1, 8, 8, 3), jnp.float32)
        params = jax.jit(FIDInceptionV3().init)(jax.random.key(0), z)["params"]
    extractor = InceptionExtractor(params, batch_size=args.batch, dtype=jnp.dtype(args.dtype))
    images = np.random.default_rng(0).integers(
        0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8
    )

    t0 = time.perf_counter()
    extractor._apply.lower(extractor.params, images).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        extractor(images)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        extractor(images)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    dev = jax.devices()[0]
    print(
        f"backend={jax.default_backend()} device={dev.device_kind} dtype={args.dtype} "
        f"batch={args.batch} size={args.size} weights={'file' if args.weights else 'random'}"
    )
    print(f"compile: {compile_s:.2f} s")
    print(
        f"median of {args.repeats}: {med * 1e3:.1f} ms/batch = {args.batch / med:.1f} images/s "
        f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f} ms)"
    )


if __name__ == "__main__":
    main()
