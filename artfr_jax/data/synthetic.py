"""Procedurally drawn, roughly FFHQ-aligned synthetic faces.

The synthetic source makes every command runnable on a machine without data: a face is a pure
function of ``(index, size, seed)``. The layout follows FFHQ's alignment (eyes near 47% of the
height, mouth near 71%, head centred) so models trained on it see the same geometry as on FFHQ.

Everything is drawn with anti-aliased OpenCV primitives at the requested size; soft shading is
drawn at a quarter of the size and upsampled, and fine texture (skin grain, hair strands) comes
from noise tiles cached once per size, so a 512 px face costs a few milliseconds.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

_SHIFT = 4  # fixed-point bits for sub-pixel cv2 drawing
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA

# RGB palettes (light -> dark skin; natural hair colours; iris colours).
_SKIN = np.array(
    [
        [255, 226, 204],
        [245, 205, 175],
        [232, 185, 150],
        [214, 160, 120],
        [188, 130, 95],
        [150, 100, 70],
        [112, 74, 52],
        [78, 52, 38],
    ],
    np.float32,
)
_HAIR = np.array(
    [
        [22, 18, 18],
        [40, 28, 22],
        [70, 46, 30],
        [105, 70, 42],
        [140, 80, 45],
        [175, 130, 80],
        [215, 180, 120],
        [150, 145, 140],
        [215, 212, 205],
    ],
    np.float32,
)
_HAIR_P = np.array([0.22, 0.2, 0.17, 0.12, 0.06, 0.08, 0.07, 0.05, 0.03])
_DYED = np.array([[170, 40, 60], [60, 80, 170], [200, 90, 160], [220, 110, 40]], np.float32)
_IRIS = np.array(
    [[70, 42, 24], [110, 70, 35], [125, 105, 55], [75, 115, 70], [70, 115, 170], [115, 130, 145]],
    np.float32,
)
_IRIS_P = np.array([0.35, 0.2, 0.12, 0.1, 0.15, 0.08])


def _palette(pal: np.ndarray, t: float) -> np.ndarray:
    """Linear interpolation along a palette, t in [0, 1]."""
    x = t * (len(pal) - 1)
    i = min(int(x), len(pal) - 2)
    f = x - i
    return pal[i] * (1 - f) + pal[i + 1] * f


def _col(c) -> tuple:
    return tuple(min(255.0, max(0.0, float(v))) for v in c)


def _ellipse(cx, cy, ax, ay, n=48, t0=0.0, t1=2 * np.pi) -> np.ndarray:
    t = np.linspace(t0, t1, n)
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], -1)


@functools.lru_cache(maxsize=4)
def _grain_tile(size: int) -> np.ndarray:
    """Unit-variance fine noise, slightly larger than the image so random crops differ."""
    rng = np.random.default_rng(1234)
    pad = max(8, size // 8)
    n = rng.standard_normal((size + pad, size + pad)).astype(np.float32)
    # A touch of blur makes pores/grain rather than pure per-pixel noise.
    return cv2.GaussianBlur(n, (0, 0), 0.6 * max(1.0, size / 512)) * 1.6


@functools.lru_cache(maxsize=4)
def _hair_tiles(size: int) -> np.ndarray:
    """[3, size, size] float32 strand textures in ~[-1, 1], radiating from the crown."""
    rng = np.random.default_rng(4321)
    n_r, n_t = max(64, size // 2), max(256, size * 2)
    out = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = 0.5, 0.02
    r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    t = np.arctan2(yy - cy, xx - cx)
    map_x = ((t + np.pi) / (2 * np.pi) * (n_t - 1)).astype(np.float32)
    map_y = (np.clip(r / 0.9, 0, 1) * (n_r - 1)).astype(np.float32)
    for _ in range(3):
        polar = rng.standard_normal((n_r, n_t)).astype(np.float32)
        # Long along the radius, thin across it: strands.
        polar = cv2.GaussianBlur(polar, (0, 0), sigmaX=0.7, sigmaY=n_r / 20)
        polar /= polar.std() + 1e-6
        tex = cv2.remap(polar, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
        out.append(np.clip(tex / 2.5, -1, 1))
    return np.stack(out)


class _Canvas:
    """Draws polygons given in unit coordinates through a per-face similarity transform."""

    def __init__(self, size: int, mat: np.ndarray):
        self.size = size
        self.mat = mat  # 2x3, unit coords -> unit coords (pose jitter)
        self.px = size * _ONE

    def pts(self, p: np.ndarray) -> np.ndarray:
        q = p @ self.mat[:, :2].T + self.mat[:, 2]
        return np.round(q * self.px).astype(np.int32)

    def poly(self, img, p, color, thickness=-1, closed=True, scale=1.0):
        q = self.pts(p)
        if thickness < 0:
            cv2.fillPoly(img, [q], color, _AA, _SHIFT)
        else:
            t = max(1, int(round(thickness * self.size * scale)))
            cv2.polylines(img, [q], closed, color, t, _AA, _SHIFT)

    def circle(self, img, c, rad, color, thickness=-1):
        q = self.pts(np.asarray(c, np.float64)[None])[0]
        s = float(np.hypot(self.mat[0, 0], self.mat[1, 0]))
        r = max(1, int(round(rad * s * self.px)))
        t = thickness if thickness < 0 else max(1, int(round(thickness * self.size)))
        cv2.circle(img, (int(q[0]), int(q[1])), r, color, t, _AA, _SHIFT)


def _lip_curves(mx, my, mw, smile, up_t, lo_t, open_h):
    u = np.linspace(-1, 1, 21)
    x = mx + u * mw / 2
    curve = -smile * 0.018 * (u**2)  # corners up for a smile
    bow = 0.35 * up_t * np.exp(-((np.abs(u) - 0.22) ** 2) / 0.02)
    upper_top = my + curve - up_t * (1 - u**2) ** 0.7 - bow * (1 - u**2) + 0.3 * up_t * (u**2)
    gap_top = my + curve - open_h * 0.5 * (1 - u**2)
    gap_bot = my + curve + open_h * 0.5 * (1 - u**2)
    lower_bot = gap_bot + lo_t * (1 - u**2) ** 0.8
    return x, upper_top, gap_top, gap_bot, lower_bot


def render_face(index: int, size: int = 512, *, seed: int = 0) -> np.ndarray:
    """Draws synthetic face ``index`` as RGB uint8 ``[size, size, 3]``; deterministic."""
    if size < 16:
        raise ValueError(f"synthetic face size must be >= 16, got {size}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFFFFFF, 0xFACE])
    u = rng.uniform

    # --- identity and pose -------------------------------------------------------------------
    skin = _palette(_SKIN, u() ** 1.1) * u(0.97, 1.03, 3)
    if u() < 0.06:
        hair_c = _DYED[rng.integers(len(_DYED))] * u(0.7, 1.1)
    else:
        hair_c = _HAIR[rng.choice(len(_HAIR), p=_HAIR_P)] * u(0.85, 1.15)
    iris_c = _IRIS[rng.choice(len(_IRIS), p=_IRIS_P)] * u(0.8, 1.2)
    ang = np.deg2rad(u(-7, 7))
    scl = u(0.92, 1.08)
    tx, ty = u(-0.025, 0.025), u(-0.02, 0.025)
    ca, sa = np.cos(ang) * scl, np.sin(ang) * scl
    mat = np.array(
        [[ca, -sa, 0.5 - 0.5 * ca + 0.5 * sa + tx], [sa, ca, 0.5 - 0.5 * sa - 0.5 * ca + ty]]
    )
    cv = _Canvas(size, mat)
    yaw = u(-0.025, 0.025)  # features slide sideways inside the head outline

    # Head geometry (unit coordinates, y down).
    hcx, hcy = 0.5, 0.505
    ha, hb = u(0.21, 0.245), u(0.27, 0.30)
    jaw = u(0.15, 0.38)
    eye_y = u(0.455, 0.48)
    eye_sep = u(0.115, 0.135)
    ew, eh = u(0.078, 0.095), u(0.026, 0.036)
    openness = u(0.55, 1.15) if u() < 0.9 else u(0.1, 0.35)
    nose_y = u(0.585, 0.615)
    mouth_y = u(0.69, 0.72)
    mouth_w = u(0.095, 0.135)
    smile = u(-0.4, 1.0)
    mouth_open = u(0.004, 0.03) if u() < 0.3 else 0.0
    brow_raise = u(-0.008, 0.02)
    fx = hcx + yaw

    # --- background ------------------------------------------------------------------------
    small = max(8, size // 4)
    # Muted studio-like backdrop: one base colour with soft, low-saturation variation.
    base = u(25, 225, 3)
    base = base * 0.5 + base.mean() * 0.5
    bg = base + u(-35, 35, (3, 3, 1)) + u(-12, 12, (3, 3, 3))
    img = cv2.resize(
        np.clip(bg, 0, 255).astype(np.uint8), (size, size), interpolation=cv2.INTER_LINEAR
    )
    hair_mask = np.zeros((size, size), np.uint8)

    # --- clothes / shoulders -----------------------------------------------------------------
    cloth = u(15, 230, 3)
    sh_y = u(0.86, 0.92)
    shoulders = np.array(
        [
            [0.37, sh_y],
            [0.16, sh_y + 0.05],
            [-0.05, sh_y + 0.12],
            [-0.1, 1.3],
            [1.1, 1.3],
            [1.05, sh_y + 0.12],
            [0.84, sh_y + 0.05],
            [0.63, sh_y],
        ]
    )
    cv.poly(img, shoulders, _col(cloth))

    # --- hair behind the head ----------------------------------------------------------------
    style = rng.choice(
        ["short", "long", "bob", "curly", "bald", "bun"], p=[0.3, 0.3, 0.15, 0.1, 0.05, 0.1]
    )
    hair_len = {"long": u(0.85, 1.1), "bob": u(0.68, 0.8), "curly": u(0.7, 0.9)}.get(style, 0.0)
    wob = lambda n, amp: (
        amp
        * np.sum(
            [u(0.3, 1) * np.sin(k * np.linspace(0, 2 * np.pi, n) + u(0, 6.3)) for k in (3, 5, 9)], 0
        )
    )
    if hair_len > 0:
        wide = ha + (u(0.06, 0.11) if style != "curly" else u(0.12, 0.17))
        top = _ellipse(hcx, hcy - 0.02, wide, hb + 0.05, 40, np.pi, 2 * np.pi)
        if style == "curly":
            top += np.stack([np.zeros(40), wob(40, 0.012)], -1)
        side_r = np.array(
            [[hcx + wide * u(0.95, 1.1), hair_len], [hcx + wide * 0.55, hair_len + 0.02]]
        )
        side_l = np.array(
            [[hcx - wide * 0.55, hair_len + 0.02], [hcx - wide * u(0.95, 1.1), hair_len]]
        )
        back = np.concatenate([top, side_r, side_l])
        cv.poly(img, back, _col(hair_c * 0.85))
        cv.poly(hair_mask, back, 255)
    if style == "bun":
        bun = _ellipse(hcx + u(-0.05, 0.05), hcy - hb - 0.02, 0.07, 0.055, 32)
        cv.poly(img, bun, _col(hair_c))
        cv.poly(hair_mask, bun, 255)

    # --- neck, ears, head --------------------------------------------------------------------
    neck_w = ha * u(0.5, 0.62)
    neck = np.array(
        [
            [hcx - neck_w, 0.66],
            [hcx - neck_w * 1.05, sh_y + 0.02],
            [hcx, sh_y + u(0.03, 0.07)],
            [hcx + neck_w * 1.05, sh_y + 0.02],
            [hcx + neck_w, 0.66],
        ]
    )
    cv.poly(img, neck, _col(skin * 0.82))
    cv.poly(hair_mask, neck, 0)
    ear_y = eye_y + 0.045
    for side in (-1, 1):
        ear = _ellipse(hcx + side * (ha - 0.005), ear_y, 0.028 * (1 - side * yaw * 8), 0.055, 24)
        cv.poly(img, ear, _col(skin * 0.9))
        cv.poly(hair_mask, ear, 0)
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    s = np.sin(t)
    hx = ha * np.cos(t) * (1 - jaw * np.maximum(s, 0) ** 2.2)
    hy = hb * s * np.where(s > 0, 1.0, 1.04)
    head = np.stack([hcx + hx, hcy + hy], -1)
    cv.poly(img, head, _col(skin))
    cv.poly(hair_mask, head, 0)

    # --- soft shading, drawn at low resolution -----------------------------------------------
    dark = np.zeros((small, small), np.float32)
    light = np.zeros((small, small), np.float32)
    lowc = _Canvas(small, mat)
    ldir = u(-1, 1)  # light from the left (-1) or right (+1)
    lowc.poly(dark, head, 1.0, thickness=0.05)  # face rim
    lowc.poly(dark, _ellipse(hcx, hcy + hb * 0.98, ha * 0.62, 0.05, 24), 2.0)  # under-chin shadow
    for side in (-1, 1):
        lowc.poly(dark, _ellipse(fx + side * eye_sep, eye_y - 0.006, ew * 0.75, eh * 1.6, 24), 0.7)
        lowc.poly(
            light,
            _ellipse(fx + side * 0.11, mouth_y - 0.07, 0.045, 0.03, 20),
            0.35 + 0.4 * ldir * side,
        )
    nose_side = -1 if ldir > 0 else 1
    bridge = np.array(
        [[fx + nose_side * 0.022, eye_y + 0.01], [fx + nose_side * 0.028, nose_y - 0.01]]
    )
    lowc.poly(dark, bridge, 1.2, thickness=0.02, closed=False)
    lowc.poly(dark, _ellipse(fx, nose_y + 0.022, 0.03, 0.008, 16), 1.0)  # under the nose
    lowc.poly(dark, _ellipse(fx, mouth_y + 0.045, mouth_w * 0.3, 0.01, 16), 0.8)  # under the lip
    lowc.poly(light, _ellipse(fx, nose_y - 0.01, 0.012, 0.016, 16), 1.0)  # nose tip
    lowc.poly(light, _ellipse(fx - nose_side * 0.004, eye_y + 0.06, 0.007, 0.05, 16), 0.5)
    lowc.poly(light, _ellipse(fx + ldir * 0.05, hcy - hb * 0.6, 0.07, 0.04, 20), 0.6)  # forehead
    ks = max(1.0, small / 64)
    dark = cv2.GaussianBlur(dark, (0, 0), 1.6 * ks)
    light = cv2.GaussianBlur(light, (0, 0), 1.6 * ks)

    # --- eyes ------------------------------------------------------------------------------
    sclera = np.array([236, 232, 226], np.float32) * u(0.9, 1.0)
    lid_c = skin * 0.35 + hair_c * 0.25
    gaze = u(-0.25, 0.25), u(-0.15, 0.15)
    tilt = u(-0.15, 0.2)
    for side in (-1, 1):
        ex = fx + side * eye_sep
        w_side = ew * (1 + side * yaw * 4)
        uu = np.linspace(-1, 1, 25)
        xs = ex + uu * w_side / 2
        h = eh * openness
        up = eye_y - h * (1 - uu**2) ** 0.9 * (1 + 0.25 * side * uu) - side * tilt * eh * uu
        lo = eye_y + 0.55 * h * (1 - uu**2) ** 1.1 - side * tilt * eh * uu * 0.6
        almond = np.concatenate([np.stack([xs, up], -1), np.stack([xs[::-1], lo[::-1]], -1)])
        # Iris and pupil are clipped to the almond with a per-eye ROI.
        q = cv.pts(almond)
        x0, y0 = np.maximum(q.min(0) // _ONE - 2, 0)
        x1, y1 = np.minimum(q.max(0) // _ONE + 3, size)
        if x1 - x0 > 2 and y1 - y0 > 2:
            roi = img[y0:y1, x0:x1]
            patch = np.empty_like(roi)
            patch[:] = np.clip(sclera, 0, 255).astype(np.uint8)
            m = np.zeros(roi.shape[:2], np.uint8)
            off = np.array([x0, y0]) * _ONE
            cv2.fillPoly(m, [q - off], 255, _AA, _SHIFT)
            ic = np.array([ex + gaze[0] * w_side * 0.3, eye_y + gaze[1] * eh * 0.5 - 0.1 * h])
            r_iris = ew * u(0.2, 0.24)
            ipt = cv.pts(ic[None])[0] - off
            sc = float(np.hypot(mat[0, 0], mat[1, 0]))
            ri = max(1, int(round(r_iris * sc * cv.px)))
            cv2.circle(patch, tuple(int(v) for v in ipt), ri, _col(iris_c * 0.55), -1, _AA, _SHIFT)
            cv2.circle(
                patch, tuple(int(v) for v in ipt), int(ri * 0.86), _col(iris_c), -1, _AA, _SHIFT
            )
            cv2.circle(
                patch, tuple(int(v) for v in ipt), int(ri * 0.42), (12, 10, 10), -1, _AA, _SHIFT
            )
            hl = ipt + np.array([-ri * 0.35, -ri * 0.35]).astype(np.int32)
            cv2.circle(
                patch,
                tuple(int(v) for v in hl),
                max(1, int(ri * 0.16)),
                (250, 250, 250),
                -1,
                _AA,
                _SHIFT,
            )
            a = (m.astype(np.float32) / 255.0)[..., None]
            roi[:] = (patch * a + roi * (1 - a)).astype(np.uint8)
        lid_t = 0.0055 if u() < 0.5 else 0.0075
        cv.poly(img, np.stack([xs, up], -1), _col(lid_c), thickness=lid_t, closed=False)
        lash = np.array([[xs[-1 if side > 0 else 0], up[-1 if side > 0 else 0]]])
        lash = np.concatenate([lash, lash + [[side * ew * 0.12, -eh * 0.35]]])
        cv.poly(img, lash, _col(lid_c), thickness=0.004, closed=False)
        cv.poly(
            img,
            np.stack([xs[3:-3], lo[3:-3] + 0.002], -1),
            _col(skin * 0.72),
            thickness=0.002,
            closed=False,
        )
        crease = np.stack([xs[4:-2], up[4:-2] - eh * 0.55 - 0.004], -1)
        cv.poly(img, crease, _col(skin * 0.78), thickness=0.003, closed=False)
        # Brows: thick tapered stroke, part of the hair mask so it gets strand texture.
        bu = np.linspace(-1, 1, 15)
        bx = ex + side * (bu * ew * 0.65 + ew * 0.08)
        by = eye_y - u(0.045, 0.06) - brow_raise - 0.012 * (1 - bu**2) + 0.006 * bu
        bt = u(0.006, 0.011) * (1 - 0.5 * np.clip(bu, 0, 1))
        brow = np.concatenate(
            [np.stack([bx, by - bt], -1), np.stack([bx[::-1], (by + bt)[::-1]], -1)]
        )
        brow_c = hair_c * 0.8 if hair_c.mean() < 160 else hair_c * 0.55
        cv.poly(img, brow, _col(brow_c))
        cv.poly(hair_mask, brow, 170)

    # --- nose and mouth ----------------------------------------------------------------------
    nw = u(0.018, 0.028)
    for side in (-1, 1):
        nos = _ellipse(fx + side * nw, nose_y + 0.008, 0.008, 0.0045, 16)
        cv.poly(img, nos, _col(skin * 0.45))
    wing = np.stack(
        [
            fx + np.array([-1.6, -1.3, 0, 1.3, 1.6]) * nw,
            nose_y + np.array([-0.004, 0.012, 0.016, 0.012, -0.004]),
        ],
        -1,
    )
    cv.poly(img, wing, _col(skin * 0.7), thickness=0.0025, closed=False)

    lip_c = skin * np.array([0.88, 0.62, 0.62]) + np.array([25, 0, 5])
    if u() < 0.15:
        lip_c = lip_c * 0.6 + np.array([160, 30, 50]) * 0.4
    x, upt, gt, gb, lob = _lip_curves(
        fx, mouth_y, mouth_w, smile, u(0.01, 0.016), u(0.012, 0.02), mouth_open
    )
    upper = np.concatenate([np.stack([x, upt], -1), np.stack([x[::-1], gt[::-1]], -1)])
    lower = np.concatenate([np.stack([x, gb], -1), np.stack([x[::-1], lob[::-1]], -1)])
    if mouth_open > 0:
        inner = np.concatenate([np.stack([x, gt], -1), np.stack([x[::-1], gb[::-1]], -1)])
        cv.poly(img, inner, (60, 22, 25))
        teeth_h = min(mouth_open * 0.45, 0.01)
        teeth = np.concatenate(
            [np.stack([x[4:-4], gt[4:-4]], -1), np.stack([x[-5:3:-1], gt[-5:3:-1] + teeth_h], -1)]
        )
        cv.poly(img, teeth, (225, 220, 205))
    cv.poly(img, upper, _col(lip_c * 0.92))
    cv.poly(img, lower, _col(lip_c))
    cv.poly(
        img, np.stack([x, (gt + gb) / 2], -1), _col(lip_c * 0.45), thickness=0.003, closed=False
    )
    lowc.poly(light, np.stack([x[7:-7], lob[7:-7] - 0.006], -1), 0.8, thickness=0.01, closed=False)

    # --- facial hair -------------------------------------------------------------------------
    if u() < 0.12:
        # Band along the jaw below the mouth (full beard reaches the ears, goatee only the chin).
        s0 = u(0.15, 0.45) if u() < 0.7 else u(0.8, 0.9)
        outer = head[s > s0]
        side_x = np.abs(outer[0, 0] - hcx) * 0.85
        inner = np.array(
            [
                [hcx - side_x, outer[-1, 1] - 0.01],
                [fx - mouth_w * 0.75, mouth_y + 0.01],
                [fx, mouth_y + 0.03 + u(0, 0.02)],
                [fx + mouth_w * 0.75, mouth_y + 0.01],
                [hcx + side_x, outer[0, 1] - 0.01],
            ]
        )
        stache = np.concatenate(
            [np.stack([x, upt - 0.004], -1), np.stack([x[::-1], upt[::-1] - 0.016], -1)]
        )
        beard = np.concatenate([outer, inner])
        tmp = np.zeros_like(hair_mask)
        cv.poly(tmp, beard, 255)
        if u() < 0.7:
            cv.poly(tmp, stache, 255)
        cv.poly(tmp, lower, 0)
        cv.poly(tmp, upper, 0)
        ys, xs_ = np.nonzero(tmp[:: max(1, size // 64), :: max(1, size // 64)])
        if len(ys):
            st = max(1, size // 64)
            y0, y1 = max(0, ys.min() * st - st), min(size, ys.max() * st + 2 * st)
            x0, x1 = max(0, xs_.min() * st - st), min(size, xs_.max() * st + 2 * st)
            a = (tmp[y0:y1, x0:x1].astype(np.float32) * (u(0.5, 0.95) / 255.0))[..., None]
            roi = img[y0:y1, x0:x1]
            roi[:] = (np.asarray(hair_c, np.float32) * a + roi * (1 - a)).astype(np.uint8)
            np.maximum(hair_mask, tmp, out=hair_mask)

    # --- hair on top of the head -------------------------------------------------------------
    if style != "bald":
        cap_w, cap_h = ha * u(1.04, 1.1), hb * u(1.06, 1.14)
        cap = _ellipse(hcx, hcy + 0.01, cap_w, cap_h, 40, np.pi * 0.98, np.pi * 2.02)
        if style == "curly":
            cap += np.stack([np.zeros(40), wob(40, 0.01)], -1)
        line_y = hcy - hb * u(0.55, 0.75)  # hairline height at the centre
        temple_y = eye_y - u(0.02, 0.06)
        fringe = rng.choice(["part", "side", "bangs", "straight"])
        hu = np.linspace(1, -1, 21)
        hl_x = hcx + hu * ha * 0.98
        if fringe == "bangs":
            hl_y = np.full_like(hu, eye_y - u(0.08, 0.11)) + 0.004 * np.sin(hu * 23)
        elif fringe == "side":
            d = rng.choice([-1, 1])
            hl_y = line_y + (hu * d + 1) / 2 * u(0.05, 0.1) - 0.02
        elif fringe == "part":
            hl_y = line_y + 0.02 * (1 - np.abs(hu - u(-0.4, 0.4))) - 0.02
        else:
            hl_y = line_y + 0.0 * hu
        # Temples drop toward the ears.
        drop = np.abs(hu) ** 6
        hl_y = hl_y * (1 - drop) + temple_y * drop
        if style in ("short", "bun"):
            hl_y = np.minimum(hl_y, temple_y - 0.01 * drop)
        front = np.concatenate([cap, np.stack([hl_x, hl_y], -1)])
        cv.poly(img, front, _col(hair_c))
        cv.poly(hair_mask, front, 255)
        if style in ("long", "bob", "curly"):
            for side in (-1, 1):
                lock_len = hair_len - 0.05
                lock = np.array(
                    [
                        [hcx + side * cap_w, hcy],
                        [hcx + side * ha * 0.93, temple_y],
                        [hcx + side * ha * 0.9, ear_y + 0.05],
                        [hcx + side * ha * 1.03, lock_len],
                        [hcx + side * (cap_w + 0.03), lock_len],
                    ]
                )
                cv.poly(img, lock, _col(hair_c * 0.95))
                cv.poly(hair_mask, lock, 255)
        light_hair = _ellipse(hcx + ldir * 0.06, hcy - hb * 0.85, 0.08, 0.03, 16)
        lowc.poly(light, light_hair, 0.6)

    # --- glasses -----------------------------------------------------------------------------
    if u() < 0.2:
        frame_c = _col(u(10, 60, 3) if u() < 0.7 else u(120, 200, 3))
        sun = u() < 0.2
        gw, gh = ew * u(0.7, 0.85), eh * u(1.6, 2.1)
        round_ = u() < 0.4
        lens = []
        for side in (-1, 1):
            ex = fx + side * eye_sep
            if round_:
                lens.append(_ellipse(ex, eye_y + 0.003, gw, gh, 40))
            else:
                tt = np.linspace(0, 2 * np.pi, 40, endpoint=False)
                c, s_ = np.cos(tt), np.sin(tt)
                sq = 0.35
                lens.append(
                    np.stack(
                        [
                            ex + gw * np.sign(c) * np.abs(c) ** sq,
                            eye_y + 0.003 + gh * np.sign(s_) * np.abs(s_) ** sq,
                        ],
                        -1,
                    )
                )
        for ln in lens:
            if sun:
                cv.poly(img, ln, (20, 22, 26))
            cv.poly(img, ln, frame_c, thickness=u(0.004, 0.008))
            if not sun:
                lowc.poly(light, ln[8:14], 1.2, thickness=0.01, closed=False)
        bridge_pts = np.array(
            [[fx - eye_sep + gw, eye_y], [fx, eye_y - 0.008], [fx + eye_sep - gw, eye_y]]
        )
        cv.poly(img, bridge_pts, frame_c, thickness=0.005, closed=False)
        for side in (-1, 1):
            arm = np.array(
                [
                    [fx + side * (eye_sep + gw), eye_y - 0.005],
                    [hcx + side * ha * 1.02, ear_y - 0.02],
                ]
            )
            cv.poly(img, arm, frame_c, thickness=0.005, closed=False)

    # --- compose shading, hair texture and grain ---------------------------------------------
    gx = np.linspace(-1, 1, small, dtype=np.float32)
    grad = 1.0 + 0.12 * ldir * gx[None, :] + u(-0.05, 0.08) * gx[:, None]
    shade = grad * (1.0 - 0.22 * np.minimum(dark, 1.5)) * (1.0 + 0.18 * light)
    shade = cv2.resize(shade, (size, size), interpolation=cv2.INTER_LINEAR)
    # One multiplicative gain map (lighting x hair strands x grain) keeps the full-resolution work
    # to a few single-channel ops and one saturating uint8 multiply.
    tex = _hair_tiles(size)[rng.integers(3)]
    if rng.integers(2):
        tex = tex[:, ::-1]
    gain = cv2.multiply(hair_mask, tex, scale=u(0.35, 0.6) / 255.0, dtype=cv2.CV_32F)
    g = _grain_tile(size)
    oy, ox = rng.integers(0, g.shape[0] - size + 1, 2)
    gain = cv2.scaleAdd(g[oy : oy + size, ox : ox + size], u(0.008, 0.02), gain)
    gain += 1.0
    gain *= shade
    return cv2.multiply(img, cv2.merge([gain, gain, gain]), dtype=cv2.CV_8U)


def face_grid(indices, size: int = 128, seed: int = 0, cols: int = 8) -> np.ndarray:
    """Tiles rendered faces into one RGB image (for eyeballing the generator)."""
    faces = [render_face(i, size, seed=seed) for i in indices]
    rows = -(-len(faces) // cols)
    grid = np.zeros((rows * size, cols * size, 3), np.uint8)
    for k, f in enumerate(faces):
        r, c = divmod(k, cols)
        grid[r * size : (r + 1) * size, c * size : (c + 1) * size] = f
    return grid
