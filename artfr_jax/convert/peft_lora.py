"""PEFT/diffusers LoRA files (``pytorch_lora_weights.safetensors``) <-> :mod:`models.lora` trees.

A diffusers LoRA file holds, per adapted module, PEFT's two factors (Hu et al. 2021, Eq. 3:
``h = W0 x + (alpha / r) B A x``) in PyTorch layouts under the component's prefix::

  unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight  [r, in]
  unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight  [out, r]
  unet.down_blocks.0.resnets.0.conv1.lora_A.weight                               [r, in, kh, kw]
  unet.down_blocks.0.resnets.0.conv1.lora_B.weight                               [out, r, 1, 1]

and, in the safetensors header, ``__metadata__['lora_adapter_metadata']``: a JSON object of PEFT
``LoraConfig`` arguments, each key prefixed like the tensors (``"unet.r"``,
``"unet.lora_alpha"``, ``"unet.target_modules"``, ...; unprefixed when written by
``save_lora_adapter``). diffusers builds the adapter's ``LoraConfig`` from that object; without it
it takes the ranks from the shapes and ``lora_alpha = r`` (scale 1).

:func:`load` reads such a file (also without the prefix, and diffusers' older
``...lora.down.weight`` / ``...lora.up.weight`` and attention-processor ``...processor.to_q_lora``
keys) into a LoRA tree for ``params``; :func:`save` writes one that
``UNet2DConditionModel.load_lora_adapter`` / ``pipe.load_lora_weights`` reproduce, scale included.
Only safetensors files are read: pickles are never executed.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from artfr_jax.models import lora as lora_lib
from artfr_jax.models import naming
from artfr_jax.models.lora import LoraConfig

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
# Components of a diffusers pipeline whose LoRA keys a file may hold beside the one loaded.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer", "prior")

# diffusers' older key styles -> PEFT's (diffusers.utils.state_dict_utils.UNET_TO_DIFFUSERS).
_OLD_STYLES = (
    (".processor.", "."),
    (".to_out_lora.", ".to_out.0.lora."),
    (".to_q_lora.", ".to_q.lora."),
    (".to_k_lora.", ".to_k.lora."),
    (".to_v_lora.", ".to_v.lora."),
    (".lora_linear_layer.", ".lora."),
    (".lora.down.", ".lora_A."),
    (".lora.up.", ".lora_B."),
)
# ``<module>.lora_A.weight``; raw PEFT model state dicts add the adapter name (``lora_A.default``).
_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight")


# -------------------------------------------------------------------------------------- reading


def _file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no LoRA file; write one with diffusers' save_lora_weights or "
            "artfr_jax.convert.peft_lora.save"
        )
    if not path.endswith(".safetensors"):
        raise ValueError(
            f"{path}: only .safetensors LoRA files are read (pickles are never executed); "
            "re-save it with safetensors.torch.save_file"
        )
    return path


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """``(state dict as float32 NumPy, adapter metadata or None)`` of a LoRA safetensors file
    (or of ``WEIGHT_NAME`` in a directory). Metadata: the JSON of ``lora_adapter_metadata``."""
    from safetensors import safe_open

    path = _file(path)
    with safe_open(path, framework="flax") as f:  # the flax reader knows bfloat16
        header = f.metadata() or {}
        sd = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    raw = header.get(METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata {METADATA_KEY!r} is not JSON: {e}") from None
    return sd, metadata


def _component_items(items: Mapping[str, Any], prefix: str | None, what: str) -> dict[str, Any]:
    """``{key without prefix: (key, value)}`` for entries of ``prefix`` and entries without a
    component prefix; other components' entries (``text_encoder.*``) are left out.
    ``prefix=None`` keeps everything as it is."""
    out, skipped = {}, collections.Counter()
    for key, value in items.items():
        head, _, tail = key.partition(".")
        if prefix and head == prefix:
            out[tail] = (key, value)
        elif prefix and head in COMPONENTS and tail:
            skipped[head] += 1
        else:
            out[key] = (key, value)
    if skipped:
        logging.info("LoRA %s: left out %s (not %r)", what, dict(skipped), prefix)
    return out


def _normalise_key(stripped: str, key: str) -> tuple[str, str]:
    """``'a.b.to_q.lora_A.weight'`` (or an older style) -> ``('a.b.to_q', 'A')``; ``key``: the
    file's key, for messages."""
    if key.startswith(("lora_unet_", "lora_te")):
        raise ValueError(
            f"LoRA key {key!r}: kohya-style keys are not supported; load the file with diffusers' "
            "pipe.load_lora_weights and save it with pipe.save_lora_weights"
        )
    new = stripped
    for old, repl in _OLD_STYLES:
        new = new.replace(old, repl)
    m = _KEY.fullmatch(new)
    if m is None:
        if "lora_magnitude_vector" in key:
            what = "DoRA is"
        elif "lora_B" in key and key.endswith(".bias"):
            what = "a LoRA bias is"
        else:
            what = "this key is"
        raise ValueError(
            f"LoRA key {key!r}: {what} not supported (expected <module>.lora_A.weight)"
        )
    return m.group("module"), m.group("factor")


