"""Paste restored face crops back into the photo, and optional colour transfer.

``paste(canvas, face, m)`` blends ``face`` (the restored S x S crop) into ``canvas`` in place,
where ``m`` maps canvas pixel centres to ``face`` pixel centres (``align``'s convention). For a
canvas upscaled by ``s`` (``--upscale``) pass ``align.upscaled(m, s)``; for a restorer whose output
is ``k`` times the crop size, ``align.resized(m, k)``.

Work stays inside the face's region: the bounding box of the crop square mapped into the canvas
(plus 2 px), clipped to the canvas. Only region-sized temporaries are made (the warped face, the
mask, the blended region, float32), so a 24-megapixel photo with ten faces costs the canvas and
ten face-sized regions, one at a time. Faces paste sequentially; each changes only its region.
A crop more than 2x larger than its place in the canvas is first area-averaged by that integer
factor (a bilinear warp alone would skip crop pixels and alias).

Soft mask (``soft_mask``), built in crop pixels and warped with the face, so every fraction is
of the face's size in the canvas too: the crop square (or a caller's crop-space mask, e.g.
``hull_mask`` of the landmarks) is eroded by ``ceil(3 sigma) + 1`` px and Gaussian-blurred with
``sigma = feather * S`` (default ``feather = 0.015``; kernel ``2 ceil(3 sigma) + 1``). At S = 512
that is sigma 7.7 px, 0 on the outer 2 px, 0.5 at 25.5 px and 1 from 49 px inwards (about 10% of
the side, as in CodeFormer's square mask, whose erosion and blur are each ``sqrt(area) / 20``).
The mask is exactly 0 near and outside the crop's edge, and there the canvas is not written at
all: pixels outside every mask keep their input values bit for bit.

Blending is ``canvas + mask * (face - canvas)`` in float32, rounded (``np.rint``) and clipped for
integer canvases, cast for float ones.

``color_transfer(restored, reference)`` (off unless the caller asks) gives the restored crop the
low frequencies (colour, shading) of the input crop: ``"wavelet"`` swaps the coarsest band of an
a-trous decomposition (as StableSR's wavelet colour fix), ``"adain"`` matches each channel's mean
and standard deviation (as CodeFormer's ``adain_npy`` colour transfer of the restored face).
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from artfr_jax.faces.align import _check_matrix, compose, scale_of

DEFAULT_FEATHER = 0.015
_MARGIN = 2  # canvas pixels around the crop's bounding box (bilinear support)


def inverse(m) -> np.ndarray:
    """Inverse of a 2x3 affine matrix (float64)."""
    m = _check_matrix(m)
    a = np.linalg.inv(m[:, :2])
    return np.concatenate([a, (-a @ m[:, 2])[:, None]], 1)


def face_region(m, crop_shape, canvas_shape, margin: int = _MARGIN):
    """(y0, y1, x0, x1): the canvas rows/columns that the crop (``crop_shape`` (h, w)) covers under
    ``m`` (canvas -> crop), plus ``margin`` px, clipped to ``canvas_shape``; None when empty."""
    h, w = crop_shape[:2]
    corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]])
    a = inverse(m)
    pts = corners @ a[:, :2].T + a[:, 2]
    x0 = max(math.floor(pts[:, 0].min()) - margin, 0)
    y0 = max(math.floor(pts[:, 1].min()) - margin, 0)
    x1 = min(math.ceil(pts[:, 0].max()) + margin + 1, canvas_shape[1])
    y1 = min(math.ceil(pts[:, 1].max()) + margin + 1, canvas_shape[0])
    if x1 <= x0 or y1 <= y0:
        return None
    return y0, y1, x0, x1


def hull_mask(points, size: int, grow: float = 1.0) -> np.ndarray:
    """A crop-space mask: the convex hull of ``points`` [K, 2] (crop pixels, e.g. the 68 landmarks
    through the crop matrix), scaled by ``grow`` about its centroid. float32 [size, size] in
    {0, 1}; pass it as ``paste(..., mask=...)``, which erodes and blurs it."""
    p = np.asarray(points, np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or len(p) < 3:
        raise ValueError(f"paste.hull_mask: points must be [K >= 3, 2], got {p.shape}")
    p = (p - p.mean(0)) * grow + p.mean(0)
    hull = cv2.convexHull(np.round(p * 16).astype(np.int32))
    out = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(out, hull, 1, lineType=cv2.LINE_8, shift=4)
    return out.astype(np.float32)


def _soften(hard: np.ndarray, feather: float) -> np.ndarray:
    side = math.sqrt(hard.shape[0] * hard.shape[1])
    sigma = max(feather * side, 0.3)
    half = math.ceil(3 * sigma)
    inside = (hard >= 0.5).astype(np.uint8)
    inside[[0, -1], :] = 0  # the crop's edge counts as outside: erode from it too
    inside[:, [0, -1]] = 0
    dist = cv2.distanceTransform(inside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    eroded = (dist > half + 1).astype(np.float32)
    out = cv2.GaussianBlur(
        eroded, (2 * half + 1, 2 * half + 1), sigma, borderType=cv2.BORDER_CONSTANT
    )
    # The blur's weights sum to 1 only up to rounding; the interior must be exactly 1.
    out[out > 1 - 1e-5] = 1.0
    return np.clip(out, 0.0, 1.0)


@functools.lru_cache(maxsize=8)
def _square_mask(h: int, w: int, feather: float) -> np.ndarray:
    out = _soften(np.ones((h, w), np.float32), feather)
    out.flags.writeable = False
    return out


def soft_mask(crop_shape, mask=None, feather: float = DEFAULT_FEATHER) -> np.ndarray:
    """The crop-space paste mask (module docstring): float32 [h, w] in [0, 1], exactly 0 on the
    crop's two outermost rows and columns and away from ``mask``, exactly 1 well inside.

    mask: None (the crop square) or a crop-space array [h, w] (e.g. ``hull_mask``), > 0.5 inside.
    """
    h, w = crop_shape[:2]
    if not 0 < feather < 0.5:
        raise ValueError(f"paste: feather must be in (0, 0.5), got {feather}")
    if mask is None:
        return _square_mask(int(h), int(w), float(feather))
    mask = np.asarray(mask, np.float32)
    if mask.shape != (h, w):
        raise ValueError(f"paste: mask must be the crop's shape {(h, w)}, got {mask.shape}")
    return _soften(mask, feather)


def _check_mask(mask, crop_shape):
    if mask is None:
        return None
    mask = np.asarray(mask, np.float32)
    if mask.shape != tuple(crop_shape[:2]):
        raise ValueError(f"paste: mask must be the face's shape {crop_shape[:2]}, got {mask.shape}")
    return mask


def _plan(m, crop_shape):
    """(m, None), or for a crop more than 2x larger than its place in the canvas, the matrix for
    the crop area-shrunk by that integer factor and the shrunk (w, h): bilinear sampling alone
    would skip crop pixels and alias."""
    shrink = int(scale_of(m) + 1e-6)
    if shrink < 2:
        return m, None
    fh, fw = crop_shape[:2]
    size = (max(1, round(fw / shrink)), max(1, round(fh / shrink)))
    sx, sy = size[0] / fw, size[1] / fh
    m = np.diag([sx, sy]) @ m
    m[:, 2] += [0.5 * sx - 0.5, 0.5 * sy - 0.5]
    return m, size


def _alpha(m, crop_shape, canvas_shape, mask, feather, size):
    if size is not None and mask is not None:
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_AREA)
    weights = soft_mask(crop_shape, mask, feather)
    region = face_region(m, crop_shape, canvas_shape)
    if region is None:
        return None
    y0, y1, x0, x1 = region
    local = compose(m, np.array([[1.0, 0.0, x0], [0.0, 1.0, y0]]))
    alpha = cv2.warpAffine(
        weights,
        local,
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return region, local, alpha


def paste_alpha(m, crop_shape, canvas_shape, *, mask=None, feather: float = DEFAULT_FEATHER):
    """The blend weights ``paste`` uses: ((y0, y1, x0, x1), float32 [y1 - y0, x1 - x0] in
    [0, 1]) for a crop of ``crop_shape`` under ``m`` (canvas -> crop), or None when the crop
    lies outside the canvas. ``paste`` writes exactly the pixels where this is > 0."""
    m = _check_matrix(m)
    mask = _check_mask(mask, crop_shape)
    m, size = _plan(m, crop_shape)
    shape = crop_shape[:2] if size is None else (size[1], size[0])
    placed = _alpha(m, shape, canvas_shape, mask, feather, size)
    return None if placed is None else (placed[0], placed[2])


def paste(
    canvas: np.ndarray,
    face: np.ndarray,
    m,
    *,
    mask=None,
    feather: float = DEFAULT_FEATHER,
    interpolation: int = cv2.INTER_LINEAR,
):
    """Blend the crop ``face`` [h, w(, C)] into ``canvas`` [H, W(, C)] in place (module docstring).

    m: 2x3, canvas pixel centres -> ``face`` pixel centres. mask: None (crop square) or a
    crop-space [h, w] mask (``hull_mask``, a parsing mask). Values must share the canvas's scale
    (e.g. both uint8 0..255). Returns the written region (y0, y1, x0, x1), or None when the crop
    lies outside the canvas.
    """
    if not isinstance(canvas, np.ndarray) or canvas.ndim not in (2, 3):
        raise ValueError(
            f"paste: canvas must be a numpy [H, W] or [H, W, C] array, got {canvas!r:.80}"
        )
    if not canvas.flags.writeable:
        raise ValueError("paste: canvas is read-only (it is written in place)")
    face = np.asarray(face)
    channels = 1 if canvas.ndim == 2 else canvas.shape[2]
    if face.ndim != canvas.ndim or (face.ndim == 3 and face.shape[2] != channels):
        raise ValueError(f"paste: face {face.shape} must have the canvas's channels {canvas.shape}")
    if not (np.issubdtype(canvas.dtype, np.integer) or np.issubdtype(canvas.dtype, np.floating)):
        raise ValueError(f"paste: canvas dtype {canvas.dtype} is neither integer nor float")
    m = _check_matrix(m)
    mask = _check_mask(mask, face.shape)
    m, size = _plan(m, face.shape)
    if size is not None:
        face = cv2.resize(face, size, interpolation=cv2.INTER_AREA)
    if face.ndim < canvas.ndim:  # cv2 drops a trailing channel axis of 1
        face = face[..., None]
    placed = _alpha(m, face.shape, canvas.shape, mask, feather, size)
    if placed is None:
        return None
    region, local, alpha = placed
    y0, y1, x0, x1 = region
    dsize = (x1 - x0, y1 - y0)
    write = alpha > 0
    if not write.any():
        return region
    blend = cv2.warpAffine(
        np.ascontiguousarray(face, np.float32),
        local,
        dsize,
        flags=interpolation | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    if blend.ndim < canvas.ndim:  # cv2 drops a trailing channel axis of 1
        blend = blend[..., None]
    target = canvas[y0:y1, x0:x1]
    # In place on region-sized float32 arrays: base + alpha * (face - base).
    base = target.astype(np.float32)
    blend -= base
    blend *= alpha if canvas.ndim == 2 else alpha[..., None]
    blend += base
    del base
    if np.issubdtype(canvas.dtype, np.integer):
        info = np.iinfo(canvas.dtype)
        np.rint(blend, out=blend)
        np.clip(blend, info.min, info.max, out=blend)
    np.copyto(
        target, blend.astype(canvas.dtype), where=write if canvas.ndim == 2 else write[..., None]
    )
    return region


def _atrous_lowpass(x: np.ndarray, levels: int) -> np.ndarray:
    """The coarsest band of an a-trous (stationary wavelet) decomposition: ``levels`` passes of the
    B3-like kernel [1, 2, 1] / 4 with dilation 1, 2, 4, ... (reflected borders)."""
    low = x
    for i in range(levels):
        d = 2**i
        k = np.zeros(2 * d + 1, np.float32)
        k[[0, d, 2 * d]] = [0.25, 0.5, 0.25]
        low = cv2.sepFilter2D(low, cv2.CV_32F, k, k, borderType=cv2.BORDER_REFLECT_101)
    return low


def color_transfer(
    restored: np.ndarray, reference: np.ndarray, method: str = "wavelet", levels: int = 5
) -> np.ndarray:
    """``restored`` [S, S, C] with the colour of ``reference`` (the input crop, resized to
    ``restored``'s size if needed). Same dtype as ``restored`` (rounded and clipped if integer).

    method: ``"wavelet"``: keep ``restored``'s detail bands, take ``reference``'s coarsest band of a
    ``levels``-level a-trous decomposition (features larger than about 2**levels px);
    ``"adain"``: per-channel mean and standard deviation of ``reference``.
    """
    restored = np.asarray(restored)
    reference = np.asarray(reference)
    if restored.ndim != 3 or reference.ndim != 3 or restored.shape[2] != reference.shape[2]:
        raise ValueError(
            f"paste.color_transfer: restored and reference must be [H, W, C] with the same C, got "
            f"{restored.shape} and {reference.shape}"
        )
    x = restored.astype(np.float32)
    r = reference.astype(np.float32)
    if r.shape[:2] != x.shape[:2]:
        r = cv2.resize(r, (x.shape[1], x.shape[0]), interpolation=cv2.INTER_AREA)
    if method == "wavelet":
        out = x - _atrous_lowpass(x, levels) + _atrous_lowpass(r, levels)
    elif method == "adain":
        mx, sx = x.mean((0, 1)), x.std((0, 1))
        mr, sr = r.mean((0, 1)), r.std((0, 1))
        out = (x - mx) / np.maximum(sx, 1e-6) * sr + mr
    else:
        raise ValueError(
            f"paste.color_transfer: method must be 'wavelet' or 'adain', got {method!r}"
        )
    if np.issubdtype(restored.dtype, np.integer):
        info = np.iinfo(restored.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(restored.dtype)


__all__ = [
    "DEFAULT_FEATHER",
    "color_transfer",
    "face_region",
    "hull_mask",
    "inverse",
    "paste",
    "paste_alpha",
    "soft_mask",
]
