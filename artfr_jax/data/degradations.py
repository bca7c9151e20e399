"""Synthetic degradation model for blind face restoration (ART-FR Eq. 8).

``I_l = {[(I_h * k_sigma) down_r + n_delta]_JPEG_q} up_r``: Gaussian blur, downscale by ``r``,
additive Gaussian noise (std ``delta`` on the 0-255 scale), JPEG at quality ``q``, and resize back
to the input size. ART-FR's ranges (Sec. 4.1) are the ``artfr`` preset; VQFR's (Sec. 4.1 of that
paper) the ``vqfr`` preset. Following GFPGAN/CodeFormer, whose pipeline Eq. 8 cites, the kernel is
isotropic or anisotropic with equal probability, and gray conversion / colour jitter are optional.

All randomness is drawn up front into a :class:`DegradationParams`, so a degradation is a pure
function of ``(hq, params)`` and the pipeline stays deterministic for a seed.

Extension-task presets (ART-FR Sec. 4.1 "Extensional applications", App. A.2, App. B):

- ``inpainting``: GPEN's free-form brush strokes painted white over the clean face (:mod:`masks`).
- ``colorization``: GFPGAN's colour jitter (per-channel shift, then brightness / contrast /
  saturation / hue) around an always-on gray conversion; the LQ is always gray.
- ``denoise_a`` / ``denoise_b``: Gaussian noise only, its std drawn per sample from {25, 50, 75,
  100} (Model A) or {125, 150, 175, 200} (Model B) on the 0-255 scale, clipped to uint8.
- ``sr``: x8 bicubic super-resolution (the paper only says "high downsampling rates"): antialiased
  bicubic shrink and bicubic enlarge (PIL, a = -0.5 as MATLAB ``imresize``), no extra blur.

Two-stage preset (OSDFace Sec. 4.1: "a dual-stage degradation model, with parameters following
Wave-Face"):

- ``osdface``: Eq. 8 twice, the second pass (``second_*`` knobs) on the first one's output, in the
  manner of Real-ESRGAN's second-order model. WaveFace's own values are not published in what we
  could find, so the ranges are Real-ESRGAN's (``train_realesrgan_x4plus.yml``) mapped onto Eq. 8;
  the choice is the framework's. Stage 1: sigma in [0.2, 3] (always), r in [1, 1/0.15], Gaussian
  noise std in [1, 30] (gray in 40%), JPEG q in [30, 95]. Stage 2 (always): blur in 80%, sigma in
  [0.2, 1.5], r in [1, 1/0.3], noise std in [1, 25] (gray in 40%), JPEG q in [30, 95].

The original presets' random streams are untouched: the extension and second-stage knobs draw
only when enabled, after all the original draws (the second stage last).
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import ml_collections
import numpy as np
from PIL import Image

from artfr_jax.data import masks

_INTERP = {
    "bilinear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "bicubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}
# Not a cv2 flag: PIL's bicubic (a = -0.5, MATLAB imresize's kernel), widened when shrinking so it
# antialiases; cv2's INTER_CUBIC samples only 4 taps and aliases at large factors.
_BICUBIC_AA = "bicubic_aa"

PRESETS = (
    "artfr",
    "vqfr",
    "none",
    "inpainting",
    "colorization",
    "denoise_a",
    "denoise_b",
    "sr",
    "osdface",
)
MASK_FILLS = ("white", "black", "noise")


def degradation_preset(name: str) -> ml_collections.ConfigDict:
    """Returns the degradation config for one of :data:`PRESETS`.

    ``'artfr'`` / ``'vqfr'``: Eq. 8 with each paper's ranges; ``'none'``: identity;
    ``'osdface'``: two Eq. 8 passes (module docstring; first stage sigma [0.2, 3], r [1, 6.67],
    noise [1, 30], q [30, 95]; second stage blur 80%, sigma [0.2, 1.5], r [1, 3.33], noise
    [1, 25], q [30, 95]); the rest are the extension tasks (module docstring). Usable as
    ``config.data.degradation``.

    ``second_stage_prob > 0`` switches on a second Eq. 8 pass on the first one's output, with its
    own ``second_*`` ranges (interpolation, kernel cap and ``fast_blur`` are shared).
    """
    c = ml_collections.ConfigDict()
    c.name = name
    c.blur_prob = 1.0
    c.blur_sigma = (1.0, 15.0)  # ART-FR: sigma in [1, 15]
    c.kernel_iso_prob = 0.5  # isotropic vs anisotropic (GFPGAN/CodeFormer practice)
    c.kernel_max_size = 41  # kernel size = min(2 * ceil(3 * sigma) + 1, this), odd
    c.downscale_range = (1.0, 30.0)  # ART-FR: r in [1, 30]
    c.downscale_interp = "bilinear"  # bilinear | area | bicubic | nearest
    c.upscale_interp = "bilinear"
    c.fast_blur = True  # blur after a partial area-shrink when sigma and r are both >= 2
    c.noise_prob = 1.0
    c.noise_range = (0.0, 20.0)  # ART-FR: delta in [0, 20], std on the 0-255 scale
    c.noise_gray_prob = 0.0  # same noise in all channels
    c.jpeg_prob = 1.0
    c.jpeg_range = (40, 100)  # ART-FR: q in [40, 100]
    c.gray_prob = 0.0  # LQ converted to gray (3 equal channels)
    c.color_jitter_prob = 0.0
    c.color_jitter_shift = 20.0  # per-channel shift in [-s, s] on the 0-255 scale
    # Extension knobs; these defaults are off and leave the random stream alone.
    c.noise_levels = ()  # non-empty: std drawn from this set, overriding noise_range
    c.gray_after_shift = False  # GFPGAN order: shift -> gray -> photometric jitter
    c.photometric_jitter_prob = 0.0  # GFPGAN's brightness/contrast/saturation/hue jitter
    c.jitter_brightness = (0.5, 1.5)  # factor ranges, as torchvision's ColorJitter
    c.jitter_contrast = (0.5, 1.5)
    c.jitter_saturation = (0.0, 1.5)
    c.jitter_hue = (-0.1, 0.1)  # fraction of the hue circle, within [-0.5, 0.5]
    c.mask_prob = 0.0  # free-form stroke mask painted over the LQ (masks.py)
    c.mask_max_strokes = 3  # 1..this strokes
    c.mask_vertices = (8, 27)  # walk steps per stroke (inclusive)
    c.mask_width_frac = (12 / 512, 80 / 512)  # brush width / shorter image side (GPEN @ 512)
    c.mask_step_frac = 1 / 8  # mean step / image diagonal
    c.mask_random_heading = True  # rotate each walk uniformly (GPEN's drift to +x otherwise)
    c.mask_fill = "white"  # white (GPEN) | black | noise
    # Second Eq. 8 pass on the first one's output (Real-ESRGAN's second-order model); off unless
    # second_stage_prob > 0. The ranges default to Real-ESRGAN's second degradation
    # (train_realesrgan_x4plus.yml: second_blur_prob, blur_sigma2, resize_range2, noise_range2,
    # gray_noise_prob2, jpeg_range2), keeping only its downscaling (r >= 1).
    c.second_stage_prob = 0.0
    c.second_blur_prob = 0.8
    c.second_blur_sigma = (0.2, 1.5)
    c.second_kernel_iso_prob = 0.5
    c.second_downscale_range = (1.0, 1 / 0.3)  # resize_range2 = [0.3, 1.2], shrink part
    c.second_noise_prob = 1.0
    c.second_noise_range = (1.0, 25.0)  # 0-255 scale
    c.second_noise_gray_prob = 0.4
    c.second_jpeg_prob = 1.0
    c.second_jpeg_range = (30, 95)
    if name == "artfr":
        pass
    elif name == "vqfr":
        c.blur_sigma = (0.2, 10.0)
        c.downscale_range = (1.0, 8.0)
        c.noise_range = (0.0, 15.0)
        c.jpeg_range = (60, 100)
    elif name == "osdface":
        # OSDFace trains with "a dual-stage degradation model, with parameters following Wave-Face";
        # WaveFace's values were not found, so both stages take Real-ESRGAN's second-order ranges
        # (train_realesrgan_x4plus.yml), mapped onto Eq. 8 -- the framework's choice:
        # - its x4 output grid is dropped (each stage resizes back to the input size) and only the
        #   shrinking part of its resize ranges is kept (r >= 1);
        # - it always adds noise, Gaussian or Poisson; Eq. 8 has Gaussian only, so always that;
        # - sinc filters, generalized / plateau kernels and random resize modes are left out.
        c.blur_sigma = (0.2, 3.0)  # blur_sigma
        c.downscale_range = (1.0, 1 / 0.15)  # resize_range = [0.15, 1.5], shrink part
        c.noise_range = (1.0, 30.0)  # noise_range
        c.noise_gray_prob = 0.4  # gray_noise_prob
        c.jpeg_range = (30, 95)  # jpeg_range
        c.second_stage_prob = 1.0  # Real-ESRGAN always runs its second degradation
    elif name in ("none", "inpainting", "colorization", "denoise_a", "denoise_b", "sr"):
        # The extension tasks start from the identity and switch on one degradation each.
        c.blur_prob = 0.0
        c.downscale_range = (1.0, 1.0)
        c.noise_prob = 0.0
        c.noise_range = (0.0, 0.0)
        c.jpeg_prob = 0.0
        if name == "inpainting":
            c.mask_prob = 1.0
        elif name == "colorization":
            # GFPGAN's train_gfpgan_v1 jitter probabilities; gray always, after the shift.
            c.gray_prob = 1.0
            c.gray_after_shift = True
            c.color_jitter_prob = 0.3
            c.photometric_jitter_prob = 0.3
        elif name in ("denoise_a", "denoise_b"):
            c.noise_prob = 1.0
            c.noise_levels = (25.0, 50.0, 75.0, 100.0)
            if name == "denoise_b":
                c.noise_levels = (125.0, 150.0, 175.0, 200.0)
            c.noise_range = (min(c.noise_levels), max(c.noise_levels))  # overridden; for display
        elif name == "sr":
            c.downscale_range = (8.0, 8.0)
            c.downscale_interp = _BICUBIC_AA
            c.upscale_interp = _BICUBIC_AA
    else:
        raise ValueError(f"unknown degradation preset {name!r} (expected {'|'.join(PRESETS)})")
    return c


@dataclasses.dataclass(frozen=True)
class DegradationParams:
    """One draw of Eq. 8's random variables; ``sigma_x == 0`` or ``jpeg_quality == 0`` = off."""

    sigma_x: float = 0.0
    sigma_y: float = 0.0
    theta: float = 0.0
    scale: float = 1.0
    noise_std: float = 0.0
    noise_gray: bool = False
    noise_seed: int = 0
    jpeg_quality: int = 0
    gray: bool = False
    color_shift: tuple[float, float, float] | None = None
    # Extension fields (off by default).
    gray_after_shift: bool = False
    jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    jitter_order: tuple[int, ...] = (0, 1, 2, 3)  # order of the four jitter ops
    mask_strokes: tuple[masks.Stroke, ...] = ()  # masks.sample_strokes output; () = no mask
    mask_fill: str = "white"
    mask_seed: int = 0  # for mask_fill='noise'
    # Second Eq. 8 pass on the first one's output (blur, scale, noise, JPEG fields used; the
    # photometric and mask fields of ``second`` are ignored). None = one stage.
    second: DegradationParams | None = None


