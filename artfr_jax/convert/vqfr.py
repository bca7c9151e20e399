"""Converts the official VQFR v1 PyTorch checkpoints (TencentARC/VQFR) to flax params.

  python -m artfr_jax.convert.vqfr --arch=vqgan_v1 \
      --input=VQ_Codebook_FFHQ512-39165968.pth --output=vqgan_v1.msgpack
  python -m artfr_jax.convert.vqfr --arch=vqfr_v1 --input=VQFR_v1-33a1fac5.pth \
      --output=vqfr_v1.msgpack [--key=params_ema]

The inputs are BasicSR checkpoints: ``{'params': state_dict}`` and/or ``{'params_ema': ...}``
(``--key`` picks one; by default ``params``, else ``params_ema``, else the file is taken as a bare
state dict). The output is the flax ``params`` collection of :class:`artfr_jax.models.vqfr.VQGANv1`
or :class:`~artfr_jax.models.vqfr.VQFRv1` at the paper configuration (msgpack, no ``{'params':}``
wrapper), read back with :func:`load_vqgan_v1_params` / :func:`load_vqfr_v1_params`.

Names: the release's ``encoder.encoder_dict.Level_X.j.*`` -> ``encoder/Level_X_block_j/*``,
``pre_downsample_dict`` / ``pre_upsample_dict`` ``.Level_X.conv`` -> ``Level_X_downsample`` /
``Level_X_upsample``, ``quantizer.quantize_dict.Level_32.*`` -> ``quantizer/*`` and so on (see
:func:`torch_key`). Conv weights ``[O, I, kh, kw]`` -> ``[kh, kw, I, O]`` (the DCN weight too);
GroupNorm ``weight`` -> ``scale``. The reservoir / usage buffers of the release's quantiser are
not parameters and are skipped if a file contains them. Torch is only used to read the file.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from artfr_jax.models.vqfr import VQFRv1, VQGANv1, level_name
from artfr_jax.utils import params_io

ARCHS = ("vqgan_v1", "vqfr_v1")
# The released files (see the official repository's experiments/pretrained_models/README.md).
RELEASED_FILES = {
    "vqgan_v1": ("VQ_Codebook_FFHQ512-39165968.pth", "vqgan_v1.msgpack"),
    "vqfr_v1": ("VQFR_v1-33a1fac5.pth", "vqfr_v1.msgpack"),
}
_LABEL = {"vqgan_v1": "VQGANv1", "vqfr_v1": "VQFRv1"}
# Buffers of the release's quantiser (non-persistent in its code, but tolerated if saved).
_SKIPPED = re.compile(r"^quantizer\.quantize_dict\.Level_\d+\.(usage|reestimation_reservoir\..*)$")

_TWM = {
    "cond_downsample": "downsample.conv",
    "offset_in": "offset_conv1.0",
    "offset_norm1": "offset_conv1.1",
    "offset_dw": "offset_conv1.3",
    "offset_norm2": "offset_conv1.4",
    "offset_out": "offset_conv1.6",
    "offset_fuse": "offset_conv2.0",
    "offset_fuse_norm": "offset_conv2.1",
    "dcn": "dcn",
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "embedding.weight"}


class ConversionError(ValueError):
    """A checkpoint that does not match the VQFR v1 layout (one line, naming the file)."""


def _default_model(arch: str):
    if arch == "vqgan_v1":
        return VQGANv1()
    if arch == "vqfr_v1":
        return VQFRv1()
    raise ConversionError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def torch_key(path: Sequence[str], top_level: str) -> str:
    """Official state-dict key of the flax param at ``path`` (``top_level``: the quantised level,
    e.g. ``Level_32``). Raises ``KeyError`` for a path outside the VQFR v1 layout."""
    *mods, leaf = path
    head, rest = mods[0] if mods else "", mods[1:]
    tail = _LEAF[leaf]
    lvl = r"(Level_\d+)"

    def sub(names: Sequence[str]) -> str:
        return ".".join([*names, tail])

    if head == "inpfeat_conv" and not rest:
        return sub(["inpfeat_extraction.conv"])
    if head == "quantizer":
        return sub([f"quantizer.quantize_dict.{top_level}", *rest])
    if head in ("encoder", "decoder") and rest:
        name = rest[0]
        if m := re.fullmatch(lvl + r"_block_(\d+)", name):
            return sub([f"{head}.{head}_dict.{m[1]}.{m[2]}", *rest[1:]])
        if m := re.fullmatch(lvl + r"_(downsample|upsample)", name):
            return sub([f"{head}.pre_{m[2]}_dict.{m[1]}.conv"])
        if m := re.fullmatch(lvl + r"_convout_(norm|conv)", name):
            return sub([f"encoder.enc_convout_dict.{m[1]}.{0 if m[2] == 'norm' else 2}"])
        if head == "encoder" and name == "conv_in":
            return sub(["encoder.conv_in"])
        if head == "decoder" and name in ("norm_out", "conv_out"):
            return sub([f"decoder.conv_out.{0 if name == 'norm_out' else 2}"])
    if head == "main_decoder" and rest:
        name = rest[0]
        if m := re.fullmatch(lvl + r"_upsample", name):
            return sub([f"main_decoder.pre_upsample_dict.{m[1]}.conv"])
        if m := re.fullmatch(lvl + r"_fuse", name):
            return sub([f"main_decoder.decoder_dict.{m[1]}", *rest[1:]])
        if (m := re.fullmatch(lvl + r"_twm", name)) and len(rest) > 1:
            return sub([f"main_decoder.align_func_dict.{m[1]}", _TWM[rest[1]], *rest[2:]])
        if name == "norm_out":
            return sub(["main_decoder.conv_out_1.0"])
        if name == "conv_out":
            return sub(["main_decoder.conv_out.0"])
    raise KeyError("/".join(path))


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:  # flax [kh, kw, I, O] -> torch [O, I, kh, kw]
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def flax_param_shapes(model) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat ``{path: shape}`` of ``model``'s ``params`` (abstract; nothing is computed)."""
    f = model.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, 3), jnp.float32)
    tree = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def key_table(model) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """``{official key: (flax path, official shape)}`` for ``model`` (VQGANv1 or VQFRv1)."""
    top = level_name(len(model.channel_multipliers) - 1)
    table = {}
    for path, shape in flax_param_shapes(model).items():
        key = torch_key(path, top)
        if key in table:
            raise AssertionError(f"two flax params map to {key}")
        table[key] = (path, _torch_shape(shape))
    return table


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch here
        import torch

        return value.detach().cpu().to(torch.float32).numpy()
    return np.asarray(value, np.float32)


