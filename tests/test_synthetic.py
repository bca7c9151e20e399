"""Synthetic faces: deterministic, varied, any size, face-like layout."""

import numpy as np
import pytest

from artfr_jax.data.synthetic import face_grid, render_face


def test_deterministic_per_index_and_seed():
    a, b = render_face(5, 64), render_face(5, 64)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, render_face(6, 64))
    assert not np.array_equal(a, render_face(5, 64, seed=1))


@pytest.mark.parametrize("size", [16, 33, 128, 300])
def test_any_resolution(size):
    img = render_face(0, size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8


def test_varied_faces():
    faces = np.stack([render_face(i, 64) for i in range(24)]).astype(np.float64)
    # Per-face mean colours differ (skin, hair, background vary).
    means = faces.mean((1, 2))
    assert means.std(0).min() > 5
    # Pairwise differences are large: not the same face with noise.
    d = np.abs(faces[:, None] - faces[None]).mean((2, 3, 4))
    assert d[np.triu_indices(24, 1)].min() > 5


def test_face_layout_is_aligned_and_roughly_symmetric():
    # FFHQ-like alignment: the eye band (rows ~43-50%) carries more detail than the cheeks
    # below it, and a face is closer to its own mirror image than to another face.
    faces = np.stack([render_face(i, 128) for i in range(24)]).astype(np.float64)
    eye_band = faces[:, 56:64, 40:88].std((1, 2)).mean()
    cheeks = faces[:, 76:82, 46:54].std((1, 2)).mean()
    assert eye_band > 1.5 * cheeks
    mirror = np.abs(faces - faces[:, :, ::-1]).mean()
    other = np.abs(faces - np.roll(faces, 1, axis=0)).mean()
    assert mirror < 0.7 * other


def test_grid_and_bad_size():
    g = face_grid(range(6), size=32, cols=3)
    assert g.shape == (64, 96, 3)
    with pytest.raises(ValueError, match="size must be >= 16"):
        render_face(0, 8)
