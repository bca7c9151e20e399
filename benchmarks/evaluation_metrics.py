"""Images/s of every metric of the evaluate command, through the command's own code path.

    python -m benchmarks.evaluation_metrics [--size=512] [--n=32] [--batch=16] [--repeats=3]
        [--metrics=psnr,ssim,lpips,dists,fid,niqe,deg,lmd] [--weights_dir=DIR]

Each metric is built by ``artfr_jax.evaluation.suite`` exactly as ``python -m artfr_jax.evaluate``
builds it (random network weights unless ``--weights_dir`` holds converted files; speed does not
depend on the values) and scores ``--n`` synthetic ``(restored, GT)`` pairs in batches of
``--batch``. Printed per metric: the first pass (compile + run) and the median of ``--repeats``
timed passes after it, as images/s. ``deg`` is timed for ArcFace ResNet-18 and for dlib's
descriptor; ``fid`` is the Inception feature extraction of one folder (the Frechet distance itself
is a one-off 2048x2048 matrix square root, timed separately).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import serialization  # noqa: E402

from artfr_jax.data.synthetic import render_face  # noqa: E402
from artfr_jax.evaluation import suite  # noqa: E402


def _write(path: str, tree) -> None:
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(jax.device_get(tree)))


def random_weights(folder: str) -> None:
    """Random-weight files under the names the evaluate command looks for."""
    from artfr_jax.evaluation import arcface, inception
    from artfr_jax.losses import dists, perceptual

    key = jax.random.key(0)
    z = jnp.zeros((1, 64, 64, 3))
    _write(os.path.join(folder, suite.LPIPS_FILE), perceptual.LPIPS().init(key, z, z)["params"])
    _write(os.path.join(folder, suite.DISTS_FILE), dists.DISTS().init(key, z, z)["params"])
    _write(
        os.path.join(folder, inception.CONVERTED_FILE),
        inception.FIDInceptionV3().init(key, jnp.zeros((1, 299, 299, 3)))["params"],
    )
    module = arcface.arcface_module("resnet18")
    _write(
        os.path.join(folder, arcface.ARCFACE_FILES["resnet18"].converted),
        module.init(key, jnp.zeros((1, *arcface.input_shape("resnet18")))),
    )


def _rate(fn, n: int, repeats: int) -> tuple[float, float]:
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return first, n / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--metrics", default=",".join(suite.METRICS))
    p.add_argument("--weights_dir", default=None)
    args = p.parse_args()

    gt = np.stack([render_face(i, args.size) for i in range(args.n)])
    rng = np.random.default_rng(0)
    restored = np.clip(gt + rng.normal(0, 8, gt.shape), 0, 255).astype(np.uint8)
    names = [m for m in args.metrics.split(",") if m]
    print(
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), {args.n} pairs of "
        f"{args.size} px, batch {args.batch}, median of {args.repeats} after the first pass"
    )
    print(f"{'metric':<22} {'first pass s':>12} {'images/s':>10}")

    with tempfile.TemporaryDirectory() as tmp:
        wdir = args.weights_dir or tmp
        if not args.weights_dir:
            random_weights(tmp)
        rows = []
        for name in names:
            if name == "fid":
                rows.append(("fid (features)", *_fid_rate(wdir, restored, args)))
                continue
            embedders = ("arcface_resnet18", "dlib") if name == "deg" else ("auto",)
            for emb in embedders:
                opts = suite.Options(weights_dir=wdir, batch_size=args.batch, deg_embedder=emb)
                ready, skipped = suite.build_metrics([name], opts, has_gt=True)
                label = f"{name} ({emb})" if name == "deg" else name
                if name in skipped:
                    print(f"{label:<22} skipped: {skipped[name]}")
                    continue
                fn = ready[name].fn

                def run(fn=fn):
                    for s in range(0, args.n, args.batch):
                        fn(restored[s : s + args.batch], gt[s : s + args.batch], {})

                rows.append((label, *_rate(run, args.n, args.repeats)))
        for label, first, rate in rows:
            print(f"{label:<22} {first:>12.2f} {rate:>10.1f}")


def _fid_rate(wdir: str, images: np.ndarray, args) -> tuple[float, float]:
    from artfr_jax.evaluation import fid, inception

    params = inception.load_inception_params(os.path.join(wdir, inception.CONVERTED_FILE))
    extractor = fid.InceptionExtractor(params, batch_size=args.batch)
    first, rate = _rate(lambda: extractor(images), args.n, args.repeats)
    feats = np.random.default_rng(0).normal(size=(4096, 2048))  # full-rank, like a real folder
    mu, sigma = fid.feature_statistics(feats)
    t = time.perf_counter()
    fid.frechet_distance(mu, sigma, mu + 0.1, sigma)
    print(f"frechet distance (2048-d): {time.perf_counter() - t:.2f} s")
    return first, rate


if __name__ == "__main__":
    main()