def _pair(cfg, field: str, kind=float) -> tuple:
    """``cfg[field]`` as a (lo, hi) pair of ``kind``; a ValueError naming the field otherwise."""
    try:
        lo, hi = (kind(v) for v in cfg[field])
    except (TypeError, ValueError):
        raise ValueError(
            f"data.degradation.{field}={cfg[field]!r}: expected a (lo, hi) pair"
        ) from None
    return lo, hi


def _range(cfg, field: str) -> tuple[float, float]:
    lo, hi = _pair(cfg, field)
    if lo > hi or lo < 0:
        raise ValueError(f"data.degradation.{field}={tuple(cfg[field])}: expected 0 <= lo <= hi")
    return lo, hi


def sample_degradation(
    cfg: ml_collections.ConfigDict, rng: np.random.Generator
) -> DegradationParams:
    """Draws Eq. 8's sigma, r, delta, q (and the optional extras) from the config's ranges."""
    # Every draw is made whether or not it is used, so that changing one probability does not
    # shift the random stream of the other knobs.
    u = rng.uniform(size=8)
    p, nseed = _sample_eq8(cfg, rng, u[:5], "")
    p["gray"] = bool(u[5] < cfg.gray_prob)
    shift = rng.uniform(-cfg.color_jitter_shift, cfg.color_jitter_shift, size=3)
    if u[6] < cfg.color_jitter_prob:
        p["color_shift"] = tuple(float(v) for v in shift)
    _sample_extensions(cfg, rng, u, nseed, p)
    second_prob = float(cfg.get("second_stage_prob", 0.0))
    if second_prob > 0:  # last, so that no other knob's stream moves
        u2 = rng.uniform(size=6)
        p2, _ = _sample_eq8(cfg, rng, u2[1:], "second_")
        if u2[0] < second_prob:
            p["second"] = DegradationParams(**p2)
    return DegradationParams(**p)


