"""NIQE parity with BasicSR's ``calculate_niqe`` and properties of the MATLAB-style resize."""

import numpy as np
import pytest
import skimage.data

from artfr_jax.evaluation.niqe import matlab_imresize, niqe

# Reference values from BasicSR 1.4.2's basicsr/metrics/niqe.py (sdist from
# `pip download basicsr==1.4.2 --no-deps --no-binary :all:`), run standalone with its package
# __init__ files stubbed out, numpy 2.4 / scipy 1.17 / torch 2.13 cpu:
#   calculate_niqe(rgb[..., ::-1], crop_border, input_order='HWC', convert_to=...)  (BGR input)
#   calculate_niqe(gray, 0, input_order='HW')                                       (camera)
# Differences of ~1e-4 come from float32 rounding in BasicSR's torch imresize.
REFERENCE = {
    ("astronaut", 0, "y"): 3.0649476661849033,
    ("astronaut", 4, "y"): 2.991296048454476,
    ("astronaut", 0, "gray"): 3.061004066799764,
    ("camera", 0, "y"): 3.0962066193457405,
    ("astronaut_300x200", 0, "y"): 4.666527250051649,
}


def _image(name):
    if name == "astronaut":
        return skimage.data.astronaut()
    if name == "camera":
        return skimage.data.camera()
    return skimage.data.astronaut()[:300, 50:250]


@pytest.mark.parametrize("key", list(REFERENCE))
def test_matches_basicsr_reference(key):
    name, crop, convert_to = key
    assert niqe(_image(name), crop_border=crop, convert_to=convert_to) == pytest.approx(
        REFERENCE[key], abs=1e-3
    )


def test_gray_input_equals_y_path():
    rgb = skimage.data.astronaut()
    bgr_y = rgb.astype(np.float64)[..., ::-1] / 255.0 @ np.array([24.966, 128.553, 65.481]) + 16
    luma = (bgr_y / 255.0).astype(np.float32) * np.float32(255.0)
    assert niqe(luma.round()) == pytest.approx(niqe(rgb), abs=1e-9)


def test_noise_raises_score():
    rgb = skimage.data.astronaut()
    noisy = rgb + np.random.default_rng(0).normal(0, 25, rgb.shape)
    assert niqe(np.clip(noisy, 0, 255).astype(np.uint8)) > niqe(rgb) + 1.0


def test_imresize_shapes_constant_and_ramp():
    x = np.full((97, 50), 0.3, np.float32)
    out = matlab_imresize(x, 0.5)
    assert out.shape == (49, 25)
    np.testing.assert_allclose(out, 0.3, atol=1e-6)
    # A linear ramp is reproduced away from the borders: output pixel k (0-based) sits at input
    # coordinate 2k + 0.5.
    ramp = np.tile(np.arange(64, dtype=np.float32), (8, 1))
    out = matlab_imresize(ramp, 0.5)
    expected = np.broadcast_to(2 * np.arange(32) + 0.5, (4, 32))
    np.testing.assert_allclose(out[:, 3:-3], expected[:, 3:-3], atol=1e-4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least two 96x96 blocks"):
        niqe(np.zeros((100, 150, 3), np.uint8))
    with pytest.raises(ValueError, match="at least two 96x96 blocks"):
        niqe(np.zeros((200, 200), np.uint8), crop_border=10)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        niqe(np.zeros((200, 200, 4), np.uint8))
    with pytest.raises(ValueError, match="convert_to"):
        niqe(np.zeros((200, 200, 3), np.uint8), convert_to="ycbcr")
