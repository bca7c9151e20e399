"""Extension-task presets (ART-FR Sec. 4.1, App. A.2, App. B): inpainting, colorization, denoise, sr."""

import hashlib
import math
import pickle

import cv2
import numpy as np
import pytest
from PIL import Image

from artfr_jax.data import degradations as D
from artfr_jax.data import masks
from artfr_jax.data import pipeline as data
from artfr_jax.data.pipeline import DegradePair
from artfr_jax.data.synthetic import render_face

NEW = ("inpainting", "colorization", "denoise_a", "denoise_b", "sr")
LEVELS = {"denoise_a": (25.0, 50.0, 75.0, 100.0), "denoise_b": (125.0, 150.0, 175.0, 200.0)}


@pytest.fixture(scope="module")
def hq():
    return render_face(5, 64)


def _params(name, seed):
    return D.sample_degradation(D.degradation_preset(name), np.random.default_rng(seed))


# sha256 of the 'artfr' preset's LQ for render_face(3, 64), seeds 0..7: a regression check of the
# whole degradation (OpenCV's blur, resize and JPEG codec make the bits), so it holds for the OpenCV
# releases it was checked with; constraints.txt pins the one CI installs. Recorded before the
# extension presets, and again when the anisotropic line blur moved to a tighter canvas
# (degradations._line_blur; 4 of the 8 seeds use it). The property behind it, without OpenCV's
# bits: test_extension_fields_leave_original_presets_bit_identical.
ARTFR_HASH = "93125aac97a6c8c84237776cbb03c251c81b2cf9a2cda468e61b4afdef8a98f9"
ARTFR_HASH_CV2 = ("5.0.0", "5.1.0")


def _without_extension_fields(name):
    """The preset as a config saved before the extension tasks existed."""
    old = D.degradation_preset(name)
    for k in [k for k in old if k.startswith(("mask_", "jitter_"))] + [
        "noise_levels",
        "gray_after_shift",
        "photometric_jitter_prob",
    ]:
        del old[k]
    return old


@pytest.mark.parametrize("name", ["artfr", "vqfr"])
def test_extension_fields_leave_original_presets_bit_identical(name):
    img = render_face(3, 64)
    new, old = D.degradation_preset(name), _without_extension_fields(name)
    for s in range(12):
        a = D.random_degrade(img, new, np.random.default_rng(s))
        b = D.random_degrade(img, old, np.random.default_rng(s))
        np.testing.assert_array_equal(a, b, err_msg=f"{name} seed {s}")


def test_artfr_preset_output_unchanged():
    if cv2.__version__ not in ARTFR_HASH_CV2:
        pytest.skip(f"hash checked with OpenCV {ARTFR_HASH_CV2}, have {cv2.__version__}")
    cfg = D.degradation_preset("artfr")
    img = render_face(3, 64)
    h = hashlib.sha256()
    for s in range(8):
        h.update(D.random_degrade(img, cfg, np.random.default_rng(s)).tobytes())
    assert h.hexdigest() == ARTFR_HASH


@pytest.mark.parametrize("name", ["artfr", "vqfr", "none"])
def test_original_presets_draw_no_extension_randomness(name):
    cfg = D.degradation_preset(name)
    rng = np.random.default_rng(0)
    ps = [D.sample_degradation(cfg, rng) for _ in range(20)]
    assert all(p.jitter is None and not p.mask_strokes and not p.gray_after_shift for p in ps)
    # Same stream as a config without the extension fields at all (an older saved config).
    old = _without_extension_fields(name)
    rng = np.random.default_rng(0)
    assert [D.sample_degradation(old, rng) for _ in range(20)] == ps


@pytest.mark.parametrize("name", NEW)
def test_deterministic_for_a_seed(hq, name):
    cfg = D.degradation_preset(name)
    a = D.random_degrade(hq, cfg, np.random.default_rng(11))
    b = D.random_degrade(hq, cfg, np.random.default_rng(11))
    np.testing.assert_array_equal(a, b)
    assert a.shape == hq.shape and a.dtype == np.uint8
    outs = [D.random_degrade(hq, cfg, np.random.default_rng(s)).tobytes() for s in range(6)]
    assert len(set(outs)) > 1 or name == "sr"  # sr is a fixed operator
    assert not np.array_equal(a, hq)


