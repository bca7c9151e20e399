"""Converts torchvision VGG16 weights plus DISTS' alpha/beta to the ``DISTS`` params tree.

ImageNet VGG16 weights are not shipped with this project: download torchvision's
``vgg16-397923af.pth`` (a state dict with ``features.{idx}.weight/bias``) once, then

  python -m artfr_jax.convert.dists --vgg16=vgg16-397923af.pth --output=dists.msgpack

``--weights`` defaults to ``weights.pt`` inside the installed ``DISTS_pytorch`` package (found
without importing it, so torchvision is not needed). The output is
``flax.serialization.msgpack_serialize`` of ``{'vgg': ..., 'alpha': [1475], 'beta': [1475]}``, read
back with ``artfr_jax.losses.dists.load_dists_params``. Torch is only used to read the files.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Mapping, Sequence

import numpy as np

from artfr_jax.convert.lpips_vgg import convert_vgg_features, read_torch_state_dict
from artfr_jax.losses.dists import DISTS_CHANNELS
from artfr_jax.utils import params_io


def convert_alpha_beta(
    state_dict: Mapping[str, np.ndarray], *, source: str = "state dict"
) -> dict[str, np.ndarray]:
    """DISTS_pytorch ``alpha``/``beta`` ``[1, 1475, 1, 1]`` -> flat ``[1475]`` float32 arrays."""
    n = sum(DISTS_CHANNELS)
    out = {}
    for key in ("alpha", "beta"):
        w = state_dict.get(key)
        if w is None:
            raise ValueError(
                f"{source}: missing '{key}'; expected DISTS_pytorch's weights.pt "
                "({'alpha', 'beta'} of shape [1, 1475, 1, 1])"
            )
        w = np.asarray(w, np.float32)
        if w.size != n or w.shape not in ((1, n, 1, 1), (n,)):
            raise ValueError(f"{source}: '{key}' has shape {w.shape}, expected {(1, n, 1, 1)}")
        out[key] = w.reshape(n).copy()
    if not (out["alpha"].sum() + out["beta"].sum()) > 0:
        raise ValueError(f"{source}: alpha + beta must have a positive sum (it normalises them)")
    return out


def convert_dists(
    vgg16_state_dict: Mapping[str, np.ndarray],
    weights_state_dict: Mapping[str, np.ndarray],
    *,
    vgg16_source: str = "VGG16 state dict",
    weights_source: str = "DISTS weights",
) -> dict:
    """Builds the full ``DISTS`` params tree from the two state dicts (NumPy arrays)."""
    params: dict = {"vgg": convert_vgg_features(vgg16_state_dict, source=vgg16_source)}
    params.update(convert_alpha_beta(weights_state_dict, source=weights_source))
    return params


def default_weights_path() -> str:
    """``weights.pt`` of the installed ``DISTS_pytorch`` package (found without importing it)."""
    spec = importlib.util.find_spec("DISTS_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "--weights not given and the DISTS_pytorch package is not installed; pip install "
            "DISTS_pytorch==0.1 or pass --weights=PATH/TO/DISTS_pytorch/weights.pt"
        )
    return os.path.join(spec.submodule_search_locations[0], "weights.pt")


def convert_files(vgg16_path: str, output_path: str, weights_path: str | None = None) -> dict:
    """Reads both ``.pth`` files, converts them and writes the msgpack file. Returns the params."""
    weights_path = weights_path or default_weights_path()
    params = convert_dists(
        read_torch_state_dict(vgg16_path),
        read_torch_state_dict(weights_path),
        vgg16_source=vgg16_path,
        weights_source=weights_path,
    )
    params_io.save_params_file(output_path, params)
    return params


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m artfr_jax.convert.dists",
        description="torchvision VGG16 + DISTS_pytorch alpha/beta -> flax msgpack for DISTS.",
    )
    parser.add_argument("--vgg16", required=True, help="torchvision vgg16-397923af.pth")
    parser.add_argument(
        "--weights", default=None, help="DISTS_pytorch weights.pt (default: the installed package)"
    )
    parser.add_argument("--output", required=True, help="output .msgpack path")
    args = parser.parse_args(argv)
    try:
        params = convert_files(args.vgg16, args.output, args.weights)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(1, f"error: {e}\n")
    n = sum(v.size for layer in params["vgg"].values() for v in layer.values())
    print(f"wrote {args.output}: VGG16 trunk ({n:,} params) + DISTS alpha/beta")


if __name__ == "__main__":
    main()
