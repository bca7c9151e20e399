"""Random-access HQ image sources: image folder, ArrayRecord shards, TFDS and synthetic faces.

Every source has ``__len__`` and ``__getitem__(i) -> RGB uint8 [S, S, 3]`` (grain's
``RandomAccessDataSource`` protocol), already centre-cropped and resized to the image size, so the
pipeline only shuffles indices and degrades.

Unreadable records are not found up front (that would read all 70k FFHQ files at start-up);
instead ``__getitem__`` logs the path and reason once and substitutes the next readable record, so
one bad file costs a warning, not a training run. A long run of bad records is an error.

ArrayRecord shards (written by ``python -m artfr_jax.data.pack``): ``PREFIX.index.json`` lists the
shards ``PREFIX.array_record-00000-of-0000N`` (paths relative to the index), written with
``group_size:1`` so any record is one seek. A record is one encoded image and nothing else: PNG or
JPEG bytes as ``cv2.imencode`` writes them (or the original file's bytes when packed with
``--size=0``), in the sorted order of the packed folder; anything ``cv2.imdecode`` reads works.
"""

from __future__ import annotations

import bisect
import glob
import json
import logging
import os
from collections.abc import Sequence

import cv2
import numpy as np

from artfr_jax.data import synthetic

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
_log = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _to_rgb_uint8(img: np.ndarray, where: str, bgr: bool) -> np.ndarray:
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        img = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ValueError(f"{where}: unsupported pixel type {img.dtype} (expected 8 or 16 bit)")
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4) or min(img.shape[:2]) < 1:
        raise ValueError(f"{where}: unsupported image shape {img.shape}")
    c = img.shape[2]
    if c in (1, 2):  # gray (+ alpha)
        return np.ascontiguousarray(np.repeat(img[..., :1], 3, axis=2))
    img = img[..., :3]  # alpha is dropped: faces are opaque
    return np.ascontiguousarray(img[..., ::-1] if bgr else img)


def decode_image(data, where: str) -> np.ndarray:
    """Encoded png/jpg/jpeg/webp bytes (8/16-bit, gray, RGB, RGBA) -> RGB uint8 ``[H, W, 3]``.

    Raises ``ValueError("<where>: <reason>")`` on empty or undecodable bytes.
    """
    buf = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else data
    if buf.size == 0:
        raise ValueError(f"{where}: empty file")
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{where}: not a decodable image (png/jpg/jpeg/webp)")
    return _to_rgb_uint8(img, where, bgr=True)


def load_image(path) -> np.ndarray:
    """Reads png/jpg/jpeg/webp (8/16-bit, gray, RGB, RGBA) as RGB uint8 ``[H, W, 3]``.

    Raises ``ValueError("<path>: <reason>")`` on a missing, empty or undecodable file.
    """
    path = os.fspath(path)
    try:
        data = np.fromfile(path, np.uint8)  # fromfile + imdecode also handles non-ASCII paths
    except OSError as e:
        raise ValueError(f"{path}: cannot read file ({e.strerror or e})") from None
    return decode_image(data, path)


