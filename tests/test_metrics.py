import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from artfr_jax.evaluation import metrics


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 40, 48, 3)).astype(np.float32)
    noise = rng.normal(0, 20, x.shape)
    y = np.clip(x * 0.7 + 40 + noise, 0, 255).astype(np.float32)
    return x, y


def test_psnr_matches_skimage(pair):
    x, y = pair
    ours = np.asarray(metrics.psnr(x, y))
    ref = [peak_signal_noise_ratio(x[i], y[i], data_range=255) for i in range(2)]
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_ssim_matches_skimage(pair):
    x, y = pair
    ours = np.asarray(metrics.ssim(x, y))
    ref = [
        structural_similarity(
            x[i],
            y[i],
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
            channel_axis=-1,
        )
        for i in range(2)
    ]
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_identical_images_score_perfectly(pair):
    x, _ = pair
    np.testing.assert_allclose(np.asarray(metrics.ssim(x, x)), 1.0, atol=1e-5)
    assert np.all(np.asarray(metrics.psnr(x, x)) > 90)
    assert np.all(np.isposinf(np.asarray(metrics.psnr(x, x, inf_if_identical=True))))
