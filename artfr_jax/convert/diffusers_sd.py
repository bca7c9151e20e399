"""Convert Stable Diffusion 2.x diffusers folders (``UNet2DConditionModel``, ``AutoencoderKL``)
into :class:`~artfr_jax.models.unet.UNet` / :class:`~artfr_jax.models.vae.AutoencoderKL` params.

Usage::

  # a pipeline folder (unet/ and vae/ subfolders): writes OUT_unet.msgpack and OUT_vae.msgpack
  python -m artfr_jax.convert.diffusers_sd --input=/path/to/stable-diffusion-2-1-base \\
      --output=sd21.msgpack
  # one component folder (config.json + diffusion_pytorch_model[.fp16].safetensors or .bin)
  python -m artfr_jax.convert.diffusers_sd --input=/path/to/sd21/unet --output=unet.msgpack

Each ``.msgpack`` (``{'params': ...}``) has a ``.json`` sidecar of the module's keyword arguments
and its class (``'unet'`` or ``'vae'``); :func:`load_converted` reads both back. In Python,
:func:`load_unet` / :func:`load_vae` convert a folder without writing anything, ``load_unet``
optionally merging a PEFT/diffusers LoRA file.

The module built is configured from ``config.json``; a config field whose value the linen modules
do not implement is a :class:`ConversionError` naming it, never a silently different network.
Tensor names: the UNet's linen paths are diffusers' module names (:func:`naming.torch_name`); the
VAE's are the VQGAN's (:mod:`artfr_jax.convert.diffusers_vq`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from artfr_jax.convert.diffusers_vq import (
    ConversionError,
    _normalize_key,
    _torch_key,
    encoder_decoder_levels,
    load_state_dict,
    param_shapes,
    params_from_state_dict,
    sidecar_path,
)
from artfr_jax.models import naming
from artfr_jax.models.layers import ACTIVATIONS
from artfr_jax.models.unet import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, UNet
from artfr_jax.models.vae import AutoencoderKL

__all__ = [
    "ConversionError",
    "convert_unet_state_dict",
    "convert_vae_state_dict",
    "load_converted",
    "load_unet",
    "load_vae",
    "main",
    "unet_kwargs_from_diffusers_config",
    "vae_kwargs_from_diffusers_config",
]

WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
COMPONENTS = ("unet", "vae")

# Defaults of diffusers.UNet2DConditionModel.__init__ (0.42) for keys a config.json leaves out.
_UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
# Fields whose only supported value is the diffusers default (anything else adds or changes layers).
_UNET_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),  # diffusers' UNet2DConditionModel rejects it too
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "dropout": (0, 0.0),
    "downsample_padding": (0, 1),
}
# Read elsewhere or without effect on the network.
_UNET_IGNORED = ("sample_size", "addition_embed_type_num_heads")

# Defaults of diffusers.AutoencoderKL.__init__ (0.42).
_VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
_VAE_FIXED: dict[str, tuple[Any, ...]] = {
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
}
_VAE_IGNORED = ("sample_size", "force_upcast")


def _same(value: Any, allowed: Any) -> bool:
    """``value == allowed``, numbers by value (``0 == 0.0``), anything else also by type (so
    ``0`` is not ``False`` and ``1`` not ``True``)."""
    number = (int, float)
    if isinstance(value, number) and isinstance(allowed, number):
        if isinstance(value, bool) or isinstance(allowed, bool):
            return value is allowed
        return value == allowed
    return type(value) is type(allowed) and value == allowed


def _check_fields(
    cfg: Mapping[str, Any],
    defaults: Mapping[str, Any],
    fixed: Mapping[str, tuple],
    what: str,
) -> dict[str, Any]:
    """``defaults`` updated with ``cfg`` (keys starting with ``_`` dropped); unknown keys that are
    switched on and ``fixed`` fields holding another value raise."""
    given = {k: v for k, v in cfg.items() if not k.startswith("_")}
    for key, value in given.items():
        # A field newer than this converter is harmless while it is off (null / false).
        if key not in defaults and value is not None and value is not False:
            raise ConversionError(
                f"config: unknown field {key}={json.dumps(value)} for a diffusers {what}; a "
                "newer diffusers model this converter does not implement"
            )
    out = {**defaults, **given}
    for key, allowed in fixed.items():
        value = out[key]
        if not any(_same(value, a) for a in allowed):
            expected = " or ".join(json.dumps(a) for a in allowed)
            raise ConversionError(
                f"config: {key}={json.dumps(value)} unsupported; expected {expected}"
            )
    return out


def _per_block(cfg: Mapping[str, Any], key: str, n: int) -> int | tuple[int, ...]:
    """An int, or a list of ints with one per block (-> tuple)."""
    value = cfg[key]
    if isinstance(value, bool):
        raise ConversionError(f"config: {key}={json.dumps(value)} unsupported; expected int(s)")
    if isinstance(value, int):
        return value
    if (
        isinstance(value, (list, tuple))
        and len(value) == n
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return tuple(value)
    raise ConversionError(
        f"config: {key}={json.dumps(value)} unsupported; expected an int or {n} ints (one per "
        "block)"
    )


def _activation(cfg: Mapping[str, Any]) -> str:
    if cfg["act_fn"] not in ACTIVATIONS:
        raise ConversionError(
            f"config: act_fn={json.dumps(cfg['act_fn'])} unsupported; expected one of "
            f"{sorted(ACTIVATIONS)}"
        )
    return cfg["act_fn"]


def unet_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`UNet` keyword arguments reproducing a diffusers ``UNet2DConditionModel`` config.

    Architecture fields only (no dtype); absent keys take diffusers' defaults. Raises
    :class:`ConversionError` naming the first field the UNet does not implement.
    """
    cfg = _check_fields(config, _UNET_DEFAULTS, _UNET_FIXED, "UNet2DConditionModel")
    chans = tuple(int(c) for c in cfg["block_out_channels"])
    n = len(chans)
    types = {}
    for key, known in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        types[key] = tuple(cfg[key])
        if len(types[key]) != n:
            raise ConversionError(
                f"config: {key} has {len(types[key])} entries; expected one per "
                f"block_out_channels ({n})"
            )
        for t in types[key]:
            if t not in known:
                raise ConversionError(
                    f"config: {key} entry {t!r} unsupported; expected one of {list(known)}"
                )
    only_cross = cfg["only_cross_attention"]
    if only_cross is not False and not (
        isinstance(only_cross, (list, tuple)) and not any(only_cross)
    ):
        raise ConversionError(
            f"config: only_cross_attention={json.dumps(only_cross)} unsupported; expected false"
        )
    cross = cfg["cross_attention_dim"]
    if isinstance(cross, bool) or not isinstance(cross, int):
        raise ConversionError(
            f"config: cross_attention_dim={json.dumps(cross)} unsupported; expected one int"
        )
    ted = cfg["time_embedding_dim"]
    return {
        "in_channels": int(cfg["in_channels"]),
        "out_channels": int(cfg["out_channels"]),
        "down_block_types": types["down_block_types"],
        "up_block_types": types["up_block_types"],
        "block_out_channels": chans,
        "layers_per_block": _per_block(cfg, "layers_per_block", n),
        "attention_head_dim": _per_block(cfg, "attention_head_dim", n),
        "cross_attention_dim": int(cross),
        "transformer_layers_per_block": _per_block(cfg, "transformer_layers_per_block", n),
        "use_linear_projection": bool(cfg["use_linear_projection"]),
        "upcast_attention": bool(cfg["upcast_attention"]),
        "norm_num_groups": int(cfg["norm_num_groups"]),
        "norm_eps": float(cfg["norm_eps"]),
        "flip_sin_to_cos": bool(cfg["flip_sin_to_cos"]),
        "freq_shift": float(cfg["freq_shift"]),
        "act_fn": _activation(cfg),
        "downsample_padding": int(cfg["downsample_padding"]),
        "mid_block_scale_factor": float(cfg["mid_block_scale_factor"]),
        "resnet_out_scale_factor": float(cfg["resnet_out_scale_factor"]),
        "time_embedding_dim": None if ted is None else int(ted),
    }


