"""dlib identity descriptor and 68-point landmarks (evaluation/dlib_face.py)."""

import importlib.util

import cv2
import numpy as np
import pytest

from artfr_jax.data.synthetic import render_face
from artfr_jax.evaluation import dlib_face
from artfr_jax.evaluation.metrics import angle_degrees

_REASON = dlib_face.dlib_available()
needs_dlib = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))
SIZE = 128


@pytest.fixture(scope="module")
def descriptor():
    return dlib_face.DlibFaceDescriptor()


@pytest.fixture(scope="module")
def landmarks():
    return dlib_face.DlibLandmarks()


@pytest.fixture(scope="module")
def astronaut(landmarks):
    """A real face (skimage's astronaut) aligned the FFHQ way at SIZE px."""
    import skimage.data

    im = skimage.data.astronaut()
    box, found = dlib_face.face_box(im)
    assert found
    lm = landmarks(im[None], box[None])[0]
    return dlib_face.align_ffhq(im, lm, SIZE)


def _jpeg(im, quality=75):
    ok, enc = cv2.imencode(".jpg", im[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return np.ascontiguousarray(cv2.imdecode(enc, cv2.IMREAD_COLOR)[..., ::-1])


def _noisy(im, sigma=4.0, seed=0):
    noise = np.random.default_rng(seed).normal(0, sigma, im.shape)
    return np.clip(im + noise, 0, 255).astype(np.uint8)


@needs_dlib
def test_descriptor_self_zero_and_deterministic(descriptor, astronaut):
    a = descriptor(astronaut[None])
    b = descriptor(astronaut[None])
    assert a.shape == (1, 128) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert angle_degrees(a, b)[0] < 1e-3
    assert descriptor.name == "dlib ResNet face descriptor v1 (face_recognition_models)"


@needs_dlib
def test_descriptor_separates_people(descriptor, astronaut):
    syn = [render_face(i, SIZE) for i in (0, 4)]
    batch = np.stack([astronaut, _jpeg(astronaut), _noisy(astronaut), *syn, _jpeg(syn[0])])
    boxes, found = dlib_face.detect_boxes(batch)
    assert found.all()
    d = descriptor(batch, boxes)
    same = angle_degrees(d[[0, 0, 3]], d[[1, 2, 5]])  # astronaut vs its jpeg/noisy; syn vs its jpeg
    other = angle_degrees(d[[0, 0, 3]], d[[3, 4, 4]])  # astronaut vs two faces; two faces
    assert same.max() < 8.0, same
    assert other.min() > 2 * same.max(), (same, other)


@needs_dlib
def test_landmarks_on_aligned_face(landmarks, astronaut):
    lm = landmarks(astronaut[None])
    assert lm.shape == (1, 68, 2) and lm.dtype == np.float32
    lm = lm[0] / SIZE
    # FFHQ alignment puts the eyes near (0.375, 0.48) and (0.625, 0.48), the mouth near (0.5, 0.7).
    np.testing.assert_allclose(lm[36:42].mean(0), [0.375, 0.48], atol=0.03)
    np.testing.assert_allclose(lm[42:48].mean(0), [0.625, 0.48], atol=0.03)
    np.testing.assert_allclose((lm[48] + lm[54]) / 2, [0.5, 0.7], atol=0.03)


@needs_dlib
@pytest.mark.parametrize("shift", [(5, 3), (-4, 7)])
def test_landmarks_follow_shift(landmarks, astronaut, shift):
    dx, dy = shift
    box, _ = dlib_face.face_box(astronaut)
    moved = np.roll(astronaut, (dy, dx), axis=(0, 1))
    lm = landmarks(np.stack([astronaut, moved]), np.stack([box, box + [dx, dy, dx, dy]]))
    delta = lm[1] - lm[0]
    np.testing.assert_allclose(delta.mean(0), [dx, dy], atol=0.5)
    assert np.abs(delta - [dx, dy]).max() <= 0.5


def test_landmark_distance_normalisation():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 128, (3, 68, 2))
    np.testing.assert_array_equal(dlib_face.landmark_distance(a, a, 128), 0.0)
    b = a + [3.0, 4.0]  # 5 px everywhere
    np.testing.assert_allclose(dlib_face.landmark_distance(a, b, 128), 5.0 * 512 / 128)
    np.testing.assert_allclose(dlib_face.landmark_distance(a, b, 512), 5.0)
    np.testing.assert_allclose(dlib_face.landmark_distance(a, b, 1024), 2.5)
    with pytest.raises(ValueError, match=r"\[N, P, 2\]"):
        dlib_face.landmark_distance(a, b[:, :5], 128)


@needs_dlib
def test_fallback_box_when_no_face(landmarks, descriptor):
    gray = np.full((SIZE, SIZE, 3), 128, np.uint8)
    box, found = dlib_face.face_box(gray)
    assert not found
    np.testing.assert_array_equal(box, dlib_face.fallback_box(SIZE, SIZE))
    np.testing.assert_array_equal(box, [31, 44, 96, 109])
    boxes, mask = dlib_face.detect_boxes(np.stack([gray, render_face(0, SIZE)]))
    np.testing.assert_array_equal(mask, [False, True])
    # Both models still run on the fallback box (and give finite outputs).
    assert np.isfinite(landmarks(gray[None])).all()
    assert np.isfinite(descriptor(gray[None])).all()


@needs_dlib
def test_fallback_box_matches_detector_on_aligned_face(astronaut):
    box, found = dlib_face.face_box(astronaut)
    assert found
    fb = dlib_face.fallback_box(SIZE, SIZE)
    lo, hi = np.maximum(box[:2], fb[:2]), np.minimum(box[2:], fb[2:])
    inter = np.prod(np.maximum(hi - lo + 1, 0))
    area = lambda r: np.prod(r[2:] - r[:2] + 1)
    assert inter / (area(box) + area(fb) - inter) > 0.75


@needs_dlib
def test_deg_and_lmd_use_gt_box(descriptor, landmarks, astronaut):
    gray = np.full_like(astronaut, 128)
    gt = np.stack([astronaut, astronaut, gray])
    restored = np.stack([astronaut, _noisy(astronaut, 6.0), gray])
    out = dlib_face.deg_and_lmd(restored, gt, descriptor=descriptor, landmarks=landmarks)
    np.testing.assert_array_equal(out["detected"], [True, True, False])
    assert out["deg"][0] < 1e-3 and out["lmd"][0] == 0.0
    assert 0 < out["deg"][1] < 10 and 0 < out["lmd"][1] < 15
    assert out["deg"][2] < 1e-3 and out["lmd"][2] == 0.0
    with pytest.raises(ValueError, match="same square shape"):
        dlib_face.deg_and_lmd(restored[:2], gt, descriptor=descriptor, landmarks=landmarks)


@needs_dlib
def test_bad_input_errors(descriptor):
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        descriptor(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        dlib_face.face_box(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match=r"boxes must be \[N, 4\]"):
        descriptor(np.zeros((2, 64, 64, 3), np.uint8), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="unknown model"):
        dlib_face.model_path("nope.dat")


@needs_dlib
def test_model_path_finds_files():
    for name in (
        "shape_predictor_5_face_landmarks.dat",
        "dlib_face_recognition_resnet_model_v1.dat",
    ):
        path = dlib_face.model_path(name)
        assert path.endswith("/models/" + name)


@pytest.mark.parametrize("missing", ["dlib", "face_recognition_models"])
def test_missing_package_reason(monkeypatch, missing):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a)
    )
    reason = dlib_face.dlib_available()
    assert isinstance(reason, str) and "\n" not in reason
    assert missing in reason and "pip install -e ." in reason
    with pytest.raises(ImportError, match="pip install"):
        dlib_face.DlibLandmarks()