def test_unknown_preset_lists_all_names():
    with pytest.raises(ValueError, match="unknown degradation preset 'foo'") as e:
        D.degradation_preset("foo")
    for n in D.PRESETS:
        assert n in str(e.value)
    assert set(NEW) <= set(D.PRESETS)


# --- inpainting -----------------------------------------------------------------------------------


def test_inpainting_changes_only_masked_pixels(hq):
    for s in range(10):
        p = _params("inpainting", s)
        assert p.mask_strokes and p.sigma_x == 0 and p.noise_std == 0 and p.jpeg_quality == 0
        lq = D.apply_degradation(hq, p)
        m = masks.render_mask(p.mask_strokes, *hq.shape[:2])
        np.testing.assert_array_equal(lq[~m], hq[~m])
        assert (lq[m] == 255).all()  # GPEN paints its strokes white


def test_inpainting_mask_coverage_and_irregularity():
    cfg = D.degradation_preset("inpainting")
    cov, irregular = [], 0
    for s in range(200):
        p = D.sample_degradation(cfg, np.random.default_rng(s))
        m = masks.render_mask(p.mask_strokes, 64, 64)
        cov.append(m.mean())
        ys, xs = np.nonzero(m)
        box = m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        irregular += not box.all()
    cov = np.array(cov)
    assert cov.min() > 0 and cov.max() < 0.8
    assert 0.15 < np.median(cov) < 0.3
    assert 0.6 < np.mean((cov >= 0.1) & (cov <= 0.4))  # typically 10-40 % of the face
    assert irregular == 200  # never a filled rectangle


def test_masks_scale_with_resolution():
    strokes = _params("inpainting", 3).mask_strokes
    small = masks.render_mask(strokes, 64, 64)
    big = masks.render_mask(strokes, 256, 256)
    down = cv2.resize(big.astype(np.float32), (64, 64), interpolation=cv2.INTER_AREA) > 0.5
    assert np.mean(small != down) < 0.05
    assert abs(small.mean() - big.mean()) < 0.03


def test_mask_fill_options(hq):
    cfg = D.degradation_preset("inpainting")
    for fill in ("black", "noise"):
        cfg.mask_fill = fill
        p = D.sample_degradation(cfg, np.random.default_rng(1))
        lq = D.apply_degradation(hq, p)
        m = masks.render_mask(p.mask_strokes, *hq.shape[:2])
        np.testing.assert_array_equal(lq[~m], hq[~m])
        if fill == "black":
            assert (lq[m] == 0).all()
        else:
            assert lq[m].std() > 50  # uniform noise, std ~74
    cfg.mask_fill = "pink"
    with pytest.raises(ValueError, match="data.degradation.mask_fill='pink'"):
        D.sample_degradation(cfg, np.random.default_rng(0))
    cfg = D.degradation_preset("inpainting")
    cfg.mask_vertices = (0, 4)
    with pytest.raises(ValueError, match="data.degradation.mask_"):
        D.sample_degradation(cfg, np.random.default_rng(0))


# --- colorization ---------------------------------------------------------------------------------


def test_colorization_is_always_gray_and_loses_chroma(hq):
    hq_chroma = np.abs(hq.astype(int) - hq.astype(int).mean(-1, keepdims=True)).mean()
    assert hq_chroma > 5
    plain = jittered = 0
    for s in range(40):
        p = _params("colorization", s)
        lq = D.apply_degradation(hq, p)
        assert np.array_equal(lq[..., 0], lq[..., 1]) and np.array_equal(lq[..., 1], lq[..., 2])
        if p.color_shift is None and p.jitter is None:
            plain += 1
            np.testing.assert_array_equal(lq[..., 0], cv2.cvtColor(hq, cv2.COLOR_RGB2GRAY))
        else:
            jittered += 1
            assert p.gray_after_shift
    assert plain > 5 and jittered > 5  # GFPGAN's 0.3 / 0.3 jitter probabilities


