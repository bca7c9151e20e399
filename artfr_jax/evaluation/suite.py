"""Runs the papers' metrics over result folders: per-image metrics in batches, FID per folder.

Every metric is built by :func:`build_metrics`, which either returns it ready (weights loaded) or a
one-line reason why it is skipped; nothing is faked. Per-image metrics see batches of same-sized
``(restored, gt)`` uint8 images and return one value per image; a folder's number is their mean.
FID compares the whole restored folder with a reference set (:mod:`artfr_jax.evaluation.fid`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from tqdm import tqdm

from artfr_jax.evaluation import metrics as metrics_lib
from artfr_jax.evaluation import niqe as niqe_lib
from artfr_jax.evaluation import pairs as pairs_lib
from artfr_jax.utils import files as files_lib

METRICS = ("psnr", "ssim", "lpips", "dists", "fid", "niqe", "deg", "lmd")
# ART-FR Table 1 (a): realness (FID, NIQE) then fidelity (LPIPS, Deg, LMD, PSNR); SSIM and DISTS
# (reported by VQFR / OSDFace) follow.
TABLE_COLUMNS = (
    ("fid", "FID↓"),
    ("niqe", "NIQE↓"),
    ("lpips", "LPIPS↓"),
    ("deg", "Deg↓"),
    ("lmd", "LMD↓"),
    ("psnr", "PSNR↑"),
    ("ssim", "SSIM↑"),
    ("dists", "DISTS↓"),
)
DEG_EMBEDDERS = ("auto", "arcface_resnet18", "arcface_iresnet100", "arcface_iresnet50", "dlib")
LPIPS_FILE = "lpips_vgg.msgpack"
DISTS_FILE = "dists.msgpack"


@dataclasses.dataclass
class Options:
    weights_dir: str | None = None
    batch_size: int = 16
    crop_border: int = 0
    deg_embedder: str = "auto"
    fid_ref: str | None = None  # stats .npz or an image folder; None: the GT folder
    fid_cache_dir: str | None = None
    progress: bool = True


class Skip(Exception):
    """A metric cannot run; the message is the one-line reason shown in the report."""


@dataclasses.dataclass
class BatchMetric:
    """A per-image metric: ``fn(restored, gt, cache) -> [B]`` on uint8 ``[B, H, W, 3]`` batches."""

    name: str
    convention: str
    fn: Callable[[np.ndarray, np.ndarray | None, dict], np.ndarray]
    needs_gt: bool = True


def _weights_file(opts: Options, filename: str, command: str) -> str:
    if not opts.weights_dir:
        raise Skip(f"needs {filename} in --weights_dir (make it with: {command})")
    path = os.path.join(opts.weights_dir, filename)
    if not os.path.exists(path):
        raise Skip(f"{path} not found (make it with: {command})")
    return path


def _padded_jit(fn: Callable, batch_size: int, *consts) -> Callable[..., np.ndarray]:
    """``fn(*consts, *batch)`` jitted for a fixed batch size: short batches repeat their last row."""
    jfn = jax.jit(fn)

    def call(*arrays: np.ndarray) -> np.ndarray:
        n = arrays[0].shape[0]
        if n < batch_size:
            arrays = tuple(
                np.concatenate([a, np.repeat(a[-1:], batch_size - n, 0)]) for a in arrays
            )
        return np.asarray(jfn(*consts, *arrays), np.float64)[:n]

    return call


def _full_reference(opts: Options) -> dict[str, BatchMetric]:
    cb = opts.crop_border
    psnr = _padded_jit(
        lambda r, g: metrics_lib.psnr(r, g, crop_border=cb, inf_if_identical=True), opts.batch_size
    )
    ssim = _padded_jit(lambda r, g: metrics_lib.ssim(r, g, crop_border=cb), opts.batch_size)
    conv = f"RGB, 0-255, crop_border={cb}, as BasicSR calculate_psnr/ssim and scikit-image"
    return {
        "psnr": BatchMetric("psnr", f"PSNR (dB): {conv}", lambda r, g, c: psnr(r, g)),
        "ssim": BatchMetric(
            "ssim", f"SSIM: 11x11 Gaussian window (sigma 1.5), {conv}", lambda r, g, c: ssim(r, g)
        ),
    }


def _lpips(opts: Options) -> BatchMetric:
    from artfr_jax.losses import perceptual

    path = _weights_file(opts, LPIPS_FILE, perceptual.CONVERT_COMMAND.format(output=LPIPS_FILE))
    params = jax.device_put(perceptual.load_lpips_params(path))

    def fn(p, r, g):
        return perceptual.lpips_distance(p, r / 127.5 - 1.0, g / 127.5 - 1.0)

    call = _padded_jit(fn, opts.batch_size, params)
    return BatchMetric(
        "lpips",
        f"LPIPS v0.1, VGG16 trunk + the lpips package's linear heads ({path})",
        lambda r, g, c: call(r.astype(np.float32), g.astype(np.float32)),
    )


def _dists(opts: Options) -> BatchMetric:
    from artfr_jax.losses import dists

    path = _weights_file(opts, DISTS_FILE, dists.CONVERT_COMMAND.format(output=DISTS_FILE))
    params = jax.device_put(dists.load_dists_params(path))
    call = _padded_jit(
        lambda p, r, g: dists.dists(p, r / 255.0, g / 255.0), opts.batch_size, params
    )
    return BatchMetric(
        "dists",
        f"DISTS (DISTS_pytorch 0.1 alpha/beta, VGG16 with L2 pooling) ({path})",
        lambda r, g, c: call(r.astype(np.float32), g.astype(np.float32)),
    )


def _niqe(opts: Options) -> BatchMetric:
    cb = opts.crop_border

    def one(img: np.ndarray, cache: dict) -> float:
        try:
            return niqe_lib.niqe(img, crop_border=cb, convert_to="y")
        except ValueError as e:  # too small for two 96x96 blocks
            cache.setdefault("unscored", {}).setdefault("niqe", str(e))
            return float("nan")

    return BatchMetric(
        "niqe",
        f"NIQE on the Y channel, crop_border={cb}, BasicSR's pristine parameters "
        "(images under 192x96 are not scored)",
        lambda r, g, c: np.array([one(x, c) for x in r]),
        needs_gt=False,
    )


def _dlib():
    from artfr_jax.evaluation import dlib_face

    reason = dlib_face.dlib_available()
    if reason:
        raise Skip(reason)
    return dlib_face


def _gt_boxes(dlib_face, gt: np.ndarray, cache: dict):
    """Face boxes detected on the GT, shared by Deg. (dlib) and LMD for the same batch."""
    if "boxes" not in cache:
        cache["boxes"], detected = dlib_face.detect_boxes(gt)
        cache["undetected"] = int(np.sum(~np.asarray(detected)))
    return cache["boxes"]


def _deg(opts: Options) -> BatchMetric:
    choice = opts.deg_embedder
    if choice not in DEG_EMBEDDERS:
        raise Skip(f"--deg_embedder={choice!r} unknown (expected {'|'.join(DEG_EMBEDDERS)})")
    reasons = []
    for arch in ("resnet18", "iresnet100", "iresnet50"):
        if choice not in ("auto", f"arcface_{arch}"):
            continue
        from artfr_jax.evaluation import arcface

        files = arcface.ARCFACE_FILES[arch]
        command = arcface.CONVERT_COMMAND.format(
            arch=arch, input=files.checkpoint, output=files.converted
        )
        try:
            path = _weights_file(opts, files.converted, command)
        except Skip as e:
            reasons.append(str(e))
            continue
        embed = arcface.ArcFaceEmbedder(
            arch, arcface.load_arcface_params(arch, path), batch_size=opts.batch_size
        )
        crop = (
            "; the whole face crop is resized to 112x112 (insightface models expect their own "
            "5-point alignment, so this is an approximation)"
            if arch.startswith("iresnet")
            else "; VQFR's calculate_cos_dist.py protocol"
        )
        return BatchMetric(
            "deg",
            f"Deg.: angle (degrees) between identity embeddings of restored and GT; "
            f"embedder: {embed.name} ({path}){crop}",
            lambda r, g, c, embed=embed: metrics_lib.angle_degrees(embed(r), embed(g)),
        )
    if choice in ("auto", "dlib"):
        try:
            dlib_face = _dlib()
        except Skip as e:
            reasons.append(str(e))
        else:
            desc = dlib_face.DlibFaceDescriptor()

            def fn(r, g, cache):
                boxes = _gt_boxes(dlib_face, g, cache)
                return metrics_lib.angle_degrees(desc(r, boxes), desc(g, boxes))

            return BatchMetric(
                "deg",
                f"Deg.: angle (degrees) between identity embeddings of restored and GT; "
                f"embedder: {desc.name}, on the face box detected in the GT (not the papers' "
                "ArcFace ResNet-18, so not comparable digit for digit)",
                fn,
            )
    raise Skip("; ".join(reasons) or "no identity embedder available")


def _lmd(opts: Options) -> BatchMetric:
    dlib_face = _dlib()
    marks = dlib_face.DlibLandmarks()

    def fn(r, g, cache):
        boxes = _gt_boxes(dlib_face, g, cache)
        return dlib_face.landmark_distance(marks(r, boxes), marks(g, boxes), g.shape[1])

    return BatchMetric(
        "lmd",
        f"LMD: mean distance of dlib's 68 landmarks ({marks.name}) between restored and GT, in "
        "pixels of a 512-px face, on the face box detected in the GT; the papers use an AWing "
        "(WFLW, 98-point) network, so numbers are comparable in kind, not digit for digit",
        fn,
    )


_BUILDERS: dict[str, Callable[[Options], BatchMetric]] = {
    "lpips": _lpips,
    "dists": _dists,
    "niqe": _niqe,
    "deg": _deg,
    "lmd": _lmd,
}


def build_metrics(
    names: Sequence[str], opts: Options, *, has_gt: bool
) -> tuple[dict[str, BatchMetric], dict[str, str]]:
    """Per-image metrics ready to run and ``{name: reason}`` for the skipped ones (FID excluded)."""
    ready, skipped = {}, {}
    full_ref = None
    for name in names:
        if name == "fid":
            continue
        try:
            if name not in METRICS:
                raise Skip(f"unknown metric (expected some of {','.join(METRICS)})")
            if name in ("psnr", "ssim", "lpips", "dists", "deg", "lmd") and not has_gt:
                raise Skip("needs --gt (a full-reference metric)")
            if name in ("psnr", "ssim"):
                full_ref = full_ref or _full_reference(opts)
                ready[name] = full_ref[name]
            else:
                ready[name] = _BUILDERS[name](opts)
        except Skip as e:
            skipped[name] = str(e)
    return ready, skipped


# ----------------------------------------------------------------------------- FID


@dataclasses.dataclass
class FidReference:
    mu: np.ndarray
    sigma: np.ndarray
    description: str


def build_fid(opts: Options, gt_folder: str | None):
    """``(extractor, weights_id, reference)`` for FID, or raises :class:`Skip`."""
    from artfr_jax.evaluation import fid, inception

    path = _weights_file(opts, inception.CONVERTED_FILE, inception.convert_command())
    extractor = fid.InceptionExtractor(
        inception.load_inception_params(path), batch_size=opts.batch_size
    )
    weights_id = f"{os.path.abspath(path)}:{os.path.getmtime(path)}"
    ref = opts.fid_ref
    if ref and os.path.isfile(ref):
        mu, sigma, _ = fid.load_statistics(ref)
        reference = FidReference(mu, sigma, f"statistics file {ref}")
    elif ref or gt_folder:
        folder = ref or gt_folder
        if not os.path.isdir(folder):
            raise Skip(f"--fid_ref {folder!r} is neither a statistics .npz nor a folder")
        mu, sigma, info = fid.folder_statistics(
            folder,
            extractor,
            cache_dir=opts.fid_cache_dir,
            weights_id=weights_id,
            progress=opts.progress,
        )
        kind = (
            "reference folder (e.g. all of FFHQ at 512, as VQFR/GFPGAN)"
            if ref
            else ("the test set's GT (--gt)")
        )
        reference = FidReference(mu, sigma, f"{kind} {folder}, {info['num_images']} images")
    else:
        raise Skip("needs a reference: --fid_ref=STATS.npz|DIR, or --gt")
    return extractor, weights_id, reference


def folder_fid(folder: str, fid_setup, opts: Options) -> tuple[float, int]:
    from artfr_jax.evaluation import fid

    extractor, weights_id, reference = fid_setup
    mu, sigma, info = fid.folder_statistics(
        folder,
        extractor,
        cache_dir=opts.fid_cache_dir,
        weights_id=weights_id,
        progress=opts.progress,
    )
    return float(fid.frechet_distance(mu, sigma, reference.mu, reference.sigma)), info["num_images"]


# ----------------------------------------------------------------------------- folders


@dataclasses.dataclass
class FolderResult:
    name: str
    restored: str
    gt: str | None
    pairing: pairs_lib.Pairing
    per_image: dict[str, dict[str, float]]
    failed: dict[str, str]  # file -> reason
    values: dict[str, float]
    notes: list[str]


def _read_pair(pair):
    from artfr_jax.restore import read_image

    r, g = pair
    ri = read_image(r)
    gi = read_image(g) if g else None
    if gi is not None and ri.shape != gi.shape:
        raise ValueError(
            f"{r}: restored image is {ri.shape[1]}x{ri.shape[0]} but its GT {g} is "
            f"{gi.shape[1]}x{gi.shape[0]}"
        )
    return ri, gi


def evaluate_folder(
    name: str,
    restored: str,
    gt: str | None,
    batch_metrics: dict[str, BatchMetric],
    opts: Options,
    *,
    fid_setup=None,
    log: Callable[[str], None] = print,
) -> FolderResult:
    """Runs every ready metric over one restored folder; unreadable pairs are reported, skipped."""
    r_files, _ = pairs_lib.list_image_files(restored, "--restored")
    g_files = pairs_lib.list_image_files(gt, "--gt")[0] if gt else None
    pairing = pairs_lib.pair_by_stem(r_files, g_files)
    per_image: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    undetected = 0
    unscored: dict[str, str] = {}  # metric -> first reason an image was not scored
    batch: list[tuple[str, np.ndarray, np.ndarray | None]] = []

    def flush():
        nonlocal undetected
        if not batch:
            return
        r = np.stack([b[1] for b in batch])
        g = np.stack([b[2] for b in batch]) if batch[0][2] is not None else None
        cache: dict = {}
        for m in batch_metrics.values():
            vals = m.fn(r, g, cache)
            for (s, _, _), v in zip(batch, vals, strict=True):
                per_image[s][m.name] = float(v)
        undetected += cache.get("undetected", 0)
        for k, why in cache.get("unscored", {}).items():
            unscored.setdefault(k, why)
        batch.clear()

    todo = pairing.pairs
    bar = tqdm(total=len(todo), desc=name, unit="img", disable=not opts.progress)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for pair, future in files_lib.read_ahead(pool, _read_pair, todo, 2 * opts.batch_size):
            try:
                ri, gi = future.result()
            except ValueError as e:
                failed[pair[0]] = str(e)
                log(str(e))
                bar.update(1)
                continue
            if batch and (batch[0][1].shape != ri.shape or len(batch) == opts.batch_size):
                flush()
            s = pairs_lib.stem(pair[0])
            per_image[s] = {}
            batch.append((s, ri, gi))
            bar.update(1)
        flush()
    bar.close()

    values, notes = {}, list(pairing.problems())
    for m in batch_metrics.values():
        vals = np.array([v[m.name] for v in per_image.values()], np.float64)
        ok = vals[~np.isnan(vals)]  # NaN: not scored; +inf (PSNR of identical images) counts
        if ok.size:
            values[m.name] = float(np.mean(ok))
        if ok.size < vals.size:
            why = f" ({unscored[m.name]})" if m.name in unscored else ""
            notes.append(f"{m.name}: {vals.size - ok.size} image(s) could not be scored{why}")
    if undetected:
        notes.append(
            f"dlib found no face in {undetected} GT image(s); the aligned-crop box was used"
        )
    if failed:
        notes.append(f"{len(failed)} unreadable or mismatched file(s) left out")
    if "deg" in values:
        angles = np.array([v["deg"] for v in per_image.values() if "deg" in v])
        near = int(np.sum(angles < 1.0))
        if near:  # VQFR's calculate_cos_dist.py leaves these out of its mean
            kept = angles[angles >= 1.0]
            mean = f"{kept.mean():.2f}" if kept.size else "undefined"
            notes.append(
                f"deg: {near} pair(s) under 1 degree; VQFR's script leaves them out: {mean}"
            )
    if fid_setup is not None:
        try:
            values["fid"], n = folder_fid(restored, fid_setup, opts)
            notes.append(f"fid: {n} restored images against {fid_setup[2].description}")
        except ValueError as e:
            notes.append(f"fid: not computed ({e})")
    return FolderResult(name, restored, gt, pairing, per_image, failed, values, notes)
