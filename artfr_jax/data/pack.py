"""Packs a folder of face images into ArrayRecord shards for ``data.source='array_record'``.

    python -m artfr_jax.data.pack --input=DIR --output=PREFIX [--num_shards=N] [--size=512] \\
        [--format=png|jpeg] [--jpeg_quality=95] [--threads=N] [--overwrite]

Writes ``PREFIX.array_record-00000-of-0000N`` ... and ``PREFIX.index.json`` (count, shards with their
record counts, size, format); train with ``config.data.source='array_record'`` and
``config.data.array_record=PREFIX``. The format is described in ``artfr_jax.data.sources``.

* Order: the input's images (png/jpg/jpeg/webp, recursive) sorted by path, as ``data.source='folder'``
  reads them; shard ``k`` holds a contiguous run, so record ``i`` is the ``i``-th readable image.
* ``--size=S`` (default 512, the training size) centre-crops to a square and resizes to ``S`` here,
  once, instead of at every read (FFHQ's 1024-px PNGs have 4x the pixels to decode).
  ``--size=0`` keeps every image as it is; an image already ``S`` x ``S`` in ``--format`` is
  copied byte for byte (no second JPEG compression).
* Unreadable files get one line each on stderr and are left out; the summary counts them.
* Never writes inside ``--input``; existing shards or index are kept unless ``--overwrite``.
  Shards are written under a temporary name and renamed when complete, the index last.

Exit status: 0 all packed, 1 some files were unreadable (the rest is packed), 2 usage error.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence

from absl import app, flags

from artfr_jax.data import sources
from artfr_jax.utils import cli as cli_lib
from artfr_jax.utils import files as files_lib

FORMATS = ("png", "jpeg")
_MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}


@dataclasses.dataclass(frozen=True)
class Options:
    """What to write: ``size`` 0 keeps the images as they are."""

    size: int = 512
    image_format: str = "png"
    jpeg_quality: int = 95


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = flag_values
    flags.DEFINE_string("input", None, "Folder of images (searched recursively).", flag_values=fv)
    flags.DEFINE_string(
        "output",
        None,
        "Shard prefix: writes PREFIX.array_record-* and PREFIX.index.json.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_shards", 0, "Shards to write (0: one per GiB of input).", lower_bound=0, flag_values=fv
    )
    flags.DEFINE_integer(
        "size", 512, "Crop+resize to SIZE x SIZE (0: keep as is).", lower_bound=0, flag_values=fv
    )
    flags.DEFINE_enum("format", "png", FORMATS, "Encoding of resized images.", flag_values=fv)
    flags.DEFINE_integer(
        "jpeg_quality",
        95,
        "JPEG quality for --format=jpeg.",
        lower_bound=1,
        upper_bound=100,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "threads",
        0,
        "Decode/encode threads (0: the CPUs available).",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_boolean("overwrite", False, "Replace existing shards and index.", flag_values=fv)
    flags.DEFINE_boolean("progress", True, "Show a progress bar.", flag_values=fv)


def _log(message: str) -> None:
    from tqdm import tqdm  # noqa: PLC0415

    tqdm.write(message, file=sys.stderr)  # above the progress bar, not through it


def encode_record(path: str, opts: Options) -> bytes:
    """The record for one image file; ``ValueError("<path>: <reason>")`` if it does not decode."""
    import cv2  # noqa: PLC0415 - keeps --help fast

    with open(path, "rb") as f:
        raw = f.read()
    img = sources.decode_image(raw, path)  # validates every file, kept or re-encoded
    if not opts.size:
        return raw
    same = img.shape[:2] == (opts.size, opts.size)
    if same and raw.startswith(_MAGIC[opts.image_format]):
        return raw
    img = sources.center_crop_resize(img, opts.size)
    if opts.image_format == "png":
        ok, buf = cv2.imencode(".png", img[..., ::-1])
    else:
        params = [cv2.IMWRITE_JPEG_QUALITY, opts.jpeg_quality]
        ok, buf = cv2.imencode(".jpg", img[..., ::-1], params)
    if not ok:
        raise ValueError(f"{path}: could not encode as {opts.image_format}")
    return buf.tobytes()


def shard_ranges(count: int, num_shards: int) -> list[range]:
    """``num_shards`` contiguous, near-equal input ranges covering ``range(count)``."""
    return [
        range(k * count // num_shards, (k + 1) * count // num_shards) for k in range(num_shards)
    ]


def auto_num_shards(paths: Sequence[str], target_bytes: int = 1 << 30) -> int:
    """About ``target_bytes`` of input per shard (an estimate: resized images are smaller)."""
    total = sum(os.path.getsize(p) if os.path.isfile(p) else 0 for p in paths)  # broken links
    return max(1, min(len(paths), -(-total // target_bytes)))


def existing_outputs(prefix: str) -> list[str]:
    """Files a previous pack to ``prefix`` wrote: its index and shards of any shard count."""
    pattern = re.compile(
        re.escape(os.path.basename(prefix) + sources.SHARD_INFIX) + r"\d{5}-of-\d{5}"
    )
    found = [sources.index_path(prefix)] if os.path.exists(sources.index_path(prefix)) else []
    candidates = glob.glob(glob.escape(prefix + sources.SHARD_INFIX) + "*")
    return found + sorted(p for p in candidates if pattern.fullmatch(os.path.basename(p)))


def check_output(input_dir: str, prefix: str, overwrite: bool) -> None:
    """One-line ``ValueError`` for an output inside the input or existing shards."""
    real_in = os.path.realpath(input_dir)
    out_dir = os.path.realpath(os.path.dirname(os.path.abspath(prefix)))
    if out_dir == real_in or out_dir.startswith(real_in + os.sep):
        raise ValueError(
            f"--output {prefix!r} is inside --input {input_dir!r}; choose another folder"
        )
    if not os.path.basename(prefix):
        raise ValueError(f"--output {prefix!r} must end in a file-name prefix, not a '/'")
    existing = existing_outputs(prefix)
    if existing and not overwrite:
        raise ValueError(f"{existing[0]} exists; pass --overwrite to replace the shards")


def _write_shard(
    path: str,
    results: Iterable[tuple[str, concurrent.futures.Future]],
    skipped: dict[str, str],
    on_done: Callable[[], object],
) -> int:
    """Writes the records of ``(file, future)`` pairs to ``path`` (renamed into place when
    complete); unreadable files go to ``skipped`` with one line each. Returns the record count."""
    from array_record.python import array_record_module  # noqa: PLC0415

    tmp = path + ".tmp"
    writer = array_record_module.ArrayRecordWriter(tmp, sources.WRITER_OPTIONS)
    count = 0
    try:
        for item, future in results:
            try:
                writer.write(future.result())
                count += 1
            except (ValueError, OSError) as e:
                reason = str(e) if str(e).startswith(item) else f"{item}: {e}"
                skipped[item] = reason
                _log(f"skipped {reason}")
            on_done()
    except BaseException:
        writer.close()
        os.remove(tmp)
        raise
    writer.close()
    os.replace(tmp, path)
    return count


def pack(
    input_dir: str,
    prefix: str,
    *,
    num_shards: int = 0,
    opts: Options = Options(),
    threads: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Packs ``input_dir`` into shards at ``prefix``; returns the index dict (also written)."""
    from tqdm import tqdm  # noqa: PLC0415

    paths = sources.list_images(input_dir, "--input")
    check_output(input_dir, prefix, overwrite)
    stale = existing_outputs(prefix)
    if sources.index_path(prefix) in stale:  # never an index next to half-replaced shards
        os.remove(sources.index_path(prefix))
    num_shards = min(num_shards or auto_num_shards(paths), len(paths))
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    threads = threads or sources.available_cpus()
    skipped: dict[str, str] = {}
    shards = []
    with (
        concurrent.futures.ThreadPoolExecutor(threads) as pool,
        tqdm(total=len(paths), desc="pack", unit="img", disable=not progress) as bar,
    ):
        # One read-ahead stream over all files: the threads stay busy across shard boundaries.
        results = files_lib.read_ahead(pool, lambda p: encode_record(p, opts), paths, 2 * threads)
        for k, rng in enumerate(shard_ranges(len(paths), num_shards)):
            path = sources.shard_name(prefix, k, num_shards)
            n = _write_shard(path, itertools.islice(results, len(rng)), skipped, bar.update)
            shards.append({"path": os.path.basename(path), "count": n})
    written = {sources.shard_name(prefix, k, num_shards) for k in range(num_shards)}
    for old in stale:  # shards of an earlier pack with another shard count
        if old not in written and os.path.exists(old):
            os.remove(old)
    index = {
        "format": sources.INDEX_FORMAT,
        "record": "encoded image bytes"
        + (f" ({opts.image_format})" if opts.size else " (as in the input)"),
        "count": sum(s["count"] for s in shards),
        "size": opts.size or None,
        "image_format": opts.image_format if opts.size else None,
        "source": os.path.abspath(input_dir),
        "skipped": len(skipped),
        "shards": shards,
    }
    tmp = sources.index_path(prefix) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, sources.index_path(prefix))
    return index | {"skipped_files": skipped}


