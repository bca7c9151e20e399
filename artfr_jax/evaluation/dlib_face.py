"""Offline identity (Deg.) and landmark (LMD) metrics with dlib (VQFR Sec. 6.1, GFPGAN Sec. 4.1).

The papers compute Deg. with ArcFace embeddings and LMD with an AWing landmark network (WFLW, 98
points). Neither set of weights is available here, so this module uses what ships in the
``face_recognition_models`` package (in the core install, with ``dlib-bin``):

* identity: dlib's ResNet face descriptor v1 (128-D; 5-point predictor, 150 px aligned chip with
  0.25 padding, as ``dlib.face_recognition_model_v1`` does it); Deg. is the angle between the
  restored and GT descriptors (``metrics.angle_degrees``);
* landmarks: dlib's 68-point (iBUG 300-W) shape predictor; LMD is the mean point distance rescaled
  to a 512 px image (``landmark_distance``).

Numbers are therefore comparable to the papers' tables in spirit, not digit for digit.

Which box: both metrics start from a face box. The box is found once on the GT image and reused for
the restored image (``deg_and_lmd``), so the metric measures the restoration and not detector jitter
(the HOG detector snaps boxes to its pyramid grid, and the shape predictors move several pixels when
the box moves; a degraded restoration can also lose the detection altogether). Where the detector
finds no face on the GT, the fixed FFHQ-aligned box below is used and the image is counted in the
``detected`` mask, so a report can state how many fell back.

Fallback box, as fractions of (W, H, W, H) for (left, top, right, bottom):
``FFHQ_FALLBACK_BOX = (0.24, 0.34, 0.76, 0.86)``. Measured with the frontal HOG detector (upsample 1)
by ``python benchmarks/dlib_metrics.py --fallback-stats``: on ``skimage.data.astronaut()`` aligned
by ``align_ffhq`` at 64-1024 px (9/9 detected) the median box is (0.228, 0.349, 0.768, 0.885); on
120 synthetic faces (``data/synthetic.py``, 512/256/128 px; 93 detected) it is (0.242, 0.334, 0.742,
0.828). The chosen box lies between the two; 68-point landmarks from it differ from those from the
detected box by a mean 1.1 px (max 2.6) on the astronaut and 7.0 px (max 29) on synthetic faces,
whose drawn features make the predictor box-sensitive, in 512 px units.

All of this runs on the host in NumPy/dlib (CPU); dlib is imported lazily so the rest of the
evaluation code imports without it.
"""

from __future__ import annotations

import functools

import numpy as np

from artfr_jax.evaluation.metrics import angle_degrees

# The model-file helpers live in faces.detection (importable without JAX); re-exported here.
from artfr_jax.faces.detection import (  # noqa: F401
    _INSTALL,
    _MODEL_FILES,
    _dlib,
    _models_dir,
    dlib_available,
    model_path,
)

FFHQ_FALLBACK_BOX = (0.24, 0.34, 0.76, 0.86)
LMD_REFERENCE_SIZE = 512
_BATCH = 32  # images per batched descriptor call (bounds the memory of the aligned chips)


@functools.lru_cache(maxsize=1)
def _detector():
    return _dlib().get_frontal_face_detector()


def _check_image(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"dlib_face: {what} must be uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}"
        )
    return np.ascontiguousarray(image)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"dlib_face: images must be uint8 [N, H, W, 3] RGB, got {images.dtype} {images.shape}"
        )
    return images


def fallback_box(height: int, width: int) -> np.ndarray:
    """The fixed FFHQ-aligned box for an image of this size: int64 [4] (left, top, right, bottom),
    right/bottom inclusive as in ``dlib.rectangle``."""
    left, top, right, bottom = FFHQ_FALLBACK_BOX
    return np.array(
        [
            round(left * width),
            round(top * height),
            round(right * width) - 1,
            round(bottom * height) - 1,
        ],
        np.int64,
    )


