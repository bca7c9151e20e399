"""A trained model as a function from LQ faces to restored faces.

``load_restorer(workdir)`` reads the stage-II checkpoint of ``workdir`` and returns a restorer whose
whole restoration is one jitted function: for ART-FR (:class:`Restorer`) the LQ encoder, T-step
decoding, codebook lookup and the frozen stage-I decoder; for VQFR (:class:`VQFRRestorer`) one
forward pass of the network, returning its main branch (or the texture branch).
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections
import numpy as np

from artfr_jax.train import art_trainer, loop, stage1
from artfr_jax.train import checkpoint as ckpt_lib

METHODS = {"art": "ART-FR", "vqfr": "VQFR"}


class Restorer:
    """``restorer(lq uint8 [B, S, S, 3], rng) -> uint8 [B, S, S, 3]`` with ``S = image_size``."""

    def __init__(self, *, art, tokenizer, art_params, tokenizer_params, sampling, image_size):
        self.image_size = int(image_size)
        self.sampling = sampling
        self.art_params = art_params
        self.tokenizer_params = tokenizer_params
        restore = functools.partial(
            art_trainer.restore_images, art=art, tokenizer=tokenizer, sampling=sampling
        )

        def run(art_params, tok_params, lq_u8, rng):
            restored, _ = restore(art_params, tok_params, loop.to_float_image(lq_u8), rng)
            return loop.to_uint8_image(restored)

        self._run = jax.jit(run)

    def __call__(self, lq: np.ndarray, rng: jax.Array) -> np.ndarray:
        lq = np.asarray(lq)
        s = self.image_size
        if lq.dtype != np.uint8 or lq.ndim != 4 or lq.shape[1:] != (s, s, 3):
            raise ValueError(
                f"Restorer: expected uint8 [B, {s}, {s}, 3], got {lq.dtype} {list(lq.shape)}"
            )
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
            out = vqfr.apply({"params": params}, loop.to_float_image(lq_u8), method="restore")
            return loop.to_uint8_image(out[index])

        self._run = jax.jit(run)

    def __call__(self, lq: np.ndarray, rng: jax.Array) -> np.ndarray:
        del rng
        lq = np.asarray(lq)
        s = self.image_size
        if lq.dtype != np.uint8 or lq.ndim != 4 or lq.shape[1:] != (s, s, 3):
            raise ValueError(
                f"VQFRRestorer: expected uint8 [B, {s}, {s}, 3], got {lq.dtype} {list(lq.shape)}"
            )
        return np.asarray(jax.device_get(self._run(self.params, lq)))


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
    from artfr_jax.models.vqfr import VQFRv1  # noqa: PLC0415

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
    workdir = os.path.abspath(workdir)
    ckdir = ckpt_lib.checkpoint_dir(workdir)
    if ckpt_lib.latest_step(ckdir) is None:
        raise FileNotFoundError(f"{workdir}: no checkpoint (expected {ckdir}/<step>/)")
    saved = ckpt_lib.read_config(ckdir)
    trainer = saved.get("trainer")
    if method not in ("auto", *METHODS):
        raise ValueError(f"method={method!r}: expected 'auto', 'art' or 'vqfr'")
    if trainer not in METHODS or (method != "auto" and method != trainer):
        wanted = METHODS.get(method, "ART-FR or VQFR")
        raise ValueError(
            f"{workdir}: a {trainer!r} checkpoint; restoration needs a {wanted} stage-II "
            "workdir (trained with configs/art.py or configs/vqfr.py)"
        )
    if trainer == "vqfr":
        from artfr_jax.train import vqfr_trainer  # noqa: PLC0415

        vqfr, params, size = vqfr_trainer.load_vqfr(workdir)
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
    s1 = stage1.stage1_dir(config, workdir)
    if ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(s1)) is None:
        raise FileNotFoundError(
            f"{workdir}: its stage-I tokenizer checkpoint is missing (looked in {s1}; set by "
            "config.stage1.workdir when training)"
        )
    tokenizer, tok_params = stage1.load_stage1(config, s1)
    art = art_trainer.make_model(config, tokenizer)
    art_params = art_trainer.load_art_params(workdir, art, config.data.image_size)
    return Restorer(
        art=art,
        tokenizer=tokenizer,
        art_params=art_params,
        tokenizer_params=tok_params,
        sampling=sampling,
        image_size=config.data.image_size,
    )
