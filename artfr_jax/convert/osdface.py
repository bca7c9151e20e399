"""Convert the official OSDFace release (jkwang28/OSDFace, CVPR 2025) into one folder of flax params.

Usage::

  python -m artfr_jax.convert.osdface --sd=stable-diffusion-2-1-base \\
      --lora=pretrained/pytorch_lora_weights.safetensors \\
      --projection=pretrained/embedding_change_weights.pth \\
      --vre=pretrained/associate_2.ckpt --output=osdface_release

The release is inference only: SD-2.1-base (a diffusers folder with ``unet/``, ``vae/`` and
``scheduler/``), a UNet LoRA (PEFT/diffusers safetensors), the prompt projection
``embedding_change_weights.pth`` (the state dict of two ``Conv1d(k=1)``, ``conv1`` 512 -> 256 and
``conv2`` 256 -> 1024, each followed by SiLU) and the stage-I association checkpoint
``associate_2.ckpt`` (``{'state_dict': ...}``), whose LQ autoencoder (keys ``vqvae_LQ.*``,
taming/RestoreFormer layout) is the visual representation embedder's tokenizer.

What the official ``infer.py`` / ``lq_embed/`` do, reproduced by the written ``osdface.json``:

* The UNet input is the VAE posterior *sample* (``latent_dist.sample()``, not the mode) times the
  VAE's scaling factor; the UNet runs once at ``t = 399`` and ``x0 = (z - sqrt(1 - abar) eps) /
  sqrt(abar)`` (the scheduler's ``alphas_cumprod``), decoded and clamped to [-1, 1].
* The VRE input is the LQ image already in [-1, 1], resized to 512 x 512 (bilinear,
  ``align_corners=False``) and normalised a second time, ``(x - 0.5) / 0.5``: it sees [-3, 1]
  (``vre_input: "double_normalized"``, see :func:`vre_input`).
* The prompt: the first 77 distinct nearest codes in order of distance (codebook rows, zero rows
  when fewer), ``[B, 77, 512]`` -> projection -> ``[B, 77, 1024]`` as ``encoder_hidden_states``.
* The LoRA is applied with scale ``lora_alpha / r`` (their ``--lora_rank 16 --lora_alpha 16``:
  1); here the file's metadata, else ``alpha = r``, as diffusers' ``load_lora_weights``.

Output folder (read back with :func:`load_release`)::

  osdface.json        format, module kwargs, LoRA config, timestep, preprocessing, schedule
  unet.msgpack        {'params': SD UNet}         lora.msgpack  {'lora': LoRA tree} (if a LoRA)
  vae.msgpack         {'params': AutoencoderKL}   vre.msgpack   {'params': VQGAN (LQ branch)}
  projection.msgpack  {'params': PromptProjection}

The VQ key mapping (``vqvae_LQ.`` + taming name -> VQGAN path): ``encoder.down.{i}.block.{j}`` ->
``encoder/down_{i}/resnet_{j}`` (``nin_shortcut`` -> ``conv_shortcut``), ``.attn.{j}`` (``norm1``,
``q``, ``k``, ``v``, ``proj_out``) -> ``attn_{j}`` (``norm``, ``q``, ``k``, ``v``, ``out``),
``mid.block_1/attn_1/block_2`` -> ``mid/resnet_0/attn_0/resnet_1``, ``decoder.up.{k}`` ->
``decoder/up_{L-1-k}``, ``quantize.embedding.weight`` -> ``quantizer/codebook``. The attention
blocks' ``norm2`` (used only for cross-attention, never in these autoencoders) is skipped. The
architecture (widths, blocks, attention levels, codebook) is read from the tensors' names and
shapes. Pickles are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from artfr_jax.convert import diffusers_sd, peft_lora
from artfr_jax.convert.diffusers_vq import (
    ConversionError,
    expected_param_shapes,
    param_shapes,
    params_from_state_dict,
)
from artfr_jax.models import lora as lora_lib
from artfr_jax.models import naming
from artfr_jax.models.osdface import NUM_PROMPT_TOKENS, PromptProjection, vre_autoencoder_kwargs
from artfr_jax.models.unet import UNet
from artfr_jax.models.vae import AutoencoderKL
from artfr_jax.models.vqgan import VQGAN
from artfr_jax.sampling.noise_schedule import BETA_SCHEDULES, NoiseSchedule, make_schedule
from artfr_jax.utils import params_io

__all__ = [
    "ConversionError",
    "FORMAT",
    "convert_release",
    "load_release",
    "main",
    "projection_kwargs_from_state_dict",
    "projection_params_from_state_dict",
    "read_checkpoint",
    "vre_input",
    "vre_kwargs_from_state_dict",
    "vre_params_from_state_dict",
]

FORMAT = "artfr_jax.osdface/1"
META_FILE = "osdface.json"
FILES = {
    "unet": "unet.msgpack",
    "lora": "lora.msgpack",
    "vae": "vae.msgpack",
    "vre": "vre.msgpack",
    "projection": "projection.msgpack",
}
VRE_PREFIX = "vqvae_LQ."
TIMESTEP = 399  # infer.py: self.timesteps = 399
VRE_RESOLUTION = 512  # lq_embed/inference.py: F.interpolate(img, size=(512, 512))
VRE_INPUTS = ("double_normalized", "standard")
VRE_NUM_GROUPS = 32  # the official Normalize: GroupNorm(32, C, eps=1e-6)
_COMMAND = (
    "python -m artfr_jax.convert.osdface --sd=SD21_BASE_DIR "
    "--lora=pytorch_lora_weights.safetensors --projection=embedding_change_weights.pth "
    "--vre=associate_2.ckpt --output={output}"
)
# Unused by self-attention (the official MultiHeadAttnBlock normalises a cross-attention input
# with it); present in every attention block of the checkpoint.
_UNUSED = re.compile(
    r"(encoder|decoder)\.(down\.\d+\.attn\.\d+|up\.\d+\.attn\.\d+|mid\.attn_1)"
    r"\.norm2\.(weight|bias)"
)
# numpy arrays/scalars/dtypes in a Lightning checkpoint's bookkeeping (callbacks, hyper-parameters):
# plain data, allowed to torch.load(weights_only=True) where a file needs them.
_NUMPY_GLOBALS = re.compile(
    r"numpy\.(_?core\.multiarray\.(scalar|_reconstruct)|ndarray|dtype|dtypes\.\w+)"
)


def _hint(output: str = "OUT") -> str:
    return _COMMAND.format(output=output or "OUT")


# ------------------------------------------------------------------------------------ reading


def read_checkpoint(path: str, what: str) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, one-line errors naming ``path`` and ``what`` it
    should be. numpy arrays/scalars/dtypes (Lightning bookkeeping) are allowed; anything else
    that ``weights_only`` refuses is an error telling how to re-save the state dict."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (expected {what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (pickle / zip errors of many types)
        first = type(e).__name__
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 (not a zip checkpoint at all)
        unsafe = []
    if unsafe and all(_NUMPY_GLOBALS.fullmatch(g) for g in unsafe):
        try:
            with torch.serialization.safe_globals(_numpy_globals(unsafe)):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            first = type(e).__name__
    elif unsafe:
        raise ConversionError(
            f"{path}: torch.load(weights_only=True) refuses it (it pickles "
            f"{', '.join(unsafe[:3])}); re-save only its tensors, e.g. torch.save({{'state_dict': "
            "torch.load(path, weights_only=False)['state_dict']}, new_path), for a file you trust"
        )
    raise ConversionError(f"{path}: not a loadable torch checkpoint ({first}); expected {what}")


def _numpy_globals(names: list[str]) -> list[Any]:
    """The numpy objects ``names`` plus numpy's dtype classes (unpickled via ``numpy.dtype``)."""
    import importlib

    out = []
    for name in names:
        mod, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(mod), attr))
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25
    return out + [getattr(dtypes, n) for n in dir(dtypes) if dtypes and n.endswith("DType")]