def _sample_eq8(cfg, rng: np.random.Generator, u: np.ndarray, pre: str) -> tuple[dict, int]:
    """Eq. 8's blur, r, noise and JPEG draws from the ``{pre}*`` fields; returns (fields, seed).

    ``u``: uniforms for blur, isotropic kernel, noise, gray noise and JPEG, in that order.
    """
    p = {}
    s_lo, s_hi = _range(cfg, pre + "blur_sigma")
    sx, sy = rng.uniform(s_lo, s_hi, size=2)
    theta = rng.uniform(-math.pi, math.pi)
    if u[0] < cfg[pre + "blur_prob"] and s_hi > 0:
        if u[1] < cfg[pre + "kernel_iso_prob"]:
            p.update(sigma_x=float(sx), sigma_y=float(sx), theta=0.0)
        else:
            p.update(sigma_x=float(sx), sigma_y=float(sy), theta=float(theta))
    field = pre + "downscale_range"
    r_lo, r_hi = _range(cfg, field)
    if r_lo < 1:
        raise ValueError(f"data.degradation.{field}={tuple(cfg[field])}: need r >= 1")
    p["scale"] = float(rng.uniform(r_lo, r_hi))
    n_lo, n_hi = _range(cfg, pre + "noise_range")
    nstd = float(rng.uniform(n_lo, n_hi))
    nseed = int(rng.integers(0, 2**31 - 1))
    if u[2] < cfg[pre + "noise_prob"] and nstd > 0:
        p.update(
            noise_std=nstd, noise_seed=nseed, noise_gray=bool(u[3] < cfg[pre + "noise_gray_prob"])
        )
    field = pre + "jpeg_range"
    q_lo, q_hi = _pair(cfg, field, int)
    if not 1 <= q_lo <= q_hi <= 100:
        raise ValueError(f"data.degradation.{field}={tuple(cfg[field])}: expected 1..100")
    q = int(rng.integers(q_lo, q_hi + 1))
    if u[4] < cfg[pre + "jpeg_prob"]:
        p["jpeg_quality"] = q
    return p, nseed