def _summary(index: dict, prefix: str) -> str:
    size = f"{index['size']} px {index['image_format']}" if index["size"] else "original images"
    mib = (
        sum(
            os.path.getsize(os.path.join(os.path.dirname(os.path.abspath(prefix)), s["path"]))
            for s in index["shards"]
        )
        / 2**20
    )
    line = (
        f"packed {index['count']} images ({size}) into {len(index['shards'])} shard(s), "
        f"{mib:.1f} MiB, index {sources.index_path(prefix)}"
    )
    return line + (f"; skipped {index['skipped']} unreadable file(s)" if index["skipped"] else "")


def main(argv: Sequence[str], flag_values: flags.FlagValues | None = None) -> int:
    fv = flags.FLAGS if flag_values is None else flag_values
    if len(argv) > 1:
        return cli_lib.usage_error(
            f"unexpected arguments {list(argv[1:])}; all options are --flags"
        )
    if not fv.input or not fv.output:
        return cli_lib.usage_error("--input=DIR and --output=PREFIX are required")
    opts = Options(size=fv.size, image_format=fv.format, jpeg_quality=fv.jpeg_quality)
    try:
        index = pack(
            fv.input,
            fv.output,
            num_shards=fv.num_shards,
            opts=opts,
            threads=fv.threads,
            overwrite=fv.overwrite,
            progress=fv.progress,
        )
    except ValueError as e:
        return cli_lib.usage_error(str(e))
    print(_summary(index, fv.output), flush=True)
    return 1 if index["skipped"] else 0


def cli(argv: list[str] | None = None) -> None:
    """``python -m artfr_jax.data.pack``."""
    define_flags()
    app.run(main, argv=argv, flags_parser=cli_lib.parse_flags)


if __name__ == "__main__":
    cli()