def _state_dict(obj: Any, path: str, what: str) -> dict[str, Any]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ConversionError(
            f"{path}: expected {what} (a dict of tensors), got {type(obj).__name__}"
        )
    return dict(obj)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in value.shape)


# ------------------------------------------------------------------------- VRE (LQ autoencoder)


def _vre_key(path: tuple[str, ...], levels: int, prefix: str) -> str:
    """Official key of the VQGAN param at ``path`` (``prefix`` + taming/RestoreFormer name)."""
    *mods, leaf = path
    if tuple(mods) == ("quantizer",):
        return f"{prefix}quantize.embedding.weight"
    out = []
    for i, seg in enumerate(mods):
        m = re.fullmatch(r"(down|up|resnet|attn)_(\d+)", seg)
        if m is None:
            out.append(
                {"conv_shortcut": "nin_shortcut", "norm": "norm1", "out": "proj_out"}.get(seg, seg)
            )
            continue
        kind, n = m.group(1), int(m.group(2))
        if kind == "down":
            out.append(f"down.{n}")
        elif kind == "up":
            out.append(f"up.{levels - 1 - n}")  # taming's decoder.up is indexed by encoder level
        elif mods[i - 1] == "mid":
            out.append(f"{'block' if kind == 'resnet' else 'attn'}_{n + 1}")
        else:
            out.append(f"{'block' if kind == 'resnet' else 'attn'}.{n}")
    return prefix + ".".join(out) + (".bias" if leaf == "bias" else ".weight")


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.fullmatch(k))})