def _to_flax(factor: np.ndarray, key: str) -> np.ndarray:
    """Torch ``[out, in]`` -> ``[in, out]``; ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``."""
    if factor.ndim == 2:
        return factor.T
    if factor.ndim == 4:
        return factor.transpose(2, 3, 1, 0)
    raise ValueError(f"LoRA key {key!r}: {factor.ndim}-D weight; expected 2-D or 4-D")


def _pattern_value(patterns: Mapping[str, Any], name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _scale(name: str, rank: int, alpha: float | None, metadata: Mapping[str, Any]) -> float:
    """``alpha / r`` of one module: the ``alpha`` argument, else the metadata's (PEFT's
    ``alpha_pattern`` and ``use_rslora``, ``alpha / sqrt(r)``, included), else ``alpha = r``
    (diffusers' default: scale 1)."""
    if alpha is not None:
        return float(alpha) / rank
    alpha = _pattern_value(metadata.get("alpha_pattern") or {}, name, metadata.get("lora_alpha"))
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if metadata.get("use_rslora") else rank)


def _check_metadata(metadata: Mapping[str, Any], path: str) -> None:
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "a LoRA bias")):
        if metadata.get(flag):
            raise ValueError(f"{path}: {what} ({flag}=true in the metadata) is not supported")


def from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    params: Mapping[str, Any],
    alpha: float | None = None,
    metadata: Mapping[str, Any] | None = None,
    prefix: str | None = "unet",
    source: str = "LoRA state dict",
) -> tuple[dict, LoraConfig]:
    """A PEFT/diffusers LoRA state dict (torch layouts) -> ``(lora tree, LoraConfig)`` for
    ``params``. ``metadata``: the file's adapter metadata (prefixed or not). Every key must name a
    Dense/Conv module of ``params`` with fitting shapes; per-module ranks may differ only where the
    per-module scales ``alpha / r`` come out equal."""
    sd = _component_items(state_dict, prefix, "keys")
    if not sd:
        raise ValueError(f"{source}: no LoRA keys (prefix {prefix!r})")
    meta = {k: v for k, (_, v) in _component_items(metadata or {}, prefix, "metadata").items()}
    _check_metadata(meta, source)
    kernels = lora_lib.module_kernels(params)

    factors: dict[str, dict[str, tuple[str, np.ndarray]]] = collections.defaultdict(dict)
    for stripped, (key, value) in sd.items():
        name, factor = _normalise_key(stripped, key)
        factors[name][factor] = (key, np.asarray(value, np.float32))

    flat, ranks, scales = {}, {}, {}
    for name, pair in factors.items():
        key = next(iter(pair.values()))[0]
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA key {key!r}: lora_A and lora_B must both be present")
        path = naming.linen_path(name)
        if path not in kernels:
            raise ValueError(f"LoRA key {key!r}: no Dense/Conv module {name!r} in the params")
        (key_a, a), (key_b, b) = pair["A"], pair["B"]
        a, b = _to_flax(a, key_a), _to_flax(b, key_b)
        rank = a.shape[-1]
        want = lora_lib.lora_shapes(kernels[path].shape, rank)
        if (a.shape, b.shape) != want:
            raise ValueError(
                f"LoRA key {key_a!r}: A {a.shape} / B {b.shape} (flax layout) do not fit the "
                f"kernel {tuple(kernels[path].shape)} of {name!r}; expected {want[0]} / {want[1]}"
            )
        flat[(*path, "lora_A")] = jnp.asarray(a)
        flat[(*path, "lora_B")] = jnp.asarray(b)
        ranks[name] = rank
        scales[name] = _scale(name, rank, alpha, meta)

    scale = next(iter(scales.values()))
    odd = {n: s for n, s in scales.items() if not math.isclose(s, scale, rel_tol=1e-6)}
    if odd:
        other, other_scale = next(iter(odd.items()))
        raise ValueError(
            f"{source}: per-module scales alpha/r differ ({next(iter(scales))}: {scale}, "
            f"{other}: {other_scale}; {len(odd)} of {len(scales)} modules differ from the first); "
            "one scale is supported"
        )
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    config = LoraConfig(rank=rank, alpha=scale * rank, target_modules=tuple(sorted(factors)))
    return traverse_util.unflatten_dict(flat), config


