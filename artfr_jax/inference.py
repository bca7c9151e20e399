"""A trained model as a function from LQ faces to restored faces; imports no training code.

``load_restorer(workdir)`` reads the stage-II checkpoint of ``workdir`` and returns a restorer whose
whole restoration is one jitted function: for ART-FR (:class:`Restorer`) the LQ encoder, T-step
decoding, codebook lookup and the frozen stage-I decoder; for VQFR (:class:`VQFRRestorer`) one
forward pass of the network, returning its main branch (or the texture branch). The loaders of
trained networks (:func:`load_tokenizer`, :func:`load_art_params`, :func:`load_vqfr`) also serve
the trainers that start from them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from artfr_jax import workdirs
from artfr_jax.models import factory, layers, osdface
from artfr_jax.models import lora as lora_lib
from artfr_jax.models.artfr import ARTFR
from artfr_jax.models.vqfr import VQFRv1
from artfr_jax.sampling import artfr as artfr_sampling
from artfr_jax.sampling import noise_schedule, one_step
from artfr_jax.utils import images as image_utils

METHODS = {"art": "ART-FR", "vqfr": "VQFR", "osdface": "OSDFace"}


# ------------------------------------------------------------------------- trained networks


def load_tokenizer(
    directory: str,
    *,
    policy_from: Mapping[str, Any] | None = None,
    what: str = "--workdir",
) -> tuple[nn.Module, dict, dict]:
    """``(tokenizer, params, saved config)`` of a stage-I workdir (EMA params if it kept them),
    computing under the policy of the ``config.model`` section ``policy_from`` (default: its own).
    ``what`` names the flag or field that pointed at ``directory``, for the errors."""
    ckdir, saved, key = workdirs.trained_config(directory, "vqgan", what)
    tokenizer = factory.tokenizer(saved["model"], policy_from)
    size = saved["data"]["image_size"]
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda: tokenizer.init(jax.random.key(0), x, train=False)["params"])
    restored = workdirs.restore_subtree(ckdir, {key: {"generator": abstract}})
    return tokenizer, restored[key]["generator"], saved


def stage1_workdir(config: Mapping[str, Any], workdir: str) -> str:
    """The stage-I workdir a stage-II config names (``stage1.workdir``, else ``<workdir>/stage1``)."""
    return workdirs.resolve(config["stage1"]["workdir"] or workdirs.join(workdir, "stage1"))


def abstract_art_params(art: ARTFR, image_size: int):
    """The shapes of ART-FR stage-II params (``jax.eval_shape``; nothing is computed)."""
    n = art.transformer.num_tokens if art.transformer is not None else 1
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    tokens = jnp.zeros((1, n), jnp.int32)
    return jax.eval_shape(lambda: art.init(jax.random.key(0), x, tokens)["params"])


def load_art_params(
    workdir: str, art: ARTFR, image_size: int, what: str = "stage-II workdir"
) -> dict:
    """ART-FR stage-II params (EMA if kept) from the latest checkpoint of a stage-II workdir."""
    ckdir, _, key = workdirs.trained_config(workdir, "art", what)
    target = {key: {"art": abstract_art_params(art, image_size)}}
    try:
        return workdirs.restore_subtree(ckdir, target)[key]["art"]
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"{what}={workdir}: its stage-II parameters do not fit this model config ({e})"
        ) from None


def load_vqfr(workdir: str, what: str = "--workdir") -> tuple[VQFRv1, dict, int]:
    """The trained network of a VQFR workdir: ``(model, params, image_size)`` (EMA if kept)."""
    ckdir, saved, key = workdirs.trained_config(workdir, "vqfr", what)
    config = ml_collections.ConfigDict(saved)
    vqfr = factory.vqfr(config)
    size = config.data.image_size
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda: vqfr.init(jax.random.key(0), x)["params"])
    restored = workdirs.restore_subtree(ckdir, {key: {"sr": abstract}})
    return vqfr, restored[key]["sr"], size


def load_vre_lq(
    directory: str, *, policy_from: Mapping[str, Any] | None = None, what: str = "--workdir"
) -> tuple[nn.Module, dict, dict]:
    """``(VQGAN, params, saved config)``: the LQ branch of an OSDFace stage-I (VRE) workdir, the
    visual tokenizer and dictionary of Eq. 5, computing under ``policy_from``'s policy."""
    ckdir, saved, key = workdirs.trained_config(directory, "osdface_vre", what)
    branch = factory.tokenizer(saved["model"], policy_from)
    size = saved["data"]["image_size"]
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda: branch.init(jax.random.key(0), x, train=False)["params"])
    restored = workdirs.restore_subtree(ckdir, {key: {"lq": abstract}})
    return branch, restored[key]["lq"], saved


