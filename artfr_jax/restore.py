"""Restores a face image or a folder of face images with a trained model.

    python -m artfr_jax.restore (--workdir=DIR | --weights=vqfr_v1.msgpack | --weights=OSDFACE_DIR) \\
        --input=FILE_OR_FOLDER --output=DIR [--mode=auto|aligned|whole] [--upscale=1] \\
        [--steps=8] [--temperature=0] [--batch_size=8] [--seed=0] \\
        [--side_by_side|--noside_by_side] [--overwrite] [--method=auto|art|vqfr|osdface] [--texture]

Flags may be spelt with underscores or dashes (``--batch_size`` or ``--batch-size``).

* ``--mode=aligned``: inputs are aligned face crops (FFHQ-style). Every image is centre-cropped
  to a square (non-square inputs lose their borders) and resized to the model's ``image_size``,
  so outputs are ``image_size`` squares.
* ``--mode=whole``: photos and videos (``.mp4``, ``.mov``, ``.mkv``, ``.avi``, ``.m4v``): faces
  are detected (dlib), aligned to the FFHQ template, restored in one batch per photo and pasted
  back (``artfr_jax.faces.pipeline``); outputs in ``restored_imgs/`` (the photo's own format:
  gray, alpha and 16 bit are kept), ``restored_faces/``, ``cropped_faces/``,
  ``restored_videos/``. ``--upscale``, ``--only_center_face``, ``--largest_face``,
  ``--min_face``, ``--draw_box``, ``--color_fix``, ``--detector``, ``--landmarks``. A photo
  without a face is copied (upscaled) and reported.
* ``--mode=auto`` (default): aligned for a square image whose largest face already sits on the
  template, or in which no face is found and whose side is at most 1024 px; whole otherwise.
* A folder is read non-recursively: every regular, non-hidden file at its top level is a candidate
  (whatever its extension), so a renamed or broken file is reported rather than silently ignored.
* ``<output>/<stem>.png`` per input, plus ``<output>/side_by_side/<stem>.png`` (model input |
  restored). Inputs sharing a stem (``a.png``, ``a.jpg``) are written under their full name
  instead (``a.png.png``, ``a.jpg.png``); any clash left gets ``_1``, ``_2``, ... (see
  :func:`output_names`).
* Nothing is written into the input folder (an output folder equal to or inside it is refused), and
  an existing output is kept unless ``--overwrite``: an input with any existing output is skipped,
  so re-running an interrupted command finishes the rest. Files are written atomically.
* Each unreadable file is reported as one line ``<path>: <reason>`` on stderr; the run goes on.
  The last line is ``restored N of M images into DIR; K failed``.

``--method`` defaults to the method the workdir was trained with (ART-FR, VQFR or OSDFace);
``--steps`` and ``--temperature`` only affect ART-FR, ``--texture`` writes VQFR's texture-branch
output. ``--weights`` instead of ``--workdir`` restores with official weights: a VQFR v1 file
converted by ``python -m artfr_jax.convert.vqfr --arch=vqfr_v1``, or the OSDFace release folder
written by ``python -m artfr_jax.convert.osdface`` (both 512 px, the paper configurations).

Exit status: 0 all restored (or kept), 1 some files failed, 2 usage error (bad flag, missing input,
no candidate files, output inside the input folder, workdir without a usable checkpoint).

Batch ``i`` is restored with ``jax.random.fold_in(jax.random.key(seed), i)``; the last partial batch
is padded with black images so the model sees one batch shape (one compilation).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import struct
import sys
import time
import zlib
from collections.abc import Sequence
from typing import Protocol

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from PIL import Image, ImageFile, UnidentifiedImageError  # noqa: E402
from tqdm import tqdm  # noqa: E402

from artfr_jax.data import sources  # noqa: E402
from artfr_jax.utils import cli as cli_lib  # noqa: E402
from artfr_jax.utils import compile_cache, host_memory  # noqa: E402
from artfr_jax.utils import files as files_lib  # noqa: E402
from artfr_jax.utils import images as images_lib  # noqa: E402

SIDE_BY_SIDE_DIR = "side_by_side"
# Whole photos and videos (--mode=whole/auto): the folders users of face-restoration tools know.
WHOLE_DIRS = {
    "image": "restored_imgs",
    "face": "restored_faces",
    "crop": "cropped_faces",
    "video": "restored_videos",
    "frames": "restored_frames",
}
LOG_EVERY_S = 10.0  # progress log interval when stderr is not a terminal


class Restorer(Protocol):
    """What :func:`artfr_jax.inference.load_restorer` returns."""

    image_size: int

    def __call__(self, lq: np.ndarray, rng: jax.Array) -> np.ndarray:
        """uint8 ``[B, S, S, 3]`` -> uint8 ``[B, S, S, 3]``."""
        ...


@dataclasses.dataclass
class RestoreReport:
    """Outcome of :func:`restore_paths`; paths are the inputs as given."""

    output_dir: str
    total: int = 0
    restored: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)
    skipped: list[str] = dataclasses.field(default_factory=list)  # an output already existed
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)  # input -> restored file
    faces: int = 0  # whole photos and videos: faces restored (over all frames)
    no_face: list[str] = dataclasses.field(default_factory=list)  # copied without a face

    def summary(self) -> str:
        line = (
            f"restored {len(self.restored)} of {self.total} images into {self.output_dir}; "
            f"{len(self.failed)} failed"
        )
        if self.faces:
            line += f"; {self.faces} faces in whole photos/videos"
        if self.no_face:
            line += f"; {len(self.no_face)} without a face (copied to {WHOLE_DIRS['image']}/)"
        if self.skipped:
            line += f"; {len(self.skipped)} skipped (output exists, --overwrite replaces it)"
        return line

    def merge(self, other: RestoreReport) -> None:
        self.restored += other.restored
        self.failed += other.failed
        self.skipped += other.skipped
        self.outputs.update(other.outputs)
        self.faces += other.faces
        self.no_face += other.no_face


# ----------------------------------------------------------------------------- inputs


def list_inputs(input_path: str) -> list[str]:
    """``[input_path]`` for a file; for a folder its regular non-hidden top-level files, sorted.

    Not recursive. Every file is a candidate whatever its extension (a bad one is reported when
    read). Raises ``ValueError`` with a one-line message if the path is missing or has no files.
    """
    if not input_path:
        raise ValueError("--input is empty; set it to an image file or a folder of images")
    if os.path.isfile(input_path):
        return [input_path]
    if not os.path.isdir(input_path):
        raise ValueError(f"--input {input_path!r} does not exist")
    files, subdirs = [], 0
    with os.scandir(input_path) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if entry.is_file():  # follows symlinks
                files.append(entry.path)
            elif entry.is_dir():
                subdirs += 1
    if subdirs:
        logging.info("%s: %d subfolder(s) not searched (not recursive)", input_path, subdirs)
    if not files:
        raise ValueError(f"--input {input_path!r} contains no files (folders are not searched)")
    return sorted(files)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _pil_problem(path: str) -> str | None:
    """Why PIL cannot fully decode ``path`` (truncated/corrupt data), or None if it can or if PIL
    does not know the format (then OpenCV's verdict stands)."""
    fmt = "image"
    try:
        with Image.open(path) as im:
            fmt = im.format or fmt
            im.load()
    except (UnidentifiedImageError, Image.DecompressionBombError):
        return None
    except (OSError, SyntaxError, EOFError, ValueError, struct.error, zlib.error) as e:
        return f"truncated or corrupt {fmt} data ({_first_line(e)})"
    return None


def read_image(path: str) -> np.ndarray:
    """:func:`sources.load_image` (RGB uint8 ``[H, W, 3]``) that also rejects truncated files.

    OpenCV may decode a truncated PNG/JPEG into a partly grey image without an error (it depends on
    the build), so a decoded file is also fully decoded by PIL, which raises on missing data.
    Raises ``ValueError("<path>: <reason>")``.
    """
    try:
        img = sources.load_image(path)
    except ValueError:
        problem = _pil_problem(path)  # a more specific reason when PIL has one
        if problem is None:
            raise
        raise ValueError(f"{path}: {problem}") from None
    if not ImageFile.LOAD_TRUNCATED_IMAGES:  # someone may have made PIL lenient; then skip
        problem = _pil_problem(path)
        if problem is not None:
            raise ValueError(f"{path}: {problem}")
    return img


# ----------------------------------------------------------------------------- outputs


def output_names(paths: Sequence[str]) -> list[str]:
    """Output file name (``<stem>.png``) per input, unique case-insensitively.

    A stem shared by several inputs (``a.png``, ``a.jpg``) makes each use its full name
    (``a.png.png``, ``a.jpg.png``); a name still shared (same file name in two folders) gets
    ``_1``, ``_2``, ... in input order, avoiding every name already taken.
    """
    bases = [os.path.basename(os.path.normpath(p)) for p in paths]
    stems = [os.path.splitext(b)[0] or b for b in bases]
    stem_count = collections.Counter(s.casefold() for s in stems)
    names = [
        (s if stem_count[s.casefold()] == 1 else b) + ".png"
        for s, b in zip(stems, bases, strict=True)
    ]
    name_count = collections.Counter(n.casefold() for n in names)
    taken = {n.casefold() for n in names if name_count[n.casefold()] == 1}
    out = []
    for n in names:
        if name_count[n.casefold()] > 1:
            root, k, cand = n[: -len(".png")], 0, n
            while cand.casefold() in taken:
                k += 1
                cand = f"{root}_{k}.png"
            n = cand
            taken.add(n.casefold())
        out.append(n)
    return out


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _is_within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def check_output_dir(input_path: str, output_dir: str, *, side_by_side: bool = True) -> None:
    """Raises ``ValueError`` if restoring ``input_path`` into ``output_dir`` would write into the
    input folder (for a folder input: equal to or inside it; for a file input: its folder)."""
    if not output_dir:
        raise ValueError("--output is empty; set it to a folder for the restored images")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output {output_dir!r} exists and is not a folder")
    inp = _real(input_path)
    dirs = [_real(output_dir)]
    if side_by_side:
        dirs.append(os.path.join(dirs[0], SIDE_BY_SIDE_DIR))
    for d in dirs:
        if os.path.isdir(inp) and _is_within(d, inp):
            raise ValueError(
                f"--output {output_dir!r} is the input folder or inside it ({d} is within "
                f"{inp}); choose a folder outside the input"
            )
        if not os.path.isdir(inp) and d == os.path.dirname(inp):
            raise ValueError(
                f"--output {output_dir!r} is the folder of the input file {input_path!r}; "
                "choose another folder"
            )


def _write_png(img: np.ndarray, path: str) -> None:
    """Atomic write: an interrupted run leaves no partial file behind."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(img).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------- restoring


def restore_paths(
    restorer: Restorer,
    paths: Sequence[str],
    output_dir: str,
    *,
    batch_size: int = 8,
    seed: int = 0,
    side_by_side: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    num_threads: int = 4,
) -> RestoreReport:
    """Restores ``paths`` into ``output_dir`` (created); see the module docstring for the rules.

    Unreadable inputs and failed writes go to ``report.failed`` and are printed as
    ``<path>: <reason>`` on stderr. Raises ``ValueError`` for bad arguments, including an
    ``output_dir`` that holds one of the inputs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = int(restorer.image_size)
    if size < 1:
        raise ValueError(f"restorer.image_size must be >= 1, got {restorer.image_size}")
    paths = list(paths)
    out_dir = os.fspath(output_dir)
    sbs_dir = os.path.join(out_dir, SIDE_BY_SIDE_DIR)
    written_dirs = {_real(out_dir)} | ({_real(sbs_dir)} if side_by_side else set())
    for p in paths:
        if os.path.dirname(_real(p)) in written_dirs:
            raise ValueError(f"output folder {out_dir!r} holds the input {p!r}; choose another")

    report = RestoreReport(output_dir=out_dir, total=len(paths))
    names = output_names(paths)
    targets = {}  # path -> output files
    todo = []
    for p, n in zip(paths, names, strict=True):
        files = [os.path.join(out_dir, n)] + ([os.path.join(sbs_dir, n)] if side_by_side else [])
        targets[p] = files
        if not overwrite and any(os.path.lexists(f) for f in files):
            report.skipped.append(p)
        else:
            todo.append(p)
    if report.skipped:
        logging.warning(
            "%d input(s) already have output in %s and are skipped (first: %s); pass "
            "--overwrite to replace them",
            len(report.skipped),
            out_dir,
            targets[report.skipped[0]][0],
        )
    os.makedirs(out_dir, exist_ok=True)
    if side_by_side:
        os.makedirs(sbs_dir, exist_ok=True)
    if not todo:
        return report

    batch = min(batch_size, len(todo))
    key = jax.random.key(seed)
    # A bar on a terminal; in a log file, a line every LOG_EVERY_S seconds instead of bar redraws.
    bar = tqdm(
        total=len(todo),
        unit="img",
        desc="restore",
        file=sys.stderr,
        disable=not (progress and sys.stderr.isatty()),
    )
    start = last_log = time.perf_counter()
    num_done = 0
    status: dict[str, str | None] = {}  # path -> None (ok) or failure reason
    noted_crop = False

    def fail(path: str, reason: str) -> None:
        reason = reason.removeprefix(f"{path}: ")
        status[path] = reason
        tqdm.write(f"{path}: {reason}", file=sys.stderr)

    def advance(n: int) -> None:
        nonlocal num_done, last_log
        num_done += n
        bar.update(n)
        now = time.perf_counter()
        if progress and bar.disable and now - last_log > LOG_EVERY_S:
            last_log = now
            rate = num_done / (now - start)
            logging.info("restore: %d/%d images (%.2f images/s)", num_done, len(todo), rate)

    def write(path: str, lq: np.ndarray, restored: np.ndarray) -> None:
        try:
            _write_png(restored, targets[path][0])
            if side_by_side:
                _write_png(images_lib.side_by_side(lq[None], restored[None])[0], targets[path][1])
        except (OSError, ValueError) as e:
            fail(path, f"cannot write output: {_first_line(e)}")
        else:
            status[path] = None

    with bar, concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        pending_writes: list[concurrent.futures.Future] = []
        group_paths: list[str] = []
        group_imgs: list[np.ndarray] = []
        batch_index = 0

        def run_group() -> None:
            nonlocal batch_index, pending_writes
            n = len(group_imgs)
            lq = np.zeros((batch, size, size, 3), np.uint8)  # padding rows stay black
            lq[:n] = np.stack(group_imgs)
            out = np.asarray(restorer(lq, jax.random.fold_in(key, batch_index)))
            if out.shape != lq.shape or out.dtype != np.uint8:
                raise ValueError(
                    f"restorer returned {out.dtype} {out.shape}; expected uint8 {lq.shape}"
                )
            batch_index += 1
            writes = [pool.submit(write, p, lq[i], out[i]) for i, p in enumerate(group_paths)]
            for f in pending_writes:  # the previous batch's writes ran during this model call
                f.result()
            pending_writes = writes
            advance(n)
            group_paths.clear()
            group_imgs.clear()

        for path, future in files_lib.read_ahead(pool, read_image, todo, window=2 * batch):
            try:
                img = future.result()
            except (ValueError, OSError, cv2.error) as e:
                fail(path, _first_line(e))
                advance(1)
                continue
            h, w = img.shape[:2]
            if h != w and not noted_crop:
                noted_crop = True
                logging.info(
                    "non-square inputs are centre-cropped to a square before resizing to %dx%d "
                    "(first: %s, %dx%d)",
                    size,
                    size,
                    path,
                    w,
                    h,
                )
            group_paths.append(path)
            group_imgs.append(sources.center_crop_resize(img, size))
            if len(group_imgs) == batch:
                run_group()
        if group_imgs:
            run_group()
        for f in pending_writes:
            f.result()

    for p in todo:
        reason = status.get(p, "not processed")
        if reason is None:
            report.restored.append(p)
            report.outputs[p] = targets[p][0]
        else:
            report.failed.append((p, reason))
    seconds = time.perf_counter() - start
    logging.info(
        "%d files processed in %.1f s (%.2f images/s)",
        len(todo),
        seconds,
        len(todo) / max(seconds, 1e-9),
    )
    return report


# ----------------------------------------------------------------------------- whole photos


def classify(paths: Sequence[str], detector, *, progress: bool = True) -> tuple[list, list]:
    """``--mode=auto``: (aligned crops, whole photos and videos). Only square images are read and
    searched for a face (``faces.pipeline.looks_aligned``); an unreadable file goes to the whole
    list, whose loop reports it."""
    from artfr_jax.faces import pipeline, video

    aligned, whole = [], []
    for path in tqdm(paths, desc="sorting", file=sys.stderr, disable=not progress):
        if video.is_video_path(path):
            whole.append(path)
            continue
        try:
            with Image.open(path) as im:
                w, h = im.size
            if w != h:
                whole.append(path)
                continue
            img = read_image(path)
            faces = detector.detect(img)
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
            whole.append(path)
            continue
        (aligned if pipeline.looks_aligned(img.shape, faces) else whole).append(path)
    return aligned, whole


def restore_whole_paths(
    restorer: Restorer,
    detector,
    paths: Sequence[str],
    output_dir: str,
    options=None,
    *,
    seed: int = 0,
    side_by_side: bool = True,
    overwrite: bool = False,
    save_faces: bool = True,
    save_frames: bool = False,
    progress: bool = True,
) -> RestoreReport:
    """Whole photos and videos (``faces.pipeline``) into ``output_dir``: ``restored_imgs/<name>``
    (the photo's own format, PNG), ``restored_faces/`` and ``cropped_faces/`` (``<stem>_<k>.png``,
    largest face first), ``side_by_side/<name>``; videos into ``restored_videos/<stem>.mp4`` (and
    ``restored_frames/<stem>/`` with ``save_frames``). Photo ``i`` (and every frame of video
    ``i``) uses ``fold_in(key(seed), i)``. Bad files are reported as in :func:`restore_paths`; a
    photo without a face is copied (upscaled) and listed in ``report.no_face``."""
    from artfr_jax.faces import pipeline, video

    options = options or pipeline.Options()
    paths = list(paths)
    out_dir = os.fspath(output_dir)
    report = RestoreReport(output_dir=out_dir, total=len(paths))
    dirs = {k: os.path.join(out_dir, v) for k, v in WHOLE_DIRS.items()}
    dirs["sbs"] = os.path.join(out_dir, SIDE_BY_SIDE_DIR)
    written = {_real(d) for d in dirs.values()}
    for p in paths:
        if os.path.dirname(_real(p)) in written:
            raise ValueError(f"output folder {out_dir!r} holds the input {p!r}; choose another")
    names = output_names(paths)
    key = jax.random.key(seed)
    bar = tqdm(
        total=len(paths),
        unit="file",
        desc="restore",
        file=sys.stderr,
        disable=not (progress and sys.stderr.isatty()),
    )

    def fail(path: str, reason: str) -> None:
        reason = reason.removeprefix(f"{path}: ")
        report.failed.append((path, reason))
        tqdm.write(f"{path}: {reason}", file=sys.stderr)

    with bar:
        for index, (path, name) in enumerate(zip(paths, names, strict=True)):
            bar.update(1)
            stem = name[: -len(".png")]
            if video.is_video_path(path):
                target = os.path.join(dirs["video"], stem + ".mp4")
                if os.path.lexists(target) and not overwrite:
                    report.skipped.append(path)
                    continue
                os.makedirs(dirs["video"], exist_ok=True)
                frames = os.path.join(dirs["frames"], stem) if save_frames else None
                try:
                    result = pipeline.restore_video(
                        path,
                        target,
                        detector,
                        restorer,
                        jax.random.fold_in(key, index),
                        options,
                        png_dir=frames,
                    )
                except (OSError, ValueError, cv2.error) as e:
                    fail(path, _first_line(e))
                    continue
                logging.info(
                    "%s: %d frames, %d faces; flicker in the face masks %.2f (input %.2f)",
                    path,
                    result.frames,
                    result.faces,
                    result.flicker_output,
                    result.flicker_input,
                )
                report.faces += result.faces
                report.restored.append(path)
                report.outputs[path] = target
                continue
            target = os.path.join(dirs["image"], name)
            if os.path.lexists(target) and not overwrite:
                report.skipped.append(path)
                continue
            try:
                photo = pipeline.read_photo(path)
                problem = None if ImageFile.LOAD_TRUNCATED_IMAGES else _pil_problem(path)
                if problem:
                    raise ValueError(problem)
            except (OSError, ValueError, cv2.error) as e:
                fail(path, _first_line(e))
                continue
            try:
                result = pipeline.restore_photo(
                    photo, detector, restorer, jax.random.fold_in(key, index), options
                )
            except (ValueError, cv2.error) as e:
                fail(path, _first_line(e))
                continue
            try:
                for d in ("image", "face", "crop") if result.faces and save_faces else ("image",):
                    os.makedirs(dirs[d], exist_ok=True)
                for k, (crop, face) in enumerate(zip(result.crops, result.restored, strict=True)):
                    if save_faces:
                        _write_png(crop, os.path.join(dirs["crop"], f"{stem}_{k:02d}.png"))
                        _write_png(face, os.path.join(dirs["face"], f"{stem}_{k:02d}.png"))
                _write_photo(result.image, target)
                if side_by_side:
                    os.makedirs(dirs["sbs"], exist_ok=True)
                    preview = pipeline.side_by_side(photo, result.image)
                    _write_png(preview, os.path.join(dirs["sbs"], name))
            except (OSError, ValueError, cv2.error) as e:
                fail(path, f"cannot write output: {_first_line(e)}")
                continue
            report.restored.append(path)
            report.outputs[path] = target
            report.faces += len(result.faces)
            if not result.faces:
                report.no_face.append(path)
                tqdm.write(
                    f"{path}: no face found"
                    + (
                        f" ({result.dropped} left out by the face filters)"
                        if result.dropped
                        else ""
                    )
                    + f"; copied to {target}",
                    file=sys.stderr,
                )
    return report


def _write_photo(img: np.ndarray, path: str) -> None:
    """Atomic write of a photo in its own format (``faces.pipeline.write_photo``)."""
    from artfr_jax.faces import pipeline

    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp.png")
    try:
        pipeline.write_photo(img, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------- command line


def _load_restorer(
    workdir: str | None,
    *,
    steps: int,
    temperature: float,
    method: str = "auto",
    texture: bool = False,
    weights: str | None = None,
) -> Restorer:
    """The model of a workdir, or of converted official weights (a VQFR v1 file or an OSDFace
    folder); tests replace this function."""
    from artfr_jax import inference  # the model code is only needed when actually restoring

    if weights and os.path.isdir(weights):
        if texture:
            raise ValueError("--texture is a VQFR option; --weights names an OSDFace folder")
        return inference.load_converted_osdface(weights)
    if weights:
        return inference.load_converted_vqfr(weights, texture=texture)
    return inference.load_restorer(
        workdir, method=method, steps=steps, temperature=temperature, texture=texture
    )


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the command's flags (only when run as a command, so importing defines none)."""
    fv = flag_values
    flags.DEFINE_string("workdir", None, "Training workdir with the checkpoint.", flag_values=fv)
    flags.DEFINE_string(
        "weights",
        None,
        "Instead of --workdir: official weights, a VQFR v1 file converted by "
        "`python -m artfr_jax.convert.vqfr --arch=vqfr_v1` or an OSDFace folder written by "
        "`python -m artfr_jax.convert.osdface` (512 px).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "input", None, "Image file, or folder of images (not recursive).", flag_values=fv
    )
    flags.DEFINE_string("output", None, "Folder for restored PNGs (created).", flag_values=fv)
    flags.DEFINE_integer("steps", 8, "Decoding steps.", lower_bound=1, flag_values=fv)
    flags.DEFINE_float(
        "temperature", 0.0, "Sampling temperature (0: greedy).", lower_bound=0.0, flag_values=fv
    )
    flags.DEFINE_integer(
        "batch_size", 8, "Images per model call (last batch padded).", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)
    flags.DEFINE_boolean(
        "side_by_side", True, f"Also write {SIDE_BY_SIDE_DIR}/<stem>.png.", flag_values=fv
    )
    flags.DEFINE_boolean("overwrite", False, "Replace existing output files.", flag_values=fv)
    flags.DEFINE_enum(
        "method",
        "auto",
        ["auto", "art", "vqfr", "osdface"],
        "Restoration method; 'auto' reads it from the workdir's config.",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "texture", False, "VQFR: write the texture branch instead of the main one.", flag_values=fv
    )
    flags.DEFINE_enum(
        "mode",
        "auto",
        ["auto", "aligned", "whole"],
        "aligned: inputs are aligned face crops; whole: photos and videos (detect, align, paste "
        "back); auto: aligned for a square image whose face already sits on the template (or "
        "with no face found, up to 1024 px), whole otherwise.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "upscale",
        1,
        "Whole photos: output scale (Lanczos background).",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "only_center_face",
        False,
        "Whole photos: restore the face nearest the centre only.",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "largest_face", False, "Whole photos: restore the largest face only.", flag_values=fv
    )
    flags.DEFINE_float(
        "min_face",
        0.0,
        "Whole photos: skip faces whose eye distance is below this (input px).",
        lower_bound=0.0,
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "draw_box", False, "Whole photos: outline the restored faces.", flag_values=fv
    )
    flags.DEFINE_enum(
        "color_fix",
        "none",
        ["none", "wavelet", "adain"],
        "Whole photos: give each restored face the input face's low frequencies (colour).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "detector",
        "hog",
        ["hog", "cnn"],
        "Face detector: dlib HOG, or dlib's CNN (slow).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "landmarks",
        "5",
        ["5", "68"],
        "5: dlib's 5-point model (public domain); 68: the exact FFHQ alignment (the 68-point "
        "model's licence is non-commercial).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "upsample",
        1,
        "Detector pyramid upsampling (finds smaller faces, slower).",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_float(
        "min_score",
        0.25,
        "Lowest detector score kept. dlib's HOG default (0) also fires on non-faces: a glove "
        "in scikit-image's astronaut scores 0.12, while the faces of the test photos score "
        "0.37-2.8 at --upsample=1. Lower it for hard photos.",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "save_faces",
        True,
        "Whole photos: also write cropped_faces/ and restored_faces/.",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "save_frames", False, "Videos: also write every frame as a PNG.", flag_values=fv
    )
    flags.mark_flags_as_required(["input", "output"], flag_values=fv)
    flags.mark_flags_as_mutual_exclusive(["workdir", "weights"], required=True, flag_values=fv)


def main(argv: Sequence[str], flag_values: flags.FlagValues | None = None) -> int:
    """Runs the command on parsed flags (``flags.FLAGS`` unless given); returns the exit status."""
    fv = flags.FLAGS if flag_values is None else flag_values
    if len(argv) > 1:
        return cli_lib.usage_error(
            f"unexpected arguments {list(argv[1:])}; all options are --flags"
        )
    try:
        paths = list_inputs(fv.input)
        check_output_dir(fv.input, fv.output, side_by_side=fv.side_by_side)
    except ValueError as e:
        return cli_lib.usage_error(str(e))
    logging.info("%d candidate file(s) in %s", len(paths), fv.input)
    if fv.weights:
        held = "osdface" if os.path.isdir(fv.weights) else "vqfr"
        if fv.method not in ("auto", held):
            what = "an OSDFace release folder" if held == "osdface" else "VQFR v1 params"
            return cli_lib.usage_error(
                f"--weights holds {what}; --method={fv.method} is not '{held}'"
            )
    try:
        kw = {"method": fv.method, "texture": True} if fv.texture else {"method": fv.method}
        if fv.weights:
            kw["weights"] = fv.weights
        restorer = _load_restorer(fv.workdir, steps=fv.steps, temperature=fv.temperature, **kw)
    except (FileNotFoundError, ValueError) as e:
        which = f"--weights {fv.weights!r}" if fv.weights else f"--workdir {fv.workdir!r}"
        return cli_lib.usage_error(f"{which}: {_first_line(e)}")
    aligned, whole, detector = paths, [], None
    if fv.mode != "aligned":
        from artfr_jax.faces import detection, pipeline, video

        try:
            options = pipeline.Options(
                upscale=fv.upscale,
                only_center_face=fv.only_center_face,
                largest_face=fv.largest_face,
                min_face=fv.min_face,
                color_fix=fv.color_fix,
                batch_size=fv.batch_size,
                draw_box=fv.draw_box,
            )
            detector = detection.make_detector(
                fv.detector, fv.landmarks, upsample=fv.upsample, min_score=fv.min_score
            )
        except ImportError as e:
            if fv.mode == "whole":
                return cli_lib.usage_error(f"--mode=whole needs a face detector: {e}")
            logging.warning("no face detector (%s); every input is taken as an aligned crop", e)
        except ValueError as e:
            return cli_lib.usage_error(str(e))
        if detector is not None and fv.mode == "auto":
            aligned, whole = classify(paths, detector)
            logging.info("%d aligned crop(s), %d whole photo(s)/video(s)", len(aligned), len(whole))
        elif detector is not None:
            aligned, whole = [], paths
        else:
            aligned = [p for p in paths if not video.is_video_path(p)]
    report = restore_paths(
        restorer,
        aligned,
        fv.output,
        batch_size=fv.batch_size,
        seed=fv.seed,
        side_by_side=fv.side_by_side,
        overwrite=fv.overwrite,
    )
    report.total = len(paths)
    for p in sorted(set(paths) - set(aligned) - set(whole)):  # videos without a detector
        report.failed.append((p, "a video needs the face detector (dlib-bin)"))
        print(f"{p}: a video needs the face detector (dlib-bin)", file=sys.stderr)
    if whole:
        report.merge(
            restore_whole_paths(
                restorer,
                detector,
                whole,
                fv.output,
                options,
                seed=fv.seed,
                side_by_side=fv.side_by_side,
                overwrite=fv.overwrite,
                save_faces=fv.save_faces,
                save_frames=fv.save_frames,
            )
        )
    print(report.summary(), flush=True)
    return 1 if report.failed else 0


def cli(argv: list[str] | None = None) -> None:
    """``python -m artfr_jax.restore``: defines the flags on ``flags.FLAGS`` and runs :func:`main`."""
    define_flags()
    host_memory.retain_freed_memory_on_cpu()
    compile_cache.enable_persistent_cache()
    # OpenCV's own warning for a broken file would duplicate the one-line report.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    app.run(main, argv=argv, flags_parser=cli_lib.parse_flags)


if __name__ == "__main__":
    cli()
