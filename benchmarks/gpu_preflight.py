r"""First part of ``benchmarks/gpu_check.sh``: the project imports and jax has the backend asked for.

    python -m benchmarks.gpu_preflight              # a CUDA GPU is required
    python -m benchmarks.gpu_preflight --expect=cpu # the dry run

Prints the versions that matter for the numbers (Python, jax, jaxlib, flax, the CUDA plugin and
cuDNN wheels), the device, its memory and the bf16 peak used for the share-of-peak figures, then runs
one small bfloat16 matmul on the device. Exits 2 with the install command when a package is missing
or jax has no GPU backend, so the check stops within seconds instead of timing every part on the
CPU.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

EXIT_NOT_READY = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the benchmarks of the check import, heaviest last (clu's writers import tensorflow).
MODULES = (
    "numpy",
    "jax",
    "flax",
    "optax",
    "orbax.checkpoint",
    "ml_collections",
    "grain",
    "cv2",
    "clu.metric_writers",
    "artfr_jax.train.vqgan_trainer",
    "artfr_jax.train.art_trainer",
    "artfr_jax.inference",
    "artfr_jax.data.pipeline",
)
DISTRIBUTIONS = (
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "jax-cuda12-pjrt",
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
    "nvidia-cudnn-cu12",
    "nvidia-cudnn-cu13",
    "flax",
    "numpy",
    "grain",
)


def install_help() -> str:
    pin = pinned().get("jax", "?")
    return f"""\
Install the project with its CUDA extra (jax[cuda12] at the jax pinned in constraints.txt, {pin}:
jax's CUDA 12 plugin with the CUDA and cuDNN libraries as wheels; the machine needs only an NVIDIA
driver for CUDA 12), from the repository root:

    python -m pip install -e '.[cuda]' -c constraints.txt

or let the check do it: bash benchmarks/gpu_check.sh --install
A machine without network: on one with network (same Python version, x86-64 Linux) run
    python -m pip download -d wheels '.[cuda]' -c constraints.txt setuptools wheel
copy wheels/ next to the repository and run
    bash benchmarks/gpu_check.sh --install --wheels=wheels"""


def pinned() -> dict[str, str]:
    """``name -> version`` of ``constraints.txt`` (lower-case names)."""
    pins = {}
    try:
        with open(os.path.join(ROOT, "constraints.txt")) as f:
            for line in f:
                name, sep, version = line.split("#")[0].strip().partition("==")
                if sep:
                    pins[name.strip().lower().replace("_", "-")] = version.strip()
    except OSError:
        pass
    return pins


def not_ready(message: str) -> None:
    print(f"gpu_preflight: NOT READY: {message}\n\n{install_help()}", flush=True)
    sys.exit(EXIT_NOT_READY)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--expect", choices=["gpu", "cpu"], default="gpu")
    args = parser.parse_args()

    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001  (ImportError, or a broken CUDA/TF install)
            not_ready(f"cannot import {name}: {type(e).__name__}: {e}")

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from benchmarks import results  # noqa: PLC0415
    from benchmarks.art_train_step import PEAK_BF16_TFLOPS, peak_tflops  # noqa: PLC0415

    print(f"python {platform.python_version()} ({sys.executable}) on {platform.machine()}")
    pins = pinned()
    versions = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        pin = pins.get(dist)
        note = f" (constraints.txt pins {pin})" if pin and pin != versions[dist] else ""
        print(f"  {dist} {versions[dist]}{note}")

    try:
        devices = jax.devices()
    except RuntimeError as e:  # a CUDA plugin that fails to start (driver, libraries)
        not_ready(f"jax could not start a backend: {e}")
    dev = devices[0]
    print(f"jax backend: {dev.platform}, {len(devices)} device(s): {dev.device_kind}")
    if args.expect == "gpu" and dev.platform != "gpu":
        not_ready(
            f"jax has no CUDA backend here (jax.devices() platform {dev.platform!r}; "
            f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r})"
        )
    stats = dev.memory_stats() or {}
    if "bytes_limit" in stats:
        print(f"  memory for jax: {stats['bytes_limit'] / 2**30:.1f} GiB")
    peak = peak_tflops(dev)
    print(
        "  bf16 dense peak used for shares of peak: "
        + (f"{peak:.0f} TFLOP/s" if peak else f"none known for {dev.device_kind!r}")
        + f" (benchmarks/art_train_step.py PEAK_BF16_TFLOPS, {len(PEAK_BF16_TFLOPS)} chips)"
    )
    x = jnp.ones((256, 256), jnp.bfloat16)
    total = float(jax.jit(lambda a: (a @ a).astype(jnp.float32).sum())(x))
    if total != 256.0**3:
        not_ready(f"a 256x256 bfloat16 matmul on {dev.device_kind} gave {total}, not {256.0**3}")
    print("  a bfloat16 matmul ran on the device")
    results.record(
        "preflight",
        platform=dev.platform,
        device=dev.device_kind,
        devices=len(devices),
        peak_tflops=peak,
        versions=versions,
    )


if __name__ == "__main__":
    main()