def vre_kwargs_from_state_dict(
    state_dict: Mapping[str, Any], prefix: str = VRE_PREFIX, source: str = "state dict"
) -> dict[str, Any]:
    """:class:`VQGAN` kwargs of the autoencoder under ``prefix`` (default: OSDFace's LQ branch),
    read from the tensors' names and shapes; the paper's model gives
    ``vre_autoencoder_kwargs()``. Raises :class:`ConversionError` naming ``source``."""
    keys = [k[len(prefix) :] for k in state_dict if k.startswith(prefix)]
    if not keys:
        some = sorted(state_dict)[:3]
        raise ConversionError(
            f"{source}: no keys starting with {prefix!r} (found {some}); expected OSDFace's "
            "associate_2.ckpt"
        )
    sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    needed = (
        "encoder.conv_in.weight",
        "encoder.conv_out.weight",
        "quant_conv.weight",
        "quantize.embedding.weight",
    )
    for k in needed:
        if k not in sd:
            raise ConversionError(f"{source}: missing key {prefix + k!r} of the VQ autoencoder")
    levels = _indices(keys, r"encoder\.down\.(\d+)\..+")
    if not levels or levels != list(range(len(levels))):
        raise ConversionError(f"{source}: {prefix}encoder.down.* levels {levels}; expected 0..L-1")
    chans = []
    for i in levels:
        k = f"encoder.down.{i}.block.0.conv1.weight"
        if k not in sd:
            raise ConversionError(f"{source}: missing key {prefix + k!r}")
        chans.append(_shape(sd[k])[0])
    blocks = _indices(keys, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight")
    base = _shape(sd["encoder.conv_in.weight"])[0]
    k_codes, dim = _shape(sd["quantize.embedding.weight"])
    kw = vre_autoencoder_kwargs(
        base_channels=base,
        channel_multipliers=tuple(max(c // base, 1) for c in chans),
        layers_per_block=len(blocks),
        latent_channels=_shape(sd["encoder.conv_out.weight"])[0],
        num_embeddings=k_codes,
        embedding_dim=dim,
        norm_num_groups=VRE_NUM_GROUPS,
    )
    kw["block_out_channels"] = tuple(chans)
    kw["in_channels"] = _shape(sd["encoder.conv_in.weight"])[1]
    kw["attention_levels"] = tuple(i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd)
    kw["mid_attention"] = "encoder.mid.attn_1.q.weight" in sd
    if "decoder.conv_out.weight" in sd:
        kw["out_channels"] = _shape(sd["decoder.conv_out.weight"])[0]
        dec_blocks = _indices(keys, r"decoder\.up\.0\.block\.(\d+)\.conv1\.weight")
        kw["decoder_layers_per_block"] = len(dec_blocks)
        dec_attn = tuple(_indices(keys, r"decoder\.up\.(\d+)\.attn\.0\.q\.weight"))
        kw["decoder_attention_levels"] = None if dec_attn == kw["attention_levels"] else dec_attn
    odd = [c for c in chans if c % VRE_NUM_GROUPS]
    if odd:
        raise ConversionError(
            f"{source}: channel widths {tuple(chans)} not all multiples of {VRE_NUM_GROUPS} "
            "(the official GroupNorm groups)"
        )
    return kw


def vre_params_from_state_dict(
    state_dict: Mapping[str, Any],
    prefix: str = VRE_PREFIX,
    *,
    kwargs: Mapping[str, Any] | None = None,
    source: str = "state dict",
) -> dict[str, Any]:
    """The LQ autoencoder under ``prefix`` -> params of ``VQGAN(**kwargs)`` (kwargs default:
    :func:`vre_kwargs_from_state_dict`). Encoder, ``quant_conv`` and codebook are required; the
    decoder and ``post_quant_conv`` are converted when the file has them (``'decoder' in params``
    tells), else left out (restoration never decodes VQ codes). Other keys (other prefixes,
    extra ``quantize.*`` buffers) are ignored, as the official ``load_state_dict(strict=False)``
    ignores them; an unknown key in the encoder or ``quant_conv`` is an error."""
    kw = (
        dict(kwargs)
        if kwargs is not None
        else vre_kwargs_from_state_dict(state_dict, prefix, source)
    )
    sd = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if not _UNUSED.fullmatch(k[len(prefix) :])}
    levels = len(kw["block_out_channels"])

    def key(path):
        return _vre_key(path, levels, prefix)

    shapes = expected_param_shapes(kw)
    core = {p: s for p, s in shapes.items() if p[0] not in ("decoder", "post_quant_conv")}
    dec = {p: s for p, s in shapes.items() if p[0] in ("decoder", "post_quant_conv")}

    def group(rel: str) -> str:
        if rel.startswith(("encoder.", "quant_conv.")) or rel == "quantize.embedding.weight":
            return "core"
        if rel.startswith(("decoder.", "post_quant_conv.")):
            return "decoder"
        return "other"

    split = {"core": {}, "decoder": {}, "other": {}}
    for k, v in sd.items():
        split[group(k[len(prefix) :])][k] = v
    if split["other"]:
        logging.info(
            "%s: ignored %d key(s) under %r, e.g. %s (the official loader ignores them too)",
            source,
            len(split["other"]),
            prefix,
            sorted(split["other"])[0],
        )
    try:
        params = params_from_state_dict(split["core"], core, key, model="VRE encoder")
    except ConversionError as e:
        raise ConversionError(f"{source}: {e}") from None
    if split["decoder"]:
        try:
            params.update(params_from_state_dict(split["decoder"], dec, key, model="VRE decoder"))
        except ConversionError as e:
            logging.warning(
                "%s: the VQ decoder is left out (%s); restoration does not use it", source, e
            )
    return params


def vre_input(lq: jax.Array, mode: str = "double_normalized") -> jax.Array:
    """The official VRE input from an LQ image in [-1, 1] (already resized to
    :data:`VRE_RESOLUTION`): ``'double_normalized'`` -> ``(lq - 0.5) / 0.5`` in [-3, 1] (what the
    release was trained and run with), ``'standard'`` -> ``lq`` unchanged."""
    if mode == "double_normalized":
        return (lq - 0.5) / 0.5
    if mode == "standard":
        return lq
    raise ValueError(f"vre_input mode {mode!r}: expected one of {VRE_INPUTS}")


# --------------------------------------------------------------------------- prompt projection


def _projection_sd(state_dict: Mapping[str, Any], source: str) -> dict[str, Any]:
    want = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")
    keys = set(state_dict)
    if keys != set(want):
        missing = [k for k in want if k not in keys]
        what = (
            f"missing {missing[0]!r}" if missing else f"unexpected {sorted(keys - set(want))[0]!r}"
        )
        raise ConversionError(
            f"{source}: {what}; expected exactly the keys {list(want)} (TwoLayerConv1x1: two "
            "Conv1d, kernel size 1)"
        )
    out = {}
    for k, v in state_dict.items():
        s = _shape(v)
        if k.endswith("weight"):
            if len(s) != 3 or s[2] != 1:
                raise ConversionError(f"{source}: {k} has shape {s}; expected [out, in, 1]")
            v = v[:, :, 0]
        out[k] = v
    return out


def projection_kwargs_from_state_dict(
    state_dict: Mapping[str, Any], source: str = "state dict"
) -> dict[str, int]:
    """``{'hidden_features', 'features'}`` of :class:`PromptProjection` for the official
    ``embedding_change_weights.pth`` state dict."""
    sd = _projection_sd(state_dict, source)
    return {
        "hidden_features": _shape(sd["conv1.weight"])[0],
        "features": _shape(sd["conv2.weight"])[0],
    }


def projection_params_from_state_dict(
    state_dict: Mapping[str, Any], source: str = "state dict"
) -> dict[str, Any]:
    """Official ``TwoLayerConv1x1`` state dict -> :class:`PromptProjection` params (``conv1``,
    ``conv2``: ``kernel = weight[:, :, 0].T``)."""
    sd = _projection_sd(state_dict, source)
    kw = projection_kwargs_from_state_dict(state_dict, source)
    x = jax.ShapeDtypeStruct((1, 1, _shape(sd["conv1.weight"])[1]), jnp.float32)
    shapes = param_shapes(PromptProjection(**kw), x)
    try:
        return params_from_state_dict(
            sd,
            shapes,
            lambda p: f"{p[0]}.{'bias' if p[-1] == 'bias' else 'weight'}",
            model="PromptProjection",
        )
    except ConversionError as e:
        raise ConversionError(f"{source}: {e}") from None


# -------------------------------------------------------------------------- SD folder pieces


def schedule_kwargs(sd_folder: str) -> dict[str, Any]:
    """:func:`make_schedule` kwargs from ``sd_folder/scheduler/scheduler_config.json`` (the
    official code builds ``DDIMScheduler.from_pretrained(..., subfolder='scheduler')`` and uses
    its ``alphas_cumprod``); Stable Diffusion's values where the folder has no scheduler."""
    path = os.path.join(sd_folder, "scheduler", "scheduler_config.json")
    defaults = {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": 1000,
    }
    if not os.path.isfile(path):
        logging.warning("%s not found; using Stable Diffusion's schedule %s", path, defaults)
        return defaults
    with open(path) as f:
        cfg = json.load(f)
    for field, ok in (
        ("trained_betas", (None,)),
        ("prediction_type", ("epsilon",)),
        ("rescale_betas_zero_snr", (False,)),
    ):
        value = cfg.get(field, ok[0])
        if value not in ok:
            raise ConversionError(
                f"{path}: {field}={json.dumps(value)} unsupported; OSDFace expects "
                f"{json.dumps(ok[0])} (SD-2.1-base)"
            )
    out = {k: cfg.get(k, v) for k, v in defaults.items()}
    if out["beta_schedule"] not in BETA_SCHEDULES:
        raise ConversionError(f"{path}: beta_schedule={out['beta_schedule']!r} unsupported")
    out["beta_start"], out["beta_end"] = float(out["beta_start"]), float(out["beta_end"])
    out["num_train_timesteps"] = int(out["num_train_timesteps"])
    return out


# ----------------------------------------------------------------------------------- convert


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _check_output(output: str, sd_folder: str, files: list[str]) -> None:
    out = _real(output)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"{output}: exists and is not a folder; expected an output folder")
    sd = _real(sd_folder)
    if out == sd or out.startswith(sd + os.sep):
        raise ConversionError(f"{output}: inside the input SD folder {sd_folder}; choose another")
    written = {_real(os.path.join(out, n)) for n in (META_FILE, *FILES.values())}
    for f in files:
        if _real(f) == out or _real(f) in written:
            raise ConversionError(f"{output}: would overwrite the input {f}; choose another folder")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def convert_release(
    sd_folder: str,
    lora: str | None,
    projection: str,
    vre: str,
    output: str,
    *,
    lora_alpha: float | None = None,
) -> dict[str, Any]:
    """Converts the OSDFace release into the folder ``output`` (created; files in it replaced)
    and returns the ``osdface.json`` dict. ``lora=None``: a UNet without LoRA (e.g. already
    merged). ``lora_alpha``: overrides the LoRA file's alpha (scale ``lora_alpha / r``).

    Everything is read and checked before anything is written; an ``output`` inside the SD
    folder or on an input file is refused. Errors: ``FileNotFoundError`` / :class:`ConversionError`
    (a ``ValueError``), one line naming the file."""
    inputs = [p for p in (lora, projection, vre) if p is not None]
    if not os.path.isdir(sd_folder):
        raise FileNotFoundError(f"{sd_folder}: no such folder (expected the SD-2.1-base folder)")
    for p, what in (
        (lora, "the UNet LoRA .safetensors"),
        (projection, "embedding_change_weights.pth"),
        (vre, "associate_2.ckpt"),
    ):
        if p is not None and not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: not found (expected {what})")
    _check_output(output, sd_folder, inputs)

    vre_sd = _state_dict(read_checkpoint(vre, "associate_2.ckpt"), vre, "associate_2.ckpt")
    vre_kw = vre_kwargs_from_state_dict(vre_sd, VRE_PREFIX, vre)
    vre_params = vre_params_from_state_dict(vre_sd, VRE_PREFIX, kwargs=vre_kw, source=vre)
    del vre_sd

    proj_sd = _state_dict(
        read_checkpoint(projection, "embedding_change_weights.pth"),
        projection,
        "embedding_change_weights.pth",
    )
    proj_kw = projection_kwargs_from_state_dict(proj_sd, projection)
    proj_params = projection_params_from_state_dict(proj_sd, projection)
    proj_in = proj_params["conv1"]["kernel"].shape[0]
    if proj_in != vre_kw["embedding_dim"]:
        raise ConversionError(
            f"{projection}: input width {proj_in} != the VRE codebook width "
            f"{vre_kw['embedding_dim']} of {vre}"
        )
    # The SD folder last: the small files' errors come before minutes of UNet conversion.
    schedule = schedule_kwargs(sd_folder)
    unet_kw, unet_params = diffusers_sd._convert(sd_folder, "unet")
    vae_kw, vae_params = diffusers_sd._convert(sd_folder, "vae")
    if proj_kw["features"] != unet_kw["cross_attention_dim"]:
        raise ConversionError(
            f"{projection}: output width {proj_kw['features']} != the UNet's cross_attention_dim "
            f"{unet_kw['cross_attention_dim']} ({sd_folder})"
        )
    if vae_kw["latent_channels"] != unet_kw["in_channels"]:
        raise ConversionError(
            f"{sd_folder}: VAE latent_channels {vae_kw['latent_channels']} != UNet in_channels "
            f"{unet_kw['in_channels']}"
        )

    lora_meta, lora_tree = None, None
    if lora is not None:
        lora_tree, cfg = peft_lora.load(lora, unet_params, alpha=lora_alpha)
        lora_meta = {
            "rank": cfg.rank,
            "alpha": float(cfg.alpha),
            "target_modules": list(cfg.target_modules),
        }
        if abs(cfg.scale - 1.0) > 1e-6:
            logging.warning(
                "%s: LoRA scale alpha/r = %g (the official --lora_alpha 16 "
                "--lora_rank 16 merge uses 1)",
                lora,
                cfg.scale,
            )

    meta = {
        "format": FORMAT,
        "unet": _jsonable(unet_kw),
        "vae": _jsonable(vae_kw),
        "vre": _jsonable(vre_kw),
        "vre_decoder": "decoder" in vre_params,
        "projection": proj_kw,
        "lora": lora_meta,
        "timestep": TIMESTEP,
        "vre_input": "double_normalized",
        "vre_resolution": VRE_RESOLUTION,
        "prompt_tokens": NUM_PROMPT_TOKENS,
        "sample_posterior": True,
        "schedule": schedule,
        "sources": {
            k: _real(v) if v else None
            for k, v in (
                ("sd", sd_folder),
                ("lora", lora),
                ("projection", projection),
                ("vre", vre),
            )
        },
    }

    os.makedirs(output, exist_ok=True)
    stale = os.path.join(output, FILES["lora"])
    if lora_tree is None and os.path.isfile(stale):
        os.remove(stale)
    trees = {
        "unet": {"params": unet_params},
        "vae": {"params": vae_params},
        "vre": {"params": vre_params},
        "projection": {"params": proj_params},
    }
    if lora_tree is not None:
        trees["lora"] = {"lora": lora_tree}
    for name, tree in trees.items():
        params_io.save_params_file(
            os.path.join(output, FILES[name]), jax.tree_util.tree_map(np.asarray, tree)
        )
    tmp = os.path.join(output, META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(output, META_FILE))
    return meta


# -------------------------------------------------------------------------------------- load


def _flat_shapes(prefix: str, shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> dict:
    return {(prefix, *k): tuple(v) for k, v in shapes.items()}


def _read_tree(folder: str, name: str, label: str, expected: dict) -> dict:
    path = os.path.join(folder, FILES[name])
    return params_io.load_params_file(
        path,
        label=label,
        user="load_release",
        filename=FILES[name],
        expected=expected,
        hint=lambda p: _hint(folder),
    )["params"]


def _read_lora(folder: str, unet_params: Mapping[str, Any]) -> dict:
    path = os.path.join(folder, FILES["lora"])
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: not found (osdface.json names a LoRA); recreate it with: {_hint(folder)}"
        )
    try:
        with open(path, "rb") as f:
            tree = flax.serialization.msgpack_restore(f.read())["lora"]
        paths = lora_lib.module_paths(tree)
    except Exception as e:  # noqa: BLE001 (msgpack and tree errors of several types)
        raise ValueError(
            f"{path}: not a {{'lora': LoRA tree}} msgpack ({type(e).__name__}); "
            f"recreate it with: {_hint(folder)}"
        ) from None
    kernels = lora_lib.module_kernels(unet_params)
    flat = traverse_util.flatten_dict(tree)
    for p in paths:
        a, b = flat[(*p, "lora_A")], flat[(*p, "lora_B")]
        if p not in kernels or lora_lib.lora_shapes(kernels[p].shape, a.shape[-1]) != (
            a.shape,
            b.shape,
        ):
            raise ValueError(
                f"{path}: LoRA of {naming.torch_name(p)} does not fit the UNet; "
                f"recreate it with: {_hint(folder)}"
            )
    return traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_release(
    folder: str, *, dtype: str = "float32", param_dtype: str = "float32", kernels: str = "auto"
) -> dict[str, Any]:
    """A folder written by :func:`convert_release` -> modules, params and settings:

    ``unet`` (:class:`UNet`), ``unet_params`` (base SD), ``lora`` (tree or None), ``lora_scale``
    (``alpha / rank``; 0.0 without LoRA), ``vae`` (:class:`AutoencoderKL`), ``vae_params``,
    ``vre`` (:class:`VQGAN`, the LQ branch), ``vre_params``, ``projection``
    (:class:`PromptProjection`), ``projection_params``, ``schedule`` (:class:`NoiseSchedule`),
    ``timestep``, ``vre_input`` (``'double_normalized'``: see :func:`vre_input`),
    ``vre_resolution``, ``prompt_tokens``, ``sample_posterior``. Params are NumPy in
    ``param_dtype``; every file is checked against the module shapes. A missing folder/file is a
    ``FileNotFoundError``, a wrong one a ``ValueError``; both name it and the convert command.
    """
    meta_path = os.path.join(folder, META_FILE)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"{folder}: no OSDFace release folder; create it with: {_hint(folder)}"
        )
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path}: not found; create the release with: {_hint(folder)}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{meta_path}: not JSON ({e}); recreate it with: {_hint(folder)}"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(
            f"{meta_path}: format {got!r}, expected {FORMAT!r}; recreate it with: {_hint(folder)}"
        )
    need = (
        "unet",
        "vae",
        "vre",
        "projection",
        "lora",
        "timestep",
        "vre_input",
        "prompt_tokens",
        "sample_posterior",
        "schedule",
    )
    missing = [k for k in need if k not in meta]
    if missing:
        raise ValueError(
            f"{meta_path}: missing field {missing[0]!r}; recreate it with: {_hint(folder)}"
        )
    if meta["vre_input"] not in VRE_INPUTS:
        raise ValueError(
            f"{meta_path}: vre_input={meta['vre_input']!r}, expected one of {VRE_INPUTS}"
        )

    pol = diffusers_sd._policy(dtype, param_dtype, kernels)
    np_dtype = np.dtype(pol["param_dtype"])
    unet_kw = {k: _tuples(v) for k, v in meta["unet"].items()}
    vae_kw = {k: _tuples(v) for k, v in meta["vae"].items()}
    vre_kw = {k: _tuples(v) for k, v in meta["vre"].items()}
    proj_kw = dict(meta["projection"])
    try:
        unet = UNet(**unet_kw, **pol)
        vae = AutoencoderKL(**vae_kw, **pol)
        vre = VQGAN(**vre_kw, **pol)
        projection = PromptProjection(**proj_kw, dtype=pol["dtype"], param_dtype=pol["param_dtype"])
        schedule: NoiseSchedule = make_schedule(**meta["schedule"])
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{meta_path}: bad module settings ({e}); recreate it with: {_hint(folder)}"
        ) from None
    timestep = int(meta["timestep"])
    if not 0 <= timestep < schedule.num_train_timesteps:
        raise ValueError(
            f"{meta_path}: timestep {timestep} outside the schedule's "
            f"{schedule.num_train_timesteps} steps"
        )

    vre_shapes = expected_param_shapes(vre_kw)
    if not meta.get("vre_decoder", True):
        vre_shapes = {
            p: s for p, s in vre_shapes.items() if p[0] not in ("decoder", "post_quant_conv")
        }
    x = jax.ShapeDtypeStruct((1, 1, vre_kw["embedding_dim"]), jnp.float32)
    trees = {
        "unet": _read_tree(
            folder,
            "unet",
            "OSDFace UNet",
            _flat_shapes("params", diffusers_sd.unet_param_shapes(unet_kw)),
        ),
        "vae": _read_tree(
            folder,
            "vae",
            "OSDFace VAE",
            _flat_shapes("params", diffusers_sd.vae_param_shapes(vae_kw)),
        ),
        "vre": _read_tree(folder, "vre", "OSDFace VRE", _flat_shapes("params", vre_shapes)),
        "projection": _read_tree(
            folder,
            "projection",
            "OSDFace projection",
            _flat_shapes("params", param_shapes(projection, x)),
        ),
    }
    lora_tree, lora_scale = None, 0.0
    if meta["lora"] is not None:
        lora_tree = _read_lora(folder, trees["unet"])
        lora_scale = float(meta["lora"]["alpha"]) / float(meta["lora"]["rank"])

    def cast(tree):
        return jax.tree_util.tree_map(lambda a: np.asarray(a).astype(np_dtype, copy=False), tree)

    return {
        "unet": unet,
        "unet_params": cast(trees["unet"]),
        "lora": None if lora_tree is None else cast(lora_tree),
        "lora_scale": lora_scale,
        "vae": vae,
        "vae_params": cast(trees["vae"]),
        "vre": vre,
        "vre_params": cast(trees["vre"]),
        "projection": projection,
        "projection_params": cast(trees["projection"]),
        "schedule": schedule,
        "timestep": timestep,
        "vre_input": meta["vre_input"],
        "vre_resolution": int(meta.get("vre_resolution", VRE_RESOLUTION)),
        "prompt_tokens": int(meta["prompt_tokens"]),
        "sample_posterior": bool(meta["sample_posterior"]),
    }