def load(
    path: str | os.PathLike,
    params: Mapping[str, Any],
    alpha: float | None = None,
    prefix: str | None = "unet",
) -> tuple[dict, LoraConfig]:
    """A PEFT/diffusers LoRA safetensors file (or a directory holding ``WEIGHT_NAME``) ->
    ``(lora tree, LoraConfig)`` for ``params`` (concrete or abstract).

    ``alpha``: the argument, else the file's metadata (``lora_alpha``), else the rank (scale 1,
    as diffusers assumes). ``prefix``: the component (``'unet'``); keys without a component prefix
    are read as they are, other components' keys are left out.
    """
    sd, metadata = read(path)
    return from_state_dict(sd, params, alpha, metadata, prefix, source=os.fspath(path))


# -------------------------------------------------------------------------------------- writing


def _to_torch(factor: np.ndarray) -> np.ndarray:
    if factor.ndim == 2:
        return np.ascontiguousarray(factor.T)
    return np.ascontiguousarray(factor.transpose(3, 2, 0, 1))


def _prefixed(prefix: str | None, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def to_state_dict(lora: Mapping[str, Any], prefix: str | None = "unet") -> dict[str, np.ndarray]:
    """A LoRA tree -> PEFT/diffusers keys and torch layouts (float32 NumPy)."""
    flat = traverse_util.flatten_dict(lora)
    sd = {}
    for path in lora_lib.module_paths(lora):
        name = naming.torch_name(path)
        for factor in ("A", "B"):
            value = np.asarray(flat[(*path, f"lora_{factor}")], np.float32)
            sd[_prefixed(prefix, f"{name}.lora_{factor}.weight")] = _to_torch(value)
    return sd


def adapter_metadata(
    lora: Mapping[str, Any], config: LoraConfig, prefix: str | None = "unet"
) -> dict[str, Any]:
    """PEFT ``LoraConfig`` arguments for diffusers (``r``, ``lora_alpha``, ``target_modules``:
    the modules' full names; ``rank_pattern``/``alpha_pattern`` for modules whose rank differs
    from ``config.rank``, keeping their scale ``config.scale``), keys prefixed as diffusers'
    ``save_lora_weights`` writes them."""
    rank_pattern, alpha_pattern, names = {}, {}, []
    flat = traverse_util.flatten_dict(lora)
    for path in lora_lib.module_paths(lora):
        name = naming.torch_name(path)
        names.append(name)
        rank = flat[(*path, "lora_A")].shape[-1]
        if rank != config.rank:  # diffusers' pattern keys: "^<full name>"
            rank_pattern[f"^{name}"] = int(rank)
            alpha_pattern[f"^{name}"] = float(config.scale * rank)
    meta = {
        "r": int(config.rank),
        "lora_alpha": float(config.alpha),
        "target_modules": sorted(names),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    return {_prefixed(prefix, k): v for k, v in meta.items()}


def save(
    path: str | os.PathLike,
    lora: Mapping[str, Any],
    config: LoraConfig,
    prefix: str | None = "unet",
    fold_scale: bool = False,
) -> str:
    """Writes ``lora`` as a diffusers LoRA safetensors file (a ``.safetensors`` path, or a
    directory that gets ``WEIGHT_NAME``) with diffusers-readable adapter metadata; returns the
    file's path. ``prefix=None`` writes the layout of ``save_lora_adapter`` (no prefixes).

    ``fold_scale``: write ``scale * B`` and ``lora_alpha = r`` (scale 1), the same update, for
    readers that ignore the metadata and take ``alpha = r`` (kohya-style tools; diffusers'
    ``load_lora_adapter(file)`` without ``weight_name`` or ``use_safetensors=True``).
    """
    from safetensors.numpy import save_file

    if fold_scale:
        lora = jax.tree_util.tree_map_with_path(
            lambda p, x: x * config.scale if p[-1].key == "lora_B" else x, lora
        )
        config = dataclasses.replace(config, alpha=float(config.rank))
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, WEIGHT_NAME)
    meta = json.dumps(adapter_metadata(lora, config, prefix), indent=2, sort_keys=True)
    save_file(to_state_dict(lora, prefix), path, metadata={"format": "pt", METADATA_KEY: meta})
    return path
