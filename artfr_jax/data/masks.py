"""Irregular free-form stroke masks for the inpainting extension (ART-FR App. A.2).

ART-FR builds its inpainting LQ faces with "random irregular polyline masks, following GPEN", whose
masks are DeepFill v2's free-form brush strokes: 1-3 strokes, each a zig-zag random walk of 8-27
vertices (turning angles near +-2pi/5, step lengths ~ N(d/8, d/16) clipped to [0, d/4] for the image
diagonal d), drawn with a brush 12-80 px wide at 512 px and rounded at every joint. Here every length
is a fraction of the image size, so one stroke set rasterises the same at any resolution.

A stroke set is plain data, ``((width_frac, ((x, y), ...)), ...)`` with ``x, y`` in ``[0, 1]`` as
fractions of the image width and height, so a degradation that carries it stays a pure function.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

Stroke = tuple[float, tuple[tuple[float, float], ...]]

# DeepFill v2 / GPEN turning angles: alternate sides of the heading, about 72 degrees each.
MEAN_ANGLE = 2 * math.pi / 5
ANGLE_RANGE = 2 * math.pi / 15


def sample_strokes(
    rng: np.random.Generator,
    *,
    max_strokes: int = 3,
    vertices: tuple[int, int] = (8, 27),
    width_frac: tuple[float, float] = (12 / 512, 80 / 512),
    step_frac: float = 1 / 8,
    random_heading: bool = True,
) -> tuple[Stroke, ...]:
    """Draws 1..``max_strokes`` brush strokes (a random walk each) from ``rng``.

    ``vertices``: inclusive range of walk steps per stroke; ``width_frac``: brush width range as a
    fraction of the shorter image side; ``step_frac``: mean step length as a fraction of the image
    diagonal. ``random_heading`` turns each walk by a uniform angle: DeepFill/GPEN walks always
    drift towards +x and pile up on the right border, a bias an aligned face would inherit.
    """
    v_lo, v_hi = (int(v) for v in vertices)
    w_lo, w_hi = (float(v) for v in width_frac)
    if max_strokes < 1 or not 1 <= v_lo <= v_hi or not 0 < w_lo <= w_hi or step_frac <= 0:
        raise ValueError(
            f"stroke mask: need max_strokes >= 1 (got {max_strokes}), 1 <= vertices lo <= hi "
            f"(got {tuple(vertices)}), 0 < width_frac lo <= hi (got {tuple(width_frac)}), "
            f"step_frac > 0 (got {step_frac})"
        )
    mean_step = step_frac * math.sqrt(2.0)  # diagonal of the unit square
    strokes = []
    for _ in range(int(rng.integers(1, max_strokes + 1))):
        n = int(rng.integers(v_lo, v_hi + 1))
        a_lo = MEAN_ANGLE - rng.uniform(0, ANGLE_RANGE)
        a_hi = MEAN_ANGLE + rng.uniform(0, ANGLE_RANGE)
        turns = rng.uniform(a_lo, a_hi, size=n)
        turns[0::2] *= -1.0
        heading = rng.uniform(0, 2 * math.pi)
        steps = np.clip(rng.normal(mean_step, mean_step / 2, size=n), 0.0, 2 * mean_step)
        x, y = (float(v) for v in rng.uniform(0, 1, size=2))
        width = float(rng.uniform(w_lo, w_hi))
        pts = [(x, y)]
        for a, r in zip(turns + (heading if random_heading else 0.0), steps, strict=True):
            x = min(max(x + r * math.cos(a), 0.0), 1.0)
            y = min(max(y + r * math.sin(a), 0.0), 1.0)
            pts.append((x, y))
        strokes.append((width, tuple(pts)))
    return tuple(strokes)


def render_mask(strokes: tuple[Stroke, ...], height: int, width: int) -> np.ndarray:
    """Rasterises a stroke set to a boolean mask ``[height, width]`` (True = masked)."""
    m = np.zeros((height, width), np.uint8)
    for w_frac, pts in strokes:
        thick = max(1, round(w_frac * min(height, width)))
        xy = [(round(x * width), round(y * height)) for x, y in pts]
        for a, b in zip(xy[:-1], xy[1:], strict=True):
            cv2.line(m, a, b, 1, thick, cv2.LINE_8)
        for c in xy:  # round joints, as a brush would leave
            cv2.circle(m, c, thick // 2, 1, -1, cv2.LINE_8)
    return m.astype(bool)


def fill_mask(img: np.ndarray, mask: np.ndarray, fill: str = "white", seed: int = 0) -> np.ndarray:
    """Returns ``img`` (uint8 ``[H, W, 3]``) with ``mask`` pixels set to ``fill``.

    ``fill``: ``'white'`` (GPEN paints its strokes white), ``'black'``, or ``'noise'`` (uniform
    random RGB from ``seed``).
    """
    out = img.copy()
    if fill == "white":
        out[mask] = 255
    elif fill == "black":
        out[mask] = 0
    elif fill == "noise":
        noise = np.random.default_rng(seed).integers(0, 256, size=img.shape, dtype=np.uint8)
        out[mask] = noise[mask]
    else:
        raise ValueError(f"data.degradation.mask_fill={fill!r}: expected white|black|noise")
    return out
