"""grain input pipeline: HQ source -> shard -> shuffle -> repeat -> degrade (Eq. 8) -> batch.

The train iterator is a ``grain.DatasetIterator``; its ``get_state()``/``set_state()`` let it be
saved next to the model with ``grain.checkpoint.CheckpointSave`` in an orbax ``Composite``.
Determinism: the record order comes from grain's seeded shuffle (reseeded every epoch), and each
record's degradation from the ``np.random.Generator`` that ``random_map`` derives from the
pipeline seed and the record's global index, so a seed fixes every batch regardless of workers.
"""

from __future__ import annotations

import logging
import os

import cv2
import grain
import ml_collections
import numpy as np
from absl import flags

from artfr_jax.data import sources
from artfr_jax.data.degradations import degradation_preset, random_degrade

_log = logging.getLogger(__name__)

SOURCES = ("synthetic", "folder", "tfds")
# Held-out synthetic faces start here, far past any training index, so they never overlap.
SYNTHETIC_EVAL_OFFSET = 1_000_000_000


def default_config(image_size: int = 512, preset: str = "artfr") -> ml_collections.ConfigDict:
    """The ``config.data`` section (synthetic faces + ``preset`` degradations by default)."""
    c = ml_collections.ConfigDict()
    c.source = "synthetic"  # synthetic | folder | tfds
    c.folder = ""  # root directory (recursive) for source='folder'
    # Validation images: a folder of HQ faces (degraded here with a fixed seed), or a split made by
    # `python -m artfr_jax.evaluate --make_testset` (its gt/ and lq/ pairs are used as they are).
    # '' = hold out the last `eval_holdout` images of the train source.
    c.eval_folder = ""
    c.eval_holdout = 500  # held-out count for folder/tfds when no separate eval split is given
    c.tfds_name = ""
    c.tfds_split = "train"
    c.tfds_eval_split = ""  # '' = hold out from tfds_split
    c.tfds_data_dir = ""
    c.tfds_image_key = "image"
    c.synthetic_num_train = 70_000  # virtual dataset size (one epoch), like FFHQ
    c.synthetic_seed = 0  # changes every face
    c.image_size = image_size
    c.num_workers = 2  # grain worker processes; 0 = in-process
    c.worker_buffer_size = 2  # batches buffered per worker
    c.read_threads = 1  # threads per worker (cv2 releases the GIL)
    c.read_buffer_size = 16  # records prefetched per worker
    c.shuffle = True
    c.seed_offset = 0  # added to the training seed for the data pipeline
    c.degradation = degradation_preset(preset)
    return c


def _check_source(cfg) -> str:
    if cfg.source not in SOURCES:
        raise ValueError(f"unknown data.source {cfg.source!r} (expected {'|'.join(SOURCES)})")
    if int(cfg.image_size) < 16:
        raise ValueError(f"data.image_size must be >= 16, got {cfg.image_size}")
    return cfg.source


def _held_out(n: int, holdout: int, field: str) -> int:
    """Number of records to keep for training when the last `holdout` are held out."""
    if holdout < 0:
        raise ValueError(f"data.eval_holdout must be >= 0, got {holdout}")
    if holdout and n <= holdout:
        raise ValueError(
            f"{field} has {n} images, need more than data.eval_holdout={holdout} to hold out an "
            f"eval split; set a separate eval split or lower data.eval_holdout"
        )
    return n - holdout


def train_source(cfg: ml_collections.ConfigDict):
    """The random-access HQ source for training (held-out records excluded)."""
    size = int(cfg.image_size)
    kind = _check_source(cfg)
    if kind == "synthetic":
        return sources.SyntheticSource(int(cfg.synthetic_num_train), size, seed=cfg.synthetic_seed)
    if kind == "folder":
        paths = sources.list_images(cfg.folder, "data.folder")
        if not cfg.eval_folder:
            paths = paths[
                : _held_out(len(paths), int(cfg.eval_holdout), f"data.folder {cfg.folder!r}")
            ]
        return sources.FolderSource(paths, size, name=cfg.folder)
    src = sources.TfdsSource(
        cfg.tfds_name,
        cfg.tfds_split,
        size,
        data_dir=cfg.tfds_data_dir,
        image_key=cfg.tfds_image_key,
    )
    if not cfg.tfds_eval_split:
        field = f"data.tfds_name {cfg.tfds_name!r} split {cfg.tfds_split!r}"
        src.stop = src.start + _held_out(len(src), int(cfg.eval_holdout), field)
    return src


def eval_source(cfg: ml_collections.ConfigDict):
    """The held-out HQ source: eval folder / eval split, or the train source's held-out tail."""
    size = int(cfg.image_size)
    kind = _check_source(cfg)
    if cfg.eval_folder:  # a validation folder works with any training source
        return sources.FolderSource(
            sources.list_images(cfg.eval_folder, "data.eval_folder"), size, name=cfg.eval_folder
        )
    if kind == "synthetic":
        return sources.SyntheticSource(
            10**8, size, seed=cfg.synthetic_seed, offset=SYNTHETIC_EVAL_OFFSET
        )
    if kind == "folder":
        paths = sources.list_images(cfg.folder, "data.folder")
        keep = _held_out(len(paths), int(cfg.eval_holdout), f"data.folder {cfg.folder!r}")
        if keep == len(paths):
            raise ValueError("data.eval_folder is empty and data.eval_holdout is 0: no eval images")
        return sources.FolderSource(paths[keep:], size, name=f"{cfg.folder} (held out)")
    split = cfg.tfds_eval_split or cfg.tfds_split
    src = sources.TfdsSource(
        cfg.tfds_name, split, size, data_dir=cfg.tfds_data_dir, image_key=cfg.tfds_image_key
    )
    if not cfg.tfds_eval_split:
        if int(cfg.eval_holdout) == 0:
            raise ValueError("data.tfds_eval_split is empty and data.eval_holdout is 0: no eval")
        field = f"data.tfds_name {cfg.tfds_name!r} split {split!r}"
        src.start = src.start + _held_out(len(src), int(cfg.eval_holdout), field)
    return src


