"""Similarity transforms from detected landmarks to the aligned S x S crop, and the crop warp.

Pixel-centre convention (everywhere in ``artfr_jax.faces``): a 2x3 matrix ``m`` maps a point
``(x, y)`` of its source image to ``m @ (x, y, 1)`` in its destination image, where integer
coordinates are pixel centres (pixel ``[i, j]`` is the unit square centred on ``(x=j, y=i)``; the
image's outer edge is at ``-0.5`` and ``W - 0.5``). ``cv2.warpAffine`` uses the same convention,
so ``warp_face(image, m, S)`` puts input pixel centre ``p`` at crop pixel centre ``m @ p``.
dlib's landmarks and boxes are pixel indices, i.e. the same convention.

Templates (``TEMPLATES``, 5 points as (x, y) for a reference crop size):

* ``dlib5`` (used for ``Face.kind == "dlib5"``, the default detector's landmarks): CodeFormer's
  ``face_restoration_helper`` template for ``det_model == 'dlib'``, "standard 5 landmarks for FFHQ
  faces with 1024 x 1024", in dlib's 5-point order: the image-right eye's outer corner, its inner
  corner, the image-left eye's outer corner, its inner corner, the bottom of the nose. Its points
  are where dlib's own 5-point predictor puts those features on FFHQ-aligned faces (on the
  astronaut's 1024 px FFHQ crop: within 4 px), so fitting it gives the FFHQ alignment the models
  were trained on, without the non-commercial 68-point model. Checked on ``skimage.data.astronaut()``
  (tests/test_faces.py): the dlib-5 matrix and the exact FFHQ (68-point quad) matrix of the same
  face place its 68 landmarks a mean 1.6 px (max 3.1) apart at 512 px; the 68-point predictor run
  on the dlib-5 crop and on ``dlib_face.align_ffhq``'s crop (same box) differs by a mean 2.1 px
  (max 5.0). The point order is right: swapping the eyes puts the landmarks 154 px off.
* ``retinaface5`` (data only, for a future RetinaFace detector): facexlib's 512 px template in
  RetinaFace's order (image-left eye centre, image-right eye centre, nose tip, image-left mouth
  corner, image-right mouth corner). No detector here produces these points yet.

A template is rescaled to crop size S in the pixel-centre convention,
``p_S = (p_ref + 0.5) * S / ref - 0.5`` (CodeFormer scales by ``S / ref`` alone, a 0.25 px
difference at 512).

``dlib68`` faces get the exact FFHQ alignment (Karras et al. 2019, NVlabs ffhq-dataset
``recreate_aligned_images``): eye centres from points 36-41 and 42-47, mouth corners 48 and 54,
an oriented square of half side ``max(2.0 * |eye-to-eye|, 1.8 * |eye-to-mouth|)`` centred
``0.1 * eye-to-mouth`` below the eye midpoint (``ffhq_quad``). NVlabs samples that quad with PIL
after adding 0.5 to it, i.e. the quad's corners are the crop's outer pixel edges; ``quad_transform``
keeps that (corner ``c - x - y`` -> ``(-0.5, -0.5)``). That square is a similarity of the crop, so it
is a 2x3 matrix like the template fit. (``evaluation.dlib_face.align_ffhq`` shares ``ffhq_quad``
but keeps its historical mapping of the corners to pixel centres, up to half a pixel away.)

Border: ``warp_face`` reflects the image at its edges by default (``cv2.BORDER_REFLECT``) where the
crop reaches outside the photo. FFHQ's own crops were reflect-padded (and blurred) there, so the
models have seen reflected borders; a constant fill is a hard edge they never saw.
``border="constant"`` fills CodeFormer's gray (135, 133, 132) instead. Either way the paste-back
mask only covers the part of the crop inside the photo's canvas, since it is clipped to it.
"""

from __future__ import annotations

import cv2
import numpy as np

