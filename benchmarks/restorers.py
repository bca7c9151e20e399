"""Restorers on random weights for the benchmarks: what ``inference`` builds from a trained
workdir, with the weights drawn by the modules' jitted inits (same compute as trained ones).

``make(method, variant, dtype)``: ``method`` one of ``METHODS`` (``identity``: a stand-in that
returns its input at 512 px, the pipeline's cost alone), ``variant`` the configs' variant
(``paper``, ``smoke`` or ``tiny``: ``configs/art.py``, ``configs/vqfr.py``, ``configs/osdface.py``),
``dtype`` the compute dtype (``config.model.dtype``; OSDFace's frozen UNet/VAE parameters too, as
``benchmarks.osdface`` keeps them). The ART-FR restorer is built as ``benchmarks.restoration``
builds it, the OSDFace one from ``benchmarks.osdface``'s networks and random LoRA, as its
latency part builds it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from artfr_jax import inference
from artfr_jax.models import factory

METHODS = ("identity", "art", "vqfr", "osdface")
VARIANTS = ("paper", "smoke", "tiny")


class Identity:
    """``restorer(lq uint8 [B, S, S, 3], rng) -> lq`` (a copy), S = 512."""

    image_size = 512

    def __call__(self, lq: np.ndarray, rng) -> np.ndarray:
        del rng
        return np.array(lq, np.uint8, copy=True)


def _variant(variant: str) -> str | None:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
    return None if variant == "paper" else variant


def art(variant: str = "paper", dtype: str = "float32") -> inference.Restorer:
    """ART-FR (``configs/art.py``): the LQ encoder, transformer and stage-I tokenizer."""
    from configs import art as art_config  # noqa: PLC0415

    config = art_config.get_config(_variant(variant))
    config.model.dtype = dtype
    # The frozen tokenizer computes in the stage's dtype, as a trained workdir's does.
    tokenizer = factory.tokenizer(config.stage1.config.model.to_dict(), config.model.to_dict())
    model = factory.art(config, tokenizer)
    size = config.data.image_size
    x = jnp.zeros((1, size, size, 3))
    n_tok = model.transformer.num_tokens
    with jax.set_mesh(inference.device_mesh()):
        tok_params = jax.jit(lambda k: tokenizer.init(k, x, train=False)["params"])(
            jax.random.key(1)
        )
        art_params = jax.jit(
            lambda k: model.init(k, x, jnp.zeros((1, n_tok), jnp.int32))["params"]
        )(jax.random.key(2))
    return inference.Restorer(
        art=model,
        tokenizer=tokenizer,
        art_params=art_params,
        tokenizer_params=tok_params,
        sampling=config.sampling,
        image_size=size,
    )


def vqfr(variant: str = "paper", dtype: str = "float32") -> inference.VQFRRestorer:
    """VQFR (``configs/vqfr.py``): the network the stage-II trainer trains, main branch."""
    from configs import vqfr as vqfr_config  # noqa: PLC0415

    config = vqfr_config.get_config(_variant(variant))
    config.model.dtype = dtype
    model = factory.vqfr(config)
    size = config.data.image_size
    x = jnp.zeros((1, size, size, 3))
    with jax.set_mesh(inference.device_mesh()):
        params = jax.jit(lambda k: model.init(k, x)["params"])(jax.random.key(1))
    return inference.VQFRRestorer(vqfr=model, params=params, image_size=size)


def osdface(
    variant: str = "paper", dtype: str = "float32", lora: str = "merged"
) -> inference.OSDFaceRestorer:
    """OSDFace (``configs/osdface.py``): SD UNet + VAE, the VRE's LQ branch, the prompt
    projection and a random rank-r LoRA (``lora='merged'``, as a trained one) or none."""
    from benchmarks import osdface as bench  # noqa: PLC0415
    from configs import osdface as osdface_config  # noqa: PLC0415

    config = osdface_config.get_config(_variant(variant))
    config.model.update(dtype=dtype, frozen_param_dtype=dtype, remat="none")
    nets = bench.build_networks(config)
    size = config.data.image_size
    if size % bench.image_multiple(nets):
        raise ValueError(f"{size} px is not a multiple of {bench.image_multiple(nets)}")
    # unsafe_rbg: the random inits compile in seconds instead of minutes (benchmarks.osdface).
    keys = jax.random.split(jax.random.key(0, impl="unsafe_rbg"), 5)
    fns = bench.frozen_init_fns(nets)
    with jax.set_mesh(inference.device_mesh()):
        params = {
            name: jax.jit(fns[name])(k)
            for name, k in zip(("unet", "vae", "vre"), keys[:3], strict=True)
        }
    p0 = jnp.zeros((1, 1, nets.vre.embedding_dim), jnp.float32)
    proj_params = jax.jit(lambda k: nets.projection.init(k, p0)["params"])(keys[3])
    lora_tree = bench.random_lora(keys[4], params["unet"], nets.g_lora) if lora != "none" else None
    return bench.make_restorer(
        nets, params, proj_params, lora_tree, size, int(config.model.timestep)
    )


def make(method: str, variant: str = "paper", dtype: str = "float32"):
    """(restorer, seconds to build it incl. the random init) for ``method`` in ``METHODS``."""
    builders = {"identity": lambda: Identity(), "art": art, "vqfr": vqfr, "osdface": osdface}
    if method not in builders:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    t0 = time.perf_counter()
    restorer = builders[method]() if method == "identity" else builders[method](variant, dtype)
    jax.block_until_ready([getattr(restorer, a, None) for a in ("params", "art_params")])
    return restorer, time.perf_counter() - t0