class DegradePair(grain.transforms.RandomMap):
    """HQ image -> ``{'hq', 'lq'}`` with Eq. 8 degradations drawn from grain's per-record rng."""

    def __init__(self, degradation: ml_collections.ConfigDict):
        # A private unlocked copy: picklable for workers, independent of the caller's config.
        self.cfg = ml_collections.ConfigDict(degradation.to_dict())

    def random_map(self, hq: np.ndarray, rng: np.random.Generator) -> dict:
        return {"hq": hq, "lq": random_degrade(hq, self.cfg, rng)}


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    cv2.setNumThreads(1)  # one process per core; cv2's own threads would oversubscribe


def make_train_dataset(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """The infinite, sharded, shuffled, degraded and batched training ``IterDataset``."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}"
        )
    local = global_batch_size // process_count
    src = train_source(data_config)
    if len(src) < process_count:
        raise ValueError(f"{src} has fewer records than process_count={process_count}")
    ds = grain.MapDataset.source(src)
    ds = ds[process_index::process_count]
    ds = ds.seed(int(seed) + int(data_config.seed_offset))
    if data_config.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(None)  # reseeds shuffle and degradations every epoch
    ds = ds.random_map(DegradePair(data_config.degradation))
    its = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=int(data_config.read_threads),
            prefetch_buffer_size=int(data_config.read_buffer_size),
        )
    )
    its = its.batch(local, drop_remainder=True)
    if int(data_config.num_workers) > 0:
        # grain's worker start-up reads an absl flag; outside absl.app (tests, notebooks,
        # benchmarks) flags are unparsed and reading one raises. Defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        its = its.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=int(data_config.num_workers),
                per_worker_buffer_size=int(data_config.worker_buffer_size),
            ),
            worker_init_fn=_worker_init,
        )
    return its


def make_train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Checkpointable iterator of ``{'hq', 'lq'}`` uint8 ``[B_local, S, S, 3]`` batches.

    ``B_local = global_batch_size // process_count``; pass ``jax.process_index()`` and
    ``jax.process_count()`` on multi-host runs.
    """
    ds = make_train_dataset(
        data_config,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    return iter(ds)


def make_eval_batches(
    data_config: ml_collections.ConfigDict, *, num_images: int, batch_size: int, seed: int
) -> list[dict]:
    """Deterministic held-out ``{'hq', 'lq'}`` uint8 batches; the last one may be smaller."""
    if num_images <= 0 or batch_size <= 0:
        raise ValueError(f"num_images={num_images} and batch_size={batch_size} must be > 0")
    if data_config.eval_folder and is_test_split(data_config.eval_folder):
        hq, lq = _read_test_split(data_config.eval_folder, int(data_config.image_size), num_images)
        return [
            {"hq": np.stack(hq[s : s + batch_size]), "lq": np.stack(lq[s : s + batch_size])}
            for s in range(0, len(hq), batch_size)
        ]
    src = eval_source(data_config)
    if num_images > len(src):
        _log.warning(
            "eval split %s has %d images; using all of them, not %d", src, len(src), num_images
        )
        num_images = len(src)
    deg = ml_collections.ConfigDict(data_config.degradation.to_dict())
    hq, lq = [], []
    for i in range(num_images):
        img = src[i]
        hq.append(img)
        lq.append(random_degrade(img, deg, np.random.default_rng([int(seed), i, 0xE7A1])))
    out = []
    for s in range(0, num_images, batch_size):
        out.append({"hq": np.stack(hq[s : s + batch_size]), "lq": np.stack(lq[s : s + batch_size])})
    return out


def is_test_split(folder: str) -> bool:
    """A folder with ``gt/`` and ``lq/`` subfolders (as written by ``evaluate --make_testset``)."""
    return os.path.isdir(os.path.join(folder, "gt")) and os.path.isdir(os.path.join(folder, "lq"))


def _read_test_split(folder: str, size: int, num_images: int) -> tuple[list, list]:
    """The first ``num_images`` (gt, lq) pairs of a test split, paired by stem, at ``size``."""
    gts = sources.list_images(os.path.join(folder, "gt"), "data.eval_folder gt/")
    lqs = {
        os.path.splitext(os.path.relpath(p, os.path.join(folder, "lq")))[0]: p
        for p in sources.list_images(os.path.join(folder, "lq"), "data.eval_folder lq/")
    }
    if num_images > len(gts):
        _log.warning("eval split %s has %d pairs; using all of them", folder, len(gts))
    hq, lq = [], []
    for path in gts[:num_images]:
        key = os.path.splitext(os.path.relpath(path, os.path.join(folder, "gt")))[0]
        if key not in lqs:
            raise ValueError(f"data.eval_folder {folder!r}: {path} has no lq/{key}.* partner")
        hq.append(sources.center_crop_resize(sources.load_image(path), size))
        lq.append(sources.center_crop_resize(sources.load_image(lqs[key]), size))
    return hq, lq
