"""Whole photos and videos: detect, align, restore every face in one batch, paste back.

``restore_photo(photo, detector, restorer, key, options)`` is what ``python -m artfr_jax.restore
--mode=whole`` runs per photo; ``restore_video`` per clip. A restorer is any callable
``uint8 [B, S, S, 3] -> uint8 [B, S, S, 3]`` with an ``image_size`` S (``inference``'s three).

* Photos keep their format: gray, gray + alpha, RGB, RGBA, 8 or 16 bit (``read_photo``). Faces
  are detected and cropped from an RGB uint8 view; each restored face is converted to the photo's
  format (luma for gray, x257 for 16 bit) and blended into its colour channels only, so alpha is
  kept. With ``upscale=1`` every pixel outside the face masks is the input's, bit for bit.
* ``upscale=s``: the photo is upscaled with Lanczos (``cv2.INTER_LANCZOS4``; no background model)
  and faces are pasted through ``align.upscaled`` (pixel centres exact).
* Batching: the faces of a photo are restored in chunks of ``batch_size``, each padded to the next
  power of two (1, 2, 4, ... ``batch_size``), so a handful of compilations serves every photo.
* Memory: the decoded photo, the output canvas (a copy, upscaled or not) and face-sized crops;
  detection runs on a downscaled copy of large photos (``detection.make_detector(max_side=...)``)
  and each paste works in its face's region only (``paste``).
* Video: one detector pass per frame, faces tracked and their landmarks smoothed over time
  (``video.Tracker``) before alignment, every frame restored with the same key (a stochastic
  method then makes the same choices for a face that does not move), frames streamed from
  ``video.read_frames`` to ``video.VideoWriter``. Its report holds a flicker figure: the mean
  absolute frame-to-frame change inside the face masks, for the input and for the output.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import cv2
import jax
import numpy as np

from artfr_jax.faces import align, detection, paste, video

COLOR_FIXES = ("none", "wavelet", "adain")
BOX_COLOR = (255, 64, 64)


@dataclasses.dataclass(frozen=True)
class Options:
    """What users choose per run (``restore``'s flags of the same names).

    upscale: integer factor of the output photo; only_center_face / largest_face: keep one face;
    min_face: the smallest eye distance kept, in input pixels (0: all); color_fix: transfer the
    input crop's low frequencies to the restored face (``paste.color_transfer``), for methods
    that shift colour; feather: the paste mask's blur as a fraction of the face size;
    batch_size: faces per model call; draw_box: outline each restored face's detection box.
    """

    upscale: int = 1
    only_center_face: bool = False
    largest_face: bool = False
    min_face: float = 0.0
    color_fix: str = "none"
    feather: float = paste.DEFAULT_FEATHER
    batch_size: int = 8
    draw_box: bool = False

    def __post_init__(self):
        if int(self.upscale) != self.upscale or self.upscale < 1:
            raise ValueError(f"upscale must be an integer >= 1, got {self.upscale}")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix must be one of {COLOR_FIXES}, got {self.color_fix!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.min_face < 0:
            raise ValueError(f"min_face must be >= 0, got {self.min_face}")


@dataclasses.dataclass
class PhotoResult:
    image: np.ndarray  # the restored photo, in the input's format, upscaled
    faces: list[detection.Face]  # the restored faces, in input coordinates
    crops: list[np.ndarray]  # uint8 [S, S, 3] aligned input crops
    restored: list[np.ndarray]  # uint8 [S, S, 3] restored crops (after the colour fix)
    dropped: int = 0  # faces detected but left out (min_face, largest/center face)


# ----------------------------------------------------------------------------- photo format


def read_photo(path: str) -> np.ndarray:
    """A photo's pixels as stored: uint8 or uint16, [H, W] gray, [H, W, 2] gray + alpha,
    [H, W, 3] RGB or [H, W, 4] RGBA. Raises ``ValueError("<path>: <reason>")``."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise ValueError(f"{path}: cannot read file ({e.strerror or e})") from None
    if data.size == 0:
        raise ValueError(f"{path}: empty file")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{path}: not a decodable image (png/jpg/jpeg/webp)")
    if img.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: unsupported pixel type {img.dtype} (expected 8 or 16 bit)")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[2] in (3, 4):
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB if img.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    elif not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 2)):
        raise ValueError(f"{path}: unsupported image shape {img.shape}")
    if min(img.shape[:2]) < 1:
        raise ValueError(f"{path}: empty image {img.shape}")
    return img


def write_photo(img: np.ndarray, path: str) -> None:
    """PNG in the photo's own format (``read_photo``'s layout), except gray + alpha, written as
    RGBA with equal colour channels (OpenCV's PNG encoder has no two-channel mode). Raises
    ``ValueError`` when OpenCV cannot encode it."""
    if img.ndim == 3 and img.shape[2] == 2:
        img = np.concatenate([np.repeat(img[..., :1], 3, axis=2), img[..., 1:]], axis=2)
    if img.ndim == 3 and img.shape[2] in (3, 4):
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR if img.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ValueError(f"{path}: cannot encode {img.dtype} {img.shape} as PNG")
    buf.tofile(path)


