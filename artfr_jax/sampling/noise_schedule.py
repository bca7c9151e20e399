"""The discrete forward diffusion process of DDPM (Ho et al., 2020, Eq. 4) as Stable Diffusion
trains it, and the conversions between its parameterisations.

``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` with ``abar_t = prod_{s<=t} (1 - beta_s)``.
A network predicts the noise ``eps`` (SD-2.1-base, OSDFace), the velocity
``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` (Salimans & Ho, 2022, Sec. 4; SD-2.1 at 768 px) or
``x_0`` itself; each gives ``x_0`` back from ``x_t``. One-step restoration (OSDFace Eq. 5) is
:func:`x0_from_epsilon` at a fixed ``t``.

The schedule is computed in float64 on the host and kept as float32 arrays; functions take
timesteps ``t`` as integers (a scalar or ``[B]``) and broadcast over the trailing axes of ``x``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@struct.dataclass
class NoiseSchedule:
    """``betas [T]`` and ``alphas_cumprod [T]`` (float32) of a discrete diffusion schedule."""

    betas: jax.Array
    alphas_cumprod: jax.Array

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021), Eq. 17 with s = 0.008, betas capped at ``max_beta``."""

    def abar(t):
        return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2

    t = np.arange(n, dtype=np.float64)
    return np.minimum(1.0 - abar((t + 1) / n) / abar(t / n), max_beta)


def make_schedule(
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
) -> NoiseSchedule:
    """The schedule of diffusers' ``DDPMScheduler`` config fields (defaults: Stable Diffusion's).

    ``linear``: betas evenly spaced from ``beta_start`` to ``beta_end``; ``scaled_linear``: their
    square roots evenly spaced (latent diffusion); ``squaredcos_cap_v2``: the cosine schedule.
    """
    n = int(num_train_timesteps)
    if n < 1:
        raise ValueError(f"num_train_timesteps={num_train_timesteps}: expected a positive integer")
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise ValueError(f"beta_schedule={beta_schedule!r}: expected one of {BETA_SCHEDULES}")
    abar = np.cumprod(1.0 - betas)
    return NoiseSchedule(
        betas=jnp.asarray(betas, jnp.float32), alphas_cumprod=jnp.asarray(abar, jnp.float32)
    )


def _coefficients(schedule: NoiseSchedule, t: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
    """``sqrt(abar_t)`` and ``sqrt(1 - abar_t)`` shaped to broadcast against an ``ndim`` array."""
    abar = jnp.take(schedule.alphas_cumprod, jnp.asarray(t, jnp.int32))
    abar = abar.reshape(abar.shape + (1,) * (ndim - abar.ndim))
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (DDPM Eq. 4), float32."""
    a, s = _coefficients(schedule, t, x0.ndim)
    return a * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0``."""
    a, s = _coefficients(schedule, t, x0.ndim)
    return a * noise.astype(jnp.float32) - s * x0.astype(jnp.float32)


def x0_from_epsilon(
    schedule: NoiseSchedule, xt: jax.Array, eps: jax.Array, t: jax.Array
) -> jax.Array:
    """``x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (OSDFace Eq. 5 at ``t = T_L``)."""
    a, s = _coefficients(schedule, t, xt.ndim)
    return (xt.astype(jnp.float32) - s * eps.astype(jnp.float32)) / a


def x0_from_v(schedule: NoiseSchedule, xt: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
    """``x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v``."""
    a, s = _coefficients(schedule, t, xt.ndim)
    return a * xt.astype(jnp.float32) - s * v.astype(jnp.float32)


def epsilon_from_x0(
    schedule: NoiseSchedule, xt: jax.Array, x0: jax.Array, t: jax.Array
) -> jax.Array:
    """``eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)`` (undefined where ``abar_t = 1``)."""
    a, s = _coefficients(schedule, t, xt.ndim)
    return (xt.astype(jnp.float32) - a * x0.astype(jnp.float32)) / s


def x0_from_prediction(
    schedule: NoiseSchedule,
    xt: jax.Array,
    prediction: jax.Array,
    t: jax.Array,
    prediction_type: str = "epsilon",
) -> jax.Array:
    """``x_0`` from a network output of ``prediction_type`` (diffusers' config field)."""
    if prediction_type == "epsilon":
        return x0_from_epsilon(schedule, xt, prediction, t)
    if prediction_type == "v_prediction":
        return x0_from_v(schedule, xt, prediction, t)
    if prediction_type == "sample":
        return prediction.astype(jnp.float32)
    raise ValueError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")