# --------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m artfr_jax.convert.osdface",
        description="The official OSDFace release (PyTorch) -> one folder of flax params.",
    )
    parser.add_argument("--sd", required=True, help="SD-2.1-base diffusers folder")
    parser.add_argument("--lora", default=None, help="pytorch_lora_weights.safetensors (optional)")
    parser.add_argument(
        "--lora_alpha",
        type=float,
        default=None,
        help="LoRA alpha (default: the file's metadata, else the rank)",
    )
    parser.add_argument("--projection", required=True, help="embedding_change_weights.pth")
    parser.add_argument("--vre", required=True, help="associate_2.ckpt")
    parser.add_argument("--output", required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        meta = convert_release(
            args.sd, args.lora, args.projection, args.vre, args.output, lora_alpha=args.lora_alpha
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    lora = meta["lora"]
    what = (
        "no LoRA"
        if lora is None
        else (
            f"LoRA r={lora['rank']} alpha={lora['alpha']:g} on {len(lora['target_modules'])} modules"
        )
    )
    dec = "with" if meta["vre_decoder"] else "without"
    print(
        f"wrote {args.output}: SD UNet + VAE, {what}, VRE {dec} decoder, projection, "
        f"{META_FILE} (t={meta['timestep']}, vre_input={meta['vre_input']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
