"""Convert a diffusers ``VQModel`` (taming-transformers VQGAN layout) into :class:`VQGAN` params.

Usage::

  # a diffusers model directory (config.json + diffusion_pytorch_model.safetensors or .bin)
  python -m artfr_jax.convert.diffusers_vq --input=/path/to/vqmodel --output=vq.msgpack
  # a bare weights file plus its diffusers config
  python -m artfr_jax.convert.diffusers_vq --input=model.safetensors --config=config.json \
      --output=vq.msgpack

Writes ``vq.msgpack`` (``flax.serialization`` of ``{'params': ...}``) and ``vq.json`` (the
:class:`VQGAN` keyword arguments). Read both back with :func:`load_converted`.

Torch layouts: conv ``[O, I, kh, kw]`` -> flax ``[kh, kw, I, O]``; linear ``[O, I]`` -> ``[I, O]``;
GroupNorm ``weight`` -> ``scale``. Older checkpoints' attention names (``query``, ``key``,
``value``, ``proj_attn``) are accepted as aliases of ``to_q``, ``to_k``, ``to_v``, ``to_out.0``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from artfr_jax.models.vqgan import VQGAN

# Defaults of diffusers.VQModel.__init__, used for keys a config.json leaves out.
_VQMODEL_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 3,
    "num_vq_embeddings": 256,
    "norm_num_groups": 32,
    "vq_embed_dim": None,
    "norm_type": "group",
    "mid_block_add_attention": True,
}
_DOWN_TYPES = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
_UP_TYPES = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class ConversionError(ValueError):
    """A state dict or config that does not match the VQGAN layout."""


def encoder_decoder_levels(
    cfg: Mapping[str, Any],
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(block_out_channels, encoder attention levels, decoder attention levels)`` of a diffusers
    ``Encoder``/``Decoder`` config (``VQModel``, ``AutoencoderKL``), decoder levels numbered as the
    encoder's; a wrong count or block type is a :class:`ConversionError` naming the field."""
    chans = tuple(int(c) for c in cfg["block_out_channels"])
    n = len(chans)
    down, up = tuple(cfg["down_block_types"]), tuple(cfg["up_block_types"])
    if len(down) != n or len(up) != n:
        raise ConversionError(
            f"config: down_block_types ({len(down)}) and up_block_types ({len(up)}) must both have "
            f"len(block_out_channels)={n} entries"
        )
    for name, types, known in (("down", down, _DOWN_TYPES), ("up", up, _UP_TYPES)):
        for t in types:
            if t not in known:
                raise ConversionError(
                    f"config: {name}_block_types entry {t!r} unsupported; "
                    f"expected one of {sorted(known)}"
                )
    enc_attn = tuple(i for i, t in enumerate(down) if _DOWN_TYPES[t])
    # up_blocks[i] runs at the resolution of encoder level n-1-i.
    dec_attn = tuple(sorted(n - 1 - i for i, t in enumerate(up) if _UP_TYPES[t]))
    return chans, enc_attn, dec_attn


