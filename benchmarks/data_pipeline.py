"""Data pipeline throughput: degraded 512-px pairs/s per worker (synthetic faces, `artfr` preset).

    python benchmarks/data_pipeline.py [--size 512] [--preset artfr] [--seconds 3] [--workers 2]

Prints render and degrade time per image (one thread, as in a worker), in-process pipeline pairs/s
(median of timed runs after a warm-up, num_workers=0) and a multi-worker run. Target: >= 60 pairs/s
per worker.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from artfr_jax.data import pipeline as data  # noqa: E402
from artfr_jax.data.degradations import random_degrade  # noqa: E402
from artfr_jax.data.synthetic import render_face  # noqa: E402


def _per_image(fn, n):
    ts = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3, statistics.mean(ts) * 1e3


def _pipeline_rate(cfg, batch, seconds, runs):
    it = data.make_train_iterator(cfg, global_batch_size=batch, seed=0)
    rates = []
    try:
        next(it)  # warm-up (worker start-up, caches)
        for _ in range(runs):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                n += len(next(it)["hq"])
            rates.append(n / (time.perf_counter() - t0))
    finally:
        if hasattr(it, "close"):
            it.close()
    return statistics.median(rates), rates


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--preset", default="artfr")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()

    cfg = data.default_config(a.size, a.preset)
    deg = cfg.degradation
    # Per-image times on one thread, as in a grain worker (pipeline._worker_init); cv2's default
    # thread pool would spread them over all cores and overstate the one-core bound.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    render_face(0, a.size)
    hq = [render_face(i, a.size) for i in range(8)]
    r_med, r_mean = _per_image(lambda i: render_face(1000 + i, a.size), 40)
    d_med, d_mean = _per_image(
        lambda i: random_degrade(hq[i % 8], deg, np.random.default_rng(i)), 80
    )
    cv2.setNumThreads(threads)

    cfg.num_workers = 0
    single, single_runs = _pipeline_rate(cfg, a.batch, a.seconds, a.runs)
    cfg.num_workers = a.workers
    multi, multi_runs = _pipeline_rate(cfg, a.batch, a.seconds, a.runs) if a.workers else (0, [])

    print(
        f"\nData pipeline: synthetic faces, {a.size}px, preset '{a.preset}', {os.cpu_count()} CPUs"
    )
    print(f"{'measure':42s} {'value':>12s}")
    print("-" * 56)
    print(f"{'render synthetic face (median / mean ms)':42s} {r_med:5.2f} / {r_mean:5.2f}")
    print(f"{'degrade Eq. 8 (median / mean ms)':42s} {d_med:5.2f} / {d_mean:5.2f}")
    print(f"{'render + degrade bound (pairs/s, 1 core)':42s} {1e3 / (r_mean + d_mean):12.1f}")
    print(f"{'pipeline num_workers=0 (pairs/s, median)':42s} {single:12.1f}")
    if a.workers:
        print(f"{f'pipeline num_workers={a.workers} (pairs/s, median)':42s} {multi:12.1f}")
        print(f"{'  per worker (pairs/s)':42s} {multi / a.workers:12.1f}")
    print(f"{'target per worker (pairs/s)':42s} {60:12d}")
    print(
        f"runs: workers=0 {[round(r, 1) for r in single_runs]}, "
        f"workers={a.workers} {[round(r, 1) for r in multi_runs]}"
    )


if __name__ == "__main__":
    main()
