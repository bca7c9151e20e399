"""The frozen stage-I codebook model that stage-II trainers build on (ART-FR Sec. 3.2, VQFR Sec. 4.2).

A stage-II config names its tokenizer by ``config.stage1.workdir`` (default ``<workdir>/stage1``) and
declares it in ``config.stage1.config``. With ``config.stage1.train_if_missing`` the main command
(``artfr_jax.main.run``) trains (or finishes) stage I there first, which is how the small variants
run both stages in one command; a trainer itself only reads it.
"""

from __future__ import annotations

import ml_collections
from flax import linen as nn

from artfr_jax import inference, workdirs
from artfr_jax.models import factory

# Fields of the ``taming`` tokenizer that must agree between the declared model and its checkpoint;
# other architectures compare every declared field but the compute settings.
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
    return workdirs.resolve(config.stage1.workdir or workdirs.join(workdir, "stage1"))


def needs_training(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Whether the main command should train (or finish) stage I before this stage II."""
    if "stage1" not in config or not config.stage1.train_if_missing:
        return False
    step = workdirs.latest_step(workdirs.checkpoint_dir(stage1_dir(config, workdir)))
    return step is None or step < config.stage1.config.num_train_steps


def load_stage1(config: ml_collections.ConfigDict, workdir: str) -> tuple[nn.Module, dict]:
    """The frozen tokenizer of ``config.stage1`` and its params (EMA if stage I kept one), computing
    under this stage's ``config.model`` policy; one-line errors when it is missing or differs from
    the declared ``config.stage1.config``."""
    directory = stage1_dir(config, workdir)
    if workdirs.latest_step(workdirs.checkpoint_dir(directory)) is None:
        raise FileNotFoundError(
            f"config.stage1.workdir: no stage-I checkpoint in {directory}; train one with "
            f"`python -m artfr_jax.main --config=configs/vqgan.py --workdir={directory}` or set "
            "--config.stage1.train_if_missing=true (the main command then trains it first)"
        )
    tokenizer, params, saved = inference.load_tokenizer(
        directory, policy_from=config.model, what="config.stage1.workdir"
    )
    declared = config.stage1.config.model.to_dict()
    arch = declared.get("arch", "taming")
    if arch == "taming":
        fields = _TOKENIZER_FIELDS
    else:
        fields = ("arch", *sorted(k for k in declared if k not in factory.COMPUTE_FIELDS))
    norm = lambda v: list(v) if isinstance(v, tuple | list) else v  # noqa: E731
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
    return tokenizer, params
