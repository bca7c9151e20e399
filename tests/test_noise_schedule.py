"""The DDPM noise schedule against diffusers' ``DDPMScheduler`` on the same inputs."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from artfr_jax.sampling import noise_schedule as ns

SCHEDULES = [
    ("scaled_linear", 0.00085, 0.012, 1000),
    ("linear", 0.0001, 0.02, 1000),
    ("squaredcos_cap_v2", 0.0001, 0.02, 50),
]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("kind,start,end,n", SCHEDULES)
def test_betas_and_alphas_cumprod_match_diffusers(kind, start, end, n):
    ref = DDPMScheduler(num_train_timesteps=n, beta_start=start, beta_end=end, beta_schedule=kind)
    ours = ns.make_schedule(kind, start, end, n)
    assert ours.num_train_timesteps == n
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-4)


def test_sd_schedule_is_the_default():
    ours = ns.make_schedule()
    assert ours.num_train_timesteps == 1000
    np.testing.assert_allclose(np.asarray(ours.betas)[[0, -1]], [0.00085, 0.012], rtol=1e-6)


@pytest.fixture
def noisy():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
    noise = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
    t = np.array([0, 399, 999])
    return x0, noise, t


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def test_add_noise_and_velocity_match_diffusers(noisy):
    x0, noise, t = noisy
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = ns.make_schedule()
    want = ref.add_noise(_nchw(x0), _nchw(noise), torch.from_numpy(t)).numpy()
    got = np.asarray(ns.add_noise(ours, x0, noise, t)).transpose(0, 3, 1, 2)
    assert _rel(got, want) < 1e-5
    want_v = ref.get_velocity(_nchw(x0), _nchw(noise), torch.from_numpy(t)).numpy()
    got_v = np.asarray(ns.velocity(ours, x0, noise, t)).transpose(0, 3, 1, 2)
    assert _rel(got_v, want_v) < 1e-5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_matches_the_schedulers_pred_original_sample(noisy, prediction_type):
    x0, noise, _ = noisy
    ours = ns.make_schedule()
    ref = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
    )
    ref.set_timesteps(1000)
    t = 399
    xt = ns.add_noise(ours, x0[:1], noise[:1], t)
    pred = noise[:1] if prediction_type == "epsilon" else ns.velocity(ours, x0[:1], noise[:1], t)
    out = ref.step(_nchw(pred), t, _nchw(xt), generator=torch.Generator().manual_seed(0))
    want = out.pred_original_sample.numpy()
    got = np.asarray(ns.x0_from_prediction(ours, xt, pred, t, prediction_type))
    assert _rel(got.transpose(0, 3, 1, 2), want) < 1e-5
    # the exact network output recovers x_0 itself
    assert _rel(got, x0[:1]) < 1e-4


def test_epsilon_and_x0_invert_each_other(noisy):
    x0, noise, t = noisy
    s = ns.make_schedule()
    # abar_0 is almost 1, where epsilon is ill-conditioned: t = 399 and 999 only.
    x0, noise, t = x0[1:], noise[1:], t[1:]
    xt = ns.add_noise(s, x0, noise, t)
    assert _rel(ns.epsilon_from_x0(s, xt, x0, t), noise) < 1e-4
    assert _rel(ns.x0_from_epsilon(s, xt, noise, t), x0) < 1e-4
    assert ns.x0_from_prediction(s, xt, jnp.asarray(x0), t, "sample").dtype == jnp.float32


def test_bad_fields_are_named():
    with pytest.raises(ValueError, match="beta_schedule='cosine'"):
        ns.make_schedule("cosine")
    with pytest.raises(ValueError, match="prediction_type='x'"):
        ns.x0_from_prediction(ns.make_schedule(), jnp.zeros((1, 2)), jnp.zeros((1, 2)), 3, "x")
