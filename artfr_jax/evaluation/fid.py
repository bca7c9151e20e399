"""Fréchet Inception Distance (Heusel et al., NeurIPS 2017), compatible with pytorch-fid 0.3.0.

Protocol (what ``python -m pytorch_fid`` computes): every image is read as RGB uint8, scaled to
[0, 1], resized bilinearly to 299x299 WITHOUT antialiasing (torch ``F.interpolate(...,
align_corners=False)``), scaled to [-1, 1] and passed through the TF-ported Inception-v3 of
pytorch-fid (``FIDInceptionV3``, weights ``pt_inception-2015-12-05-6726825d.pth``); its 2048-d
pool3 activations are summarised by their mean and covariance (``np.cov``, rowvar=False) in float64
and ``FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))``. Files of statistics are .npz with
``mu`` and ``sigma``, interchangeable with ``python -m pytorch_fid --save-stats``. One known
difference: JPEGs are decoded with OpenCV here and with PIL there, which may differ by one grey
level on some pixels (PNG decodes identically).

The reference set is NOT the same across papers, so FIDs are only comparable under the same
reference: VQFR and GFPGAN (and methods that copy their tables) measure against all 70k FFHQ
images at 512 px, others against the ground truth of the test set itself. The caller names the
reference it used next to every score.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from scipy import linalg
from tqdm import tqdm

from artfr_jax.data.sources import IMAGE_EXTS, load_image
from artfr_jax.evaluation.inception import FEATURE_DIM, FIDInceptionV3

Params = Any
_log = logging.getLogger(__name__)
_CACHE_VERSION = 1  # bump when the features or the statistics change meaning


class InceptionExtractor:
    """pool3 features of ``FIDInceptionV3`` for uint8 images, in fixed-size jitted batches.

    ``params``: the tree from ``load_inception_params`` (or any ``FIDInceptionV3`` params).
    ``batch_size``: images per device call; the last batch is zero-padded to it, so one image
    size compiles once. ``dtype``: compute dtype (float32 for reference FIDs).

    ``extractor(images)``: ``uint8 [N, H, W, 3]`` (any ``H, W``) -> ``float64 [N, 2048]``. Only
    uint8 is accepted so generated images are quantised exactly as when saved to PNG first.
    """

    def __init__(self, params: Params, batch_size: int = 50, *, dtype: Any = jnp.float32):
        if batch_size < 1:
            raise ValueError(f"InceptionExtractor: batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.params = jax.device_put(params)
        self._host_params = params
        self._weights_id: str | None = None
        model = FIDInceptionV3(dtype=dtype)

        def features(p, images):
            return model.apply({"params": p}, images.astype(jnp.float32) / 255.0)

        self._apply = jax.jit(features)

    @property
    def weights_id(self) -> str:
        """Short hash of the parameter values (keys the statistics cache)."""
        if self._weights_id is None:
            h = hashlib.sha256()
            flat = traverse_util.flatten_dict(self._host_params)
            for key in sorted(flat):
                h.update("/".join(key).encode())
                h.update(np.ascontiguousarray(np.asarray(flat[key], np.float32)).tobytes())
            self._weights_id = h.hexdigest()[:16]
        return self._weights_id

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"InceptionExtractor: expected uint8 images [N, H, W, 3], got {images.dtype} "
                f"{images.shape}"
            )
        n, bs = images.shape[0], self.batch_size
        outs = []
        for start in range(0, n, bs):
            chunk = images[start : start + bs]
            if len(chunk) < bs:
                pad = np.zeros((bs - len(chunk), *chunk.shape[1:]), np.uint8)
                chunk = np.concatenate([chunk, pad])
            outs.append(self._apply(self.params, chunk))  # dispatch all before reading back
        if not outs:
            return np.zeros((0, FEATURE_DIM), np.float64)
        return np.concatenate([np.asarray(o, np.float64) for o in outs])[:n]


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``features [N, D]`` -> ``(mu [D], sigma [D, D])`` in float64, as pytorch-fid (N >= 2)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(
            f"FID statistics need features [N >= 2, D], got shape {features.shape}; "
            "a covariance needs at least 2 images"
        )
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Dowson & Landau; Heusel et al. Eq. 6).

    Same numerics as pytorch-fid's ``calculate_frechet_distance``: ``scipy.linalg.sqrtm`` of the
    product; if it is not finite, ``eps * I`` is added to both covariances and it is recomputed;
    an imaginary part on the diagonal above 1e-3 is an error, smaller ones are dropped.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: means differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(
            f"frechet_distance: covariances differ in shape: {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # Fewer images than feature dimensions make singular covariances; not worth a warning.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            _log.warning("FID: singular covariance product; adding %g to the diagonal of both", eps)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"FID: matrix square root has an imaginary component of "
                f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are not valid"
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **meta) -> str:
    """Writes ``mu``, ``sigma`` and scalar/string ``meta`` to an .npz at exactly ``path``.

    Atomic (temp file + rename), so an interrupted run never leaves a truncated cache file.
    """
    path = os.fspath(path)
    mu, sigma = _check_stats(np.asarray(mu, np.float64), np.asarray(sigma, np.float64), path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in meta.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Reads an .npz with ``mu [D]`` and ``sigma [D, D]`` (ours or ``pytorch_fid --save-stats``).

    Returns ``(mu, sigma, meta)`` with the other entries as Python scalars/strings (0-d) or arrays.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"FID statistics file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:
        raise ValueError(
            f"FID statistics file {path}: not a readable .npz ({type(e).__name__}: {e})"
        ) from None
    missing = [k for k in ("mu", "sigma") if k not in data]
    if missing:
        raise ValueError(
            f"FID statistics file {path}: missing {missing}; expected an .npz with 'mu' [D] and "
            f"'sigma' [D, D] (found {sorted(data)})"
        )
    mu, sigma = _check_stats(
        data.pop("mu").astype(np.float64), data.pop("sigma").astype(np.float64), path
    )
    meta = {k: (v.item() if v.ndim == 0 else v) for k, v in data.items()}
    return mu, sigma, meta


def _check_stats(mu: np.ndarray, sigma: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"FID statistics {where}: 'mu' has shape {mu.shape} and 'sigma' {sigma.shape}; "
            "expected [D] and [D, D]"
        )
    return mu, sigma


def list_folder_images(folder: str) -> list[str]:
    """Sorted png/jpg/jpeg/webp files at the top level of ``folder`` (names, not paths)."""
    if not os.path.isdir(folder):
        raise ValueError(f"FID image folder {folder!r} does not exist or is not a directory")
    return sorted(
        e.name
        for e in os.scandir(folder)
        if e.name.lower().endswith(IMAGE_EXTS) and e.is_file(follow_symlinks=True)
    )


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/artfr_jax/fid_stats``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "artfr_jax", "fid_stats")


def _cache_path(folder: str, names: Sequence[str], weights_id: str, cache_dir: str) -> str:
    listing = []
    for name in names:
        st = os.stat(os.path.join(folder, name))
        listing.append([name, st.st_size, st.st_mtime_ns])
    key = json.dumps(
        {"v": _CACHE_VERSION, "folder": folder, "files": listing, "weights": weights_id},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(folder) or "root")[:40]
    return os.path.join(cache_dir, f"{stem}-{digest}.npz")


def _batches(
    folder: str, names: Sequence[str], batch_size: int, workers: int
) -> Iterator[tuple[list[int], np.ndarray]]:
    """``(indices, uint8 [b, H, W, 3])`` with one image size per batch, decoding ahead in threads.

    Images are grouped by size as they arrive, so memory stays at a few batches per distinct size.
    """
    pending: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    chunk = max(batch_size, 16)

    def read(i: int) -> np.ndarray:
        return load_image(os.path.join(folder, names[i]))

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:

        def submit(start: int) -> list[concurrent.futures.Future]:
            return [pool.submit(read, i) for i in range(start, min(start + chunk, len(names)))]

        ahead = submit(0)
        for start in range(0, len(names), chunk):
            current, ahead = ahead, submit(start + chunk)  # decode the next chunk meanwhile
            for offset, fut in enumerate(current):
                img = fut.result()
                group = pending.setdefault(img.shape, [])
                group.append((start + offset, img))
                if len(group) == batch_size:
                    yield [i for i, _ in group], np.stack([im for _, im in group])
                    group.clear()
    for group in pending.values():
        if group:
            yield [i for i, _ in group], np.stack([im for _, im in group])


def folder_statistics(
    folder: str,
    extractor: Callable[[np.ndarray], np.ndarray],
    *,
    cache_dir: str | None = None,
    weights_id: str = "",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """FID statistics of every png/jpg/jpeg/webp at the top level of ``folder`` (sorted).

    Images are read as RGB uint8 (gray, RGBA and 16-bit converted), batched by size and passed to
    ``extractor`` (``uint8 [b, H, W, 3] -> [b, D]``, e.g. ``InceptionExtractor``). The result is
    cached in ``cache_dir`` (default ``default_cache_dir()``; never inside ``folder``) under a hash
    of the resolved folder path, the sorted ``(name, size, mtime_ns)`` list and the weights id
    (``weights_id`` or else ``extractor.weights_id``), so any added, removed or rewritten file
    recomputes. Returns ``(mu, sigma, info)`` with ``info = {num_images, cache_path, cached}``.
    """
    folder = os.path.realpath(folder)
    names = list_folder_images(folder)
    if len(names) < 2:
        raise ValueError(
            f"FID image folder {folder!r} has {len(names)} png/jpg/jpeg/webp image(s); "
            "FID needs at least 2 (and thousands for a meaningful score)"
        )
    cache_dir = os.path.realpath(cache_dir or default_cache_dir())
    if cache_dir == folder or cache_dir.startswith(folder + os.sep):
        raise ValueError(
            f"FID cache_dir {cache_dir!r} is inside the image folder {folder!r}; choose another"
        )
    weights_id = weights_id or str(getattr(extractor, "weights_id", ""))
    cache_path = _cache_path(folder, names, weights_id, cache_dir)
    info = {"num_images": len(names), "cache_path": cache_path, "cached": False}
    if os.path.exists(cache_path):
        try:
            mu, sigma, _ = load_statistics(cache_path)
            return mu, sigma, {**info, "cached": True}
        except ValueError as e:
            _log.warning("ignoring broken FID cache: %s", e)

    batch_size = int(getattr(extractor, "batch_size", 50))
    workers = min(8, os.cpu_count() or 1)
    feats: np.ndarray | None = None
    with tqdm(
        total=len(names), desc=f"FID {os.path.basename(folder)}", disable=not progress
    ) as bar:
        for idx, images in _batches(folder, names, batch_size, workers):
            out = np.asarray(extractor(images), np.float64)
            if feats is None:
                feats = np.empty((len(names), out.shape[-1]), np.float64)
            feats[idx] = out
            bar.update(len(idx))
    mu, sigma = feature_statistics(feats)
    save_statistics(
        cache_path, mu, sigma, num_images=len(names), folder=folder, weights_id=weights_id
    )
    return mu, sigma, info
