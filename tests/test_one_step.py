"""One-step restoration (OSDFace Eqs. 5-6) against diffusers: the same tiny UNet and VAE, and
``DDPMScheduler.step``'s ``pred_original_sample`` at ``T_L`` as the x0 formula."""

import jax
import numpy as np
import pytest
import torch

from artfr_jax.convert import diffusers_sd
from artfr_jax.models import lora
from artfr_jax.models.vae import sample_posterior
from artfr_jax.sampling import noise_schedule as ns
from artfr_jax.sampling import one_step
from tests.test_unet_parity import UNET_CONFIGS, VAE_CONFIG, _nchw, _nhwc, _randomise, _rel


@pytest.fixture(scope="module")
def models():
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    tu = _randomise(UNet2DConditionModel(**UNET_CONFIGS["linear_heads"]), 30)
    tv = _randomise(AutoencoderKL(**VAE_CONFIG), 31)
    sched = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False
    )
    ukw = diffusers_sd.unet_kwargs_from_diffusers_config(tu.config)
    vkw = diffusers_sd.vae_kwargs_from_diffusers_config(tv.config)
    from artfr_jax.models.unet import UNet
    from artfr_jax.models.vae import AutoencoderKL as JaxVAE

    unet = UNet(**ukw, precision="highest")
    vae = JaxVAE(**vkw, precision="highest")
    up = diffusers_sd.convert_unet_state_dict(tu.state_dict(), ukw)
    vp = diffusers_sd.convert_vae_state_dict(tv.state_dict(), vkw)
    return tu, tv, sched, unet, up, vae, vp


def test_restore_matches_diffusers_one_step(models):
    tu, tv, sched, unet, up, vae, vp = models
    rng = np.random.default_rng(0)
    lq = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    context = rng.standard_normal((2, 7, 16)).astype(np.float32)
    t = 399
    with torch.no_grad():
        z = tv.encode(_nchw(lq)).latent_dist.mean * tv.config.scaling_factor
        eps = tu(z, t, encoder_hidden_states=torch.from_numpy(context)).sample
        x0 = sched.step(eps, t, z).pred_original_sample
        want = _nhwc(tv.decode(x0 / tv.config.scaling_factor).sample)

    def eps_fn(z, t, c):
        return unet.apply({"params": up}, z, t, c)

    schedule = ns.make_schedule()
    got = jax.jit(lambda x, c: one_step.restore(eps_fn, vae, vp, schedule, x, c, timestep=t))(
        lq, context
    )
    assert got.shape == lq.shape and got.dtype == np.float32
    assert _rel(got, want) < 1e-4
    z_ours = one_step.encode_latents(vae, vp, lq)
    assert _rel(_nchw(np.asarray(z_ours)), z) < 1e-4
    assert (
        _rel(_nchw(np.asarray(one_step.one_step_latents(eps_fn, schedule, z_ours, context))), x0)
        < 1e-4
    )


def test_posterior_sample_and_lora_unet(models):
    _, _, _, unet, up, vae, vp = models
    rng = np.random.default_rng(1)
    lq = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    context = rng.standard_normal((1, 7, 16)).astype(np.float32)
    schedule = ns.make_schedule()
    mean = one_step.encode_latents(vae, vp, lq)
    a = one_step.encode_latents(vae, vp, lq, jax.random.key(0))
    b = one_step.encode_latents(vae, vp, lq, jax.random.key(0))
    np.testing.assert_array_equal(a, b)
    m, logvar = vae.apply({"params": vp}, lq, method="encode")
    want = sample_posterior(jax.random.key(0), m, logvar) * vae.scaling_factor
    np.testing.assert_allclose(a, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean, m * vae.scaling_factor, rtol=1e-6, atol=1e-7)
    assert not np.allclose(a, mean)  # a sample, not the mean
    cfg = lora.LoraConfig(rank=2, alpha=2, target_modules=("to_q", "to_v"))
    lp = lora.init(jax.random.key(1), up, cfg)

    def with_lora(z, t, c):
        return lora.apply(unet, {"params": up, "lora": lp}, z, t, c, scale=cfg.scale)

    def plain(z, t, c):
        return unet.apply({"params": up}, z, t, c)

    # B = 0: the LoRA UNet restores exactly as the base one
    x = one_step.restore(with_lora, vae, vp, schedule, lq, context)
    y = one_step.restore(plain, vae, vp, schedule, lq, context)
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
