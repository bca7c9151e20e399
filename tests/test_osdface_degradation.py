"""The ``osdface`` preset: a two-stage (second-order) Eq. 8 degradation, OSDFace Sec. 4.1."""

import dataclasses
import hashlib

import cv2
import numpy as np
import pytest

from artfr_jax.data import degradations as D
from artfr_jax.data import pipeline as data
from artfr_jax.data.synthetic import render_face

SECOND = (
    "second_stage_prob",
    "second_blur_prob",
    "second_blur_sigma",
    "second_kernel_iso_prob",
    "second_downscale_range",
    "second_noise_prob",
    "second_noise_range",
    "second_noise_gray_prob",
    "second_jpeg_prob",
    "second_jpeg_range",
)

# Recorded with the module as it was before the second stage existed (same numpy stream): the first
# four draws of sample_degradation(preset, default_rng(0)) as (sigma_x, sigma_y, theta, scale,
# noise_std, noise_gray, noise_seed, jpeg_quality), the next uniform of that rng after them, and
# the sha256 of random_degrade(render_face(3, 64), preset, default_rng(s)) for s = 0..5.
PINNED = {
    "artfr": (
        [
            (
                8.61074988051592,
                8.61074988051592,
                0.0,
                1.0794165049342948,
                17.148085531751388,
                False,
                1190382222,
                42,
            ),
            (
                6.371485759666368,
                6.371485759666368,
                0.0,
                20.880717549940147,
                13.009185525356326,
                False,
                1804554973,
                81,
            ),
            (
                9.320200422795756,
                9.320200422795756,
                0.0,
                26.817956208138977,
                4.543151870667595,
                False,
                1533673821,
                78,
            ),
            (
                1.7282982149017345,
                6.663725757501394,
                -1.8942984090457529,
                3.6318383229545352,
                11.606647719737014,
                False,
                1930469648,
                58,
            ),
        ],
        0.36511016824482856,
        "28b0a5a275a577f0d563c1de152854755fd62e145d1cd9a855d54f5c368607f4",
    ),
    "vqfr": (
        [
            (
                5.527524916361145,
                5.527524916361145,
                0.0,
                1.0191695011910367,
                12.86106414881354,
                False,
                1190382222,
                61,
            ),
            (
                3.960040031766458,
                3.960040031766458,
                0.0,
                5.798793891364863,
                9.756889144017244,
                False,
                1804554973,
                88,
            ),
            (
                6.02414029595703,
                6.02414029595703,
                0.0,
                7.231920464033546,
                3.4073639030006957,
                False,
                1533673821,
                85,
            ),
            (
                0.7098087504312143,
                4.164608030250976,
                -1.8942984090457529,
                1.6352713193338533,
                8.70498578980276,
                False,
                1930469648,
                72,
            ),
        ],
        0.36511016824482856,
        "767c673a929c88933ef2f8d1e89ecbf4e3ed2f3fe2c3787e2ea5997bdfba560c",
    ),
}
HASH_CV2 = ("5.1.0",)  # OpenCV release the hashes were recorded with


@pytest.fixture(scope="module")
def hq():
    return render_face(5, 64)


def _fields(p):
    return (
        p.sigma_x,
        p.sigma_y,
        p.theta,
        p.scale,
        p.noise_std,
        p.noise_gray,
        p.noise_seed,
        p.jpeg_quality,
    )


def test_preset_has_both_stages():
    assert "osdface" in D.PRESETS
    cfg = D.degradation_preset("osdface")
    assert cfg.name == "osdface" and cfg.second_stage_prob == 1.0
    assert cfg.blur_prob > 0 and cfg.jpeg_prob > 0 and cfg.noise_prob > 0
    assert tuple(cfg.blur_sigma) == (0.2, 3.0) and tuple(cfg.jpeg_range) == (30, 95)
    assert tuple(cfg.second_blur_sigma) == (0.2, 1.5) and tuple(cfg.second_noise_range) == (1, 25)
    ps = [D.sample_degradation(cfg, np.random.default_rng(s)) for s in range(200)]
    assert all(p.second is not None and p.second.second is None for p in ps)
    assert all(p.jpeg_quality and p.second.jpeg_quality for p in ps)
    lo, hi = cfg.second_downscale_range
    assert all(lo <= p.second.scale <= hi for p in ps)
    assert all(30 <= p.second.jpeg_quality <= 95 for p in ps)
    assert all(1 <= p.second.noise_std <= 25 for p in ps)
    blurred = np.mean([p.second.sigma_x > 0 for p in ps])
    assert 0.65 < blurred < 0.95  # second_blur_prob = 0.8