def base_weights_dir(workdir: str) -> str:
    """Where an OSDFace run with ``model.init='random'`` keeps its frozen UNet and VAE."""
    return os.path.join(workdir, "base_weights")


def sd_policy(model: Mapping[str, Any]) -> dict[str, Any]:
    """The frozen SD networks' policy: ``config.model``'s, parameters in ``frozen_param_dtype``."""
    return {
        "dtype": model.get("dtype", "float32"),
        "param_dtype": model.get("frozen_param_dtype", "float32"),
        "kernels": model.get("kernels", "auto"),
    }


def load_sd(model: Mapping[str, Any], workdir: str) -> tuple[nn.Module, Any, nn.Module, Any]:
    """``(unet, unet_params, vae, vae_params)`` of an OSDFace ``config.model`` section: from
    ``sd_weights`` (a diffusers folder, or the ``OUT`` of ``convert.diffusers_sd``) when
    ``init='pretrained'``, else from ``WORKDIR/base_weights`` (written by the trainer)."""
    from artfr_jax.convert import diffusers_sd  # noqa: PLC0415

    pol = sd_policy(model)
    remat = layers.remat_mode(model.get("remat", False))
    if model["init"] == "random":
        folder = base_weights_dir(workdir)
        paths = {c: os.path.join(folder, f"{c}.msgpack") for c in ("unet", "vae")}
    else:
        path = model["sd_weights"]
        if not path:
            raise FileNotFoundError(
                "config.model.sd_weights is empty: name SD-2.1-base as a diffusers folder, or "
                "convert it once with `python -m artfr_jax.convert.diffusers_sd "
                "--input=stable-diffusion-2-1-base --output=weights/sd21base` and pass "
                "--config.model.sd_weights=weights/sd21base"
            )
        if os.path.isdir(path):
            unet, unet_params = diffusers_sd.load_unet(path, remat=remat, **pol)
            vae, vae_params = diffusers_sd.load_vae(path, remat=remat, **pol)
            return unet, unet_params, vae, vae_params
        stem = path[: -len(".msgpack")] if path.endswith(".msgpack") else path
        stem = stem.removesuffix("_unet").removesuffix("_vae")
        paths = {c: f"{stem}_{c}.msgpack" for c in ("unet", "vae")}
    unet, unet_params = diffusers_sd.load_converted(paths["unet"], remat=remat, **pol)
    vae, vae_params = diffusers_sd.load_converted(paths["vae"], remat=remat, **pol)
    cast = lambda t, m: jax.tree.map(lambda a: jnp.asarray(a, m.param_dtype), t)  # noqa: E731
    return unet, cast(unet_params, unet), vae, cast(vae_params, vae)


# ------------------------------------------------------------------------------- restorers


def device_mesh() -> jax.sharding.Mesh:
    """A mesh of this process's first device, the one a restorer runs on. Traced under it, the
    models' ``kernels='auto'`` takes that device's kernels when tracing instead of tracing both
    forms for the lowering to choose (``models/kernels.py``): a quicker first call."""
    return jax.sharding.Mesh(
        np.asarray(jax.local_devices()[:1]), ("batch",), axis_types=(jax.sharding.AxisType.Auto,)
    )


def _checked_batch(lq: np.ndarray, size: int, who: str) -> np.ndarray:
    """``lq`` as uint8 ``[B, size, size, 3]``, or a one-line ValueError naming ``who``."""
    lq = np.asarray(lq)
    if lq.dtype != np.uint8 or lq.ndim != 4 or lq.shape[1:] != (size, size, 3):
        raise ValueError(
            f"{who}: expected uint8 [B, {size}, {size}, 3], got {lq.dtype} {list(lq.shape)}"
        )
    return lq


