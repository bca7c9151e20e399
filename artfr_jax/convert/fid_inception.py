"""Converts pytorch-fid's Inception weights to the ``FIDInceptionV3`` params tree.

The weights are not shipped with this project: download pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (the FID release asset of mseitzer/pytorch-fid) once, then

  python -m artfr_jax.convert.fid_inception \
      --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.msgpack

and load the output with ``artfr_jax.evaluation.inception.load_inception_params``. Batch norm is
kept unfolded (``bn/{scale, bias, mean, var}``) so the converted values are the file's values
bit for bit. The 1008-way ``fc`` head (not used by FID) and ``num_batches_tracked`` counters are
dropped; any other extra key, a missing key or a shape mismatch is an error naming the file.
Torch is only used to read the file.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

import numpy as np
from flax import traverse_util

from artfr_jax.convert.lpips_vgg import read_torch_state_dict
from artfr_jax.evaluation.inception import (
    FEATURE_DIM,
    FID_WEIGHTS_FILENAME,
    inception_param_shapes,
)
from artfr_jax.utils import params_io

# flax leaf name -> torch suffix under the same module path.
_LEAVES = {
    ("conv", "kernel"): "conv.weight",
    ("bn", "scale"): "bn.weight",
    ("bn", "bias"): "bn.bias",
    ("bn", "mean"): "bn.running_mean",
    ("bn", "var"): "bn.running_var",
}
_FID_CLASSES = 1008  # the TF graph's classifier; torchvision's ImageNet Inception has 1000


def torch_key(path: tuple[str, ...]) -> str:
    """Flax params path -> pytorch-fid state-dict key (``Mixed_5b/branch1x1/conv/kernel`` ->
    ``Mixed_5b.branch1x1.conv.weight``)."""
    return ".".join((*path[:-2], _LEAVES[path[-2:]]))


def _ignored(key: str) -> bool:
    return key.endswith(".num_batches_tracked") or key in ("fc.weight", "fc.bias")


def convert_inception(state_dict: Mapping[str, np.ndarray], *, source: str = "state dict") -> dict:
    """pytorch-fid ``fid_inception_v3()`` state dict (NumPy arrays) -> ``FIDInceptionV3`` params.

    Conv kernels go from ``[Cout, Cin, kh, kw]`` to ``[kh, kw, Cin, Cout]``; BN weight, bias and
    running statistics are copied. Raises ``ValueError`` naming ``source`` on missing or unexpected
    keys and on shape mismatches.
    """
    expected = inception_param_shapes()
    want = {torch_key(path): path for path in expected}
    missing = sorted(k for k in want if k not in state_dict)
    if missing:
        raise ValueError(
            f"{source}: missing {len(missing)} key(s) {missing[:3]}; expected pytorch-fid's "
            f"{FID_WEIGHTS_FILENAME}"
        )
    unexpected = sorted(k for k in state_dict if k not in want and not _ignored(k))
    if unexpected:
        raise ValueError(
            f"{source}: unexpected {len(unexpected)} key(s) {unexpected[:3]}; expected pytorch-fid's "
            f"{FID_WEIGHTS_FILENAME} (Inception without aux head)"
        )
    fc = state_dict.get("fc.weight")
    if fc is not None and tuple(np.shape(fc)) != (_FID_CLASSES, FEATURE_DIM):
        raise ValueError(
            f"{source}: fc.weight has shape {tuple(np.shape(fc))}, expected "
            f"{(_FID_CLASSES, FEATURE_DIM)}; this is not the FID Inception ({FID_WEIGHTS_FILENAME})"
            " but probably torchvision's ImageNet Inception, which gives different FIDs"
        )

    flat = {}
    for key, path in want.items():
        value = np.asarray(state_dict[key], np.float32)
        if path[-1] == "kernel" and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        if value.shape != expected[path]:
            raise ValueError(
                f"{source}: {key} has shape {np.shape(state_dict[key])}, which does not give the "
                f"expected {expected[path]} for {'/'.join(path)}"
            )
        flat[path] = np.ascontiguousarray(value)
    return traverse_util.unflatten_dict(flat)


def convert_file(input_path: str, output_path: str) -> dict:
    """Reads the ``.pth``, converts it and writes the msgpack file. Returns the params."""
    params = convert_inception(read_torch_state_dict(input_path), source=input_path)
    params_io.save_params_file(output_path, params)
    return params


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m artfr_jax.convert.fid_inception",
        description="pytorch-fid Inception weights (.pth) -> flax msgpack for FIDInceptionV3.",
    )
    parser.add_argument("--input", required=True, help=f"pytorch-fid {FID_WEIGHTS_FILENAME}")
    parser.add_argument("--output", required=True, help="output .msgpack path")
    args = parser.parse_args(argv)
    try:
        params = convert_file(args.input, args.output)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(1, f"error: {e}\n")
    n = sum(v.size for v in traverse_util.flatten_dict(params).values())
    print(f"wrote {args.output}: FID Inception-v3 up to pool3 ({n:,} params)")


if __name__ == "__main__":
    main()