def test_color_jitter_matches_torchvision():
    import torch
    import torchvision.transforms.functional as TF

    img = render_face(7, 32)
    t = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    cases = [
        ((1.3, 1, 1, 0), TF.adjust_brightness(t, 1.3)),
        ((1, 0.6, 1, 0), TF.adjust_contrast(t, 0.6)),
        ((1, 1, 1.4, 0), TF.adjust_saturation(t, 1.4)),
        ((1, 1, 1, 0.08), TF.adjust_hue(t, 0.08)),
    ]
    for f, ref in cases:
        ref = (ref.permute(1, 2, 0).numpy() * 255).round()
        assert np.abs(D.color_jitter(img, *f).astype(float) - ref).max() <= 2, f
    np.testing.assert_array_equal(D.color_jitter(img), img)
    gray = D.color_jitter(img, saturation=0.0)
    assert np.abs(gray.astype(int) - gray[..., :1]).max() <= 1


# --- denoising ------------------------------------------------------------------------------------


def _clipped_std(sigma, mu=128.0):
    """Std of round-and-saturate(mu + N(0, sigma^2)) to uint8, exactly over the 256 levels."""
    cdf = [0.5 * (1 + math.erf((k + 0.5 - mu) / (sigma * math.sqrt(2)))) for k in range(255)]
    pk = np.diff([0.0, *cdf, 1.0])
    k = np.arange(256)
    m = (pk * k).sum()
    return math.sqrt((pk * (k - m) ** 2).sum())


@pytest.mark.parametrize("name", ["denoise_a", "denoise_b"])
def test_denoise_noise_level_from_the_set(name):
    gray = np.full((64, 64, 3), 128, np.uint8)
    seen = set()
    for s in range(24):
        p = _params(name, s)
        assert p.noise_std in LEVELS[name] and p.sigma_x == 0 and p.scale == 1
        assert p.jpeg_quality == 0 and p.color_shift is None
        seen.add(p.noise_std)
        res = D.apply_degradation(gray, p).astype(float) - 128
        assert abs(res.std() / _clipped_std(p.noise_std) - 1) < 0.05, (p.noise_std, res.std())
        if p.noise_std <= 50:  # clipping is negligible: the raw level shows
            assert abs(res.std() / p.noise_std - 1) < 0.1
    assert seen == set(LEVELS[name])


def test_noise_levels_validated():
    cfg = D.degradation_preset("denoise_a")
    cfg.noise_levels = (25.0, -5.0)
    with pytest.raises(ValueError, match="data.degradation.noise_levels"):
        D.sample_degradation(cfg, np.random.default_rng(0))


# --- super-resolution -----------------------------------------------------------------------------


def test_sr_is_bicubic_down_up_x8(hq):
    p = _params("sr", 0)
    assert p.scale == 8.0 and p.sigma_x == 0 and p.noise_std == 0 and p.jpeg_quality == 0
    lq = D.random_degrade(hq, D.degradation_preset("sr"), np.random.default_rng(0))
    small = Image.fromarray(hq).resize((8, 8), Image.Resampling.BICUBIC)
    ref = np.asarray(small.resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(lq, ref)


def test_sr_downscale_antialiases():
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    p = D.DegradationParams(scale=8.0)
    kw = {"upscale_interp": "bicubic_aa"}
    aa = D.apply_degradation(noise, p, downscale_interp="bicubic_aa", **kw).astype(float)
    cv = D.apply_degradation(noise, p, downscale_interp="bicubic", **kw).astype(float)
    # White noise has almost no energy below 1/8 of Nyquist: an antialiased shrink removes it.
    assert aa.std() < 0.15 * noise.std() < cv.std()


# --- pipeline -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_pipeline_yields_uint8_pairs(name):
    c = data.default_config(32)
    c.synthetic_num_train = 8
    c.num_workers = 0
    c.degradation = D.degradation_preset(name)
    b = next(data.make_train_iterator(c, global_batch_size=4, seed=0))
    assert set(b) == {"hq", "lq"}
    for k in ("hq", "lq"):
        assert b[k].shape == (4, 32, 32, 3) and b[k].dtype == np.uint8
    assert not np.array_equal(b["hq"], b["lq"])


@pytest.mark.parametrize("name", NEW)
def test_degrade_pair_pickles(hq, name):
    op = DegradePair(D.degradation_preset(name))
    op2 = pickle.loads(pickle.dumps(op))
    a = op.random_map(hq, np.random.default_rng(4))["lq"]
    b = op2.random_map(hq, np.random.default_rng(4))["lq"]
    np.testing.assert_array_equal(a, b)
