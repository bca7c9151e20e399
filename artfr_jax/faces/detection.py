"""Face detection and landmarks with dlib (models from the ``face_recognition_models`` package).

``make_detector()`` returns a ``Detector``: ``detect(image uint8 [H, W, 3] RGB) -> list[Face]``.

* Detector: dlib's HOG frontal-face detector (default, ``detector="hog"``, fast on CPU, frontal
  and near-frontal faces from about 80 px wide at ``upsample=0``, 40 px at 1, 20 px at 2) or its
  CNN (mmod, ``mmod_human_face_detector.dat``, ``detector="cnn"``: profile and hard faces, slow
  on CPU).
* Landmarks: the 5-point shape predictor (default, ``landmarks="5"``, Face.kind ``"dlib5"``, public
  domain) or the 68-point one (``landmarks="68"``, kind ``"dlib68"``, the exact FFHQ alignment;
  its iBUG 300-W training data allows research use only, a warning says so once).
* Large photos: the detector runs on a copy whose longest side is at most ``max_side``
  (area-downscaled); the shape predictor then runs on the full-resolution photo with the box mapped
  back, because dlib's landmarks are whole pixels of the image they ran on.
* Coordinates: input-image pixels, integer = pixel centre (``align``'s convention). ``Face.box``
  is (x0, y0, x1, y1) of the box's outer edges (dlib's inclusive ``left..right`` pixels give
  ``x0 = left - 0.5``, ``x1 = right + 0.5``), so ``x1 - x0`` is its width in pixels.
* Order: faces are sorted by box area, largest first; ties by ``x0`` then ``y0`` (stable for a
  given image).

Grayscale, RGBA and 16-bit photos are the caller's to convert to uint8 RGB; anything else is a
``ValueError`` that says so.

The model-file helpers (``dlib_available``, ``model_path``) live here and
``evaluation.dlib_face`` re-exports them, so this module imports without JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
from typing import Protocol

import cv2
import numpy as np

_INSTALL = "pip install -e . (the core install has dlib-bin and face_recognition_models)"
_MODEL_FILES = (
    "shape_predictor_68_face_landmarks.dat",
    "shape_predictor_5_face_landmarks.dat",
    "dlib_face_recognition_resnet_model_v1.dat",
    "mmod_human_face_detector.dat",
)
_PREDICTORS = {
    "5": ("shape_predictor_5_face_landmarks.dat", "dlib5", 5),
    "68": ("shape_predictor_68_face_landmarks.dat", "dlib68", 68),
}
_CNN_MODEL = "mmod_human_face_detector.dat"
_LICENCE_68 = (
    "faces.detection: the 68-point landmark model (shape_predictor_68_face_landmarks.dat) is "
    "trained on iBUG 300-W, whose licence excludes commercial use; landmarks='5' is public domain"
)
_log = logging.getLogger(__name__)
_warned_68 = False


def _models_dir() -> str | None:
    # Not `import face_recognition_models`: its __init__ imports pkg_resources, which current
    # setuptools no longer ships.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "models")


def dlib_available(models=_MODEL_FILES[:3]) -> str | None:
    """None when dlib and the model files ``models`` are usable, else a one-line reason naming
    the fix. The default checks the three files the evaluation metrics and the default
    detector use (68- and 5-point predictors, ResNet descriptor)."""
    if importlib.util.find_spec("dlib") is None:
        return f"dlib is not installed: {_INSTALL}"
    directory = _models_dir()
    if directory is None:
        return f"face_recognition_models is not installed: {_INSTALL}"
    missing = [f for f in models if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        return f"face_recognition_models lacks {', '.join(missing)} in {directory}: {_INSTALL}"
    return None


def _dlib(models=_MODEL_FILES[:3]):
    reason = dlib_available(models)
    if reason is not None:
        raise ImportError(reason)
    import dlib

    return dlib


def model_path(name: str) -> str:
    """Path of a ``face_recognition_models`` file, e.g. ``shape_predictor_5_face_landmarks.dat``."""
    if name not in _MODEL_FILES:
        raise ValueError(f"model_path: unknown model {name!r}, expected one of {_MODEL_FILES}")
    directory = _models_dir()
    if directory is None:
        raise ImportError(f"face_recognition_models is not installed: {_INSTALL}")
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dlib model file {path} is missing: {_INSTALL}")
    return path


@functools.cache
def _shape_predictor(name: str):
    return _dlib((name,)).shape_predictor(model_path(name))


@functools.cache
def _cnn_detector():
    return _dlib((_CNN_MODEL,)).cnn_face_detection_model_v1(model_path(_CNN_MODEL))


@functools.cache
def _hog_detector():
    return _dlib(()).get_frontal_face_detector()


@dataclasses.dataclass(frozen=True, eq=False)
class Face:
    """One detected face, in input-image pixels (pixel centres at integers).

    box: float64 [4] (x0, y0, x1, y1), the box's outer edges; landmarks: float64 [K, 2] (x, y);
    kind: the landmark set, ``"dlib5"`` or ``"dlib68"`` (names the alignment in ``align``);
    score: the detector's confidence (HOG: its SVM score, 0 at its default threshold; mmod:
    its confidence).
    """

    box: np.ndarray
    landmarks: np.ndarray
    kind: str
    score: float

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))

    @property
    def center(self) -> np.ndarray:
        return np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2])


class Detector(Protocol):
    def detect(self, image: np.ndarray) -> list[Face]: ...


def check_image(image, what: str = "image") -> np.ndarray:
    """``image`` as a C-contiguous uint8 [H, W, 3] RGB array, else a ValueError naming the fix."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or image.size == 0:
        raise ValueError(
            f"faces: {what} must be uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}; convert "
            "grayscale to RGB, drop an alpha channel and scale 16-bit/float images to uint8 first"
        )
    return np.ascontiguousarray(image)