def vae_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`AutoencoderKL` keyword arguments reproducing a diffusers ``AutoencoderKL`` config."""
    cfg = _check_fields(config, _VAE_DEFAULTS, _VAE_FIXED, "AutoencoderKL")
    chans, enc_attn, dec_attn = encoder_decoder_levels(cfg)
    down, up = cfg["down_block_types"], cfg["up_block_types"]
    if dec_attn != enc_attn:
        raise ConversionError(
            f"config: up_block_types {list(up)} unsupported; expected the mirror of "
            f"down_block_types {list(down)} (attention at the same levels)"
        )
    if not isinstance(cfg["layers_per_block"], int):
        raise ConversionError(
            f"config: layers_per_block={json.dumps(cfg['layers_per_block'])} unsupported; "
            "expected an int"
        )
    return {
        "in_channels": int(cfg["in_channels"]),
        "out_channels": int(cfg["out_channels"]),
        "block_out_channels": chans,
        "layers_per_block": int(cfg["layers_per_block"]),
        "attention_levels": enc_attn,
        "mid_attention": bool(cfg["mid_block_add_attention"]),
        "latent_channels": int(cfg["latent_channels"]),
        "norm_num_groups": int(cfg["norm_num_groups"]),
        "act_fn": _activation(cfg),
        "scaling_factor": float(cfg["scaling_factor"]),
        "use_quant_conv": bool(cfg["use_quant_conv"]),
        "use_post_quant_conv": bool(cfg["use_post_quant_conv"]),
    }


# ------------------------------------------------------------------------------ state dicts


def _unet_key(path: tuple[str, ...]) -> str:
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
    return f"{naming.torch_name(path[:-1])}.{leaf}"


def unet_param_shapes(kwargs: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat ``{param path: shape}`` of ``UNet(**kwargs)`` (``jax.eval_shape``, no allocation)."""
    model = UNet(**kwargs)
    f = model.downsample_factor
    sample = jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, 1, model.cross_attention_dim), jnp.float32)
    return param_shapes(model, sample, t, ctx)