class Restorer:
    """``restorer(lq uint8 [B, S, S, 3], rng) -> uint8 [B, S, S, 3]`` with ``S = image_size``."""

    def __init__(self, *, art, tokenizer, art_params, tokenizer_params, sampling, image_size):
        self.image_size = int(image_size)
        self.sampling = sampling
        self.art_params = art_params
        self.tokenizer_params = tokenizer_params
        restore = functools.partial(
            artfr_sampling.restore_images, art=art, tokenizer=tokenizer, sampling=sampling
        )

        def run(art_params, tok_params, lq_u8, rng):
            restored, _ = restore(art_params, tok_params, image_utils.to_float_image(lq_u8), rng)
            return image_utils.to_uint8_image(restored)

        self._run = jax.jit(run)
        self.mesh = device_mesh()

    def __call__(self, lq: np.ndarray, rng: jax.Array) -> np.ndarray:
        lq = _checked_batch(lq, self.image_size, "Restorer")
        with jax.set_mesh(self.mesh):
            out = self._run(self.art_params, self.tokenizer_params, lq, rng)
        return np.asarray(jax.device_get(out))


class VQFRRestorer:
    """VQFR (Sec. 3.2): ``restorer(lq uint8 [B, S, S, 3], rng) -> uint8 [B, S, S, 3]``, the main
    branch, or the texture branch with ``branch='texture'``. ``rng`` is unused (one forward pass)."""

    def __init__(self, *, vqfr, params, image_size, branch: str = "main"):
        if branch not in ("main", "texture"):
            raise ValueError(f"branch={branch!r}: expected 'main' or 'texture'")
        self.image_size = int(image_size)
        self.params = params
        index = 0 if branch == "main" else 1

        def run(params, lq_u8):
            lq = image_utils.to_float_image(lq_u8)
            out = vqfr.apply({"params": params}, lq, method="restore")
            return image_utils.to_uint8_image(out[index])

        self._run = jax.jit(run)
        self.mesh = device_mesh()

    def __call__(self, lq: np.ndarray, rng: jax.Array) -> np.ndarray:
        del rng
        lq = _checked_batch(lq, self.image_size, "VQFRRestorer")
        with jax.set_mesh(self.mesh):
            return np.asarray(jax.device_get(self._run(self.params, lq)))


class OSDFaceRestorer:
    """OSDFace (Sec. 3.1, Eqs. 5-6): ``restorer(lq uint8 [B, S, S, 3], rng) -> uint8``.

    The LQ face's visual prompt (the VRE's LQ branch, Eqs. 5-6 of Sec. 3.2) through the projection
    is the UNet's context; one UNet call (with its LoRA, merged here once) at ``timestep`` gives
    the HQ latent, which the VAE decodes. ``rng`` samples the VAE posterior when
    ``sample_posterior`` (the official release does), else the mean is used.
    """

    def __init__(
        self,
        *,
        unet,
        unet_params,
        vae,
        vae_params,
        vre,
        vre_params,
        projection,
        projection_params,
        schedule,
        image_size: int,
        lora=None,
        lora_scale: float = 1.0,
        timestep: int = 399,
        vre_input: str = "standard",
        prompt_tokens: int = osdface.NUM_PROMPT_TOKENS,
        sample_posterior: bool = True,
    ):
        if vre_input not in ("standard", "double_normalized"):
            raise ValueError(f"vre_input={vre_input!r}: expected 'standard' or 'double_normalized'")
        self.image_size = int(image_size)
        if lora is not None:
            unet_params = lora_lib.merge(unet_params, lora, lora_scale)
        self.params = {
            "unet": unet_params,
            "vae": vae_params,
            "vre": vre_params,
            "projection": projection_params,
        }

        def run(params, lq_u8, rng):
            lq = image_utils.to_float_image(lq_u8)
            p = osdface.lq_prompt(
                vre,
                params["vre"],
                lq,
                num_tokens=prompt_tokens,
                double_normalized=vre_input == "double_normalized",
            )
            context = projection.apply({"params": params["projection"]}, p)

            def eps_fn(z, t, c):
                return unet.apply({"params": params["unet"]}, z, t, c)

            out = one_step.restore(
                eps_fn,
                vae,
                params["vae"],
                schedule,
                lq,
                context,
                timestep=timestep,
                rng=rng if sample_posterior else None,
            )
            return image_utils.to_uint8_image(out)

        self._run = jax.jit(run)
        self.mesh = device_mesh()

    def __call__(self, lq: np.ndarray, rng: jax.Array) -> np.ndarray:
        lq = _checked_batch(lq, self.image_size, "OSDFaceRestorer")
        with jax.set_mesh(self.mesh):
            return np.asarray(jax.device_get(self._run(self.params, lq, rng)))


