"""Converts torchvision VGG16 weights plus the LPIPS v0.1 linear heads to the ``LPIPS`` params tree.

ImageNet VGG16 weights are not shipped with this project: download torchvision's
``vgg16-397923af.pth`` (a state dict with ``features.{idx}.weight/bias``) once, then

  python -m artfr_jax.convert.lpips_vgg --vgg16=vgg16-397923af.pth --output=lpips_vgg.msgpack

``--heads`` defaults to ``weights/v0.1/vgg.pth`` inside the installed ``lpips`` package. The output
is ``flax.serialization.msgpack_serialize`` of ``{'vgg': ..., 'lin0': ..., ..., 'lin4': ...}``, read
back with ``artfr_jax.losses.perceptual.load_lpips_params``. Torch is only used to read the files.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Mapping, Sequence

import numpy as np

from artfr_jax.models.vgg import VGG16_BLOCKS, VGG_WIDTHS, vgg_layers
from artfr_jax.utils import params_io

LPIPS_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a ``.pth`` state dict (tensors only) into float32 NumPy arrays."""
    import torch

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path}: not a loadable torch state dict ({type(e).__name__}: {e})"
        ) from e
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {
        k: v.detach().to(torch.float32).numpy()
        for k, v in sd.items()
        if isinstance(v, torch.Tensor)
    }


def convert_vgg_features(
    state_dict: Mapping[str, np.ndarray],
    *,
    block_sizes: Sequence[int] = VGG16_BLOCKS,
    widths: Sequence[int] = VGG_WIDTHS,
    source: str = "state dict",
) -> dict[str, dict[str, np.ndarray]]:
    """torchvision ``features.{idx}.{weight,bias}`` -> ``VGG`` params ``conv{idx}/{kernel,bias}``.

    Keys outside ``features.`` (e.g. the classifier) are ignored. Conv kernels go from
    ``[Cout, Cin, 3, 3]`` to ``[3, 3, Cin, Cout]``.
    """
    params: dict[str, dict[str, np.ndarray]] = {}
    cin = 3
    for kind, name, idx in vgg_layers(block_sizes):
        if kind != "conv":
            continue
        cout = widths[int(name[4 : name.index("_")]) - 1]
        w = state_dict.get(f"features.{idx}.weight")
        b = state_dict.get(f"features.{idx}.bias")
        if w is None or b is None:
            raise ValueError(
                f"{source}: missing features.{idx}.weight/bias; expected a torchvision VGG "
                f"state dict (e.g. vgg16-397923af.pth)"
            )
        w, b = np.asarray(w, np.float32), np.asarray(b, np.float32)
        if w.shape != (cout, cin, 3, 3) or b.shape != (cout,):
            raise ValueError(
                f"{source}: features.{idx} has weight {w.shape} / bias {b.shape}, expected "
                f"{(cout, cin, 3, 3)} / {(cout,)}"
            )
        params[f"conv{idx}"] = {"kernel": np.transpose(w, (2, 3, 1, 0)), "bias": b}
        cin = cout
    return params


def convert_lpips_heads(
    state_dict: Mapping[str, np.ndarray], *, source: str = "state dict"
) -> dict[str, dict[str, np.ndarray]]:
    """lpips ``lin{k}.model.{1|0}.weight [1, C, 1, 1]`` -> ``lin{k}/kernel [C, 1]``.

    Index 1 is the layout with the (inactive) dropout layer the released weights use; index 0 is a
    model built with ``use_dropout=False``.
    """
    params = {}
    for k, c in enumerate(LPIPS_CHANNELS):
        w = state_dict.get(f"lin{k}.model.1.weight", state_dict.get(f"lin{k}.model.0.weight"))
        if w is None:
            raise ValueError(
                f"{source}: missing lin{k}.model.1.weight; expected lpips' weights/v0.1/vgg.pth"
            )
        w = np.asarray(w, np.float32)
        if w.shape != (1, c, 1, 1):
            raise ValueError(
                f"{source}: lin{k} weight has shape {w.shape}, expected {(1, c, 1, 1)}"
            )
        params[f"lin{k}"] = {"kernel": w.reshape(1, c).T.copy()}
    return params


def convert_lpips_vgg(
    vgg16_state_dict: Mapping[str, np.ndarray],
    heads_state_dict: Mapping[str, np.ndarray],
    *,
    vgg16_source: str = "VGG16 state dict",
    heads_source: str = "LPIPS heads state dict",
) -> dict:
    """Builds the full ``LPIPS`` params tree from the two state dicts (NumPy arrays)."""
    params = {"vgg": convert_vgg_features(vgg16_state_dict, source=vgg16_source)}
    params.update(convert_lpips_heads(heads_state_dict, source=heads_source))
    return params


def default_heads_path() -> str:
    """``weights/v0.1/vgg.pth`` of the installed ``lpips`` package (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "--heads not given and the lpips package is not installed; pip install lpips==0.1.4 "
            "or pass --heads=PATH/TO/lpips/weights/v0.1/vgg.pth"
        )
    return os.path.join(spec.submodule_search_locations[0], "weights", "v0.1", "vgg.pth")


def convert_files(vgg16_path: str, output_path: str, heads_path: str | None = None) -> dict:
    """Reads both ``.pth`` files, converts them and writes the msgpack file. Returns the params."""
    heads_path = heads_path or default_heads_path()
    params = convert_lpips_vgg(
        read_torch_state_dict(vgg16_path),
        read_torch_state_dict(heads_path),
        vgg16_source=vgg16_path,
        heads_source=heads_path,
    )
    params_io.save_params_file(output_path, params)
    return params


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m artfr_jax.convert.lpips_vgg",
        description="torchvision VGG16 + LPIPS v0.1 heads -> flax msgpack for LPIPS.",
    )
    parser.add_argument("--vgg16", required=True, help="torchvision vgg16-397923af.pth")
    parser.add_argument("--heads", default=None, help="lpips weights/v0.1/vgg.pth (default: lpips)")
    parser.add_argument("--output", required=True, help="output .msgpack path")
    args = parser.parse_args(argv)
    try:
        params = convert_files(args.vgg16, args.output, args.heads)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(1, f"error: {e}\n")
    n = sum(v.size for layer in params["vgg"].values() for v in layer.values())
    print(f"wrote {args.output}: VGG16 trunk ({n:,} params) + 5 LPIPS heads")


if __name__ == "__main__":
    main()