def _sample_extensions(cfg, rng: np.random.Generator, u: np.ndarray, nseed: int, p: dict) -> None:
    """The extension knobs' draws, after the original ones and only for knobs that are on."""
    levels = tuple(float(v) for v in (cfg.get("noise_levels") or ()))
    if levels:
        if min(levels) < 0:
            raise ValueError(f"data.degradation.noise_levels={levels}: expected stds >= 0")
        level = levels[int(rng.integers(len(levels)))]
        for k in ("noise_std", "noise_seed", "noise_gray"):
            p.pop(k, None)
        if u[2] < cfg.noise_prob and level > 0:
            p.update(noise_std=level, noise_seed=nseed, noise_gray=bool(u[3] < cfg.noise_gray_prob))
    if p.get("gray") and cfg.get("gray_after_shift", False):
        p["gray_after_shift"] = True
    jitter_prob = float(cfg.get("photometric_jitter_prob", 0.0))
    if jitter_prob > 0:
        uj = rng.uniform()
        b = rng.uniform(*_range(cfg, "jitter_brightness"))
        c = rng.uniform(*_range(cfg, "jitter_contrast"))
        s = rng.uniform(*_range(cfg, "jitter_saturation"))
        h_lo, h_hi = (float(v) for v in cfg.jitter_hue)
        if not -0.5 <= h_lo <= h_hi <= 0.5:
            raise ValueError(
                f"data.degradation.jitter_hue={tuple(cfg.jitter_hue)}: expected -0.5 <= lo <= hi "
                f"<= 0.5"
            )
        h = rng.uniform(h_lo, h_hi)
        order = rng.permutation(4)
        if uj < jitter_prob:
            p["jitter"] = (float(b), float(c), float(s), float(h))
            p["jitter_order"] = tuple(int(v) for v in order)
    mask_prob = float(cfg.get("mask_prob", 0.0))
    if mask_prob > 0:
        if cfg.mask_fill not in MASK_FILLS:
            raise ValueError(
                f"data.degradation.mask_fill={cfg.mask_fill!r}: expected {'|'.join(MASK_FILLS)}"
            )
        um = rng.uniform()
        mseed = int(rng.integers(0, 2**31 - 1))
        try:
            strokes = masks.sample_strokes(
                rng,
                max_strokes=int(cfg.mask_max_strokes),
                vertices=tuple(cfg.mask_vertices),
                width_frac=tuple(cfg.mask_width_frac),
                step_frac=float(cfg.mask_step_frac),
                random_heading=bool(cfg.mask_random_heading),
            )
        except ValueError as e:
            raise ValueError(f"data.degradation.mask_*: {e}") from None
        if um < mask_prob:
            p.update(mask_strokes=strokes, mask_fill=str(cfg.mask_fill), mask_seed=mseed)