def osdface_projection(model: Mapping[str, Any], vre: nn.Module, unet: nn.Module) -> nn.Module:
    """The prompt projection of an OSDFace ``config.model``: VRE code width -> the UNet's
    cross-attention width, through ``prompt_hidden`` channels."""
    pol = factory.policy(model)
    return osdface.PromptProjection(
        hidden_features=int(model.get("prompt_hidden", 256)),
        features=unet.cross_attention_dim,
        dtype=pol["dtype"],
        param_dtype=pol["param_dtype"],
    )


def load_osdface(workdir: str, what: str = "--workdir") -> OSDFaceRestorer:
    """The restorer of an OSDFace stage-II workdir: its LoRA and projection, the frozen SD
    networks it trained on and its stage-I VRE."""
    ckdir, saved, key = workdirs.trained_config(workdir, "osdface", what)
    model = saved["model"]
    s1 = stage1_workdir(saved, workdir)
    if workdirs.latest_step(workdirs.checkpoint_dir(s1)) is None:
        raise FileNotFoundError(
            f"{workdir}: its stage-I VRE checkpoint is missing (looked in {s1}; set by "
            "config.stage1.workdir when training)"
        )
    vre, vre_params, _ = load_vre_lq(s1, policy_from=model, what="config.stage1.workdir")
    unet, unet_params, vae, vae_params = load_sd(model, workdir)
    projection = osdface_projection(model, vre, unet)
    lora_cfg = lora_lib.LoraConfig(
        model["lora_rank"], model["lora_alpha"], tuple(model["lora_targets"])
    )
    abstract = {
        "lora": lora_lib.init(jax.random.key(0), unet_params, lora_cfg),
        "projection": jax.eval_shape(
            lambda: projection.init(
                jax.random.key(0), jnp.zeros((1, 1, vre.embedding_dim), jnp.float32)
            )["params"]
        ),
    }
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
    trained = workdirs.restore_subtree(ckdir, {key: abstract})[key]
    return OSDFaceRestorer(
        unet=unet,
        unet_params=unet_params,
        vae=vae,
        vae_params=vae_params,
        vre=vre,
        vre_params=vre_params,
        projection=projection,
        projection_params=trained["projection"],
        schedule=noise_schedule.make_schedule(),
        image_size=saved["data"]["image_size"],
        lora=trained["lora"],
        lora_scale=lora_cfg.scale,
        timestep=int(model["timestep"]),
    )


def load_converted_osdface(folder: str) -> OSDFaceRestorer:
    """OSDFace's official release converted by ``python -m artfr_jax.convert.osdface``."""
    from artfr_jax.convert import osdface as convert_osdface  # noqa: PLC0415

    r = convert_osdface.load_release(folder)
    return OSDFaceRestorer(
        unet=r["unet"],
        unet_params=r["unet_params"],
        vae=r["vae"],
        vae_params=r["vae_params"],
        vre=r["vre"],
        vre_params=r["vre_params"],
        projection=r["projection"],
        projection_params=r["projection_params"],
        schedule=r["schedule"],
        image_size=r.get("vre_resolution", 512),
        lora=r["lora"],
        lora_scale=r["lora_scale"],
        timestep=r["timestep"],
        vre_input=r["vre_input"],
        prompt_tokens=r["prompt_tokens"],
        sample_posterior=r["sample_posterior"],
    )