def test_deterministic_for_a_seed(hq):
    cfg = D.degradation_preset("osdface")
    a = D.random_degrade(hq, cfg, np.random.default_rng(11))
    b = D.random_degrade(hq, cfg, np.random.default_rng(11))
    np.testing.assert_array_equal(a, b)
    assert a.shape == hq.shape and a.dtype == np.uint8 and not np.array_equal(a, hq)
    p = D.sample_degradation(cfg, np.random.default_rng(11))
    assert p == D.sample_degradation(cfg, np.random.default_rng(11))
    np.testing.assert_array_equal(D.apply_degradation(hq, p), D.apply_degradation(hq, p))
    outs = {D.random_degrade(hq, cfg, np.random.default_rng(s)).tobytes() for s in range(6)}
    assert len(outs) == 6


def test_second_stage_changes_output(hq):
    cfg = D.degradation_preset("osdface")
    for s in range(6):
        p = D.sample_degradation(cfg, np.random.default_rng(s))
        two = D.apply_degradation(hq, p)
        one = D.apply_degradation(hq, dataclasses.replace(p, second=None))
        assert not np.array_equal(one, two), f"seed {s}"
        # The second stage takes the first stage's output as its input.
        again = D.apply_degradation(one, p.second)
        np.testing.assert_array_equal(two, again)


def test_second_stage_on_any_preset_and_stream_untouched():
    cfg = D.degradation_preset("vqfr")
    cfg.second_stage_prob = 1.0
    off = D.degradation_preset("vqfr")
    for s in range(10):
        p = D.sample_degradation(cfg, np.random.default_rng(s))
        q = D.sample_degradation(off, np.random.default_rng(s))
        assert p.second is not None and dataclasses.replace(p, second=None) == q
    cfg.second_stage_prob = 0.5
    ps = [D.sample_degradation(cfg, np.random.default_rng(s)) for s in range(200)]
    assert 0.35 < np.mean([p.second is not None for p in ps]) < 0.65


@pytest.mark.parametrize("name", ["artfr", "vqfr"])
def test_existing_presets_pinned(name):
    draws, nxt, digest = PINNED[name]
    cfg = D.degradation_preset(name)
    rng = np.random.default_rng(0)
    ps = [D.sample_degradation(cfg, rng) for _ in range(4)]
    assert [_fields(p) for p in ps] == draws
    assert all(p.second is None for p in ps)
    assert rng.uniform() == nxt  # no extra draws
    if cv2.__version__ not in HASH_CV2:
        pytest.skip(f"hash recorded with OpenCV {HASH_CV2}, have {cv2.__version__}")
    img = render_face(3, 64)
    h = hashlib.sha256()
    for s in range(6):
        h.update(D.random_degrade(img, cfg, np.random.default_rng(s)).tobytes())
    assert h.hexdigest() == digest


@pytest.mark.parametrize("name", ["artfr", "vqfr", "none", "sr", "colorization"])
def test_existing_presets_match_config_without_second_fields(name):
    img = render_face(3, 64)
    new, old = D.degradation_preset(name), D.degradation_preset(name)
    for k in SECOND:
        del old[k]  # a config saved before the second stage existed
    for s in range(6):
        assert D.sample_degradation(new, np.random.default_rng(s)) == D.sample_degradation(
            old, np.random.default_rng(s)
        )
        a = D.random_degrade(img, new, np.random.default_rng(s))
        b = D.random_degrade(img, old, np.random.default_rng(s))
        np.testing.assert_array_equal(a, b, err_msg=f"{name} seed {s}")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("second_blur_sigma", (2.0, 1.0), "expected 0 <= lo <= hi"),
        ("second_noise_range", (-1.0, 5.0), "expected 0 <= lo <= hi"),
        ("second_downscale_range", (0.5, 2.0), "need r >= 1"),
        ("second_jpeg_range", (0, 95), "expected 1..100"),
        ("second_jpeg_range", (50, 101), "expected 1..100"),
        ("second_blur_sigma", 1.0, "expected a \\(lo, hi\\) pair"),
        ("second_noise_range", (1.0, 2.0, 3.0), "expected a \\(lo, hi\\) pair"),
    ],
)
def test_bad_second_stage_range(field, value, match):
    cfg = D.degradation_preset("osdface")
    del cfg[field]  # ConfigDict would refuse a scalar in place of a tuple
    cfg[field] = value
    with pytest.raises(ValueError, match=f"data.degradation.{field}=.*{match}") as e:
        D.sample_degradation(cfg, np.random.default_rng(0))
    assert "\n" not in str(e.value)
    # Off, the second-stage fields are not read.
    cfg.second_stage_prob = 0.0
    D.sample_degradation(cfg, np.random.default_rng(0))


def test_pipeline_yields_lq_batch():
    c = data.default_config(image_size=64, preset="osdface")
    assert c.degradation.name == "osdface" and c.degradation.second_stage_prob == 1.0
    c.synthetic_num_train = 8
    c.num_workers = 0
    b = next(data.make_train_iterator(c, global_batch_size=4, seed=0))
    assert set(b) == {"hq", "lq"}
    for k in ("hq", "lq"):
        assert b[k].shape == (4, 64, 64, 3) and b[k].dtype == np.uint8
    assert not np.array_equal(b["hq"], b["lq"])