def kernel_size(sigma: float, max_size: int = 41) -> int:
    """Odd kernel size covering +-3 sigma, capped at ``max_size`` (made odd)."""
    k = 2 * math.ceil(3 * sigma) + 1
    m = max_size if max_size % 2 else max_size - 1
    return max(1, min(k, m))


def gaussian_kernel(sigma_x: float, sigma_y: float, theta: float, size: int) -> np.ndarray:
    """Normalised (an)isotropic Gaussian kernel ``[size, size]``, rotated by ``theta`` radians."""
    ax = np.arange(size, dtype=np.float64) - size // 2
    xx, yy = np.meshgrid(ax, ax)
    c, s = math.cos(theta), math.sin(theta)
    u = c * xx + s * yy
    v = -s * xx + c * yy
    k = np.exp(-0.5 * ((u / max(sigma_x, 1e-6)) ** 2 + (v / max(sigma_y, 1e-6)) ** 2))
    return (k / k.sum()).astype(np.float32)


def _blur(img: np.ndarray, p: DegradationParams, max_size: int) -> np.ndarray:
    smin, smax = sorted((p.sigma_x, p.sigma_y))
    if smin == smax:
        size = kernel_size(smax, max_size)
        if size <= 1:
            return img
        return cv2.GaussianBlur(img, (size, size), smax, borderType=cv2.BORDER_REFLECT_101)
    # Anisotropic: covariance = smin^2 I + (smax^2 - smin^2) v v^T (v the long axis), and Gaussian
    # covariances add under convolution, so the kernel is an isotropic blur followed by a 1-D blur
    # along v (_line_blur). It matches the dense kernel up to the bilinear resampling of two
    # rotations. On one core it is as quick as a dense filter2D (which switches to a DFT) at 512 px
    # (about 10 ms for 41 taps) and 1.1-1.9x quicker at 256 px, where the fast path blurs.
    if smin > 0:
        size = kernel_size(smin, max_size)
        if size > 1:
            img = cv2.GaussianBlur(img, (size, size), smin, borderType=cv2.BORDER_REFLECT_101)
    s_line = math.sqrt(smax**2 - smin**2)
    size = kernel_size(s_line, max_size)
    if size <= 1:
        return img
    return _line_blur(
        img, p.theta if p.sigma_x >= p.sigma_y else p.theta + math.pi / 2, s_line, size
    )