def load_converted_vqfr(
    path: str, *, texture: bool = False, model=None, image_size: int = 512
) -> VQFRRestorer:
    """VQFR at the paper configuration (512 px) from a file written by
    ``python -m artfr_jax.convert.vqfr --arch=vqfr_v1`` (e.g. the official ``VQFR_v1`` release).
    ``model`` / ``image_size`` replace the paper configuration (tests use a small one).

    Raises FileNotFoundError / ValueError naming the file (and the converter command) when it is
    missing or does not hold VQFRv1 params of the paper configuration.
    """
    from artfr_jax.convert import vqfr as convert_vqfr  # noqa: PLC0415

    vqfr = model or VQFRv1()
    params = convert_vqfr.load_vqfr_v1_params(path, vqfr)
    return VQFRRestorer(
        vqfr=vqfr, params=params, image_size=image_size, branch="texture" if texture else "main"
    )


def load_restorer(
    workdir: str,
    *,
    method: str = "auto",
    steps: int | None = None,
    temperature: float | None = None,
    choice_temperature: float | None = None,
    texture: bool = False,
):
    """The restorer of a stage-II workdir. ``method``: 'auto' (from the workdir's config), 'art'
    or 'vqfr' (then the workdir must hold that method). ART-FR: ``None`` keeps the sampling
    setting it was trained with. VQFR: ``texture`` returns the texture branch.

    Raises FileNotFoundError / ValueError with a one-line message when ``workdir`` has no stage-II
    checkpoint, holds another method, or its stage-I tokenizer cannot be found.
    """
    workdir = workdirs.resolve(workdir)
    ckdir = workdirs.checkpoint_dir(workdir)
    if workdirs.latest_step(ckdir) is None:
        raise FileNotFoundError(f"{workdir}: no checkpoint (expected {ckdir}/<step>/)")
    saved = workdirs.read_config(ckdir)
    trainer = saved.get("trainer")
    if method not in ("auto", *METHODS):
        raise ValueError(f"method={method!r}: expected 'auto', 'art', 'vqfr' or 'osdface'")
    if trainer not in METHODS or (method != "auto" and method != trainer):
        wanted = METHODS.get(method, "ART-FR, VQFR or OSDFace")
        raise ValueError(
            f"{workdir}: a {trainer!r} checkpoint; restoration needs a {wanted} stage-II "
            "workdir (trained with configs/art.py, configs/vqfr.py or configs/osdface.py)"
        )
    if trainer == "osdface":
        if texture:
            raise ValueError("--texture is a VQFR option; this workdir holds an OSDFace model")
        return load_osdface(workdir)
    if trainer == "vqfr":
        vqfr, params, size = load_vqfr(workdir)
        return VQFRRestorer(
            vqfr=vqfr, params=params, image_size=size, branch="texture" if texture else "main"
        )
    if texture:
        raise ValueError("--texture is a VQFR option; this workdir holds an ART-FR model")
    config = ml_collections.ConfigDict(saved)
    sampling = ml_collections.ConfigDict(dict(config.sampling))
    for name, value in (
        ("steps", steps),
        ("temperature", temperature),
        ("choice_temperature", choice_temperature),
    ):
        if value is not None:
            sampling[name] = value
    if int(sampling.steps) < 1:
        raise ValueError(f"steps={sampling.steps}: expected >= 1")
    s1 = stage1_workdir(saved, workdir)
    if workdirs.latest_step(workdirs.checkpoint_dir(s1)) is None:
        raise FileNotFoundError(
            f"{workdir}: its stage-I tokenizer checkpoint is missing (looked in {s1}; set by "
            "config.stage1.workdir when training)"
        )
    tokenizer, tok_params, _ = load_tokenizer(s1, policy_from=saved["model"])
    art = factory.art(config, tokenizer)
    art_params = load_art_params(workdir, art, config.data.image_size)
    return Restorer(
        art=art,
        tokenizer=tokenizer,
        art_params=art_params,
        tokenizer_params=tok_params,
        sampling=sampling,
        image_size=config.data.image_size,
    )