def vqgan_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`VQGAN` keyword arguments reproducing a diffusers ``VQModel`` config (dict).

    Architecture fields only (no dtype); JSON-serialisable apart from tuples.
    """
    cfg = {**_VQMODEL_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if cfg["norm_type"] != "group":
        raise ConversionError(
            f"config: norm_type={cfg['norm_type']!r} unsupported; expected 'group'"
        )
    chans, enc_attn, dec_attn = encoder_decoder_levels(cfg)
    if cfg["act_fn"] not in ("silu", "swish", "gelu", "relu", "mish"):
        raise ConversionError(f"config: act_fn={cfg['act_fn']!r} unsupported")
    latent = int(cfg["latent_channels"])
    embed = cfg["vq_embed_dim"]
    return {
        "in_channels": int(cfg["in_channels"]),
        "out_channels": int(cfg["out_channels"]),
        "block_out_channels": chans,
        "layers_per_block": int(cfg["layers_per_block"]),
        "decoder_layers_per_block": None,
        "attention_levels": enc_attn,
        "decoder_attention_levels": None if dec_attn == enc_attn else dec_attn,
        "mid_attention": bool(cfg["mid_block_add_attention"]),
        "latent_channels": latent,
        "num_embeddings": int(cfg["num_vq_embeddings"]),
        "embedding_dim": latent if embed is None else int(embed),
        "norm_num_groups": int(cfg["norm_num_groups"]),
        "norm_eps": 1e-6,
        "act_fn": cfg["act_fn"],
    }


_SEGMENT = {
    "norm_out": "conv_norm_out",
    "mid": "mid_block",
    "downsample": "downsamplers.0",
    "upsample": "upsamplers.0",
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "out": "to_out.0",
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _torch_key(path: tuple[str, ...]) -> str:
    if path == ("quantizer", "codebook"):
        return "quantize.embedding.weight"
    out = []
    for seg in path[:-1]:
        m = re.fullmatch(r"(down|up|resnet|attn)_(\d+)", seg)
        if m:
            kind = {
                "down": "down_blocks",
                "up": "up_blocks",
                "resnet": "resnets",
                "attn": "attentions",
            }
            out.append(f"{kind[m.group(1)]}.{m.group(2)}")
        else:
            out.append(_SEGMENT.get(seg, seg))
    out.append(_LEAF[path[-1]])
    return ".".join(out)


def _normalize_key(key: str) -> str:
    parts = key.split(".")
    for i in range(1, len(parts) - 1):
        if parts[i - 1].isdigit() and i >= 2 and parts[i - 2] == "attentions":
            parts[i] = _LEGACY_ATTN.get(parts[i], parts[i])
    return ".".join(parts)


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        import torch

        t = value.detach().cpu()
        if t.is_floating_point():
            t = t.to(torch.float32)
        return t.numpy()
    return np.asarray(value)


def param_shapes(
    model: Any, *args: Any, method: Any = None
) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat ``{param path: shape}`` of ``model.init(key, *args)`` (``jax.eval_shape``: no allocation;
    ``args`` may be ``jax.ShapeDtypeStruct``)."""
    variables = jax.eval_shape(lambda a: model.init(jax.random.key(0), *a, method=method), args)
    shapes = variables["params"]
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
    return {k: tuple(v.shape) for k, v in flat.items()}


