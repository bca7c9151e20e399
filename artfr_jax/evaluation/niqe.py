"""NIQE no-reference quality metric (Mittal et al., "Making a 'Completely Blind' Image Quality
Analyzer", IEEE SPL 2013), numerically following BasicSR's ``calculate_niqe`` (itself a port of the
MATLAB release).

Pipeline: Y channel (MATLAB BT.601 'y') or gray, rounded to integers; MSCN coefficients with a 7x7
Gaussian window (Eq. 1); per 96x96 block (no overlap) 18 features from an AGGD fit of the MSCN
block and of its products with 4 shifted copies (Eq. 7-8), moment-matched on the shape grid
0.2:0.001:10; the same at half scale (MATLAB bicubic ``imresize`` with antialiasing, 48x48 blocks);
distance to the pristine multivariate Gaussian (Eq. 10). Runs in NumPy on the host (data-dependent
masks and grid searches, not worth jitting); lower is better.

The pristine model (``data/niqe_pris_params.npz``) holds the numbers shipped with BasicSR 1.4.2
(``basicsr/metrics/niqe_pris_params.npz``, from the MATLAB release).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

_PARAMS_PATH = Path(__file__).parent / "data" / "niqe_pris_params.npz"
_BLOCK = 96
# BT.601 luma weights (MATLAB rgb2ycbcr), in B, G, R order as BasicSR sums them.
_Y_WEIGHTS_BGR = np.array([24.966, 128.553, 65.481])
_GRAY_WEIGHTS_BGR = np.array([0.114, 0.587, 0.299], dtype=np.float32)
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))


@functools.lru_cache(maxsize=1)
def _pristine_params() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(_PARAMS_PATH) as d:
        return d["mu_pris_param"].reshape(-1), d["cov_pris_param"], d["gaussian_window"]


@functools.lru_cache(maxsize=1)
def _shape_grid() -> tuple[np.ndarray, ...]:
    """AGGD shape grid and Gamma-function tables: (alpha, rho(alpha), G(1/a), G(2/a), G(3/a))."""
    alpha = np.arange(0.2, 10.001, 0.001)
    gam = np.vectorize(math.gamma, otypes=[np.float64])
    recip = np.reciprocal(alpha)
    rho = gam(2 * recip) ** 2 / (gam(recip) * gam(3 * recip))
    return alpha, rho, gam(1 / alpha), gam(2 / alpha), gam(3 / alpha)


def _aggd_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Moment-matching AGGD fit per row. x: [N, P]. Returns alpha, beta_l, beta_r, mean, each [N].

    Rows without negative (or positive) entries give NaN, as in the reference (dropped later).
    """
    x = x.astype(np.float64)
    sq = x * x
    neg, pos = x < 0, x > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        left_std = np.sqrt(np.where(neg, sq, 0).sum(1) / neg.sum(1))
        right_std = np.sqrt(np.where(pos, sq, 0).sum(1) / pos.sum(1))
        g = left_std / right_std
        rhat = np.abs(x).mean(1) ** 2 / sq.mean(1)
        rhat_norm = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    alpha_grid, rho, g1, g2, g3 = _shape_grid()
    # NaN rows: argmin of an all-NaN row is 0, their beta/mean stay NaN through left/right_std.
    idx = np.argmin((rho[None, :] - rhat_norm[:, None]) ** 2, axis=1)
    scale = np.sqrt(g1[idx] / g3[idx])
    beta_l, beta_r = left_std * scale, right_std * scale
    mean = (beta_r - beta_l) * (g2[idx] / g1[idx])
    return alpha_grid[idx], beta_l, beta_r, mean


def _block_features(blocks: np.ndarray) -> np.ndarray:
    """18 NIQE features per MSCN block (Sec. 2 of the paper). blocks: [N, b, b] -> [N, 18]."""
    n = blocks.shape[0]
    flat = blocks.reshape(n, -1)
    alpha, beta_l, beta_r, _ = _aggd_fit(flat)
    feats = [alpha, (beta_l + beta_r) / 2]
    for shift in _SHIFTS:
        prod = (blocks * np.roll(blocks, shift, axis=(1, 2))).reshape(n, -1)
        alpha, beta_l, beta_r, mean = _aggd_fit(prod)
        feats += [alpha, mean, beta_l, beta_r]
    return np.stack(feats, axis=1)