def select_state_dict(
    checkpoint: Mapping[str, Any], key: str | None = None, *, source: str = "checkpoint"
) -> Mapping[str, Any]:
    """The state dict inside a BasicSR checkpoint: ``checkpoint[key]``; by default ``params``,
    else ``params_ema``, else ``checkpoint`` itself. ``module.`` prefixes are dropped."""
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"{source}: expected a dict, got {type(checkpoint).__name__}")
    if key is not None:
        if key not in checkpoint:
            raise ConversionError(
                f"{source}: no top-level key {key!r} (found {sorted(map(str, checkpoint))[:5]})"
            )
        sd = checkpoint[key]
    else:
        sd = next((checkpoint[k] for k in ("params", "params_ema") if k in checkpoint), checkpoint)
    if not isinstance(sd, Mapping):
        raise ConversionError(f"{source}: the state dict is a {type(sd).__name__}, not a dict")
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def convert_state_dict(
    state_dict: Mapping[str, Any], model, *, source: str = "state dict", key: str | None = None
) -> dict:
    """Official (BasicSR) checkpoint dict or bare state dict -> flax ``params`` of ``model``.

    Raises :class:`ConversionError` (one line, starting with ``source``) for a missing,
    unexpected or mis-shaped key.
    """
    label = type(model).__name__
    sd = select_state_dict(state_dict, key, source=source)
    table = key_table(model)
    missing = [k for k in table if k not in sd]
    if missing:
        raise ConversionError(
            f"{source}: missing {len(missing)} {label} key(s), first {missing[0]!r} (shape "
            f"{table[missing[0]][1]}); is it a {label} checkpoint of this configuration?"
        )
    unexpected = sorted(k for k in sd if k not in table and not _SKIPPED.match(k))
    if unexpected:
        raise ConversionError(
            f"{source}: {len(unexpected)} unexpected key(s) for {label}, first "
            f"{unexpected[0]!r}; is it a {label} checkpoint of this configuration?"
        )
    flat = {}
    for k, (path, shape) in table.items():
        arr = _to_numpy(sd[k])
        if tuple(arr.shape) != shape:
            raise ConversionError(
                f"{source}: {k} has shape {tuple(arr.shape)}, expected {shape} for {label}"
            )
        if arr.ndim == 4:
            arr = arr.transpose(2, 3, 1, 0)
        flat[path] = np.ascontiguousarray(arr, np.float32)
    return traverse_util.unflatten_dict(flat)