def _color(img: np.ndarray) -> np.ndarray:
    """The colour channels of a photo (a view: alpha excluded)."""
    if img.ndim == 2:
        return img
    return img[..., 0] if img.shape[2] == 2 else img[..., :3]


def to_rgb8(img: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a ``read_photo`` array (the same array when it already is one)."""
    c = _color(img)
    if c.dtype == np.uint16:
        c = ((c.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if c.ndim == 2:
        c = np.repeat(c[..., None], 3, axis=2)
    return np.ascontiguousarray(c)


def _like(face: np.ndarray, canvas_color: np.ndarray) -> np.ndarray:
    """uint8 RGB ``face`` in the scale and channels of ``canvas_color``."""
    if canvas_color.ndim == 2:
        face = cv2.cvtColor(face, cv2.COLOR_RGB2GRAY)
    if canvas_color.dtype == np.uint16:
        face = face.astype(np.uint16) * np.uint16(257)
    return face


def upscale_photo(img: np.ndarray, s: int) -> np.ndarray:
    """A copy of ``img`` upscaled ``s`` times with Lanczos (a copy also at s = 1)."""
    if s == 1:
        return img.copy()
    h, w = img.shape[:2]
    return cv2.resize(img, (w * s, h * s), interpolation=cv2.INTER_LANCZOS4)


# ----------------------------------------------------------------------------- faces


def select(faces: Sequence[detection.Face], image_shape, options: Options) -> list:
    """The faces to restore: eye distance >= ``min_face``, then the centre or largest one."""
    kept = [f for f in faces if detection.eye_distance(f) >= options.min_face]
    if options.only_center_face:
        one = detection.center_face(kept, image_shape)
        kept = [one] if one is not None else []
    elif options.largest_face:
        one = detection.largest(kept)
        kept = [one] if one is not None else []
    return kept


def looks_aligned(image_shape, faces: Sequence[detection.Face], *, max_side: int = 1024) -> bool:
    """Whether a photo is already an aligned face crop (``--mode=auto``).

    A square photo is a crop when its largest face's alignment to the template at the photo's
    own size is nearly the identity (scale within 20 %, rotation under 10 degrees, centre moved
    under 10 % of the side); also when no face is found and its side is at most ``max_side``:
    degraded crops defeat the detector, and whole photos are rarely small squares.
    """
    h, w = image_shape[:2]
    if h != w:
        return False
    if not faces:
        return h <= max_side
    face = detection.largest(list(faces))
    m = align.transform(face, h)
    scale = align.scale_of(m)
    angle = math.degrees(math.atan2(m[1, 0], m[0, 0]))
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    moved = np.hypot(*(align.apply(m, centre[None])[0] - centre))
    return abs(math.log(scale)) < math.log(1.2) and abs(angle) < 10 and moved < 0.1 * h


def bucket(n: int, batch_size: int) -> int:
    """The padded batch for ``n`` faces: the next power of two, at most ``batch_size``."""
    return min(batch_size, 1 << max(0, n - 1).bit_length())


def restore_crops(
    restorer: Callable, crops: Sequence[np.ndarray], key: jax.Array, batch_size: int
) -> list[np.ndarray]:
    """Restores ``crops`` (uint8 [S, S, 3]) in chunks of ``batch_size`` padded to ``bucket``;
    chunk ``i`` gets ``fold_in(key, i)``."""
    out = []
    for i, start in enumerate(range(0, len(crops), batch_size)):
        chunk = crops[start : start + batch_size]
        batch = np.zeros((bucket(len(chunk), batch_size), *chunk[0].shape), np.uint8)
        batch[: len(chunk)] = np.stack(chunk)
        restored = np.asarray(restorer(batch, jax.random.fold_in(key, i)))
        if restored.shape != batch.shape or restored.dtype != np.uint8:
            raise ValueError(
                f"restorer returned {restored.dtype} {restored.shape}; expected uint8 {batch.shape}"
            )
        out.extend(restored[: len(chunk)])
    return out


def _draw_box(canvas: np.ndarray, face: detection.Face, s: int) -> None:
    color = _color(canvas)
    x0, y0, x1, y1 = ((np.asarray(face.box) + 0.5) * s - 0.5).round().astype(int)
    value = BOX_COLOR if color.ndim == 3 else (int(np.mean(BOX_COLOR)),)
    if color.dtype == np.uint16:
        value = tuple(v * 257 for v in value)
    target = np.ascontiguousarray(color)
    cv2.rectangle(target, (x0, y0), (x1, y1), value, thickness=max(1, 2 * s))
    color[...] = target


def restore_photo(
    photo: np.ndarray,
    detector: detection.Detector | None,
    restorer: Callable,
    key: jax.Array,
    options: Options = Options(),
    *,
    faces: Sequence[detection.Face] | None = None,
    times: dict[str, float] | None = None,
) -> PhotoResult:
    """Restores every face of ``photo`` (a ``read_photo`` array) and pastes them back.

    ``faces`` (input coordinates) replaces detection (the video path passes tracked faces).
    ``times``, when given, gets the seconds of each part added: ``detect``, ``align`` (choice,
    transforms, crops), ``restore`` (the model calls, results on the host) and ``paste`` (the
    upscaled canvas, colour fix, pastes, boxes) (``benchmarks/whole_photo.py``).
    """
    clock = [time.perf_counter()]

    def lap(part: str) -> None:
        now = time.perf_counter()
        if times is not None:
            times[part] = times.get(part, 0.0) + now - clock[0]
        clock[0] = now

    rgb = to_rgb8(photo)
    if faces is None:
        faces = detector.detect(rgb)
    lap("detect")
    found = len(faces)
    faces = select(faces, rgb.shape, options)
    size, s = int(restorer.image_size), int(options.upscale)
    matrices = [align.transform(f, size) for f in faces]
    crops = [align.warp_face(rgb, m, size) for m in matrices]
    del rgb  # a copy for gray or 16-bit photos
    lap("align")
    restored = restore_crops(restorer, crops, key, options.batch_size) if crops else []
    lap("restore")
    canvas = upscale_photo(photo, s)
    if options.color_fix != "none":
        restored = [
            paste.color_transfer(r, c, method=options.color_fix)
            for r, c in zip(restored, crops, strict=True)
        ]
    color = _color(canvas)
    for m, face in zip(matrices, restored, strict=True):
        paste.paste(color, _like(face, color), align.upscaled(m, s), feather=options.feather)
    if options.draw_box:
        for f in faces:
            _draw_box(canvas, f, s)
    lap("paste")
    return PhotoResult(canvas, list(faces), crops, restored, dropped=found - len(faces))


def side_by_side(photo: np.ndarray, restored: np.ndarray, max_side: int = 2048) -> np.ndarray:
    """RGB uint8 preview: input (upscaled to the output's size) | output, longest side at most
    ``max_side`` per half."""
    h, w = restored.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    halves = []
    for img in (photo, restored):
        rgb = to_rgb8(img)
        interp = cv2.INTER_AREA if size[0] <= rgb.shape[1] else cv2.INTER_LANCZOS4
        halves.append(cv2.resize(rgb, size, interpolation=interp))
    return np.concatenate(halves, axis=1)


# ----------------------------------------------------------------------------- video


@dataclasses.dataclass
class VideoReport:
    frames: int = 0
    faces: int = 0  # restored faces over all frames
    flicker_input: float = float("nan")  # mean |frame-to-frame change| in the face masks
    flicker_output: float = float("nan")


class _Flicker:
    """Streaming ``video.flicker`` of input and output at the output's size, over the union of
    consecutive frames' face masks."""

    def __init__(self):
        self.prev = None
        self.sums = np.zeros(2)
        self.count = 0.0

    def add(self, frame_in: np.ndarray, frame_out: np.ndarray, mask: np.ndarray) -> None:
        frame_in = cv2.resize(to_rgb8(frame_in), frame_out.shape[1::-1], cv2.INTER_LINEAR)
        frames = (frame_in.astype(np.float32), to_rgb8(frame_out).astype(np.float32))
        if self.prev is not None:
            both = np.minimum(mask, self.prev[2])[..., None]
            for i in range(2):
                self.sums[i] += float((np.abs(frames[i] - self.prev[i]) * both).sum())
            self.count += float(both.sum()) * 3
        self.prev = (*frames, mask)

    def values(self) -> tuple[float, float]:
        if self.count == 0:
            return float("nan"), float("nan")
        return tuple(float(v) for v in self.sums / self.count)


def restore_video(
    path: str,
    output: str,
    detector: detection.Detector,
    restorer: Callable,
    key: jax.Array,
    options: Options = Options(),
    *,
    png_dir: str | None = None,
    tracker: video.Tracker | None = None,
    on_frame: Callable[[int], None] | None = None,
) -> VideoReport:
    """Restores every frame of the clip ``path`` into the video ``output`` (and PNG frames in
    ``png_dir``); see the module docstring. ``on_frame(i)`` is called after each frame."""
    info = video.video_info(path)
    tracker = tracker or video.Tracker()
    report, flick = VideoReport(), _Flicker()
    size, s = int(restorer.image_size), int(options.upscale)
    with (
        video.read_frames(path) as frames,
        video.VideoWriter(output, info.fps, png_dir=png_dir) as writer,
    ):
        for i, frame in enumerate(frames):
            found = detector.detect(frame)
            tracked = [t.face for t in tracker.update(select(found, frame.shape, options))]
            result = restore_photo(frame, None, restorer, key, options, faces=tracked)
            writer.write(result.image)
            mask = np.zeros(result.image.shape[:2], np.float32)
            for f in result.faces:
                m = align.upscaled(align.transform(f, size), s)
                placed = paste.paste_alpha(m, (size, size), mask.shape, feather=options.feather)
                if placed is not None:
                    (y0, y1, x0, x1), alpha = placed
                    np.maximum(mask[y0:y1, x0:x1], alpha > 0, out=mask[y0:y1, x0:x1])
            flick.add(frame, result.image, mask)
            report.frames += 1
            report.faces += len(result.faces)
            if on_frame is not None:
                on_frame(i)
    report.flicker_input, report.flicker_output = flick.values()
    return report
