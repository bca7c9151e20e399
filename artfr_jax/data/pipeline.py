"""grain input pipeline: HQ source -> shard -> shuffle -> repeat -> degrade (Eq. 8) -> batch.

The train iterator is a ``grain.DatasetIterator``; its ``get_state()``/``set_state()`` let it be
saved next to the model with ``grain.checkpoint.CheckpointSave`` in an orbax ``Composite``.
Determinism: the record order comes from grain's seeded shuffle (reseeded every epoch), and each
record's degradation from the ``np.random.Generator`` that ``random_map`` derives from the
pipeline seed and the record's global index. Batches are formed before the records are split
over worker processes (worker ``w`` of ``N`` makes batches ``w, w + N, ...``), so a seed fixes
every batch whatever ``data.num_workers`` is, and the saved state is just the position in that
stream: a run resumes on a host with another core count (another auto worker count) and
continues with the same batches.
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

SOURCES = ("synthetic", "folder", "tfds", "array_record")
AUTO_WORKERS = -1  # data.num_workers: resolved per host by resolve_num_workers
MAX_AUTO_WORKERS = 32  # each worker holds its own buffered batches; set more explicitly
# Held-out synthetic faces start here, far past any training index, so they never overlap.
SYNTHETIC_EVAL_OFFSET = 1_000_000_000


def default_config(image_size: int = 512, preset: str = "artfr") -> ml_collections.ConfigDict:
    """The ``config.data`` section (synthetic faces + ``preset`` degradations by default)."""
    c = ml_collections.ConfigDict()
    c.source = "synthetic"  # synthetic | folder | tfds | array_record
    c.folder = ""  # root directory (recursive) for source='folder'
    # source='array_record': the PREFIX written by `python -m artfr_jax.data.pack` (reads
    # PREFIX.index.json), or comma-separated shard paths / globs.
    c.array_record = ""
    # Validation images: a folder of HQ faces (degraded here with a fixed seed), or a split made by
    # `python -m artfr_jax.evaluate --make_testset` (its gt/ and lq/ pairs are used as they are).
    # '' = hold out the last `eval_holdout` images of the train source.
    c.eval_folder = ""
    c.eval_holdout = 500  # held-out count for folder/tfds/array_record without an eval split
    c.tfds_name = ""
    c.tfds_split = "train"
    c.tfds_eval_split = ""  # '' = hold out from tfds_split
    c.tfds_data_dir = ""
    c.tfds_image_key = "image"
    c.synthetic_num_train = 70_000  # virtual dataset size (one epoch), like FFHQ
    c.synthetic_seed = 0  # changes every face
    c.image_size = image_size
    # grain worker processes; 0 = in-process; -1 = auto, per host (resolve_num_workers). The
    # batches and the checkpointed iterator state do not depend on it.
    c.num_workers = AUTO_WORKERS
    c.worker_buffer_size = 2  # batches buffered per worker
    c.read_threads = 1  # batches made concurrently per worker (cv2 releases the GIL)
    c.read_buffer_size = 16  # records prefetched per worker (rounded up to whole batches)
    c.shuffle = True
    c.seed_offset = 0  # added to the training seed for the data pipeline
    c.degradation = degradation_preset(preset)
    return c


available_cpus = sources.available_cpus


def resolve_num_workers(value: int, cpus: int | None = None) -> int:
    """``data.num_workers`` -> worker processes on this host.

    ``>= 0`` is taken as given. ``-1`` (auto) leaves two CPUs to the training process (the Python
    loop and the JAX runtime's threads) and gives the rest to workers: ``cpus - 2``, at least 1
    (on a 2-CPU host one worker still overlaps data with training), at most
    ``MAX_AUTO_WORKERS``, and 0 on a single CPU, where a worker process only adds copies.
    """
    value = int(value)
    if value >= 0:
        return value
    if value != AUTO_WORKERS:
        raise ValueError(f"data.num_workers must be >= 0, or -1 for auto, got {value}")
    cpus = available_cpus() if cpus is None else int(cpus)
    if cpus <= 1:
        return 0
    return min(max(1, cpus - 2), MAX_AUTO_WORKERS)


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
    if kind == "array_record":
        src = sources.ArrayRecordSource(cfg.array_record, size)
        if not cfg.eval_folder:
            field = f"data.array_record {cfg.array_record!r}"
            src.stop = src.start + _held_out(len(src), int(cfg.eval_holdout), field)
        return src
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
    if kind == "array_record":
        if int(cfg.eval_holdout) == 0:
            raise ValueError("data.eval_folder is empty and data.eval_holdout is 0: no eval images")
        src = sources.ArrayRecordSource(cfg.array_record, size)
        field = f"data.array_record {cfg.array_record!r}"
        src.start = _held_out(len(src), int(cfg.eval_holdout), field)
        return src
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


class ProcessBlocks(grain.MapDataset):
    """One process's part of a global record stream dealt in blocks: block ``k`` (records
    ``[k*block, (k+1)*block)`` of ``parent``) goes to process ``k % count``."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, *, block: int, index: int, count: int):
        super().__init__(parent)
        self._block, self._index, self._count = int(block), int(index), int(count)

    def __len__(self) -> int:
        return len(self._parent) // self._count

    def _parent_index(self, i: int) -> int:
        k, offset = divmod(i, self._block)
        return (k * self._count + self._index) * self._block + offset

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        return self._parent[self._parent_index(i)]

    def __str__(self) -> str:
        return f"ProcessBlocks(block={self._block}, index={self._index}, count={self._count})"


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    cv2.setNumThreads(1)  # one process per core; cv2's own threads would oversubscribe