def convert_vqgan_v1(
    state_dict: Mapping[str, Any],
    model: VQGANv1 | None = None,
    *,
    source: str = "state dict",
    key: str | None = None,
) -> dict:
    """Official ``VQGANv1`` checkpoint (e.g. VQ_Codebook_FFHQ512) -> :class:`VQGANv1` params."""
    return convert_state_dict(state_dict, model or VQGANv1(), source=source, key=key)


def convert_vqfr_v1(
    state_dict: Mapping[str, Any],
    model: VQFRv1 | None = None,
    *,
    source: str = "state dict",
    key: str | None = None,
) -> dict:
    """Official ``VQFRv1`` checkpoint (e.g. VQFR_v1-33a1fac5.pth) -> :class:`VQFRv1` params."""
    return convert_state_dict(state_dict, model or VQFRv1(), source=source, key=key)


def read_checkpoint(path: str) -> Mapping[str, Any]:
    """``torch.load(path, map_location='cpu', weights_only=True)`` with one-line errors."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of many types
        raise ConversionError(
            f"{path}: not a loadable torch checkpoint ({type(e).__name__})"
        ) from None


def convert_file(
    arch: str, input_path: str, output_path: str, key: str | None = None, model=None
) -> dict:
    """Reads ``input_path``, converts it for ``arch`` and writes ``output_path``. Returns params."""
    model = model or _default_model(arch)
    params = convert_state_dict(read_checkpoint(input_path), model, source=input_path, key=key)
    params_io.save_params_file(output_path, params)
    return params


def _hint(arch: str, path: str) -> str:
    src, out = RELEASED_FILES[arch]
    return f"python -m artfr_jax.convert.vqfr --arch={arch} --input={src} --output={path or out}"


def load_params(arch: str, path: str | None, model=None) -> dict:
    """Reads a file written by this converter and checks it against ``model`` (default: the paper
    config of ``arch``). Returns the float32 NumPy ``params`` tree; errors name the file and the
    command that produces it."""
    model = model or _default_model(arch)
    return params_io.load_params_file(
        path,
        label=_LABEL[arch],
        user=_LABEL[arch],
        filename=RELEASED_FILES[arch][1],
        expected=flax_param_shapes(model),
        hint=lambda p: _hint(arch, p),
    )


def load_vqgan_v1_params(path: str | None, model: VQGANv1 | None = None) -> dict:
    """Converted VQGANv1 params (see :func:`load_params`)."""
    return load_params("vqgan_v1", path, model)


def load_vqfr_v1_params(path: str | None, model: VQFRv1 | None = None) -> dict:
    """Converted VQFRv1 params (see :func:`load_params`)."""
    return load_params("vqfr_v1", path, model)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m artfr_jax.convert.vqfr",
        description="Official VQFR v1 checkpoints (PyTorch) -> flax msgpack params.",
    )
    parser.add_argument("--arch", required=True, choices=ARCHS)
    parser.add_argument("--input", required=True, help="official .pth checkpoint")
    parser.add_argument("--output", required=True, help="output .msgpack path")
    parser.add_argument(
        "--key", default=None, help="top-level key (params / params_ema); default: params"
    )
    args = parser.parse_args(argv)
    try:
        params = convert_file(args.arch, args.input, args.output, args.key)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(v.size for v in traverse_util.flatten_dict(params).values())
    print(f"wrote {args.output}: {_LABEL[args.arch]} params ({n:,} values) from {args.input}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
