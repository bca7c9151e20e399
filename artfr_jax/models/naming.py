"""Module paths of linen parameter trees as PyTorch/diffusers module names, and back.

The UNet and VAE of Stable Diffusion name their linen submodules as diffusers names its attributes,
with one difference: a list attribute's entry ``down_blocks.0`` is the linen module
``down_blocks_0`` (orbax joins tree keys with dots, so a dot inside a key would be ambiguous in a
checkpoint). :func:`torch_name` turns ``('down_blocks_0', 'attentions_1', 'proj_in')`` into
``'down_blocks.0.attentions.1.proj_in'``, the name a diffusers state dict, a PEFT
``target_modules`` pattern and a LoRA file use; :func:`linen_path` is its inverse.
"""

from __future__ import annotations

import re

# Attributes that diffusers (and PyTorch models generally) hold as ``nn.ModuleList`` /
# ``nn.Sequential``: their entries are named ``<attribute>_<index>`` in linen.
LIST_ATTRIBUTES = (
    "down_blocks",
    "up_blocks",
    "attentions",
    "resnets",
    "transformer_blocks",
    "downsamplers",
    "upsamplers",
    "to_out",
    "net",
)

_LIST_ENTRY = re.compile(rf"({'|'.join(LIST_ATTRIBUTES)})_(\d+)")


def torch_name(path: tuple[str, ...]) -> str:
    """``('down_blocks_0', 'resnets_1', 'conv1')`` -> ``'down_blocks.0.resnets.1.conv1'``."""
    out = []
    for seg in path:
        m = _LIST_ENTRY.fullmatch(seg)
        out.append(f"{m.group(1)}.{m.group(2)}" if m else seg)
    return ".".join(out)


def linen_path(name: str) -> tuple[str, ...]:
    """Inverse of :func:`torch_name`: ``'attn1.to_out.0'`` -> ``('attn1', 'to_out_0')``."""
    parts = name.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] in LIST_ATTRIBUTES and i + 1 < len(parts) and parts[i + 1].isdigit():
            out.append(f"{parts[i]}_{parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return tuple(out)