def _check_processes(global_batch_size: int, process_index: int, process_count: int) -> int:
    """The per-process batch size; one-line errors for a bad split."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}"
        )
    return global_batch_size // process_count


def make_record_dataset(
    data_config: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    block: int = 1,
) -> grain.MapDataset:
    """This process's infinite stream of degraded ``{'hq', 'lq'}`` records, as a ``MapDataset``.

    The global stream is shuffled (reseeded every epoch), repeated and degraded with a
    per-record rng of the record's global position; process ``process_index`` then takes blocks
    ``process_index, process_index + process_count, ...`` of ``block`` records
    (:class:`ProcessBlocks`). With ``block`` = the per-process batch, global batch ``t`` is the
    same examples in the same rows for any number of processes.
    """
    src = train_source(data_config)
    if len(src) < process_count:
        raise ValueError(f"{src} has fewer records than process_count={process_count}")
    ds = grain.MapDataset.source(src)
    ds = ds.seed(int(seed) + int(data_config.seed_offset))
    if data_config.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(None)  # reseeds shuffle and degradations every epoch
    ds = ds.random_map(DegradePair(data_config.degradation))
    if process_count > 1:
        ds = ProcessBlocks(ds, block=block, index=process_index, count=process_count)
    return ds


def batch_stream(
    records: grain.MapDataset,
    data_config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    start_record: int = 0,
) -> grain.IterDataset:
    """Batches of ``records[start_record:]``, made in ``data.num_workers`` worker processes.

    Batching happens on the ``MapDataset``, before grain splits the elements over workers, so
    batch ``k`` holds records ``start_record + k * batch_size ...`` with any number of workers.
    """
    batches = records[int(start_record) :].batch(batch_size, drop_remainder=True)
    threads = max(1, int(data_config.read_threads))
    its = batches.to_iter_dataset(
        grain.ReadOptions(
            num_threads=threads,
            prefetch_buffer_size=max(threads, -(-int(data_config.read_buffer_size) // batch_size)),
        )
    )
    workers = resolve_num_workers(data_config.num_workers)
    if workers > 0:
        # grain's worker start-up reads an absl flag; outside absl.app (tests, notebooks,
        # benchmarks) flags are unparsed and reading one raises. Defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        its = its.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=int(data_config.worker_buffer_size)
            ),
            worker_init_fn=_worker_init,
        )
    return its


def make_train_dataset(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """The infinite, sharded, shuffled, degraded and batched training ``IterDataset``."""
    local = _check_processes(global_batch_size, process_index, process_count)
    records = make_record_dataset(
        data_config,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        block=local,
    )
    return batch_stream(records, data_config, batch_size=local)


class TrainIterator(grain.DatasetIterator):
    """Training batches whose checkpointed state is a position, not grain's per-worker state.

    ``get_state()`` is ``{'next_record', 'batch_size', 'process_index', 'process_count',
    'num_workers'}``; ``set_state`` rebuilds the worker pipeline at ``next_record``. The worker
    count is recorded for information only: a state saved with 30 workers resumes with 2 (or a
    different batch size) and continues with the same records. Worker processes start with the
    first batch (or ``start_prefetch``), so restoring before that starts them once.
    """

    def __init__(
        self,
        records: grain.MapDataset,
        data_config: ml_collections.ConfigDict,
        *,
        batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        super().__init__()
        self._records = records
        # A private copy: later edits to the caller's config do not change a rebuilt pipeline.
        self._data_config = ml_collections.ConfigDict(data_config.to_dict())
        self.batch_size = int(batch_size)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.num_workers = resolve_num_workers(data_config.num_workers)
        self._next_record = 0
        self._it: grain.DatasetIterator | None = None

    def _stream(self) -> grain.DatasetIterator:
        if self._it is None:
            ds = batch_stream(
                self._records,
                self._data_config,
                batch_size=self.batch_size,
                start_record=self._next_record,
            )
            self._it = iter(ds)
        return self._it

    def __next__(self) -> dict:
        self._assert_not_closed()
        batch = next(self._stream())
        self._next_record += self.batch_size
        return batch

    def get_state(self) -> dict:
        return {
            "next_record": self._next_record,
            "batch_size": self.batch_size,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "num_workers": self.num_workers,
        }

    def set_state(self, state: dict) -> None:
        self._next_record = _saved_position(state, self.process_index, self.process_count)
        self._stop_workers()

    def start_prefetch(self) -> None:
        self._assert_not_closed()
        self._stream().start_prefetch()

    def _stop_workers(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None

    def close(self) -> None:
        self._stop_workers()
        self._closed = True

    def __str__(self) -> str:
        return (
            f"TrainIterator(next_record={self._next_record}, batch_size={self.batch_size}, "
            f"num_workers={self.num_workers})"
        )


def _saved_position(state: dict, process_index: int, process_count: int) -> int:
    """The next record of a saved state; one-line ``ValueError`` if it does not fit this run."""
    if not isinstance(state, dict):
        raise ValueError(f"data-iterator state is a {type(state).__name__}, expected a dict")
    if "next_record" not in state:
        return _legacy_position(state)
    saved = (int(state.get("process_index", 0)), int(state.get("process_count", 1)))
    if saved != (process_index, process_count):
        raise ValueError(
            f"the state was saved by process {saved[0]} of {saved[1]}, this is process "
            f"{process_index} of {process_count}: every process reads its own shard of the "
            "records, so resume with the process count the run started with"
        )
    return int(state["next_record"])


def _legacy_position(state: dict) -> int:
    """Records consumed according to grain's own state (checkpoints from before TrainIterator).

    In-process: ``{'next_index': r}``; with workers, one such entry per worker in
    ``iterators_in_use_states``; either way the sum counts the records handed out. Those runs
    grouped records into batches per worker, so the order after the resume differs slightly.
    """
    if "next_index" in state:
        return int(state["next_index"])
    per_worker = state.get("iterators_in_use_states")
    if isinstance(per_worker, list) and all(
        isinstance(w, dict) and "next_index" in w for w in per_worker
    ):
        return sum(int(w["next_index"]) for w in per_worker)
    raise ValueError(f"unrecognised data-iterator state with keys {sorted(state)}")


def make_train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> TrainIterator:
    """Checkpointable iterator of ``{'hq', 'lq'}`` uint8 ``[B_local, S, S, 3]`` batches.

    ``B_local = global_batch_size // process_count``; pass ``jax.process_index()`` and
    ``jax.process_count()`` on multi-host runs.
    """
    local = _check_processes(global_batch_size, process_index, process_count)
    records = make_record_dataset(
        data_config,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        block=local,
    )
    workers = resolve_num_workers(data_config.num_workers)
    if int(data_config.num_workers) == AUTO_WORKERS:
        _log.info("data.num_workers=-1: %d worker processes (%d CPUs)", workers, available_cpus())
    return TrainIterator(
        records,
        data_config,
        batch_size=local,
        process_index=process_index,
        process_count=process_count,
    )


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
