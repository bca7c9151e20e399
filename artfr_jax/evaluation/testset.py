"""Builds a degraded test split (CelebA-Test style) from a folder of GT faces, reproducibly.

CelebA-Test (GFPGAN, used by VQFR and ART-FR Table 1a) pairs 3,000 aligned 512-px CelebA-HQ faces with
LQ versions made by the blur / downsample / noise / JPEG model with VQFR-like ranges. This writes the
same kind of split from any GT folder (or from the synthetic face generator):

  OUT/gt/<stem>.png     the GT, centre-cropped and resized to ``size``
  OUT/lq/<stem>.png     its degraded version (ART-FR Eq. 8 with the named preset)
  OUT/testset.json      preset, its config, seed, and every image's drawn parameters

Image ``stem`` is degraded with ``np.random.default_rng([seed, crc32(stem)])``, so an image's LQ
does not depend on which other images are in the folder and re-running gives identical files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Callable

import ml_collections
import numpy as np
from tqdm import tqdm

from artfr_jax.data import degradations, sources
from artfr_jax.evaluation import pairs as pairs_lib

DEFAULT_PRESET = "vqfr"


def image_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _write_png(img: np.ndarray, path: str) -> None:
    import cv2

    tmp = path + ".tmp.png"
    if not cv2.imwrite(tmp, cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write PNG")
    os.replace(tmp, path)


def make_testset(
    out: str,
    *,
    gt_folder: str | None = None,
    synthetic: int = 0,
    size: int = 512,
    preset: str = DEFAULT_PRESET,
    seed: int = 0,
    degradation: ml_collections.ConfigDict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Writes ``OUT/{gt,lq}/<stem>.png`` and ``OUT/testset.json``; returns the JSON dict.

    Exactly one of ``gt_folder`` (top-level images) and ``synthetic`` (> 0 synthetic faces named
    ``synthetic_00000`` ...) is the source; ``degradation`` (a ``config.data.degradation``)
    replaces ``preset`` where given. Unreadable GT files are logged and left out. Raises
    ``ValueError`` with a one-line message for bad arguments, an output folder inside the GT
    folder, or an existing split (unless ``overwrite``).
    """
    if bool(gt_folder) == bool(synthetic):
        raise ValueError("--make_testset needs exactly one source: --gt=DIR or --synthetic=N")
    if size < 8:
        raise ValueError(f"--size must be at least 8 pixels, got {size}")
    # A config's own degradation (e.g. the demo's, scaled to 32 px) replaces the named preset.
    cfg = degradation if degradation is not None else degradations.degradation_preset(preset)
    if gt_folder:
        files, _ = pairs_lib.list_image_files(gt_folder, "--gt")
        real = os.path.realpath(gt_folder)
        if os.path.realpath(out) == real or os.path.realpath(out).startswith(real + os.sep):
            raise ValueError(f"--out {out!r} is inside --gt {gt_folder!r}; choose another folder")
        names = [pairs_lib.stem(f) for f in files]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"--gt {gt_folder!r}: several files share the stem(s) {dup[:3]}")
        load = {n: (lambda f=f: sources.load_image(f)) for n, f in zip(names, files, strict=True)}
    else:
        synth = sources.SyntheticSource(synthetic, size, seed=seed)
        load = {f"synthetic_{i:05d}": (lambda i=i: synth[i]) for i in range(synthetic)}
    meta_path = os.path.join(out, "testset.json")
    if os.path.exists(meta_path) and not overwrite:
        raise ValueError(f"{meta_path} exists; pass --overwrite to rebuild the split there")
    for sub in ("gt", "lq"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)

    images, failed = {}, {}
    for name, read in tqdm(load.items(), desc="test set", unit="img", disable=not progress):
        try:
            hq = sources.center_crop_resize(read(), size)
        except ValueError as e:
            failed[name] = str(e)
            log(str(e))
            continue
        params = degradations.sample_degradation(cfg, image_rng(seed, name))
        lq = degradations.apply_degradation(
            hq,
            params,
            kernel_max_size=int(cfg.kernel_max_size),
            downscale_interp=cfg.downscale_interp,
            upscale_interp=cfg.upscale_interp,
            fast_blur=bool(cfg.fast_blur),
        )
        _write_png(hq, os.path.join(out, "gt", name + ".png"))
        _write_png(lq, os.path.join(out, "lq", name + ".png"))
        images[name] = _jsonable(dataclasses.asdict(params))
    meta = {
        "source": os.path.abspath(gt_folder) if gt_folder else f"synthetic faces (seed {seed})",
        "size": size,
        "preset": preset if degradation is None else "(config)",
        "seed": seed,
        "degradation": _jsonable(cfg.to_dict()),
        "num_images": len(images),
        "failed": failed,
        "images": images,
    }
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, meta_path)
    log(
        f"wrote {len(images)} GT/LQ pairs ({size} px, preset {meta['preset']!r}, seed {seed}) to {out}"
        + (f"; {len(failed)} unreadable GT files left out" if failed else "")
    )
    return meta


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x