def vae_param_shapes(kwargs: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat ``{param path: shape}`` of ``AutoencoderKL(**kwargs)`` (no allocation)."""
    model = AutoencoderKL(**kwargs)
    f = model.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)
    return param_shapes(model, x)


def convert_unet_state_dict(
    state_dict: Mapping[str, Any], kwargs: Mapping[str, Any], param_dtype: Any = np.float32
) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` state dict -> ``UNet(**kwargs)`` params."""
    return params_from_state_dict(
        state_dict, unet_param_shapes(kwargs), _unet_key, param_dtype, model="UNet"
    )


def convert_vae_state_dict(
    state_dict: Mapping[str, Any], kwargs: Mapping[str, Any], param_dtype: Any = np.float32
) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` state dict -> ``AutoencoderKL(**kwargs)`` params (old
    attention names ``query``/``key``/``value``/``proj_attn`` accepted)."""
    sd = {_normalize_key(k): v for k, v in state_dict.items()}
    return params_from_state_dict(
        sd, vae_param_shapes(kwargs), _torch_key, param_dtype, model="AutoencoderKL"
    )


# ---------------------------------------------------------------------------------- folders


def _is_component(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json"))


def component_folder(folder: str, component: str) -> str:
    """``folder/component`` of a pipeline folder, or ``folder`` itself when it holds a
    ``config.json``; a missing folder or config is a ``FileNotFoundError`` naming it."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a folder")
    sub = os.path.join(folder, component)
    if os.path.isdir(sub):
        folder = sub
    if not _is_component(folder):
        raise FileNotFoundError(
            f"{folder}: no config.json (expected a diffusers pipeline folder with {component}/ "
            "or a component folder)"
        )
    return folder


def _weights_file(folder: str) -> str:
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{folder}: no {' or '.join(WEIGHT_FILES)}")


def _read_config(folder: str, component: str) -> tuple[str, dict[str, Any]]:
    """``(component folder, its config.json)``; a wrong ``_class_name`` is an error."""
    folder = component_folder(folder, component)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    cls = config.get("_class_name")
    expected = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}[component]
    if cls is not None and cls != expected:
        raise ConversionError(
            f"{folder}/config.json: _class_name={cls!r}; expected {expected!r} for the {component}"
        )
    return folder, config


def _read_weights(folder: str) -> dict[str, Any]:
    path = _weights_file(folder)
    try:
        return load_state_dict(path)
    except (ConversionError, FileNotFoundError):
        raise
    except Exception as e:  # safetensors / torch errors on a damaged file
        raise ConversionError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from e


def _convert(folder: str, component: str, param_dtype: Any = np.float32):
    """``(module kwargs, params)`` of one component of a diffusers folder; the config is checked
    before the weights are read."""
    folder, config = _read_config(folder, component)
    if component == "unet":
        kwargs = unet_kwargs_from_diffusers_config(config)
        return kwargs, convert_unet_state_dict(_read_weights(folder), kwargs, param_dtype)
    kwargs = vae_kwargs_from_diffusers_config(config)
    return kwargs, convert_vae_state_dict(_read_weights(folder), kwargs, param_dtype)


def _policy(dtype: str, param_dtype: str, kernels: str) -> dict[str, Any]:
    from artfr_jax.models import factory  # noqa: PLC0415 (factory imports every model)

    return factory.policy({"dtype": dtype, "param_dtype": param_dtype, "kernels": kernels})


def load_unet(
    folder: str,
    lora_weights: str | None = None,
    lora_alpha: float | None = None,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    kernels: str = "auto",
    remat: bool = False,
) -> tuple[UNet, dict[str, Any]]:
    """``(UNet, params)`` from a diffusers pipeline folder (its ``unet/``) or a UNet folder.

    ``lora_weights``: a PEFT/diffusers LoRA ``.safetensors`` merged into the params (scale from
    ``lora_alpha`` or the file's). ``dtype`` / ``param_dtype`` / ``kernels``: the framework's
    policy (``models/factory.py``); params are returned in ``param_dtype``.
    """
    pol = _policy(dtype, param_dtype, kernels)
    kwargs, params = _convert(folder, "unet", np.dtype(pol["param_dtype"]))
    if lora_weights is not None:
        from artfr_jax.convert import peft_lora  # noqa: PLC0415
        from artfr_jax.models import lora  # noqa: PLC0415

        lora_tree, lora_cfg = peft_lora.load(lora_weights, params, alpha=lora_alpha)
        params = lora.merge(params, lora_tree, lora_cfg.scale)
    return UNet(**kwargs, remat=remat, **pol), params


def load_vae(
    folder: str,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    kernels: str = "auto",
    remat: bool = False,
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """``(AutoencoderKL, params)`` from a diffusers pipeline folder (its ``vae/``) or a VAE
    folder; policy keywords as :func:`load_unet`."""
    pol = _policy(dtype, param_dtype, kernels)
    kwargs, params = _convert(folder, "vae", np.dtype(pol["param_dtype"]))
    return AutoencoderKL(**kwargs, remat=remat, **pol), params


# ------------------------------------------------------------------------- converted files

_CLASSES = {"unet": UNet, "vae": AutoencoderKL}


def save_converted(output: str, component: str, kwargs: Mapping[str, Any], params: Any) -> None:
    """``{'params': params}`` as msgpack to ``output``; ``{'component', 'kwargs'}`` as JSON beside."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    host = jax.tree_util.tree_map(np.asarray, {"params": params})
    with open(output, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(host))
    with open(sidecar_path(output), "w") as f:
        json.dump({"component": component, "kwargs": dict(kwargs)}, f, indent=2, sort_keys=True)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load_converted(path: str, **policy: Any) -> tuple[Any, dict[str, Any]]:
    """``(module, params)`` written by the CLI (``UNet`` or ``AutoencoderKL``, by the sidecar);
    ``policy``: ``dtype``, ``param_dtype``, ``kernels``, ``remat`` as in :func:`load_unet`."""
    side = sidecar_path(path)
    for p in (path, side):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"{p} not found; produce it with `python -m artfr_jax.convert.diffusers_sd "
                f"--input=DIFFUSERS_FOLDER --output={path}`"
            )
    with open(side) as f:
        meta = json.load(f)
    component = meta.get("component")
    if component not in _CLASSES:
        raise ConversionError(f"{side}: component={component!r}; expected one of {COMPONENTS}")
    kwargs = {k: _tuples(v) for k, v in meta["kwargs"].items()}
    remat = policy.pop("remat", False)
    pol = _policy(**{"dtype": "float32", "param_dtype": "float32", "kernels": "auto", **policy})
    with open(path, "rb") as f:
        params = flax.serialization.msgpack_restore(f.read())["params"]
    return _CLASSES[component](**kwargs, remat=remat, **pol), params