def center_crop_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crops to a square and resizes to ``size`` (area to shrink, cubic to grow)."""
    h, w = img.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    img = img[y0 : y0 + s, x0 : x0 + s]
    if s != size:
        interp = cv2.INTER_AREA if s > size else cv2.INTER_CUBIC
        img = cv2.resize(img, (size, size), interpolation=interp)
    return np.ascontiguousarray(img)


def list_images(root: str, field: str = "data.folder") -> list[str]:
    """Sorted image paths under ``root`` (recursive); one-line error if none."""
    if not root:
        raise ValueError(f"{field} is empty; set it to a directory of images")
    if not os.path.isdir(root):
        raise ValueError(f"{field} {root!r} does not exist or is not a directory")
    out = []
    for d, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        out.extend(os.path.join(d, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTS))
    if not out:
        raise ValueError(f"{field} {root!r} contains no images (png/jpg/jpeg/webp)")
    return out


class _RobustSource:
    """Substitutes the next readable record for an unreadable one (logged once per record)."""

    max_tries: int = 16

    def __init__(self):
        self._bad: set[int] = set()

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        last = ""
        for k in range(self.max_tries):
            j = (int(i) + k) % n
            try:
                return self._load(j)
            except (ValueError, OSError) as e:
                last = str(e)
                if j not in self._bad:
                    self._bad.add(j)
                    _log.warning("skipping unreadable record %d: %s", j, last)
        raise RuntimeError(
            f"{self.max_tries} consecutive unreadable records from index {i} in {self}: {last}"
        )


class FolderSource(_RobustSource):
    """Images from a list of files (see :func:`list_images`), cropped/resized to ``size``."""

    def __init__(self, paths: Sequence[str], size: int, name: str = "folder"):
        super().__init__()
        if not paths:
            raise ValueError(f"{name}: no images")
        self.paths = list(paths)
        self.size = size
        self.name = name

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, i: int) -> np.ndarray:
        return center_crop_resize(load_image(self.paths[i]), self.size)

    def __repr__(self) -> str:
        return f"FolderSource({self.name!r}, n={len(self)})"


class TfdsSource(_RobustSource):
    """A prepared TFDS dataset (ArrayRecord format) read with ``tfds.data_source``.

    ``start``/``stop`` select a contiguous index range (used to hold out an eval split).
    """

    def __init__(
        self,
        name: str,
        split: str,
        size: int,
        *,
        data_dir: str = "",
        image_key: str = "image",
        start: int = 0,
        stop: int | None = None,
    ):
        super().__init__()
        if not name:
            raise ValueError("data.tfds_name is empty; set it to a prepared TFDS dataset name")
        self.name, self.split, self.data_dir, self.image_key = name, split, data_dir, image_key
        self.size = size
        self._ds = self._open()
        n = len(self._ds)
        self.start, self.stop = start, n if stop is None else min(stop, n)
        if self.stop <= self.start:
            raise ValueError(
                f"data.tfds_name {name!r} split {split!r} has {n} records; range "
                f"[{self.start}, {self.stop}) is empty"
            )
        first = self._ds[self.start]
        if image_key not in first:
            raise ValueError(
                f"data.tfds_image_key {image_key!r} not in dataset {name!r} features "
                f"{sorted(first)}"
            )

    def _open(self):
        import tensorflow_datasets as tfds  # heavy import, only when used

        try:
            return tfds.data_source(
                self.name, split=self.split, data_dir=self.data_dir or None, download=False
            )
        except Exception as e:  # noqa: BLE001 - tfds raises many types; report them in one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"data.tfds_name {self.name!r} split {self.split!r} (data_dir "
                f"{self.data_dir or '~/tensorflow_datasets'!r}): cannot open as a prepared "
                f"ArrayRecord data source: {reason}"
            ) from None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_ds"] = None  # reopened in the worker process
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._ds = self._open()

    def __len__(self) -> int:
        return self.stop - self.start

    def _load(self, i: int) -> np.ndarray:
        rec = self._ds[self.start + i]
        img = np.asarray(rec[self.image_key])
        where = f"tfds {self.name}/{self.split}[{self.start + i}]"
        return center_crop_resize(_to_rgb_uint8(img, where, bgr=False), self.size)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r}, n={len(self)})"


# --- ArrayRecord shards ---------------------------------------------------------------------------

INDEX_SUFFIX = ".index.json"
SHARD_INFIX = ".array_record-"
INDEX_FORMAT = "artfr_jax.encoded_images.v1"
# One record per group: any record is one seek (grain warns about anything else).
WRITER_OPTIONS = "group_size:1,uncompressed"  # PNG/JPEG bytes do not compress further


def shard_name(prefix: str, shard: int, num_shards: int) -> str:
    """``PREFIX.array_record-00003-of-00016`` (the TFDS naming)."""
    return f"{prefix}{SHARD_INFIX}{shard:05d}-of-{num_shards:05d}"


def index_path(prefix: str) -> str:
    return prefix + INDEX_SUFFIX


def _read_index(path: str, field: str, spec: str) -> list[tuple[str, int]]:
    """``(shard path, record count)`` pairs listed in a pack index; one-line errors."""
    try:
        with open(path) as f:
            index = json.load(f)
        shards = [(str(s["path"]), int(s["count"])) for s in index["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{field} {spec!r}: {path} is not a readable pack index ({e})") from None
    base = os.path.dirname(os.path.abspath(path))
    out = [(os.path.join(base, p), n) for p, n in shards]
    for p, _ in out:
        if not os.path.isfile(p):
            raise ValueError(f"{field} {spec!r}: shard {p} listed in {path} is missing")
    return out


def _count_records(path: str, field: str, spec: str) -> int:
    """Opens one shard to count its records; a missing or non-ArrayRecord file is an error."""
    from array_record.python import array_record_module  # noqa: PLC0415 - only when used

    if not os.path.isfile(path):
        raise ValueError(f"{field} {spec!r}: shard {path} is missing")
    reader = array_record_module.ArrayRecordReader(path)
    if reader.ok():
        count = int(reader.num_records())
        reader.close()
        return count
    try:  # a failed reader only says why when asked to read (and cannot be closed)
        reader.read([0])
        reason = "unreadable"
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0]
    raise ValueError(f"{field} {spec!r}: {path} is not an ArrayRecord file ({reason})")


def array_record_shards(spec: str, field: str = "data.array_record") -> list[tuple[str, int]]:
    """``(path, record count)`` of the shards that ``spec`` names, in record order.

    ``spec`` is the PREFIX given to ``artfr_jax.data.pack`` (its ``PREFIX.index.json`` lists the
    shards), the index file itself, or comma-separated shard paths / globs (sorted per glob).
    Every shard is opened once here, so a missing, truncated or foreign file fails at start-up.
    """
    if not spec:
        raise ValueError(
            f"{field} is empty; set it to the PREFIX written by `python -m artfr_jax.data.pack`"
        )
    index = spec if spec.endswith(INDEX_SUFFIX) else index_path(spec)
    if os.path.isfile(index):
        listed = _read_index(index, field, spec)
        for path, n in listed:
            found = _count_records(path, field, spec)
            if found != n:
                raise ValueError(
                    f"{field} {spec!r}: shard {path} has {found} records, {index} says {n}"
                )
        return listed
    paths = []
    for part in (p.strip() for p in spec.split(",")):
        matched = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matched or not os.path.exists(matched[0]):
            raise ValueError(
                f"{field} {spec!r}: no pack index {index} and no shard file matches {part!r}"
            )
        paths.extend(matched)
    return [(p, _count_records(p, field, spec)) for p in paths]


class ArrayRecordSource(_RobustSource):
    """Encoded images in ArrayRecord shards (see the module docstring), cropped/resized to ``size``.

    ``start``/``stop`` select a contiguous record range (used to hold out an eval split).
    """

    def __init__(
        self,
        spec: str,
        size: int,
        *,
        start: int = 0,
        stop: int | None = None,
        field: str = "data.array_record",
    ):
        super().__init__()
        import grain  # noqa: PLC0415 - reading one image does not load grain

        self.spec, self.size, self.field = spec, int(size), field
        shards = array_record_shards(spec, field)
        self.shards = [p for p, _ in shards]
        self._ends = np.cumsum([n for _, n in shards]).tolist()
        n = self._ends[-1]
        self.start, self.stop = int(start), n if stop is None else min(int(stop), n)
        if self.stop <= self.start:
            raise ValueError(
                f"{field} {spec!r} has {n} records; range [{self.start}, {self.stop}) is empty"
            )
        # 'path[0:n]' gives the record counts up front, so the source does not reopen every shard.
        self._ds = grain.sources.ArrayRecordDataSource([f"{p}[0:{c}]" for p, c in shards if c > 0])

    def __len__(self) -> int:
        return self.stop - self.start

    def where(self, i: int) -> str:
        """``<shard>[<position>]`` of record ``i`` of this source, for messages."""
        key = self.start + int(i)
        shard = bisect.bisect_right(self._ends, key)
        first = self._ends[shard - 1] if shard else 0
        return f"{self.shards[shard]}[{key - first}]"

    def _load(self, i: int) -> np.ndarray:
        try:
            data = self._ds[self.start + i]
        except (RuntimeError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{self.where(i)}: cannot read record ({reason})") from None
        return center_crop_resize(decode_image(data, self.where(i)), self.size)

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.spec!r}, n={len(self)})"


class SyntheticSource:
    """Procedural faces ``offset + i`` (:func:`synthetic.render_face`); ``num`` is virtual."""

    def __init__(self, num: int, size: int, *, seed: int = 0, offset: int = 0):
        if num <= 0:
            raise ValueError(f"data.synthetic_num_train/eval must be > 0, got {num}")
        self.num, self.size, self.seed, self.offset = int(num), int(size), int(seed), int(offset)

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> np.ndarray:
        return synthetic.render_face(self.offset + int(i) % self.num, self.size, seed=self.seed)

    def __repr__(self) -> str:
        return f"SyntheticSource(n={self.num}, offset={self.offset})"