def _order(face: Face):
    return (-face.area, float(face.box[0]), float(face.box[1]))


class DlibDetector:
    """dlib HOG or mmod detector + a 5- or 68-point shape predictor (see ``make_detector``)."""

    def __init__(
        self,
        detector: str = "hog",
        landmarks: str = "5",
        max_side: int = 1600,
        upsample: int = 1,
        min_score: float = 0.0,
    ):
        global _warned_68
        if detector not in ("hog", "cnn"):
            raise ValueError(f"faces: detector must be 'hog' or 'cnn', got {detector!r}")
        landmarks = str(landmarks)
        if landmarks not in _PREDICTORS:
            raise ValueError(f"faces: landmarks must be '5' or '68', got {landmarks!r}")
        if int(max_side) < 32:
            raise ValueError(f"faces: max_side must be >= 32, got {max_side}")
        if int(upsample) < 0:
            raise ValueError(f"faces: upsample must be >= 0, got {upsample}")
        name, self.kind, self.num_points = _PREDICTORS[landmarks]
        self.detector, self.max_side = detector, int(max_side)
        self.upsample, self.min_score = int(upsample), float(min_score)
        self._dlib = _dlib((name,) + ((_CNN_MODEL,) if detector == "cnn" else ()))
        self._predictor = _shape_predictor(name)
        self._detect = _cnn_detector() if detector == "cnn" else _hog_detector()
        if landmarks == "68" and not _warned_68:
            _warned_68 = True
            _log.warning(_LICENCE_68)

    def _boxes(self, small: np.ndarray) -> list[tuple[int, int, int, int, float]]:
        if self.detector == "hog":
            rects, scores, _ = self._detect.run(small, self.upsample, self.min_score)
            found = zip(rects, scores, strict=True)
        else:
            found = ((d.rect, d.confidence) for d in self._detect(small, self.upsample))
        return [
            (r.left(), r.top(), r.right(), r.bottom(), float(s))
            for r, s in found
            if s >= self.min_score
        ]

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in ``image`` (uint8 [H, W, 3] RGB), largest box first (module docstring)."""
        image = check_image(image)
        h, w = image.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
            small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
            sx, sy = sw / w, sh / h
        else:
            small, sx, sy = image, 1.0, 1.0
        faces = []
        for left, top, right, bottom, score in self._boxes(small):
            # Outer edges in the small image, then through the edge-aligned resize to full size.
            box = np.array([left / sx, top / sy, (right + 1) / sx, (bottom + 1) / sy]) - 0.5
            rect = self._dlib.rectangle(
                round(box[0] + 0.5), round(box[1] + 0.5), round(box[2] - 0.5), round(box[3] - 0.5)
            )
            shape = self._predictor(image, rect)
            lm = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
            faces.append(Face(box=box, landmarks=lm, kind=self.kind, score=score))
        return sorted(faces, key=_order)


def make_detector(
    detector: str = "hog",
    landmarks: str = "5",
    max_side: int = 1600,
    upsample: int = 1,
    min_score: float = 0.0,
) -> Detector:
    """A dlib face detector with landmarks (module docstring).

    detector: ``"hog"`` (default) or ``"cnn"`` (mmod); landmarks: ``"5"`` (kind ``"dlib5"``) or
    ``"68"`` (kind ``"dlib68"``); max_side: the longest side detection runs at; upsample: dlib's
    pyramid upsampling before detection (each step finds faces half as large and costs ~4x);
    min_score: the lowest detector score kept (HOG: passed as dlib's ``adjust_threshold``, so a
    negative value finds more, less certain faces; mmod: a filter on its confidence). Raises
    ImportError naming the install command when dlib or a model file is missing.
    """
    return DlibDetector(detector, landmarks, max_side, upsample, min_score)


def largest(faces: list[Face]) -> Face | None:
    """The face with the largest box (the first of ``detect``'s order); None when empty."""
    return min(faces, key=_order) if faces else None


def center_face(faces: list[Face], image_shape) -> Face | None:
    """The face whose box centre is nearest the image centre; None when empty.
    image_shape: (H, W, ...)."""
    if not faces:
        return None
    h, w = image_shape[:2]
    middle = np.array([(w - 1) / 2, (h - 1) / 2])
    return min(faces, key=lambda f: (float(np.hypot(*(f.center - middle))), _order(f)))


def eye_centers(face: Face) -> tuple[np.ndarray, np.ndarray]:
    """(image-left eye centre, image-right eye centre) as float64 [2] each."""
    lm = np.asarray(face.landmarks, np.float64)
    if face.kind == "dlib5":
        return lm[2:4].mean(0), lm[0:2].mean(0)
    if face.kind == "dlib68":
        return lm[36:42].mean(0), lm[42:48].mean(0)
    raise ValueError(f"faces: unknown landmark kind {face.kind!r}, expected 'dlib5' or 'dlib68'")


def eye_distance(face: Face) -> float:
    """Distance between the eye centres in pixels (a face-size measure for ``--min_face``).

    The two landmark sets measure the same eye centres (corner midpoints for dlib5, the mean of
    six contour points for dlib68) to within a few percent.
    """
    left, right = eye_centers(face)
    return float(np.hypot(*(right - left)))
