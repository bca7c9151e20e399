"""Data pipeline throughput: degraded pairs/s per worker, and whether it keeps up with training.

    python benchmarks/data_pipeline.py [--size 512] [--preset artfr] [--seconds 3] [--workers -1]
    python benchmarks/data_pipeline.py --steps_per_s 2.5 --batch 32 [--hosts 1] [--workers -1]
    ... [--source array_record --array_record PREFIX]   # shards from `python -m artfr_jax.data.pack`
    ... [--source folder --folder DIR]                  # images read and resized at every read

Default mode: per-image time to produce an HQ image (render a synthetic face, or read and decode
a record) and to degrade it (one thread, as in a worker), in-process pipeline pairs/s (median of
timed runs after a warm-up, num_workers=0) and a run with ``--workers`` (-1 = the auto count
``pipeline.resolve_num_workers`` picks on this host). Target: >= 60 pairs/s per worker.

Keep-up mode (``--steps_per_s``): training needs ``steps_per_s * batch / hosts`` pairs/s on each
host; the script measures the ``--workers`` pipeline alone and prints needed vs measured and a
one-line verdict (with the worker count that would do, at the measured rate per worker). The
training process also needs CPU, so ask for some headroom.
"""

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from artfr_jax.data import pipeline as data  # noqa: E402
from artfr_jax.data.degradations import random_degrade  # noqa: E402

HEADROOM = 1.2  # below this ratio of measured to needed pairs/s the verdict says "barely"


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
        it.close()
    return statistics.median(rates), rates


def _config(a):
    cfg = data.default_config(a.size, a.preset)
    cfg.source = a.source
    if a.source != "synthetic":
        where = getattr(a, a.source)
        if not where:
            sys.exit(f"error: --source {a.source} needs --{a.source}")
        setattr(cfg, a.source, where)
        cfg.eval_holdout = 0  # every image is read
    return cfg


def _source_times(a, cfg):
    """(what, median ms, mean ms) to produce one HQ image, and (median, mean) ms to degrade it,
    on one thread as in a grain worker (pipeline._worker_init); cv2's default thread pool would
    spread them over all cores and overstate the one-core bound."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        src = data.train_source(cfg)
        src[0]
        hq = [src[i % len(src)] for i in range(8)]
        what = "render synthetic face" if a.source == "synthetic" else f"read+decode {a.source}"
        s_med, s_mean = _per_image(lambda i: src[(1000 + i) % len(src)], 40)
        d_med, d_mean = _per_image(
            lambda i: random_degrade(hq[i % 8], cfg.degradation, np.random.default_rng(i)), 80
        )
    finally:
        cv2.setNumThreads(threads)
    return (what, s_med, s_mean), (d_med, d_mean)


def throughput(a, cfg, workers):
    (what, s_med, s_mean), (d_med, d_mean) = _source_times(a, cfg)
    cfg.num_workers = 0
    single, single_runs = _pipeline_rate(cfg, a.batch, a.seconds, a.runs)
    cfg.num_workers = workers
    multi, multi_runs = _pipeline_rate(cfg, a.batch, a.seconds, a.runs) if workers else (0, [])

    print(f"{'measure':44s} {'value':>12s}")
    print("-" * 58)
    print(f"{what + ' (median / mean ms)':44s} {s_med:5.2f} / {s_mean:5.2f}")
    print(f"{'degrade Eq. 8 (median / mean ms)':44s} {d_med:5.2f} / {d_mean:5.2f}")
    print(f"{'produce + degrade bound (pairs/s, 1 core)':44s} {1e3 / (s_mean + d_mean):12.1f}")
    print(f"{'pipeline num_workers=0 (pairs/s, median)':44s} {single:12.1f}")
    if workers:
        print(f"{f'pipeline num_workers={workers} (pairs/s, median)':44s} {multi:12.1f}")
        print(f"{'  per worker (pairs/s)':44s} {multi / workers:12.1f}")
    print(f"{'target per worker (pairs/s)':44s} {60:12d}")
    print(
        f"runs: workers=0 {[round(r, 1) for r in single_runs]}, "
        f"workers={workers} {[round(r, 1) for r in multi_runs]}"
    )


def verdict(needed: float, measured: float, workers: int, cpus: int) -> str:
    """One line: does ``measured`` pairs/s from ``workers`` workers cover ``needed``?"""
    ratio = measured / needed
    head = f"num_workers={workers} makes {measured:.1f} pairs/s, training needs {needed:.1f} "
    head += f"({ratio:.2f}x)"
    if ratio >= HEADROOM:
        return f"verdict: keeps up: {head}"
    per_worker = measured / max(workers, 1)
    want = math.ceil(HEADROOM * needed / per_worker)
    advice = f"about {want} workers at {per_worker:.1f} pairs/s each (this host has {cpus} CPUs)"
    if ratio >= 1.0:
        return f"verdict: barely keeps up (< {HEADROOM}x): {head}; for headroom {advice}"
    return f"verdict: too slow, training would wait for data: {head}; needs {advice}"


def keep_up(a, cfg, workers):
    needed = a.steps_per_s * a.batch / a.hosts
    if a.batch % a.hosts:
        sys.exit(f"error: --batch {a.batch} must be a multiple of --hosts {a.hosts}")
    cfg.num_workers = workers
    measured, runs = _pipeline_rate(cfg, a.batch // a.hosts, a.seconds, a.runs)
    print(f"{'measure':44s} {'value':>12s}")
    print("-" * 58)
    print(f"{'needed per host (pairs/s)':44s} {needed:12.1f}")
    print(f"{f'measured, num_workers={workers} (pairs/s)':44s} {measured:12.1f}")
    print(f"runs: {[round(r, 1) for r in runs]}")
    print(verdict(needed, measured, workers, data.available_cpus()))


def _describe(a) -> str:
    if a.source == "synthetic":
        return "synthetic faces"
    return f"{a.source} {getattr(a, a.source)}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--preset", default="artfr")
    ap.add_argument(
        "--source", choices=("synthetic", "folder", "array_record"), default="synthetic"
    )
    ap.add_argument("--array_record", default="", help="PREFIX written by artfr_jax.data.pack")
    ap.add_argument("--folder", default="", help="image folder for --source folder")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=data.AUTO_WORKERS, help="-1: auto")
    ap.add_argument("--batch", type=int, default=8, help="global batch size")
    ap.add_argument("--steps_per_s", type=float, default=0.0, help="keep-up mode: step rate")
    ap.add_argument("--hosts", type=int, default=1, help="keep-up mode: hosts sharing the batch")
    a = ap.parse_args()

    cfg = _config(a)
    workers = data.resolve_num_workers(a.workers)
    auto = " (auto)" if a.workers == data.AUTO_WORKERS else ""
    print(
        f"\nData pipeline: {_describe(a)}, "
        f"{a.size}px, preset '{a.preset}', {data.available_cpus()} CPUs, "
        f"num_workers={workers}{auto}"
    )
    if a.steps_per_s > 0:
        print(f"keep-up: {a.steps_per_s} steps/s x global batch {a.batch} over {a.hosts} host(s)")
        keep_up(a, cfg, workers)
    else:
        throughput(a, cfg, workers)


if __name__ == "__main__":
    main()