# CodeFormer face_restoration_helper, det_model == 'dlib': dlib 5-point order, 1024 px crop.
DLIB5_TEMPLATE_1024 = np.array(
    [
        [686.77227723, 488.62376238],
        [586.77227723, 493.59405941],
        [337.91089109, 488.38613861],
        [437.95049505, 493.51485149],
        [513.58415842, 678.5049505],
    ]
)
# facexlib (RetinaFace order: left eye, right eye, nose, left mouth corner, right mouth corner).
RETINAFACE5_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ]
)
TEMPLATES = {"dlib5": (DLIB5_TEMPLATE_1024, 1024), "retinaface5": (RETINAFACE5_TEMPLATE_512, 512)}
KINDS = ("dlib5", "dlib68")
DEFAULT_SIZE = 512
GRAY = (135, 133, 132)  # CodeFormer's constant border fill (RGB)


def _check_matrix(m, what: str = "m") -> np.ndarray:
    m = np.asarray(m, np.float64)
    if m.shape != (2, 3) or not np.isfinite(m).all():
        raise ValueError(f"align: {what} must be a finite 2x3 matrix, got {m.shape}")
    return m


def template(kind: str = "dlib5", size: int = DEFAULT_SIZE) -> np.ndarray:
    """The 5-point template ``kind`` (a key of ``TEMPLATES``) for an S x S crop: float64 [5, 2]."""
    if kind not in TEMPLATES:
        raise ValueError(
            f"align.template: unknown kind {kind!r}, expected one of {list(TEMPLATES)}"
        )
    points, ref = TEMPLATES[kind]
    return (points + 0.5) * (size / ref) - 0.5


def apply(m, points) -> np.ndarray:
    """Points [..., 2] (x, y) through the 2x3 matrix ``m``: float64 [..., 2]."""
    m = _check_matrix(m)
    p = np.asarray(points, np.float64)
    return p @ m[:, :2].T + m[:, 2]


def compose(a, b) -> np.ndarray:
    """The 2x3 matrix of ``a`` after ``b`` (first ``b``, then ``a``)."""
    a, b = _check_matrix(a, "a"), _check_matrix(b, "b")
    return np.concatenate([a[:, :2] @ b[:, :2], (a[:, :2] @ b[:, 2] + a[:, 2])[:, None]], 1)


def scale_of(m) -> float:
    """Isotropic scale of a similarity (destination pixels per source pixel)."""
    m = _check_matrix(m)
    return float(np.sqrt(abs(np.linalg.det(m[:, :2]))))


