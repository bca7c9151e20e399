"""Modules from config sections, under the framework's one precision and kernel policy.

``config.model`` of every config carries the policy, and every network a stage runs follows it: the
trained generator, its discriminators and the frozen networks (LPIPS/VGG, a stage-I tokenizer used
as a target):

* ``dtype``: compute dtype, ``'float32'`` or ``'bfloat16'``;
* ``param_dtype``: parameter (and so optimizer-state) dtype, ``'float32'``;
* ``kernels``: ``'auto'`` | ``'xla'`` | ``'cpu'`` (``models/kernels.py``).

Norm statistics, softmax, the VQ distance matmul, images leaving a model, losses and metrics are
float32 whatever the compute dtype. A saved config without these fields (an older checkpoint)
reads as float32 with 'auto' kernels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from artfr_jax.models import layers
from artfr_jax.models.artfr import ARTFR
from artfr_jax.models.discriminators import PatchDiscriminator
from artfr_jax.models.kernels import Kernels
from artfr_jax.models.stylegan_disc import SWADiscriminator
from artfr_jax.models.transformer import MaskedTokenTransformer
from artfr_jax.models.vqfr import VQFRv1, VQGANv1
from artfr_jax.models.vqgan import VQGAN

DTYPES = ("float32", "bfloat16")
POLICY_FIELDS = ("dtype", "param_dtype", "kernels")
# Fields that change how a network computes, not what: two configs differing only in them hold
# the same parameters.
COMPUTE_FIELDS = (*POLICY_FIELDS, "remat")

TOKENIZERS = {"taming": VQGAN, "vqfr_v1": VQGANv1}
DISCRIMINATORS = {"patchgan": PatchDiscriminator, "swagan": SWADiscriminator}


def compute_dtype(name: str, field: str = "config.model.dtype") -> jnp.dtype:
    """``'float32'`` or ``'bfloat16'`` as a dtype; anything else is an error naming ``field``."""
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r}: expected one of {DTYPES}")
    return jnp.dtype(name)


def policy(model: Mapping[str, Any]) -> dict[str, Any]:
    """``dtype``, ``param_dtype`` and ``kernels`` of a ``config.model`` section as module fields."""
    return {
        "dtype": compute_dtype(model.get("dtype", "float32")),
        "param_dtype": compute_dtype(
            model.get("param_dtype", "float32"), "config.model.param_dtype"
        ),
        "kernels": Kernels(model.get("kernels", "auto")),
    }


def split_arch(section: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``(section['arch'], the other fields)`` of a model config section, lists made tuples."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}
    return fields.pop("arch", None), fields


def _build(table: dict, section: Mapping[str, Any], default: str, where: str, **module_policy):
    arch, fields = split_arch(section)
    arch = arch or default
    if arch not in table:
        raise ValueError(f"{where}.arch={arch!r}: expected one of {sorted(table)}")
    for name in POLICY_FIELDS:
        fields.pop(name, None)
    cls = table[arch]
    # A network whose layers never reach the kernel switch (the SWAGAN's spectral-norm
    # convolutions) has no ``kernels`` field.
    declared = cls.__dataclass_fields__
    return cls(**fields, **{k: v for k, v in module_policy.items() if k in declared})


def tokenizer(model: Mapping[str, Any], policy_from: Mapping[str, Any] | None = None) -> nn.Module:
    """The stage-I codebook model of a ``config.model`` section, whatever its ``arch`` ('taming',
    the default, or 'vqfr_v1'), under the policy of ``policy_from`` (default: its own)."""
    return _build(TOKENIZERS, model, "taming", "config.model", **policy(policy_from or model))


def discriminator(section: Mapping[str, Any], model: Mapping[str, Any], where: str) -> nn.Module:
    """A discriminator config section ('patchgan', the default, or 'swagan') under the policy of
    the ``config.model`` section ``model``; ``where`` names the section in errors."""
    return _build(DISCRIMINATORS, section, "patchgan", where, **policy(model))


def art(config, stage1: nn.Module) -> ARTFR:
    """ART-FR's stage-II model (Sec. 3.2): an LQ encoder shaped as the stage-I tokenizer
    ``stage1`` and the masked token transformer of ``config.model``; ``model.use_transformer=False``
    is the "AR module off" ablation."""
    m = config.model
    fields = policy(m)
    tokens = (config.data.image_size // stage1.downsample_factor) ** 2
    transformer = None
    if m.use_transformer:
        transformer = MaskedTokenTransformer(
            num_embeddings=stage1.num_embeddings,
            num_tokens=tokens,
            num_condition_tokens=tokens,
            width=m.width,
            depth=m.depth,
            num_heads=m.num_heads,
            mlp_dim=m.mlp_dim,
            condition_mode=m.condition_mode,
            long_skips=m.long_skips,
            dropout_rate=m.dropout_rate,
            remat=layers.remat_mode(
                m.get("transformer_remat", m.remat), "config.model.transformer_remat"
            ),
            dtype=fields["dtype"],
            param_dtype=fields["param_dtype"],
        )
    lq_remat = layers.remat_mode(m.remat)
    return ARTFR(lq_encoder=stage1.clone(remat=lq_remat, **fields), transformer=transformer)


def vqfr(config) -> VQFRv1:
    """VQFR's restoration network: the stage-I model's fields plus ``config.model``'s
    (cond_channels, deformable groups, remat and the policy, which win over stage I's)."""
    arch, fields = split_arch(config.stage1.config.model.to_dict())
    if arch != "vqfr_v1":
        raise ValueError(
            f"config.stage1.config.model.arch={arch!r}: VQFR needs a 'vqfr_v1' codebook model "
            "(configs/vqgan.py:vqfr)"
        )
    fields.update(config.model.to_dict())
    for name in POLICY_FIELDS:
        fields.pop(name, None)
    return VQFRv1(**fields, **policy(config.model))