def output_paths(input_folder: str, output: str) -> dict[str, str]:
    """``{component: msgpack path}``: both components of a pipeline folder (``OUT_unet.msgpack``,
    ``OUT_vae.msgpack``), else the one component folder's (``OUT``)."""
    if not os.path.isdir(input_folder):
        raise FileNotFoundError(f"{input_folder}: not a folder")
    present = [c for c in COMPONENTS if os.path.isdir(os.path.join(input_folder, c))]
    if present and not _is_component(input_folder):
        stem, ext = os.path.splitext(output)
        return {c: f"{stem}_{c}{ext or '.msgpack'}" for c in present}
    config = os.path.join(input_folder, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(
            f"{input_folder}: neither a pipeline folder (unet/, vae/) nor a component folder "
            "(config.json)"
        )
    with open(config) as f:
        cls = json.load(f).get("_class_name")
    component = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae"}.get(cls)
    if component is None:
        raise ConversionError(
            f"{config}: _class_name={cls!r}; expected 'UNet2DConditionModel' or 'AutoencoderKL'"
        )
    return {component: output}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="diffusers pipeline or component folder")
    parser.add_argument("--output", required=True, help="output .msgpack (kwargs go to .json)")
    args = parser.parse_args(argv)
    try:
        outputs = output_paths(args.input, args.output)
        converted = {c: _convert(args.input, c) for c in outputs}
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for component, (kwargs, params) in converted.items():
        out = outputs[component]
        save_converted(out, component, kwargs, params)
        n = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
        print(f"wrote {out} ({component}, {n} params) and {sidecar_path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