def face_box(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """Largest face found by dlib's frontal HOG detector (upsample 1), else ``fallback_box``.

    image: uint8 [H, W, 3] RGB. Returns (box int64 [4] = left, top, right, bottom with right/bottom
    inclusive, detected).
    """
    image = _check_image(image, "image")
    dets = _detector()(image, 1)
    if len(dets) == 0:
        return fallback_box(*image.shape[:2]), False
    d = max(dets, key=lambda r: r.width() * r.height())
    return np.array([d.left(), d.top(), d.right(), d.bottom()], np.int64), True


def detect_boxes(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``face_box`` per image. images: uint8 [N, H, W, 3] -> (boxes int64 [N, 4], detected bool [N])."""
    images = _check_images(images)
    out = [face_box(im) for im in images]
    boxes = np.stack([b for b, _ in out]) if out else np.zeros((0, 4), np.int64)
    return boxes, np.array([d for _, d in out], bool)


def _boxes_for(images: np.ndarray, boxes) -> np.ndarray:
    if boxes is None:
        return detect_boxes(images)[0]
    boxes = np.asarray(boxes)
    if boxes.shape != (len(images), 4):
        raise ValueError(
            f"dlib_face: boxes must be [N, 4] = [{len(images)}, 4] (left, top, right, bottom), "
            f"got {boxes.shape}"
        )
    return boxes.astype(np.int64)


def _rect(dlib, box) -> object:
    return dlib.rectangle(*(int(v) for v in box))


class DlibFaceDescriptor:
    """128-D dlib ResNet identity descriptor (the Deg. embedder in this project).

    ``__call__(images uint8 [N, H, W, 3], boxes int [N, 4] | None) -> float32 [N, 128]``: the
    5-point predictor places the face in its box, dlib aligns a 150 px chip (padding 0.25) and the
    ResNet embeds it. ``boxes=None`` detects per image (``face_box``); pass the GT's boxes to embed
    a restored image in the same place. Deterministic (no jitter).
    """

    name = "dlib ResNet face descriptor v1 (face_recognition_models)"

    def __init__(self):
        dlib = _dlib()
        self._dlib = dlib
        self._shape = dlib.shape_predictor(model_path("shape_predictor_5_face_landmarks.dat"))
        self._net = dlib.face_recognition_model_v1(
            model_path("dlib_face_recognition_resnet_model_v1.dat")
        )

    def __call__(self, images: np.ndarray, boxes=None) -> np.ndarray:
        images = _check_images(images)
        boxes = _boxes_for(images, boxes)
        out = np.zeros((len(images), 128), np.float32)
        for s in range(0, len(images), _BATCH):
            chunk = [np.ascontiguousarray(im) for im in images[s : s + _BATCH]]
            faces = []
            for im, box in zip(chunk, boxes[s : s + _BATCH], strict=True):
                f = self._dlib.full_object_detections()
                f.append(self._shape(im, _rect(self._dlib, box)))
                faces.append(f)
            vecs = self._net.compute_face_descriptor(chunk, faces)
            out[s : s + len(chunk)] = np.array([np.asarray(v[0]) for v in vecs], np.float32)
        return out


class DlibLandmarks:
    """dlib's 68-point (iBUG 300-W) shape predictor, the LMD landmark model in this project.

    ``__call__(images uint8 [N, H, W, 3], boxes int [N, 4] | None) -> float32 [N, 68, 2]`` as
    (x, y) in pixels. ``boxes=None`` detects per image (``face_box``).
    """

    name = "dlib 68-point shape predictor (iBUG 300-W, face_recognition_models)"

    def __init__(self):
        dlib = _dlib()
        self._dlib = dlib
        self._shape = dlib.shape_predictor(model_path("shape_predictor_68_face_landmarks.dat"))

    def __call__(self, images: np.ndarray, boxes=None) -> np.ndarray:
        images = _check_images(images)
        boxes = _boxes_for(images, boxes)
        out = np.zeros((len(images), 68, 2), np.float32)
        for i, (im, box) in enumerate(zip(images, boxes, strict=True)):
            shape = self._shape(np.ascontiguousarray(im), _rect(self._dlib, box))
            out[i] = [(p.x, p.y) for p in shape.parts()]
        return out


def landmark_distance(lm_a, lm_b, image_size: int) -> np.ndarray:
    """LMD: mean Euclidean distance over the landmarks, rescaled to a 512 px image.

    lm_a, lm_b: [N, P, 2] (x, y) in pixels of a square ``image_size`` image. Returns [N] in 512 px
    pixels (distance * 512 / image_size), the scale at which VQFR/GFPGAN report LMD. The papers used
    an AWing network (WFLW, 98 points) whose weights are not available here; with dlib's 68 points
    the numbers are comparable in spirit, not digit for digit.
    """
    a = np.asarray(lm_a, np.float64)
    b = np.asarray(lm_b, np.float64)
    if a.shape != b.shape or a.ndim != 3 or a.shape[-1] != 2:
        raise ValueError(
            f"dlib_face.landmark_distance: lm_a and lm_b must both be [N, P, 2], got {a.shape} "
            f"and {b.shape}"
        )
    if image_size <= 0:
        raise ValueError(f"dlib_face.landmark_distance: image_size must be > 0, got {image_size}")
    return np.linalg.norm(a - b, axis=-1).mean(-1) * (LMD_REFERENCE_SIZE / image_size)


def deg_and_lmd(
    restored: np.ndarray,
    gt: np.ndarray,
    *,
    descriptor: DlibFaceDescriptor | None = None,
    landmarks: DlibLandmarks | None = None,
) -> dict[str, np.ndarray]:
    """Deg. and LMD of restored vs GT with one box per pair, found on the GT (module docstring).

    restored, gt: uint8 [N, S, S, 3]. Returns {'deg': [N] degrees, 'lmd': [N] 512 px pixels,
    'detected': bool [N] (False: the GT had no detected face and the FFHQ fallback box was used)}.
    """
    restored, gt = _check_images(restored), _check_images(gt)
    if restored.shape != gt.shape or gt.shape[1] != gt.shape[2]:
        raise ValueError(
            f"dlib_face.deg_and_lmd: restored and gt must be the same square shape, got "
            f"{restored.shape} and {gt.shape}"
        )
    descriptor = descriptor or DlibFaceDescriptor()
    landmarks = landmarks or DlibLandmarks()
    boxes, detected = detect_boxes(gt)
    deg = angle_degrees(descriptor(restored, boxes), descriptor(gt, boxes))
    lmd = landmark_distance(landmarks(restored, boxes), landmarks(gt, boxes), gt.shape[1])
    return {"deg": deg, "lmd": lmd, "detected": detected}


def align_ffhq(image: np.ndarray, landmarks68: np.ndarray, size: int) -> np.ndarray:
    """Crop a face the FFHQ way (Karras et al. 2019, ffhq-dataset alignment) from 68 landmarks.

    image: uint8 [H, W, 3]; landmarks68: [68, 2] (x, y). Returns uint8 [size, size, 3]. Eyes,
    mouth corners -> an oriented square of side max(2 * eye distance, 1.8 * eye-mouth distance)
    centred 0.1 eye-mouth below the eye midpoint; borders are reflected. Used to make real
    aligned test faces and to measure the fallback box.
    """
    import cv2

    from artfr_jax.faces.align import ffhq_quad

    image = _check_image(image, "image")
    lm = np.asarray(landmarks68, np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"dlib_face.align_ffhq: landmarks68 must be [68, 2], got {lm.shape}")
    quad = ffhq_quad(lm)
    # Corners at pixel centres here (NVlabs, and align.quad_transform, put them at pixel edges,
    # half a pixel out at most); kept so that existing crops and measurements stay the same.
    x = (quad[3] - quad[0]) / 2  # the square's half-side vector
    # Warp at an integer multiple of the output size, then area-average down: warpAffine alone
    # aliases when the face is much larger than the crop.
    factor = max(1, int(2 * np.hypot(*x) / size))
    big = size * factor
    src = np.float32(quad[:3])
    dst = np.float32([[0, 0], [0, big], [big, big]])
    m = cv2.getAffineTransform(src, dst)
    out = cv2.warpAffine(
        image, m, (big, big), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    if factor > 1:
        out = cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)
    return out
