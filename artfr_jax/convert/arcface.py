"""Converts public PyTorch ArcFace checkpoints to the linen backbones of ``evaluation.arcface``.

  python -m artfr_jax.convert.arcface --arch=resnet18 --input=resnet18_110.pth \\
      --output=arcface_resnet18.msgpack
  python -m artfr_jax.convert.arcface --arch=iresnet100 --input=backbone.pth \\
      --output=arcface_iresnet100.msgpack

``resnet18``: VQFR's ``resnet18_110.pth`` (arcface-pytorch ``resnet_face18(use_se=False)`` saved from
``nn.DataParallel``, keys ``module.conv1.weight`` ...) or GFPGAN's ``arcface_resnet18.pth`` (same
keys without ``module.``). ``iresnet50`` / ``iresnet100``: insightface arcface_torch ``backbone.pth``
(keys ``conv1.weight``, ``layer1.0.bn1.weight``, ..., ``fc.weight``, ``features.running_var``).
Torch key ``layer2.0.downsample.1.running_mean`` becomes ``batch_stats/layer2_0/downsample_bn/mean``;
conv weights ``[O, I, kh, kw]`` become kernels ``[kh, kw, I, O]``, linear weights are transposed.
The output is ``flax.serialization.msgpack_serialize`` of ``{'params', 'batch_stats'}``, read back
with ``artfr_jax.evaluation.arcface.load_arcface_params``. Torch is only used to read the file.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
from flax import traverse_util

from artfr_jax.evaluation.arcface import ARCFACE_ARCHS, arcface_variable_shapes
from artfr_jax.utils import params_io

_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("params", "negative_slope"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_MODULE = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


def _torch_key(path: tuple[str, ...]) -> str:
    collection, *modules, leaf = path
    parts = []
    for m in modules:
        block = re.fullmatch(r"(layer\d+)_(\d+)", m)
        parts.append(f"{block[1]}.{block[2]}" if block else _MODULE.get(m, m))
    return ".".join([*parts, _LEAF[(collection, leaf)]])


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:  # conv kernel [kh, kw, I, O] <- [O, I, kh, kw]
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    if len(flax_shape) == 2:  # dense kernel [I, O] <- [O, I]
        return flax_shape[::-1]
    return flax_shape


def torch_key_table(
    arch: str, layers: Sequence[int] | None = None
) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """``{torch state-dict key: (flax variable path, torch shape)}`` for ``arch`` (no FLOPs).

    ``num_batches_tracked`` buffers are not listed: they carry no inference state.
    """
    shapes = arcface_variable_shapes(arch, tuple(layers) if layers else None)
    return {_torch_key(path): (path, _torch_shape(shape)) for path, shape in shapes.items()}


def _to_flax(w: np.ndarray) -> np.ndarray:
    if w.ndim == 4:
        return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))
    if w.ndim == 2:
        return np.ascontiguousarray(w.T)
    return np.ascontiguousarray(w)


def _strip(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def convert_arcface(
    arch: str,
    state_dict: Mapping[str, np.ndarray],
    *,
    layers: Sequence[int] | None = None,
    source: str = "state dict",
) -> dict:
    """Maps a torch state dict (NumPy arrays) to ``{'params', 'batch_stats'}`` of ``arch``.

    Strips a leading ``module.`` (``nn.DataParallel``), ignores ``num_batches_tracked``, and raises
    a ``ValueError`` naming ``source`` for missing or unexpected keys and shape mismatches.
    ``layers`` overrides the IResNet depth (tests).
    """
    if arch not in ARCFACE_ARCHS:
        raise ValueError(f"unknown ArcFace arch {arch!r}; expected one of {list(ARCFACE_ARCHS)}")
    table = torch_key_table(arch, layers)
    sd = {_strip(k): v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
    missing = [k for k in table if k not in sd]
    unexpected = sorted(k for k in sd if k not in table)
    if unexpected:
        why = (
            " (squeeze-excitation weights: only use_se=False is supported, as in VQFR/GFPGAN)"
            if any(".se." in k for k in unexpected)
            else f"; is --arch={arch} the right architecture?"
        )
        raise ValueError(
            f"{source}: {len(unexpected)} unexpected key(s) for ArcFace {arch}, e.g. "
            f"{unexpected[:3]}{why}"
        )
    if missing:
        raise ValueError(
            f"{source}: missing {len(missing)} key(s) of ArcFace {arch}, e.g. {missing[:3]}; "
            f"is --arch={arch} the right architecture?"
        )
    flat = {}
    for key, (path, shape) in table.items():
        w = np.asarray(sd[key], np.float32)
        if w.shape != shape:
            raise ValueError(
                f"{source}: {key} has shape {w.shape}, expected {shape} for ArcFace {arch}"
            )
        flat[path] = _to_flax(w)
    return traverse_util.unflatten_dict(flat)


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Reads a ``.pth`` state dict (``torch.load(weights_only=True)``) into float32 NumPy arrays.

    Accepts a plain state dict or a dict holding it under ``state_dict`` /
    ``state_dict_backbone`` (insightface training checkpoints).
    """
    import pickle

    import torch

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise ValueError(f"{path}: not a torch checkpoint (unreadable pickle)") from None
        raise ValueError(
            f"{path} holds a pickled object ({found[1]}), not a state dict, and "
            "torch.load(weights_only=True) refuses code; if you trust the file, export the state "
            "dict where the model code is importable: torch.save(torch.load(PATH, "
            "weights_only=False).state_dict(), 'state_dict.pth'), then convert that file"
        ) from None
    except Exception as e:
        raise ValueError(
            f"{path}: not a loadable torch checkpoint ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    if isinstance(sd, Mapping):
        for key in ("state_dict", "state_dict_backbone"):
            if isinstance(sd.get(key), Mapping):
                sd = sd[key]
                break
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {
        k: v.detach().to(torch.float32).numpy()
        for k, v in sd.items()
        if isinstance(v, torch.Tensor)
    }


def convert_file(arch: str, input_path: str, output_path: str) -> dict:
    """Reads ``input_path``, converts it for ``arch`` and writes ``output_path``. Returns the tree."""
    variables = convert_arcface(arch, read_checkpoint(input_path), source=input_path)
    params_io.save_params_file(output_path, variables)
    return variables


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m artfr_jax.convert.arcface",
        description="PyTorch ArcFace checkpoint (arcface-pytorch / insightface) -> flax msgpack.",
    )
    parser.add_argument("--arch", required=True, choices=ARCFACE_ARCHS)
    parser.add_argument(
        "--input", required=True, help="resnet18_110.pth (resnet18) or backbone.pth (iresnet*)"
    )
    parser.add_argument("--output", required=True, help="output .msgpack path")
    args = parser.parse_args(argv)
    try:
        variables = convert_file(args.arch, args.input, args.output)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(1, f"error: {e}\n")
    n = sum(np.size(v) for v in traverse_util.flatten_dict(variables["params"]).values())
    print(f"wrote {args.output}: ArcFace {args.arch} ({n:,} params)")


if __name__ == "__main__":
    main()
