r"""Flicker of restored videos: the mean absolute frame-to-frame change inside the face masks
(0-255), of the input and of the output, with and without the tracker's landmark smoothing.

    python -m benchmarks.video_flicker                       # identity, art (smoke, random weights)
    python -m benchmarks.video_flicker --methods=identity,art,vqfr --config=tiny --frames=40

The clip: scikit-image's astronaut's head (as ``benchmarks/whole_photo.py`` draws it) over a smooth
background, ``--size`` 640x480, still (``--speed=0``, the default: every frame-to-frame change is
noise or jitter) or moving ``--speed`` px per frame to the right (and a third of it down, where
motion dominates the figure), with Gaussian sensor noise (sigma ``--noise`` grey levels, new every
frame) so that dlib's landmarks jitter as they do on real footage. Each method restores it through ``faces.pipeline.restore_video`` (real
HOG detection, 5 points) twice: with the default ``video.Tracker`` smoothing and with smoothing
off (a cutoff so high the filter passes the raw landmarks). Restorers are random-weight ones
(``benchmarks/restorers.py``): their faces are not restorations, but a face that jitters in the
crop jitters in the output, which is what flicker measures. ``identity`` pastes the crops back.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from artfr_jax.faces import detection, pipeline, video  # noqa: E402
from benchmarks import restorers, results, whole_photo  # noqa: E402


def write_clip(path, frames: int, width: int, height: int, noise: float, speed: float, seed=0):
    head, alpha = whole_photo._head()
    side = 180
    head = cv2.resize(head, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    alpha = cv2.resize(alpha, (side, side))[..., None]
    bg = whole_photo._background(height, width).astype(np.float32)
    rng = np.random.default_rng(seed)
    with video.VideoWriter(path, 25.0) as writer:
        for i in range(frames):
            x0, y0 = round(60 + speed * i), round(120 + speed * i / 3)
            img = bg.copy()
            region = img[y0 : y0 + side, x0 : x0 + side]
            region += alpha * (head - region)
            img += rng.normal(0, noise, img.shape)
            writer.write(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="identity,art")
    p.add_argument("--config", default="smoke", choices=restorers.VARIANTS)
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--size", default="640x480")
    p.add_argument("--noise", type=float, default=2.0)
    p.add_argument("--speed", type=float, default=0.0, help="px per frame (0: a still face)")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = os.path.join(tmp, "clip.mp4")
        write_clip(clip, args.frames, width, height, args.noise, args.speed)
        detector = detection.make_detector(min_score=0.25)
        for method in args.methods.split(","):
            restorer, _ = restorers.make(method, args.config, "float32")
            for smoothing in ("on", "off"):
                params = (
                    video.SmoothingParams()
                    if smoothing == "on"
                    else video.SmoothingParams(min_cutoff=10.0, beta=0.0)
                )
                report = pipeline.restore_video(
                    clip,
                    os.path.join(tmp, f"{method}_{smoothing}.mp4"),
                    detector,
                    restorer,
                    jax.random.key(0),
                    tracker=video.Tracker(smoothing=params),
                )
                rows.append(
                    dict(
                        method=method,
                        size=int(restorer.image_size),
                        smoothing=smoothing,
                        frames=report.frames,
                        faces=report.faces,
                        flicker_in=report.flicker_input,
                        flicker_out=report.flicker_output,
                    )
                )
                print(rows[-1], flush=True)
    header = ["method", "S", "smoothing", "frames", "faces", "flicker input", "flicker output"]
    keys = ["method", "size", "smoothing", "frames", "faces"]
    table = [
        [r[k] for k in keys] + [f"{r['flicker_in']:.2f}", f"{r['flicker_out']:.2f}"] for r in rows
    ]
    print()
    print(results.markdown_table(header, table))
    print("\ncommand: python -m benchmarks.video_flicker " + " ".join(argv or sys.argv[1:]))
    return rows


if __name__ == "__main__":
    main()
