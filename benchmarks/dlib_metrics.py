"""Throughput of the dlib Deg./LMD metrics (evaluation/dlib_face.py) on the CPU, and the numbers
behind its FFHQ fallback box.

    python benchmarks/dlib_metrics.py [--sizes 512 128] [--n 16] [--runs 5]
    python benchmarks/dlib_metrics.py --fallback-stats

Timing: images/s of face detection (HOG, upsample 1), 68-point landmarks and the ResNet descriptor
(both with given boxes), median of ``--runs`` timed passes over ``--n`` synthetic faces after a
warm-up pass. ``--fallback-stats``: where the detector puts faces on FFHQ-aligned crops (astronaut,
synthetic faces), and how far 68-point landmarks from the fallback box are from those from the
detected box.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from artfr_jax.data.synthetic import render_face  # noqa: E402
from artfr_jax.evaluation import dlib_face  # noqa: E402


def _rate(fn, n, runs):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def _astronaut_aligned(sizes):
    import skimage.data

    im = skimage.data.astronaut()
    box, _ = dlib_face.face_box(im)
    lm = dlib_face.DlibLandmarks()(im[None], box[None])[0]
    return [dlib_face.align_ffhq(im, lm, s) for s in sizes]


def fallback_stats():
    lmk = dlib_face.DlibLandmarks()
    sets = {
        "astronaut": _astronaut_aligned((1024, 768, 512, 384, 256, 192, 128, 96, 64)),
        "synthetic": [render_face(i, s) for s in (512, 256, 128) for i in range(40)],
    }
    for name, images in sets.items():
        rel, err = [], []
        for im in images:
            s = im.shape[0]
            box, found = dlib_face.face_box(im)
            if not found:
                continue
            rel.append((box + np.array([0, 0, 1, 1])) / s)
            fb = dlib_face.fallback_box(s, s)
            a, b = lmk(im[None], box[None]), lmk(im[None], fb[None])
            err.append(float(dlib_face.landmark_distance(a, b, s)[0]))
        rel = np.array(rel)
        print(
            f"{name}: detected {len(rel)}/{len(images)}; detector box (l, t, r, b)/side median "
            f"{np.round(np.median(rel, 0), 3).tolist()} std {np.round(rel.std(0), 3).tolist()}; "
            f"fallback {dlib_face.FFHQ_FALLBACK_BOX} -> 68-pt landmark shift vs detected box "
            f"(512 px units) mean {np.mean(err):.2f} max {np.max(err):.2f}"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 128])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--fallback-stats", action="store_true")
    args = ap.parse_args()
    reason = dlib_face.dlib_available()
    if reason:
        sys.exit(reason)
    if args.fallback_stats:
        fallback_stats()
        return
    desc, lmk = dlib_face.DlibFaceDescriptor(), dlib_face.DlibLandmarks()
    for size in args.sizes:
        images = np.stack([render_face(i, size) for i in range(args.n)])
        boxes, found = dlib_face.detect_boxes(images)
        det = _rate(lambda im=images: dlib_face.detect_boxes(im), args.n, args.runs)
        lm = _rate(lambda im=images, b=boxes: lmk(im, b), args.n, args.runs)
        de = _rate(lambda im=images, b=boxes: desc(im, b), args.n, args.runs)
        print(
            f"{size}px (n={args.n}, {int(found.sum())} detected): detect {det:.1f} img/s, "
            f"landmarks {lm:.1f} img/s, descriptor {de:.1f} img/s"
        )


if __name__ == "__main__":
    main()
