"""Eq. 8 degradations: identity settings, monotone knobs, determinism, presets."""

from itertools import pairwise

import numpy as np
import pytest

from artfr_jax.data import degradations as D
from artfr_jax.data.synthetic import render_face


@pytest.fixture(scope="module")
def hq():
    return render_face(3, 128)


def _hf_energy(img):
    g = img.astype(np.float64).mean(-1)
    return float((np.diff(g, axis=0) ** 2).mean() + (np.diff(g, axis=1) ** 2).mean())


def test_identity_preset_is_exact(hq):
    cfg = D.degradation_preset("none")
    for s in range(5):
        lq = D.random_degrade(hq, cfg, np.random.default_rng(s))
        np.testing.assert_array_equal(lq, hq)
    np.testing.assert_array_equal(D.apply_degradation(hq, D.DegradationParams()), hq)


def test_identity_with_only_jpeg_on_is_close(hq):
    lq = D.apply_degradation(hq, D.DegradationParams(jpeg_quality=100))
    assert np.abs(lq.astype(int) - hq).mean() < 1.5


@pytest.mark.parametrize("sigmas", [(1.0, 2.0, 4.0), (0.5, 1.5, 3.0)])
@pytest.mark.parametrize("aniso", [False, True])
def test_more_blur_less_high_frequency(hq, sigmas, aniso):
    energies = [_hf_energy(hq)]
    for s in sigmas:
        p = D.DegradationParams(sigma_x=s, sigma_y=s / 3 if aniso else s, theta=0.7)
        energies.append(_hf_energy(D.apply_degradation(hq, p)))
    assert all(a > b for a, b in pairwise(energies)), energies


def test_larger_downscale_less_high_frequency(hq):
    e = [_hf_energy(D.apply_degradation(hq, D.DegradationParams(scale=r))) for r in (1, 2, 4, 8)]
    assert all(a > b for a, b in pairwise(e)), e


def test_more_noise_larger_residual_std(hq):
    stds = [
        (
            D.apply_degradation(hq, D.DegradationParams(noise_std=d, noise_seed=1)).astype(float)
            - hq
        ).std()
        for d in (0.0, 5.0, 10.0, 20.0)
    ]
    assert stds[0] == 0
    assert all(a < b for a, b in pairwise(stds)), stds
    assert abs(stds[2] - 10.0) < 1.5  # delta is a std on the 0-255 scale


def test_lower_jpeg_quality_larger_error(hq):
    err = [
        np.abs(
            D.apply_degradation(hq, D.DegradationParams(jpeg_quality=q)).astype(float) - hq
        ).mean()
        for q in (100, 70, 40, 10)
    ]
    assert all(a < b for a, b in pairwise(err)), err


def test_anisotropic_fast_path_matches_dense_kernel(hq):
    p = D.DegradationParams(sigma_x=3.0, sigma_y=1.0, theta=0.6)
    fast = D.apply_degradation(hq, p, fast_blur=False).astype(float)
    ref = D.reference_blur(hq, p, max_size=61).astype(float)
    assert np.abs(fast - ref).mean() < 0.5
    assert np.abs(ref - hq).mean() > 1.5  # the blur itself is much larger than the mismatch


@pytest.mark.parametrize("theta", [0.0, 0.6, 1.5708, 2.4, -2.0])
def test_long_anisotropic_kernel_matches_dense_kernel(theta):
    # sigma 1.2 x 12: a 41-tap line blur (the sepFilter2D branch), along several directions, on a
    # non-square image so that the rotated canvas's width and height both matter.
    img = render_face(5, 128)[:, 16:112].copy()
    p = D.DegradationParams(sigma_x=12.0, sigma_y=1.2, theta=theta)
    fast = D.apply_degradation(img, p, fast_blur=False).astype(float)
    ref = D.reference_blur(img, p).astype(float)
    assert fast.shape == ref.shape
    assert np.abs(fast - ref).mean() < 0.8, np.abs(fast - ref).mean()
    assert np.abs(fast - ref).max() < 12  # no black canvas pixels leak into the border
    assert np.abs(ref - img).mean() > 4 * np.abs(fast - ref).mean()


