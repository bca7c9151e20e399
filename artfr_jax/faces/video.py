"""Video input/output, face tracking and temporal landmark smoothing for whole-frame restoration.

A video is restored frame by frame: detect faces, :class:`Tracker` gives each face a stable id and
smooths its landmarks over time (so the aligned crops, and the restored faces pasted back, do not
jitter), restore, paste back, :class:`VideoWriter`. Everything streams: one frame in memory at a
time, and the smoothing is causal (no look-ahead, no added latency).

Reading and writing (OpenCV's FFmpeg backend, opencv-python-headless 5.1 as installed here):

* :func:`read_frames` yields RGB ``uint8 [H, W, 3]`` frames; :func:`video_info` gives
  ``(fps, width, height, frame_count)``. OpenCV reports an unreadable file only by returning no
  frames, so both check that the file opens *and* that a first frame decodes, and raise a one-line
  ``ValueError`` naming the file otherwise. ``width``/``height`` are the first decoded frame's
  (so they include any rotation OpenCV applies), ``frame_count`` is the container's figure (``-1``
  when it has none; it can be approximate), a missing or absurd fps becomes 25 with a warning.
* Writable here (checked by writing and reading back): ``.mp4``/``.m4v``/``.mov``/``.mkv`` with
  fourcc ``mp4v`` (MPEG-4 Part 2) and ``.avi`` with ``MJPG``. H.264 (``avc1``/``H264``) is *not*
  available: this FFmpeg build has no libx264, only the ``h264_v4l2m2m`` hardware encoder, which
  fails without a device. ``mp4v`` plays in VLC/ffmpeg/mpv but not in most web browsers;
  re-encode with ``ffmpeg -i out.mp4 -c:v libx264 -pix_fmt yuv420p out_h264.mp4`` when that
  matters. The quality cannot be set through OpenCV here (``VIDEOWRITER_PROP_QUALITY`` makes the
  FFmpeg writer fail to open; ``OPENCV_FFMPEG_WRITER_OPTIONS`` with ``b`` or ``qscale`` changed
  nothing): 160x120 test clips come back with a mean absolute error of 2.3-2.7 (0-255) with
  ``mp4v``, 1.8-2.6 with ``MJPG`` (7-8x larger files), of which 0.7-0.8 is the 4:2:0 chroma
  subsampling alone. Use ``png_dir`` for lossless frames.
* Both codecs store 4:2:0 chroma and silently drop the last row/column of odd-sized frames, and
  OpenCV silently skips a frame whose size differs from the first: :class:`VideoWriter` pads odd
  sizes by edge replication (the PNG frames keep the exact size) and refuses a wrong-sized frame.
* :class:`VideoWriter` writes to a temporary name next to the output and renames it on a clean
  close, so an interrupted run never leaves a truncated video that looks complete.

Tracking (:class:`Tracker`): boxes are matched to tracks by IoU with the Hungarian algorithm
(``scipy.optimize.linear_sum_assignment``), each track's box being predicted forward with its
smoothed velocity; a pair below ``iou_threshold`` is no match. A track survives ``max_missed``
frames without a detection; meanwhile (``hold_missing=True``, the default) its last smoothed face
is reported again, so a one- or two-frame detector dropout does not make the face pop back to
unrestored and then restored again (the cost: a face that really vanished behind an occluder is
still pasted for up to ``max_missed`` frames at its last position).

Smoothing (:class:`LandmarkFilter`): a One-Euro filter (Casiez, Roussel and Vogel, CHI 2012), a
first-order low-pass whose cutoff rises with speed, ``cutoff = min_cutoff + beta * speed``, in
frame units (cutoffs in cycles per frame, speed in px per frame; Hz = cycles/frame x fps). Unlike
the per-coordinate original, one cutoff serves the whole face, driven by the speed of the
similarity motion (translation + zoom + in-plane rotation) least-squares fitted to the smoothed
landmark velocities, averaged over the landmarks: fitting over K points averages the detector
noise out of the speed estimate (so a still face is smoothed hard), while zooming and rotating
faces still count as moving, and all landmarks move together so the face shape is not distorted.
The box is filtered with the same coefficient. At constant speed ``v`` the steady lag is about
``v / (2 pi (min_cutoff + beta v))``, never more than ``1 / (2 pi beta)`` = 1.6 px at any speed
with the defaults.

Defaults ``min_cutoff=0.01``, ``beta=0.1``, ``d_cutoff=0.05`` (cycles/frame), measured with this
module on synthetic tracks (i.i.d. Gaussian detector noise of 1 px per coordinate, 300 frames,
first 50 discarded, mean of 5 seeds; ``python -m artfr_jax.faces.video`` reprints them):

==========================================  ==========  ===========
measurement                                  5 points    68 points
==========================================  ==========  ===========
still face: noise std, in / out              3.0x        4.4x
steady 5 px/frame: mean lag                  1.22 px     1.25 px
steady 5 px/frame: noise std, in / out       1.2x        1.2x
steady 1 px/frame: mean lag                  0.80 px     0.82 px
start from rest to 5 px/frame: worst error   3.0 px      2.8 px
zoom 1 %/frame, frames 30-59: mean error    0.80 px     0.89 px
==========================================  ==========  ===========

(A per-landmark One-Euro filter tuned to the same 1.25 px lag reduces the still-face noise only
2.2x: its speed estimate is noisier.)

:func:`flicker` measures the mean absolute frame-to-frame change inside masks (e.g. the faces'
boxes, :func:`boxes_mask`), to compare an input video with its restoration.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import cv2
import numpy as np
import scipy.optimize
from absl import logging

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".avi")
# The codec each writable extension gets (see the module docstring for what this build can write).
FOURCC_BY_EXTENSION = {
    ".mp4": "mp4v",
    ".m4v": "mp4v",
    ".mov": "mp4v",
    ".mkv": "mp4v",
    ".avi": "MJPG",
}
DEFAULT_FPS = 25.0


def is_video_path(path: str) -> bool:
    """Whether ``path`` has one of :data:`VIDEO_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(str(path))[1].lower() in VIDEO_EXTENSIONS


# ---------------------------------------------------------------------------------------------
# Reading


class VideoInfo(NamedTuple):
    fps: float
    width: int
    height: int
    frame_count: int  # from the container; -1 when unknown, may be approximate


class FrameReader:
    """Iterator over a video's frames as RGB ``uint8 [H, W, 3]``; also a context manager.

    Opening checks that the file exists, opens and decodes a first frame (``ValueError``
    otherwise); ``info`` is available at once. The capture is released when the frames run out,
    on :meth:`close`, on leaving a ``with`` block, or when the reader is garbage collected.
    """

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise ValueError(f"{self.path}: no such video file")
        cap = cv2.VideoCapture(self.path)
        if not cap.isOpened():
            cap.release()
            raise ValueError(
                f"{self.path}: cannot open as a video (not a video, or a format OpenCV cannot read)"
            )
        ok, frame = cap.read()
        if not ok or frame is None:
            cap.release()
            raise ValueError(f"{self.path}: video has no readable frames")
        self._cap = cap
        self._first = frame
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        if not math.isfinite(fps) or not 0 < fps <= 1000:
            logging.warning(
                "%s: no usable frame rate in the file (%r); assuming %g fps",
                self.path,
                fps,
                DEFAULT_FPS,
            )
            fps = DEFAULT_FPS
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        count = int(count) if math.isfinite(count) and count > 0 else -1
        self.info = VideoInfo(fps, int(frame.shape[1]), int(frame.shape[0]), count)

    def __iter__(self) -> FrameReader:
        return self

    def __next__(self) -> np.ndarray:
        if self._first is not None:
            frame, self._first = self._first, None
        elif self._cap is None:
            raise StopIteration
        else:
            ok, frame = self._cap.read()
            if not ok or frame is None:
                self.close()
                raise StopIteration
        if frame.ndim == 2:
            return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        cap, self._cap, self._first = getattr(self, "_cap", None), None, None
        if cap is not None:
            cap.release()

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def read_frames(path: str) -> FrameReader:
    """Streams the RGB ``uint8 [H, W, 3]`` frames of video ``path``; raises ``ValueError`` at once
    (not at the first ``next``) when the file cannot be opened or has no frames."""
    return FrameReader(path)


def video_info(path: str) -> VideoInfo:
    """``(fps, width, height, frame_count)`` of video ``path`` (see :class:`VideoInfo`); raises
    ``ValueError`` naming the file when it cannot be opened or has no frames."""
    with FrameReader(path) as reader:
        return reader.info


# ---------------------------------------------------------------------------------------------
# Writing


class VideoWriter:
    """Writes RGB ``uint8 [H, W, 3]`` (or ``[H, W]``) frames to a video and/or a PNG folder.

    Args:
      path: output video (one of :data:`VIDEO_EXTENSIONS`), or None for PNG frames only. Missing
        parent folders are created. The video is written to ``.<name>.partial<ext>`` beside it and
        renamed on a clean :meth:`close`; leaving a ``with`` block by an exception deletes it.
      fps: frame rate to store (pass the input's, :func:`video_info`).
      size: ``(width, height)``; by default the first frame's. Given, the encoder is opened at
        once, so a bad path fails before any work is done.
      png_dir: also write every frame losslessly as ``png_dir/frame_000001.png``, ... (1-based).
      fourcc: codec override (default :data:`FOURCC_BY_EXTENSION`).

    Every frame must have the first frame's size. Odd sizes are padded to even by repeating the
    last row/column in the video (4:2:0 codecs would silently drop it), not in the PNGs.
    """

    def __init__(
        self,
        path: str | None,
        fps: float,
        *,
        size: tuple[int, int] | None = None,
        png_dir: str | None = None,
        fourcc: str | None = None,
    ):
        if path is None and png_dir is None:
            raise ValueError("VideoWriter needs a video path, a png_dir, or both")
        fps = float(fps)
        if not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"{path}: frame rate must be a positive number, got {fps}")
        self.path = None if path is None else str(path)
        self.fps = fps
        self.png_dir = png_dir
        self.frames_written = 0
        self._size = None if size is None else (int(size[0]), int(size[1]))
        self._writer = None
        self._tmp_path = None
        self._closed = False
        if self.path is not None:
            ext = os.path.splitext(self.path)[1].lower()
            if fourcc is None:
                if ext not in FOURCC_BY_EXTENSION:
                    raise ValueError(
                        f"{self.path}: unsupported video extension {ext!r}; use one of "
                        f"{', '.join(FOURCC_BY_EXTENSION)} (.mp4 is MPEG-4 'mp4v', .avi is MJPG)"
                    )
                fourcc = FOURCC_BY_EXTENSION[ext]
            if len(fourcc) != 4:
                raise ValueError(f"{self.path}: fourcc must be 4 characters, got {fourcc!r}")
            self.fourcc = fourcc
            folder, name = os.path.split(os.path.abspath(self.path))
            stem, _ = os.path.splitext(name)
            self._tmp_path = os.path.join(folder, f".{stem}.partial{ext}")
        if png_dir is not None:
            os.makedirs(png_dir, exist_ok=True)
        if self._size is not None and self.path is not None:
            self._open()

    def _open(self) -> None:
        width, height = self._size
        if width <= 0 or height <= 0:
            raise ValueError(f"{self.path}: frame size must be positive, got {width}x{height}")
        even = (width + width % 2, height + height % 2)
        if even != (width, height):
            logging.warning(
                "%s: %dx%d frames are padded to %dx%d (the codec needs even sizes)",
                self.path,
                width,
                height,
                *even,
            )
        os.makedirs(os.path.dirname(self._tmp_path), exist_ok=True)
        # CAP_FFMPEG explicitly: with CAP_ANY an unsupported name falls through to the
        # image-sequence writer, which fails with an assertion instead of a False isOpened.
        writer = cv2.VideoWriter(
            self._tmp_path, cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*self.fourcc), self.fps, even
        )
        if not writer.isOpened():
            writer.release()
            self._remove_tmp()
            raise ValueError(
                f"{self.path}: OpenCV cannot write this video (codec {self.fourcc!r}, "
                f"{even[0]}x{even[1]} at {self.fps:g} fps); try an .avi output (MJPG) or png_dir"
            )
        self._writer = writer

    def write(self, frame: np.ndarray) -> None:
        """Appends one RGB ``uint8`` frame."""
        if self._closed:
            raise ValueError(f"{self.path or self.png_dir}: write after close")
        frame = np.asarray(frame)
        if frame.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {frame.dtype}")
        if frame.ndim == 2:
            frame = np.repeat(frame[..., None], 3, -1)
        if frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"frames must be [H, W, 3] RGB or [H, W], got shape {frame.shape}")
        size = (frame.shape[1], frame.shape[0])
        if self._size is None:
            self._size = size
            if self.path is not None:
                self._open()
        elif size != self._size:
            raise ValueError(
                f"{self.path or self.png_dir}: frame {self.frames_written + 1} is "
                f"{size[0]}x{size[1]}, the video is {self._size[0]}x{self._size[1]}"
            )
        bgr = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR)
        if self._writer is not None:
            pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
            video_frame = (
                cv2.copyMakeBorder(bgr, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE)
                if pad_h or pad_w
                else bgr
            )
            self._writer.write(video_frame)
        self.frames_written += 1
        if self.png_dir is not None:
            png = os.path.join(self.png_dir, f"frame_{self.frames_written:06d}.png")
            if not cv2.imwrite(png, bgr):
                raise OSError(f"{png}: could not write the PNG frame")

    def _remove_tmp(self) -> None:
        if self._tmp_path is not None and os.path.exists(self._tmp_path):
            os.remove(self._tmp_path)

    def close(self) -> None:
        """Finishes the video and moves it into place; ``ValueError`` when no frame was written."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self.path is None:
            return
        if self.frames_written == 0:
            self._remove_tmp()
            raise ValueError(f"{self.path}: no frames were written; no video produced")
        os.replace(self._tmp_path, self.path)

    def abort(self) -> None:
        """Stops without producing the video (the PNG frames written so far stay)."""
        self._closed = True
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        self._remove_tmp()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------------
# Temporal smoothing


@dataclasses.dataclass(frozen=True)
class SmoothingParams:
    """One-Euro parameters in frame units (see the module docstring for the measured effect).

    min_cutoff: cutoff (cycles/frame) of a still face; lower smooths still faces more.
    beta: cutoff increase per px/frame of speed; higher cuts the lag of moving faces (the lag at
      any steady speed is below ``1 / (2 pi beta)`` px) and lets more jitter through.
    d_cutoff: cutoff (cycles/frame) of the low-pass on the velocity the speed is taken from.
    """

    min_cutoff: float = 0.01
    beta: float = 0.1
    d_cutoff: float = 0.05

    def __post_init__(self):
        if not (self.min_cutoff > 0 and self.d_cutoff > 0 and self.beta >= 0):
            raise ValueError(f"need min_cutoff > 0, d_cutoff > 0, beta >= 0; got {self}")


def _alpha(cutoff: float, dt: float) -> float:
    """Low-pass smoothing factor for ``cutoff`` (cycles/frame) after ``dt`` frames."""
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


def similarity_speed(points: np.ndarray, velocity: np.ndarray) -> float:
    """Mean speed over ``points [K, 2]`` of the similarity motion (translation, zoom, in-plane
    rotation about the centroid) least-squares fitted to ``velocity [K, 2]``."""
    fitted = np.broadcast_to(velocity.mean(0), velocity.shape)
    q = points - points.mean(0)
    qq = float((q * q).sum())
    if len(points) >= 2 and qq > 1e-9:
        perp = np.stack([-q[:, 1], q[:, 0]], -1)
        zoom = float((q * velocity).sum()) / qq
        turn = float((perp * velocity).sum()) / qq
        fitted = fitted + zoom * q + turn * perp
    return float(np.linalg.norm(fitted, axis=-1).mean())


class LandmarkFilter:
    """Causal One-Euro filter for one face: landmarks ``[K, 2]`` and box ``[4]`` share one cutoff.

    The first call returns its input; later calls return the filtered positions. ``dt`` is the
    number of frames since the previous call (more than 1 after missed detections).
    """

    def __init__(self, params: SmoothingParams = SmoothingParams()):
        self.params = params
        self.reset()

    def reset(self) -> None:
        self._pos = None  # [K + 2, 2] filtered landmarks then the box's two corners
        self._vel = None  # [K + 2, 2] low-passed velocity, px/frame
        self._k = 0

    @property
    def velocity(self) -> np.ndarray | None:
        """Smoothed velocity ``[K + 2, 2]`` in px/frame (landmarks, then the box corners)."""
        return None if self._vel is None else self._vel.copy()

    def predict_box(self, dt: float = 1.0) -> np.ndarray | None:
        """The box ``dt`` frames after the last update, extrapolated with the smoothed velocity."""
        if self._pos is None:
            return None
        return (self._pos[self._k :] + dt * self._vel[self._k :]).reshape(4)

    def __call__(
        self, landmarks: np.ndarray, box: np.ndarray | None = None, dt: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray | None]:
        landmarks = np.asarray(landmarks, np.float64)
        k = len(landmarks)
        box_pts = np.zeros((2, 2)) if box is None else np.asarray(box, np.float64).reshape(2, 2)
        obs = np.concatenate([landmarks, box_pts], 0)
        if self._pos is None:
            self._pos, self._vel, self._k = obs.copy(), np.zeros_like(obs), k
        else:
            if k != self._k:
                raise ValueError(f"landmark count changed from {self._k} to {k} within a track")
            p = self.params
            dt = float(dt)
            raw_vel = (obs - self._pos) / dt
            self._vel += _alpha(p.d_cutoff, dt) * (raw_vel - self._vel)
            speed = similarity_speed(self._pos[:k], self._vel[:k])
            self._pos += _alpha(p.min_cutoff + p.beta * speed, dt) * (obs - self._pos)
        out_box = None if box is None else self._pos[k:].reshape(4).copy()
        return self._pos[:k].copy(), out_box


# ---------------------------------------------------------------------------------------------
# Tracking


class Face(NamedTuple):
    """A detected face, for inputs that are not dataclasses."""

    box: np.ndarray  # float64 [4] x0, y0, x1, y1
    landmarks: np.ndarray  # float64 [K, 2] x, y
    score: float


class TrackedFace(NamedTuple):
    track_id: int
    face: Any  # the detection with smoothed box and landmarks (same dataclass type, or a Face)
    missed: int  # 0: detected in this frame; n > 0: not detected for n frames, last face reused


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``[N, M]`` of boxes ``a [N, 4]`` and ``b [M, 4]`` (x0, y0, x1, y1)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda r: np.clip(r[:, 2] - r[:, 0], 0, None) * np.clip(r[:, 3] - r[:, 1], 0, None)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _with_geometry(face: Any, box: np.ndarray, landmarks: np.ndarray) -> Any:
    if dataclasses.is_dataclass(face) and not isinstance(face, type):
        return dataclasses.replace(face, box=box, landmarks=landmarks)
    return Face(box=box, landmarks=landmarks, score=float(face.score))


@dataclasses.dataclass
class _Track:
    track_id: int
    filter: LandmarkFilter | None
    face: Any  # last reported (smoothed) face
    missed: int = 0


class Tracker:
    """Stable face ids across frames and temporally smoothed landmarks; feed it every frame.

    Args:
      iou_threshold: least IoU between a track's predicted box and a detection to match them.
      max_missed: frames a track survives without a detection (then it is dropped, and a face
        appearing later gets a new id).
      hold_missing: while a track is missed, report its last smoothed face again (``missed > 0``)
        so a detector dropout does not leave the face unrestored for a frame or two.
      smoothing: One-Euro parameters, or None for no smoothing (ids only).
    """

    def __init__(
        self,
        *,
        iou_threshold: float = 0.3,
        max_missed: int = 2,
        hold_missing: bool = True,
        smoothing: SmoothingParams | None = SmoothingParams(),
    ):
        if not 0 < iou_threshold <= 1:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        if max_missed < 0:
            raise ValueError(f"max_missed must be >= 0, got {max_missed}")
        self.iou_threshold = float(iou_threshold)
        self.max_missed = int(max_missed)
        self.hold_missing = bool(hold_missing)
        self.smoothing = smoothing
        self.frame_index = -1
        self._tracks: list[_Track] = []
        self._next_id = 0
        self._num_landmarks = None

    @property
    def active_ids(self) -> list[int]:
        """Ids of the tracks alive after the last update (detected or held)."""
        return [t.track_id for t in self._tracks]

    def _check(self, face: Any) -> tuple[np.ndarray, np.ndarray]:
        box = np.asarray(face.box, np.float64)
        landmarks = np.asarray(face.landmarks, np.float64)
        if box.shape != (4,):
            raise ValueError(f"face box must have shape [4], got {box.shape}")
        if landmarks.ndim != 2 or landmarks.shape[1] != 2:
            raise ValueError(f"face landmarks must have shape [K, 2], got {landmarks.shape}")
        if self._num_landmarks is None:
            self._num_landmarks = len(landmarks)
        elif len(landmarks) != self._num_landmarks:
            raise ValueError(
                f"faces have {len(landmarks)} landmarks, earlier ones had {self._num_landmarks}"
            )
        return box, landmarks

    def _predicted_box(self, track: _Track) -> np.ndarray:
        if track.filter is not None:
            return track.filter.predict_box(track.missed + 1)
        return np.asarray(track.face.box, np.float64)

    def update(self, faces: Sequence[Any]) -> list[TrackedFace]:
        """Takes this frame's detections (objects with ``box``, ``landmarks``, ``score``) and
        returns one :class:`TrackedFace` per detection, in the given order, followed by the held
        missed tracks (``hold_missing``) in id order."""
        self.frame_index += 1
        geometry = [self._check(f) for f in faces]
        matches: dict[int, int] = {}  # detection index -> track index
        if self._tracks and faces:
            predicted = np.stack([self._predicted_box(t) for t in self._tracks])
            iou = box_iou(predicted, np.stack([g[0] for g in geometry]))
            rows, cols = scipy.optimize.linear_sum_assignment(iou, maximize=True)
            for r, c in zip(rows, cols, strict=True):
                if iou[r, c] >= self.iou_threshold:
                    matches[int(c)] = int(r)

        out: list[TrackedFace] = []
        kept: list[_Track] = []
        matched_tracks = set(matches.values())
        for i, (face, (box, landmarks)) in enumerate(zip(faces, geometry, strict=True)):
            if i in matches:
                track = self._tracks[matches[i]]
                dt = track.missed + 1
            else:
                filt = None if self.smoothing is None else LandmarkFilter(self.smoothing)
                track = _Track(self._next_id, filt, None)
                self._next_id += 1
                dt = 1
            if track.filter is not None:
                landmarks, box = track.filter(landmarks, box, dt)
            track.face = _with_geometry(face, box.copy(), landmarks.copy())
            track.missed = 0
            kept.append(track)
            out.append(TrackedFace(track.track_id, track.face, 0))

        held = []
        for j, track in enumerate(self._tracks):
            if j in matched_tracks:
                continue
            track.missed += 1
            if track.missed <= self.max_missed:
                kept.append(track)
                if self.hold_missing:
                    held.append(TrackedFace(track.track_id, track.face, track.missed))
        out.extend(sorted(held, key=lambda t: t.track_id))
        self._tracks = sorted(kept, key=lambda t: t.track_id)
        return out


# ---------------------------------------------------------------------------------------------
# Flicker


def boxes_mask(height: int, width: int, boxes: Iterable[np.ndarray]) -> np.ndarray:
    """Boolean ``[height, width]`` mask of the union of boxes (x0, y0, x1, y1; clipped)."""
    mask = np.zeros((height, width), bool)
    for box in boxes:
        x0, y0, x1, y1 = np.asarray(box, np.float64)
        c0, r0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        c1, r1 = min(width, math.ceil(x1)), min(height, math.ceil(y1))
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def _mask_weights(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} does not match frame size {shape}")
    m = m.astype(np.float64)
    if not np.all(np.isfinite(m)) or m.min(initial=0.0) < 0:
        raise ValueError("mask weights must be finite and non-negative")
    return m


def flicker(
    frames: Iterable[np.ndarray],
    masks: Iterable[Any] | None = None,
    *,
    per_pair: bool | None = None,
) -> float:
    """Mean absolute frame-to-frame change (0-255 scale) inside masks; streams its inputs.

    ``sum_t sum_px w_t(px) * mean_c |f_{t+1} - f_t| / sum_t sum_px w_t(px)``: pixels pooled over
    all frame pairs. ``frames``: ``[H, W, C]`` or ``[H, W]`` arrays on the 0-255 scale (uint8 or
    float). ``masks``: None (whole frames), one boolean or float-weight ``[H, W]`` mask per frame
    (pair weight = the two frames' minimum, i.e. pixels inside the mask in both frames), or one
    per frame pair (``per_pair=True``). ``per_pair=None`` decides from the lengths when both
    inputs have one (T masks: per frame; T - 1: per pair), else assumes per frame. Returns NaN
    when the masks are empty everywhere.
    """
    if masks is not None and per_pair is None:
        per_pair = False
        if hasattr(frames, "__len__") and hasattr(masks, "__len__"):
            n, m = len(frames), len(masks)
            if m == n - 1 and n > 1:
                per_pair = True
            elif m != n:
                raise ValueError(
                    f"{m} masks for {n} frames: give one per frame or one per frame pair"
                )
    mask_iter = None if masks is None else iter(masks)

    def next_mask(shape):
        try:
            return _mask_weights(next(mask_iter), shape)
        except StopIteration:
            raise ValueError("fewer masks than frames (or frame pairs)") from None

    total = weight = 0.0
    num_frames = 0
    prev = prev_mask = None
    for frame in frames:
        f = np.asarray(frame, np.float32)
        if f.ndim == 2:
            f = f[..., None]
        if f.ndim != 3:
            raise ValueError(f"frames must be [H, W, C] or [H, W], got shape {f.shape}")
        num_frames += 1
        cur_mask = next_mask(f.shape[:2]) if mask_iter is not None and not per_pair else None
        if prev is not None:
            if f.shape != prev.shape:
                raise ValueError(
                    f"frame {num_frames} has shape {f.shape}, the previous one {prev.shape}"
                )
            diff = np.abs(f - prev).mean(-1, dtype=np.float64)
            if mask_iter is None:
                w = None
            elif per_pair:
                w = next_mask(f.shape[:2])
            else:
                w = np.minimum(prev_mask, cur_mask)
            if w is None:
                total += float(diff.sum())
                weight += diff.size
            else:
                total += float((diff * w).sum())
                weight += float(w.sum())
        prev, prev_mask = f, cur_mask
    if num_frames < 2:
        raise ValueError(f"flicker needs at least 2 frames, got {num_frames}")
    if mask_iter is not None and next(mask_iter, None) is not None:
        raise ValueError("more masks than frames (or frame pairs)")
    return total / weight if weight > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# The docstring's measurements


def _shape(k: int, rng: np.random.Generator) -> np.ndarray:
    if k == 5:  # eyes, nose, mouth corners of a ~60 px face
        return np.array([[38, 52], [74, 52], [56, 72], [42, 92], [70, 92]], np.float64)
    return rng.uniform(20, 100, (k, 2))


def _run_filter(observed: np.ndarray, params: SmoothingParams) -> np.ndarray:
    filt = LandmarkFilter(params)
    return np.stack([filt(p)[0] for p in observed])


def measure_smoothing(
    params: SmoothingParams = SmoothingParams(),
    num_landmarks: int = 5,
    seed: int = 0,
    noise: float = 1.0,
) -> dict[str, float]:
    """The filter's jitter reduction and lag on synthetic tracks (see the module docstring)."""
    rng = np.random.default_rng(seed)
    frames, skip = 300, 50
    shape = _shape(num_landmarks, rng)
    t = np.arange(frames, dtype=np.float64)[:, None, None]
    noisy = lambda truth: truth + rng.normal(0.0, noise, truth.shape)
    res = {}
    still = np.broadcast_to(shape, (frames, *shape.shape))
    obs = noisy(still)
    res["still_noise_reduction"] = float(
        (obs - still)[skip:].std() / (_run_filter(obs, params) - still)[skip:].std()
    )
    for speed in (5.0, 1.0):
        moving = still + np.array([speed, 0.0]) * t
        obs = noisy(moving)
        err = (moving - _run_filter(obs, params))[skip:]
        res[f"lag_{speed:g}px"] = float(err[..., 0].mean())
        if speed == 5.0:
            res["moving_noise_reduction"] = float(
                (obs - moving)[skip:].std() / (err - err.mean((0, 1))).std()
            )
    onset = still + np.array([5.0, 0.0]) * np.maximum(t - skip, 0)
    err = np.abs(onset - _run_filter(noisy(onset), params))[skip : skip + 20, :, 0].mean(1)
    res["onset_worst_error"] = float(err.max())
    centre = shape.mean(0)
    zoom = centre + (shape - centre) * 1.01 ** t[:60]
    res["zoom_error"] = float(
        np.linalg.norm(zoom - _run_filter(noisy(zoom), params), axis=-1)[30:].mean()
    )
    return res


if __name__ == "__main__":
    for k in (5, 68):
        runs = [measure_smoothing(num_landmarks=k, seed=s) for s in range(5)]
        print(
            f"{k} landmarks:",
            {key: round(float(np.mean([r[key] for r in runs])), 2) for key in runs[0]},
        )