def _convolve_nearest(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D convolution, output same size, edge-replicated borders (scipy ``mode='nearest'``)."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    padded = np.pad(img.astype(np.float64), ((ph, ph), (pw, pw)), mode="edge")
    flipped = kernel[::-1, ::-1]
    h, w = img.shape
    out = np.zeros((h, w), np.float64)
    for i in range(kh):
        for j in range(kw):
            out += flipped[i, j] * padded[i : i + h, j : j + w]
    return out.astype(img.dtype)


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic kernel with a = -0.5 (MATLAB's 'bicubic')."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return (inner + outer).astype(x.dtype)


def _resize_matrix(in_len: int, scale: float) -> np.ndarray:
    """[out, in] float32 matrix of MATLAB ``imresize(..., 'bicubic')`` (antialiased when shrinking).

    Weights are built in float32 like BasicSR's torch port, so results agree to float32 rounding.
    """
    f32 = np.float32
    out_len = math.ceil(in_len * scale)
    width = 4.0 / scale if scale < 1 else 4.0
    x = np.linspace(1, out_len, out_len, dtype=f32)
    u = x / f32(scale) + f32(0.5 * (1 - 1 / scale))  # output centre, 1-based input coordinates
    left = np.floor(u - f32(width / 2))
    n_taps = math.ceil(width) + 2
    taps = left[:, None] + np.arange(n_taps, dtype=f32)[None, :]
    dist = u[:, None] - taps
    w = f32(scale) * _cubic(dist * f32(scale)) if scale < 1 else _cubic(dist)
    w = w / w.sum(1, keepdims=True)
    # Out-of-range taps read a mirrored copy that repeats the edge pixel (MATLAB 'symmetric').
    src = taps.astype(np.int64) - 1
    src = np.where(src < 0, -src - 1, src)
    src = np.where(src >= in_len, 2 * in_len - 1 - src, src)
    mat = np.zeros((out_len, in_len), f32)
    np.add.at(mat, (np.repeat(np.arange(out_len), n_taps), src.ravel()), w.ravel())
    return mat


def matlab_imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB-style bicubic resize of a 2-D image (antialiasing on downscale), in float32.

    img: [H, W] -> [ceil(H*scale), ceil(W*scale)], not rounded or clipped. Rows first, then
    columns, with a float32 intermediate (as BasicSR's ``imresize``).
    """
    if img.ndim != 2:
        raise ValueError(f"matlab_imresize: expected a 2-D image, got shape {img.shape}")
    rows = _resize_matrix(img.shape[0], scale)
    cols = _resize_matrix(img.shape[1], scale)
    tmp = rows @ img.astype(np.float32)
    return tmp @ cols.T


def _to_luma(img: np.ndarray, convert_to: str) -> np.ndarray:
    """[H, W, 3] RGB or [H, W] in [0, 255] -> rounded 2-D float32 luma, with BasicSR's casts."""
    x = img.astype(np.float32)
    if x.ndim == 2:
        return x.round()
    bgr = x[..., ::-1] / np.float32(255.0)
    if convert_to == "y":
        # BasicSR sums in float64, stores Y/255 as float32, then scales back: rounding ties depend
        # on that float32 step.
        y = ((bgr @ _Y_WEIGHTS_BGR + 16.0) / 255.0).astype(np.float32) * np.float32(255.0)
    else:
        y = (bgr @ _GRAY_WEIGHTS_BGR) * np.float32(255.0)  # float32, like cv2 BGR2GRAY
    return y.round()


def niqe_from_luma(luma: np.ndarray) -> float:
    """NIQE of a 2-D luma image in [0, 255] (already cropped and rounded). Needs >= 2 blocks."""
    mu_pris, cov_pris, window = _pristine_params()
    nh, nw = luma.shape[0] // _BLOCK, luma.shape[1] // _BLOCK
    img = luma[: nh * _BLOCK, : nw * _BLOCK]
    feats = []
    for scale in (1, 2):
        mu = _convolve_nearest(img, window)
        var = _convolve_nearest(np.square(img), window) - np.square(mu)
        mscn = (img - mu) / (np.sqrt(np.abs(var)) + 1)  # Eq. 1, C = 1
        b = _BLOCK // scale
        blocks = mscn.reshape(nh, b, nw, b).transpose(0, 2, 1, 3).reshape(nh * nw, b, b)
        feats.append(_block_features(blocks))
        if scale == 1:
            # BasicSR resizes in [0, 1] float32 (torch); keep float32 for parity.
            img = matlab_imresize(img / 255.0, 0.5) * np.float32(255.0)
    dist = np.concatenate(feats, axis=1)
    mu_dist = np.nanmean(dist, axis=0)
    cov_dist = np.cov(dist[~np.isnan(dist).any(axis=1)], rowvar=False)
    diff = mu_pris - mu_dist
    quality = diff @ np.linalg.pinv((cov_pris + cov_dist) / 2) @ diff  # Eq. 10
    return float(np.sqrt(quality))


def niqe(img: np.ndarray, crop_border: int = 0, convert_to: str = "y") -> float:
    """NIQE score (lower is better), matching BasicSR's ``calculate_niqe``.

    Args:
      img: [H, W, 3] **RGB** or [H, W] gray, values in [0, 255] (uint8, or float on that scale).
        BasicSR's function expects BGR (as read by cv2); here the channel flip is done internally,
        so ``niqe(rgb)`` == ``calculate_niqe(rgb[..., ::-1], crop_border)``. A 2-D input is used
        as is (``convert_to`` ignored), like BasicSR's ``input_order='HW'``.
      crop_border: pixels removed from each edge before scoring.
      convert_to: 'y' (MATLAB BT.601 Y of YCbCr) or 'gray' (OpenCV BGR2GRAY weights).

    The (cropped) image must hold at least two 96x96 blocks; extra rows/cols are dropped.
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3):
        raise ValueError(f"niqe: img must be [H, W, 3] RGB or [H, W] gray, got shape {img.shape}")
    if convert_to not in ("y", "gray"):
        raise ValueError(f"niqe: convert_to must be 'y' or 'gray', got {convert_to!r}")
    if crop_border < 0:
        raise ValueError(f"niqe: crop_border must be >= 0, got {crop_border}")
    luma = _to_luma(img, convert_to)
    if crop_border:
        luma = luma[crop_border:-crop_border, crop_border:-crop_border]
    nblocks = (luma.shape[0] // _BLOCK) * (luma.shape[1] // _BLOCK)
    if nblocks < 2:
        raise ValueError(
            f"niqe: image (after crop_border={crop_border}) is {luma.shape[0]}x{luma.shape[1]}; "
            f"needs at least two {_BLOCK}x{_BLOCK} blocks"
        )
    return niqe_from_luma(luma)
