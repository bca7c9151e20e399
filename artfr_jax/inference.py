"""A trained ART-FR model as a function from LQ faces to restored faces.

``load_restorer(workdir)`` reads the stage-II checkpoint of ``workdir``, the frozen stage-I
tokenizer it was trained with, and returns a :class:`Restorer` whose whole restoration (LQ encoder,
T-step decoding, codebook lookup, HQ decoder) is one jitted function.
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections
import numpy as np

from artfr_jax.train import art_trainer, loop
from artfr_jax.train import checkpoint as ckpt_lib


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


def load_restorer(
    workdir: str,
    *,
    steps: int | None = None,
    temperature: float | None = None,
    choice_temperature: float | None = None,
) -> Restorer:
    """The restorer of a stage-II workdir; ``None`` keeps the sampling setting it was trained with.

    Raises FileNotFoundError / ValueError with a one-line message when ``workdir`` has no stage-II
    checkpoint or its stage-I tokenizer cannot be found.
    """
    workdir = os.path.abspath(workdir)
    ckdir = ckpt_lib.checkpoint_dir(workdir)
    if ckpt_lib.latest_step(ckdir) is None:
        raise FileNotFoundError(f"{workdir}: no checkpoint (expected {ckdir}/<step>/)")
    saved = ckpt_lib.read_config(ckdir)
    if saved.get("trainer") != "art":
        raise ValueError(
            f"{workdir}: a {saved.get('trainer')!r} checkpoint; restoration needs an ART-FR "
            "stage-II workdir (trained with configs/art.py)"
        )
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
    s1 = art_trainer.stage1_dir(config, workdir)
    if ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(s1)) is None:
        raise FileNotFoundError(
            f"{workdir}: its stage-I tokenizer checkpoint is missing (looked in {s1}; set by "
            "config.stage1.workdir when training)"
        )
    tokenizer, tok_params = art_trainer.load_stage1(config, s1)
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