def test_fast_blur_close_to_full_resolution_blur(hq):
    p = D.DegradationParams(sigma_x=8.0, sigma_y=6.0, theta=0.3, scale=8.0)
    a = D.apply_degradation(hq, p).astype(float)
    b = D.apply_degradation(hq, p, fast_blur=False).astype(float)
    assert np.abs(a - b).mean() < 0.25 * np.abs(b - hq).mean()


def test_kernel_properties():
    k = D.gaussian_kernel(4.0, 1.0, 0.0, 21)
    assert k.shape == (21, 21) and abs(k.sum() - 1) < 1e-5
    assert k[10, 15] > k[15, 10]  # long axis along x for theta = 0
    assert D.kernel_size(15.0) == 41 and D.kernel_size(1.0) == 7 and D.kernel_size(1.0) % 2


def test_same_seed_same_output_different_seed_differs(hq):
    cfg = D.degradation_preset("artfr")
    a = D.random_degrade(hq, cfg, np.random.default_rng(7))
    b = D.random_degrade(hq, cfg, np.random.default_rng(7))
    c = D.random_degrade(hq, cfg, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == hq.shape and a.dtype == np.uint8


@pytest.mark.parametrize("name", ["artfr", "vqfr"])
def test_presets_sample_within_ranges(name):
    cfg = D.degradation_preset(name)
    rng = np.random.default_rng(0)
    ps = [D.sample_degradation(cfg, rng) for _ in range(300)]
    lo, hi = cfg.blur_sigma
    assert all(lo <= p.sigma_x <= hi and lo <= p.sigma_y <= hi for p in ps)
    assert all(cfg.downscale_range[0] <= p.scale <= cfg.downscale_range[1] for p in ps)
    assert all(cfg.noise_range[0] <= p.noise_std <= cfg.noise_range[1] for p in ps)
    assert all(cfg.jpeg_range[0] <= p.jpeg_quality <= cfg.jpeg_range[1] for p in ps)
    iso = np.mean([p.sigma_x == p.sigma_y for p in ps])
    assert 0.35 < iso < 0.65
    expected = {"artfr": (15.0, 30.0, 20.0, 40), "vqfr": (10.0, 8.0, 15.0, 60)}[name]
    assert (
        cfg.blur_sigma[1],
        cfg.downscale_range[1],
        cfg.noise_range[1],
        cfg.jpeg_range[0],
    ) == expected


def test_gray_and_color_jitter(hq):
    lq = D.apply_degradation(hq, D.DegradationParams(gray=True))
    assert np.array_equal(lq[..., 0], lq[..., 1]) and np.array_equal(lq[..., 1], lq[..., 2])
    lq = D.apply_degradation(hq, D.DegradationParams(color_shift=(10.0, 0.0, -10.0)))
    d = lq.astype(float).mean((0, 1)) - hq.astype(float).mean((0, 1))
    assert d[0] > 5 and abs(d[1]) < 1 and d[2] < -5


def test_bad_config_errors(hq):
    with pytest.raises(ValueError, match="unknown degradation preset 'foo'"):
        D.degradation_preset("foo")
    cfg = D.degradation_preset("artfr")
    cfg.jpeg_range = (0, 100)
    with pytest.raises(ValueError, match="data.degradation.jpeg_range"):
        D.sample_degradation(cfg, np.random.default_rng(0))
    cfg = D.degradation_preset("artfr")
    cfg.downscale_range = (0.5, 2.0)
    with pytest.raises(ValueError, match="data.degradation.downscale_range"):
        D.sample_degradation(cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match="upscale_interp"):
        D.apply_degradation(hq, D.DegradationParams(scale=2.0), upscale_interp="lanczos9")