def expected_param_shapes(kwargs: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat ``{param path: shape}`` of ``VQGAN(**kwargs)`` (no allocation)."""
    model = VQGAN(**kwargs)
    f = model.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, kwargs.get("in_channels", 3)), jnp.float32)
    return param_shapes(model, x)


def params_from_state_dict(
    state_dict: Mapping[str, Any],
    shapes: Mapping[tuple[str, ...], tuple[int, ...]],
    torch_key: Callable[[tuple[str, ...]], str],
    param_dtype: Any = np.float32,
    model: str = "VQGAN",
) -> dict[str, Any]:
    """A PyTorch state dict -> the params tree whose flat ``{path: shape}`` is ``shapes``.

    ``torch_key(path)`` names the tensor of each param. Conv kernels ``[O, I, kh, kw]`` become
    ``[kh, kw, I, O]``, linear ``[O, I]`` become ``[I, O]`` (a 1x1 conv is accepted for a linear);
    other tensors keep their layout. Raises :class:`ConversionError` naming the first missing,
    mis-shaped or unexpected key (``model`` names the module in the message).
    """
    flat: dict[tuple[str, ...], np.ndarray] = {}
    used = set()
    for path, shape in shapes.items():
        key = torch_key(path)
        tshape = _torch_shape(path, shape)
        if key not in state_dict:
            raise ConversionError(
                f"state dict: missing key {key!r} (expected shape {tshape}, for {model} param "
                f"{'/'.join(path)})"
            )
        arr = _to_numpy(state_dict[key])
        if path[-1] == "kernel" and len(shape) == 2 and arr.ndim == 4 and arr.shape[2:] == (1, 1):
            arr = arr[:, :, 0, 0]  # a 1x1 conv stored where a linear layer is expected
        if tuple(arr.shape) != tshape:
            raise ConversionError(
                f"state dict: key {key!r} has shape {tuple(arr.shape)}, expected {tshape} "
                f"(for {model} param {'/'.join(path)} of shape {shape})"
            )
        if path[-1] == "kernel" and arr.ndim == 4:
            arr = arr.transpose(2, 3, 1, 0)
        elif path[-1] == "kernel" and arr.ndim == 2:
            arr = arr.T
        flat[path] = np.ascontiguousarray(arr.astype(param_dtype))
        used.add(key)
    unexpected = sorted(set(state_dict) - used)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(
            f"state dict: unexpected key {unexpected[0]!r}{more}; no {model} param maps to it "
            f"(does the config match the checkpoint?)"
        )
    return flax.traverse_util.unflatten_dict(flat)


def convert_state_dict(
    state_dict: Mapping[str, Any],
    kwargs: Mapping[str, Any],
    param_dtype: Any = np.float32,
) -> dict[str, Any]:
    """diffusers ``VQModel`` state dict (name -> torch tensor or array) -> VQGAN ``params`` tree.

    Raises :class:`ConversionError` naming the first missing, mis-shaped or unexpected key.
    """
    sd = {_normalize_key(k): v for k, v in state_dict.items()}
    return params_from_state_dict(sd, expected_param_shapes(kwargs), _torch_key, param_dtype)


def load_state_dict(path: str) -> dict[str, Any]:
    """Read ``.safetensors`` (numpy, torch fallback for bfloat16) or ``.bin/.pt/.pth`` weights."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file

            return dict(load_file(path))
        except (TypeError, ValueError):
            from safetensors.torch import load_file

            return dict(load_file(path))
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        import torch

        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        if not isinstance(sd, Mapping):
            raise ConversionError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
        return dict(sd)
    raise ConversionError(
        f"{path}: unknown weights format; expected .safetensors, .bin, .pt or .pth"
    )


def _resolve_input(path: str, config: str | None) -> tuple[str, str]:
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
            os.path.join(path, "vqvae")
        ):
            path = os.path.join(path, "vqvae")  # a pipeline directory
        cfg = config or os.path.join(path, "config.json")
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                weights = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(
                f"{path}: no {' or '.join(WEIGHT_FILES)} in the model directory"
            )
    else:
        weights = path
        if config is None:
            raise ConversionError(f"{path}: a bare weights file needs --config=CONFIG_JSON")
        cfg = config
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"diffusers config not found: {cfg}")
    return weights, cfg


def load_diffusers_vq(
    path: str, config: str | None = None, param_dtype: Any = np.float32
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(VQGAN kwargs, params)`` from a diffusers model directory or a weights file + config."""
    weights, cfg_path = _resolve_input(path, config)
    with open(cfg_path) as f:
        kwargs = vqgan_kwargs_from_diffusers_config(json.load(f))
    return kwargs, convert_state_dict(load_state_dict(weights), kwargs, param_dtype)


def sidecar_path(output: str) -> str:
    """``out.msgpack`` -> ``out.json`` (the module kwargs written next to the params)."""
    return os.path.splitext(output)[0] + ".json"


def save_converted(output: str, kwargs: Mapping[str, Any], params: Any) -> None:
    """Write ``{'params': params}`` as msgpack to ``output`` and ``kwargs`` as JSON beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    host = jax.tree_util.tree_map(np.asarray, {"params": params})
    with open(output, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(host))
    with open(sidecar_path(output), "w") as f:
        json.dump(dict(kwargs), f, indent=2, sort_keys=True)


def load_converted(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(VQGAN kwargs, {'params': ...})`` written by :func:`save_converted`."""
    side = sidecar_path(path)
    for p in (path, side):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"{p} not found; produce it with `python -m artfr_jax.convert.diffusers_vq "
                f"--input=DIFFUSERS_DIR --output={path}`"
            )
    with open(side) as f:
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in json.load(f).items()}
    with open(path, "rb") as f:
        variables = flax.serialization.msgpack_restore(f.read())
    return kwargs, variables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="diffusers VQModel dir or weights file")
    parser.add_argument("--config", default=None, help="diffusers config.json (for a bare file)")
    parser.add_argument("--output", required=True, help="output .msgpack (kwargs go to .json)")
    args = parser.parse_args(argv)
    try:
        kwargs, params = load_diffusers_vq(args.input, args.config)
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_converted(args.output, kwargs, params)
    n = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    print(f"wrote {args.output} ({n} params) and {sidecar_path(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
