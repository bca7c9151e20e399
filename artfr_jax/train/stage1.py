"""The frozen stage-I codebook model that stage-II trainers build on (ART-FR Sec. 3.2, VQFR Sec. 4.2).

A stage-II config names its tokenizer by ``config.stage1.workdir`` (default ``<workdir>/stage1``) and
declares it in ``config.stage1.config``; with ``config.stage1.train_if_missing`` the tokenizer is
trained (or finished) there first, which is how the small variants run both stages in one command.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import linen as nn

from artfr_jax.train import checkpoint as ckpt_lib
from artfr_jax.train import vqgan_trainer

# Fields of the ``taming`` tokenizer that must agree between the declared model and its checkpoint;
# other architectures compare every declared field.
_TOKENIZER_FIELDS = (
    "block_out_channels",
    "layers_per_block",
    "attention_levels",
    "mid_attention",
    "latent_channels",
    "num_embeddings",
    "embedding_dim",
    "norm_num_groups",
    "normalize_codes",
)


def stage1_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """``config.stage1.workdir``, or ``<workdir>/stage1`` when empty."""
    return os.path.abspath(config.stage1.workdir or os.path.join(workdir, "stage1"))


def ensure_stage1(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Returns the stage-I workdir, training stage I there first if allowed and unfinished."""
    directory = stage1_dir(config, workdir)
    s1 = config.stage1.config
    step = ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(directory))
    if config.stage1.train_if_missing and (step is None or step < s1.num_train_steps):
        logging.info(
            "Stage I: training the tokenizer in %s (step %s of %d)",
            directory,
            step,
            s1.num_train_steps,
        )
        vqgan_trainer.train_and_evaluate(s1, directory)
    elif step is None:
        raise FileNotFoundError(
            f"config.stage1.workdir: no stage-I checkpoint in {directory}; train one with "
            f"`python -m artfr_jax.main --config=configs/vqgan.py --workdir={directory}` or set "
            "--config.stage1.train_if_missing=true"
        )
    return directory


def tokenizer_from_model_config(model: dict) -> nn.Module:
    """The stage-I model of a (saved) ``config.model`` dict, whatever its ``arch``."""
    return vqgan_trainer.make_generator(model)


def saved_config(directory: str, trainer: str, what: str) -> tuple[str, dict, str]:
    """(checkpoint dir, its saved config, 'ema_params' or 'params') of a ``trainer`` workdir.

    ``what`` names the flag or field that pointed at ``directory``, for the error message.
    """
    ckdir = ckpt_lib.checkpoint_dir(directory)
    saved = ckpt_lib.read_config(ckdir)
    if saved.get("trainer") != trainer:
        raise ValueError(
            f"{what}={directory}: expected a {trainer!r} checkpoint, found "
            f"trainer={saved.get('trainer')!r}"
        )
    key = "ema_params" if saved["optimizer"].get("ema_decay", 0.0) > 0 else "params"
    return ckdir, saved, key


def load_stage1(config: ml_collections.ConfigDict, directory: str) -> tuple[nn.Module, dict]:
    """The frozen tokenizer and its params (EMA if stage I kept one), with consistency checks."""
    ckdir, saved, key = saved_config(directory, "vqgan", "config.stage1.workdir")
    declared = config.stage1.config.model.to_dict()
    arch = declared.get("arch", "taming")
    fields = _TOKENIZER_FIELDS if arch == "taming" else ("arch", *sorted(declared))
    norm = lambda v: list(v) if isinstance(v, tuple | list) else v
    diffs = [
        f"{k}: checkpoint {saved['model'].get(k)!r} vs config {declared.get(k)!r}"
        for k in dict.fromkeys(fields)
        if norm(saved["model"].get(k)) != norm(declared.get(k))
    ]
    if diffs:
        raise ValueError(
            f"config.stage1.config.model does not match the checkpoint in {directory}: "
            + "; ".join(diffs)
        )
    size = saved["data"]["image_size"]
    if size != config.data.image_size:
        raise ValueError(
            f"config.data.image_size={config.data.image_size} but the stage-I tokenizer in "
            f"{directory} was trained at {size}"
        )
    tokenizer = tokenizer_from_model_config(saved["model"])
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda: tokenizer.init(jax.random.key(0), x, train=False)["params"])
    restored = ckpt_lib.restore_subtree(ckdir, {key: {"generator": abstract}})
    return tokenizer, restored[key]["generator"]