def umeyama(src, dst, scale: bool = True) -> np.ndarray:
    """Least-squares similarity ``dst ~ s R src + t`` (Umeyama 1991, IEEE TPAMI 13(4)): 2x3 float64.

    src, dst: [N, 2] point pairs, N >= 2. ``scale=False`` fits a rigid transform (s = 1). The
    rotation is proper (no reflection). Exact on noise-free input.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(
            f"align.umeyama: src and dst must both be [N, 2] with N >= 2, got {src.shape} and "
            f"{dst.shape}"
        )
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = (xs**2).sum() / len(src)
    if var_s <= 0:
        raise ValueError("align.umeyama: the source points all coincide")
    cov = xd.T @ xs / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    s = (d * sign).sum() / var_s if scale else 1.0
    t = mu_d - s * rot @ mu_s
    return np.concatenate([s * rot, t[:, None]], 1)


def ffhq_quad(landmarks68) -> np.ndarray:
    """FFHQ's oriented crop square from dlib's 68 landmarks: float64 [4, 2] corners
    ``(c - x - y, c - x + y, c + x + y, c + x - y)`` (top-left, bottom-left, bottom-right,
    top-right of the crop), NVlabs ffhq-dataset ``recreate_aligned_images`` with rotation."""
    lm = np.asarray(landmarks68, np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"align.ffhq_quad: landmarks68 must be [68, 2], got {lm.shape}")
    eye_l, eye_r = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_c = (eye_l + eye_r) / 2
    eye_to_eye = eye_r - eye_l
    eye_to_mouth = (lm[48] + lm[54]) / 2 - eye_c
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_c + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def quad_transform(quad, size: int = DEFAULT_SIZE) -> np.ndarray:
    """2x3 similarity taking an oriented square's corners ``quad`` [4, 2] (``ffhq_quad`` order)
    to the outer edges of an S x S crop: corner 0 -> (-0.5, -0.5), 1 -> (-0.5, S - 0.5),
    2 -> (S - 0.5, S - 0.5), 3 -> (S - 0.5, -0.5)."""
    quad = np.asarray(quad, np.float64)
    if quad.shape != (4, 2):
        raise ValueError(f"align.quad_transform: quad must be [4, 2], got {quad.shape}")
    lo, hi = -0.5, size - 0.5
    return umeyama(quad, [[lo, lo], [lo, hi], [hi, hi], [hi, lo]])


def landmarks_transform(landmarks, kind: str, size: int = DEFAULT_SIZE) -> np.ndarray:
    """2x3 matrix from input-image pixels to the S x S crop for landmarks of ``kind``:
    ``"dlib5"`` -> Umeyama fit to the dlib-5 template; ``"dlib68"`` -> the exact FFHQ quad."""
    if kind == "dlib5":
        lm = np.asarray(landmarks, np.float64)
        if lm.shape != (5, 2):
            raise ValueError(f"align: dlib5 landmarks must be [5, 2], got {lm.shape}")
        return umeyama(lm, template("dlib5", size))
    if kind == "dlib68":
        return quad_transform(ffhq_quad(landmarks), size)
    raise ValueError(f"align: unknown landmark kind {kind!r}, expected one of {KINDS}")


def transform(face, size: int = DEFAULT_SIZE) -> np.ndarray:
    """2x3 matrix from the photo's pixels to the S x S aligned crop of ``face``
    (a ``detection.Face``; dispatches on ``face.kind``)."""
    return landmarks_transform(face.landmarks, face.kind, size)


def upscaled(m, s: float) -> np.ndarray:
    """The matrix ``m`` for its source image upscaled by ``s``: an upscaled pixel centre ``u``
    is the original point ``(u + 0.5) / s - 0.5`` (edge-aligned resize, as ``cv2.resize``)."""
    m = _check_matrix(m)
    if not s > 0:
        raise ValueError(f"align.upscaled: s must be > 0, got {s}")
    offset = 0.5 / s - 0.5
    return np.concatenate([m[:, :2] / s, (m[:, :2].sum(1) * offset + m[:, 2])[:, None]], 1)


def resized(m, s: float) -> np.ndarray:
    """The matrix ``m`` for its destination (the crop) resized by ``s``: crop pixel centre ``v``
    becomes ``(v + 0.5) * s - 0.5``. E.g. a restorer returning 1024 px faces for 512 px crops
    pastes with ``resized(m, 2)``."""
    m = _check_matrix(m)
    if not s > 0:
        raise ValueError(f"align.resized: s must be > 0, got {s}")
    out = m * s
    out[:, 2] += 0.5 * s - 0.5
    return out


def warp_face(
    image: np.ndarray,
    m,
    size: int = DEFAULT_SIZE,
    *,
    border: str = "reflect",
    interpolation: int = cv2.INTER_LINEAR,
) -> np.ndarray:
    """The S x S crop of ``image`` [H, W, C] under ``m`` (input pixels -> crop pixels), same dtype.

    Where the face is larger than the crop (``m`` shrinks by more than 2x), the crop is warped at
    the integer multiple ``f = floor(1 / scale)`` of its size and area-averaged down (each crop
    pixel the mean of f x f warped samples centred on it), because a bilinear warp alone would
    skip input pixels and alias. ``border``: ``"reflect"`` (default, see the module docstring) or
    ``"constant"`` (``GRAY``).
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(f"align.warp_face: image must be [H, W] or [H, W, C], got {image.shape}")
    m = _check_matrix(m)
    if border == "reflect":
        mode, value = cv2.BORDER_REFLECT, 0
    elif border == "constant":
        mode, value = cv2.BORDER_CONSTANT, GRAY if image.ndim == 3 else GRAY[0]
    else:
        raise ValueError(f"align.warp_face: border must be 'reflect' or 'constant', got {border!r}")
    factor = max(1, int(1.0 / scale_of(m) + 1e-6))
    big = size * factor
    warped = cv2.warpAffine(
        image,
        resized(m, factor),
        (big, big),
        flags=interpolation,
        borderMode=mode,
        borderValue=value,
    )
    if factor > 1:
        warped = cv2.resize(warped, (size, size), interpolation=cv2.INTER_AREA)
    return warped