def _line_blur(img: np.ndarray, phi: float, sigma: float, size: int) -> np.ndarray:
    """1-D Gaussian blur of ``img`` along the direction ``phi`` (radians from the x axis).

    Rotates onto a canvas just large enough for the rotated image plus the kernel's reach along
    its rows, blurs the rows, and rotates back. The source is padded by reflection beforehand, so
    the rotation reads no pixel outside it within that reach (a reflecting border in
    ``warpAffine`` itself costs twice the rotation), and rows of more than 31 taps use
    ``sepFilter2D`` (2x quicker than ``GaussianBlur`` there)."""
    c, s = math.cos(phi), math.sin(phi)
    h, w = img.shape[:2]
    # Padding: the kernel's half width, plus the two bilinear footprints and the shift's rounding.
    m = size // 2 + 3
    src = cv2.copyMakeBorder(img, m, m, m, m, cv2.BORDER_REFLECT_101)
    cw = math.ceil(w * abs(c) + h * abs(s)) + 2 * m + 2
    ch = math.ceil(w * abs(s) + h * abs(c)) + 2
    rot = np.array([[c, s], [-s, c]])
    # image -> canvas coordinates; a whole-pixel shift keeps right angles free of resampling
    shift = np.round(np.array([cw / 2, ch / 2]) - rot @ [w / 2, h / 2])
    to_canvas = np.concatenate([rot, (shift - rot @ [m, m])[:, None]], 1)  # from padded source
    big = cv2.warpAffine(src, to_canvas, (cw, ch), flags=cv2.INTER_LINEAR)
    if size > 31:
        row = cv2.getGaussianKernel(size, sigma)
        big = cv2.sepFilter2D(big, -1, row, np.ones((1, 1)), borderType=cv2.BORDER_REFLECT_101)
    else:
        big = cv2.GaussianBlur(big, (size, 1), sigma, sigmaY=0.1, borderType=cv2.BORDER_REFLECT_101)
    return cv2.warpAffine(
        big,
        np.concatenate([rot, shift[:, None]], 1),
        (w, h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )


def reference_blur(img: np.ndarray, p: DegradationParams, max_size: int = 41) -> np.ndarray:
    """Dense-kernel blur with :func:`gaussian_kernel` (slow; for tests and inspection)."""
    size = kernel_size(max(p.sigma_x, p.sigma_y), max_size)
    k = gaussian_kernel(p.sigma_x, p.sigma_y, p.theta, size)
    return cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REFLECT_101)


def _interp(name: str, field: str) -> int:
    if name not in _INTERP:
        raise ValueError(
            f"data.degradation.{field}={name!r}: expected one of {sorted([*_INTERP, _BICUBIC_AA])}"
        )
    return _INTERP[name]


def _resize(img: np.ndarray, size: tuple[int, int], name: str, field: str) -> np.ndarray:
    """Resizes uint8 ``img`` to ``size`` = (w, h) with the named interpolation."""
    if name == _BICUBIC_AA:
        return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC))
    return cv2.resize(img, size, interpolation=_interp(name, field))


def color_jitter(
    img: np.ndarray,
    brightness: float = 1.0,
    contrast: float = 1.0,
    saturation: float = 1.0,
    hue: float = 0.0,
    order: tuple[int, ...] = (0, 1, 2, 3),
) -> np.ndarray:
    """torchvision-style ColorJitter with fixed factors on RGB uint8 ``[H, W, 3]``.

    Ops (0 brightness, 1 contrast, 2 saturation, 3 hue) run in ``order`` on [0, 1] floats, each
    clipped, as GFPGAN's LQ jitter; factors 1, 1, 1, 0 are the identity. Keeps gray images gray.
    """
    x = img.astype(np.float32) / 255.0
    for op in order:
        if op == 0:
            x = np.clip(x * brightness, 0.0, 1.0)
        elif op in (1, 2):
            g = x @ np.array([0.299, 0.587, 0.114], np.float32)  # BT.601 luma, as torchvision
            ref = g.mean() if op == 1 else g[..., None]
            f = contrast if op == 1 else saturation
            x = np.clip(f * x + (1.0 - f) * ref, 0.0, 1.0)
        elif op == 3 and hue != 0.0:
            hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # float input: H in degrees [0, 360)
            hsv[..., 0] = np.mod(hsv[..., 0] + 360.0 * hue, 360.0)
            x = np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0.0, 1.0)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def apply_degradation(
    hq: np.ndarray,
    p: DegradationParams,
    *,
    kernel_max_size: int = 41,
    downscale_interp: str = "bilinear",
    upscale_interp: str = "bilinear",
    fast_blur: bool = True,
) -> np.ndarray:
    """Eq. 8 on an RGB uint8 image ``[H, W, 3]``; returns LQ uint8 of the same shape.

    With ``p.second`` set, a second Eq. 8 pass with its fields follows the first (same options),
    before the gray / colour / mask steps of ``p``.

    ``fast_blur`` blurs at reduced resolution when both sigma and r are large (see below);
    ``False`` always blurs at full resolution.
    """
    if hq.dtype != np.uint8 or hq.ndim != 3 or hq.shape[2] != 3:
        raise ValueError(f"degradation input must be uint8 [H, W, 3], got {hq.dtype} {hq.shape}")
    h, w = hq.shape[:2]
    kw = dict(
        kernel_max_size=kernel_max_size,
        downscale_interp=downscale_interp,
        upscale_interp=upscale_interp,
        fast_blur=fast_blur,
    )
    img = _eq8(hq, p, **kw)
    if p.second is not None:
        img = _eq8(img, p.second, **kw)
    if p.gray and not p.gray_after_shift:
        img = _to_gray(img)
    if p.color_shift is not None:
        img = cv2.add(img, np.full(img.shape, p.color_shift, np.float32), dtype=cv2.CV_8U)
    if p.gray and p.gray_after_shift:
        img = _to_gray(img)
    if p.jitter is not None:
        img = color_jitter(img, *p.jitter, order=p.jitter_order)
    if p.mask_strokes:
        img = masks.fill_mask(
            img, masks.render_mask(p.mask_strokes, h, w), p.mask_fill, p.mask_seed
        )
    return np.ascontiguousarray(img)


def _eq8(
    hq: np.ndarray,
    p: DegradationParams,
    *,
    kernel_max_size: int,
    downscale_interp: str,
    upscale_interp: str,
    fast_blur: bool,
) -> np.ndarray:
    """One Eq. 8 pass (blur, downscale, noise, JPEG, resize back) with ``p``'s fields."""
    h, w = hq.shape[:2]
    img = hq
    if p.sigma_x > 0:
        smin = min(p.sigma_x, p.sigma_y)
        f = min(p.scale, smin / 1.5) if fast_blur else 1.0
        if f >= 2.0:
            # Blur and downscale commute up to the shrink's own small blur: shrink by f with area
            # averaging (a box of variance (f^2 - 1) / 12), blur the rest at 1/f resolution. Same
            # LQ up to ~1 grey level, at a fraction of the cost for the large sigma / r of Eq. 8.
            img = cv2.resize(
                img, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA
            )
            fx, fy = w / img.shape[1], h / img.shape[0]
            box = (fx * fy - 1) / 12
            p_small = dataclasses.replace(
                p,
                sigma_x=math.sqrt(max(p.sigma_x**2 - box, 0.01)) / math.sqrt(fx * fy),
                sigma_y=math.sqrt(max(p.sigma_y**2 - box, 0.01)) / math.sqrt(fx * fy),
            )
            img = _blur(img, p_small, max(3, round(kernel_max_size / f)))
        else:
            img = _blur(img, p, kernel_max_size)
    if p.scale != 1.0:
        size = (max(1, round(w / p.scale)), max(1, round(h / p.scale)))
        img = _resize(img, size, downscale_interp, "downscale_interp")
    if p.noise_std > 0:
        noise = np.empty(img.shape[:2] + ((1,) if p.noise_gray else (3,)), np.float32)
        # cv2's RNG is thread-local; seeding right before the draw keeps it deterministic and is
        # ~3x faster than numpy's normal sampler.
        cv2.setRNGSeed(p.noise_seed)
        cv2.randn(noise, (0.0,) * noise.shape[2], (p.noise_std,) * noise.shape[2])
        img = (
            cv2.add(img, noise, dtype=cv2.CV_8U)
            if noise.shape[2] == 3
            else cv2.add(img, np.repeat(noise, 3, axis=2), dtype=cv2.CV_8U)
        )
    if p.jpeg_quality > 0:
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, p.jpeg_quality]
        )
        if not ok:
            raise RuntimeError("cv2.imencode failed for JPEG degradation")
        img = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    if img.shape[:2] != (h, w):
        img = _resize(img, (w, h), upscale_interp, "upscale_interp")
    return img


def _to_gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def random_degrade(
    hq: np.ndarray, cfg: ml_collections.ConfigDict, rng: np.random.Generator
) -> np.ndarray:
    """Samples parameters from ``cfg`` with ``rng`` and applies Eq. 8."""
    p = sample_degradation(cfg, rng)
    return apply_degradation(
        hq,
        p,
        kernel_max_size=int(cfg.kernel_max_size),
        downscale_interp=cfg.downscale_interp,
        upscale_interp=cfg.upscale_interp,
        fast_blur=bool(cfg.get("fast_blur", True)),
    )
