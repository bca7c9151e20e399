"""Video reading/writing, face tracking, landmark smoothing and the flicker metric."""

import dataclasses
import os

import cv2
import numpy as np
import pytest

from artfr_jax.data.synthetic import render_face
from artfr_jax.faces import video

W, H, T, FACE = 160, 120, 20, 40


def _positions(t):
    """Top-left corners of the two synthetic faces at frame t: one walks right, one drifts down."""
    return [(8.0 + 2.0 * t, 10.0), (110.0, 20.0 + 1.5 * t)]


def _scene():
    """20 frames of 160x120 with two moving synthetic faces, plus their true boxes per frame."""
    faces = [render_face(i, FACE) for i in (3, 7)]
    frames, boxes = [], []
    for t in range(T):
        frame = np.zeros((H, W, 3), np.uint8)
        frame[..., 0] = np.linspace(40, 200, W, dtype=np.uint8)[None]
        frame[..., 1] = 90
        frame[..., 2] = np.linspace(160, 60, H, dtype=np.uint8)[:, None]
        frame_boxes = []
        for face, (x, y) in zip(faces, _positions(t), strict=True):
            x0, y0 = int(x), int(y)
            frame[y0 : y0 + FACE, x0 : x0 + FACE] = face
            frame_boxes.append(np.array([x0, y0, x0 + FACE, y0 + FACE], np.float64))
        frames.append(frame)
        boxes.append(frame_boxes)
    return frames, boxes


def _landmarks(box):
    """Five points at fixed places in a box (eyes, nose, mouth corners)."""
    x0, y0, x1, y1 = box
    rel = np.array([[0.35, 0.45], [0.65, 0.45], [0.5, 0.6], [0.38, 0.75], [0.62, 0.75]])
    return np.array([x0, y0]) + rel * np.array([x1 - x0, y1 - y0])


@dataclasses.dataclass(frozen=True)
class Det:
    box: np.ndarray
    landmarks: np.ndarray
    score: float
    label: str = "face"


class PlainDet:
    def __init__(self, box, landmarks, score):
        self.box, self.landmarks, self.score = box, landmarks, score


def _dets(boxes, rng=None, noise=0.0):
    out = []
    for box in boxes:
        jitter = 0.0 if rng is None else rng.normal(0.0, noise, 4)
        b = box + jitter
        out.append(Det(b, _landmarks(b), 0.9))
    return out


# ------------------------------------------------------------------------------------------
# Reading and writing


@pytest.mark.parametrize("ext, max_error", [(".mp4", 4.5), (".avi", 4.5)])
def test_video_roundtrip(tmp_path, ext, max_error):
    frames, _ = _scene()
    path = str(tmp_path / "out" / f"clip{ext}")
    png_dir = str(tmp_path / "pngs")
    with video.VideoWriter(path, fps=12.5, png_dir=png_dir) as writer:
        for frame in frames:
            writer.write(frame)
    assert sorted(os.listdir(tmp_path / "out")) == [f"clip{ext}"]  # the partial file was renamed

    info = video.video_info(path)
    assert info == (12.5, W, H, T)
    with video.read_frames(path) as reader:
        assert reader.info == info
        back = list(reader)
    assert len(back) == T
    for a, b in zip(frames, back, strict=True):
        assert b.shape == (H, W, 3) and b.dtype == np.uint8
        # measured: 2.7 (mp4v), 1.8 (MJPG) mean absolute error; a swapped RGB order gives 30
        assert np.abs(a.astype(np.float64) - b).mean() < max_error

    names = sorted(os.listdir(png_dir))
    assert names[0] == "frame_000001.png" and names[-1] == f"frame_{T:06d}.png" and len(names) == T
    png = cv2.cvtColor(cv2.imread(os.path.join(png_dir, names[4])), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(png, frames[4])


def test_odd_frame_size_is_padded(tmp_path):
    path = str(tmp_path / "odd.mp4")
    frame = np.zeros((21, 31, 3), np.uint8)
    frame[:, -1] = 255  # the last column, which a 4:2:0 codec would silently drop
    with video.VideoWriter(path, fps=25, size=(31, 21)) as writer:
        for _ in range(3):
            writer.write(frame)
    fps, width, height, count = video.video_info(path)
    assert (width, height, count) == (32, 22, 3)
    back = next(iter(video.read_frames(path)))
    assert back[:21, 29:].mean() > 150 and back[:21, :25].mean() < 20


def test_unreadable_video_is_a_clear_error(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for path in (garbage, empty, tmp_path / "missing.mp4"):
        with pytest.raises(ValueError, match=str(path)) as err:
            video.read_frames(str(path))  # raises at the call, not at the first next()
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match=str(path)):
            video.video_info(str(path))


def test_writer_errors_leave_no_partial_video(tmp_path):
    frame = np.zeros((H, W, 3), np.uint8)
    with pytest.raises(ValueError, match="unsupported video extension"):
        video.VideoWriter(str(tmp_path / "a.gif"), fps=25)
    with pytest.raises(ValueError, match="positive"):
        video.VideoWriter(str(tmp_path / "a.mp4"), fps=0)

    path = str(tmp_path / "b.mp4")
    with pytest.raises(ValueError, match="frame 2 is 80x60"):
        with video.VideoWriter(path, fps=25) as writer:
            writer.write(frame)
            writer.write(frame[:60, :80])  # OpenCV would drop it silently
    with pytest.raises(ValueError, match="uint8"):
        with video.VideoWriter(path, fps=25) as writer:
            writer.write(frame.astype(np.float32))
    with pytest.raises(ValueError, match="no frames"):
        with video.VideoWriter(path, fps=25, size=(W, H)):
            pass
    assert os.listdir(tmp_path) == []  # no video, no partial file


# ------------------------------------------------------------------------------------------
# Tracking


def test_tracker_keeps_ids_through_motion_and_a_dropout():
    _, boxes = _scene()
    rng = np.random.default_rng(0)
    tracker = video.Tracker()
    ids, last_second = [], None
    for t in range(T):
        dets = _dets(boxes[t], rng, noise=0.5)
        if t == 10:
            dets = dets[:1]  # the second face is missed for one frame
        out = tracker.update(dets[::-1] if t % 2 else dets)  # detection order must not matter
        if t % 2 and t != 10:
            out = [out[1], out[0]]
        if t == 10:
            assert [o.missed for o in out] == [0, 1]
            held = out[1]
            # its last smoothed face is reported again, unchanged
            np.testing.assert_array_equal(held.face.landmarks, last_second.landmarks)
        else:
            assert [o.missed for o in out] == [0, 0]
        assert all(isinstance(o.face, Det) and o.face.label == "face" for o in out)
        ids.append([o.track_id for o in out])
        last_second = out[1].face
    assert ids == [[0, 1]] * T


def test_tracker_drops_tracks_and_can_skip_held_faces():
    box = np.array([50.0, 40.0, 90.0, 80.0])
    face = PlainDet(box, _landmarks(box), 0.8)

    tracker = video.Tracker(max_missed=2, hold_missing=False)
    assert [o.track_id for o in tracker.update([face])] == [0]
    assert tracker.update([]) == []  # missed, not reported
    assert tracker.active_ids == [0]
    out = tracker.update([face])
    assert [(o.track_id, o.missed) for o in out] == [(0, 0)]
    assert isinstance(out[0].face, video.Face) and out[0].face.score == 0.8

    for _ in range(3):  # longer than max_missed: the track ends
        tracker.update([])
    assert tracker.active_ids == []
    assert [o.track_id for o in tracker.update([face])] == [1]

    far = PlainDet(box + 60, _landmarks(box + 60), 0.8)  # no overlap: a new face
    assert [o.track_id for o in tracker.update([face, far])] == [1, 2]

    with pytest.raises(ValueError, match="68 landmarks"):
        tracker.update([PlainDet(box, np.zeros((68, 2)), 0.5)])


def test_tracker_follows_a_fast_face_through_a_two_frame_dropout():
    # 12 px/frame: after two missed frames the last box overlaps the new one by IoU 0.05 only (the
    # track would end and a new id start); the velocity-predicted box still matches.
    tracker = video.Tracker(max_missed=2)
    for t in range(20):
        box = np.array([10.0 + 12 * t, 40.0, 50.0 + 12 * t, 80.0])
        out = tracker.update([] if t in (10, 11) else [PlainDet(box, _landmarks(box), 0.9)])
        assert [o.track_id for o in out] == [0]


# ------------------------------------------------------------------------------------------
# Smoothing


@pytest.mark.parametrize("num_landmarks, min_reduction", [(5, 2.5), (68, 3.5)])
def test_smoothing_reduces_still_face_jitter(num_landmarks, min_reduction):
    rng = np.random.default_rng(1)
    truth = rng.uniform(40, 100, (num_landmarks, 2))
    box = np.array([30.0, 30.0, 110.0, 110.0])
    tracker = video.Tracker()
    raw, smooth = [], []
    for _ in range(200):
        noisy = truth + rng.normal(0.0, 1.0, truth.shape)
        (out,) = tracker.update([Det(box, noisy, 0.9)])
        raw.append(noisy - truth)
        smooth.append(out.face.landmarks - truth)
    reduction = np.std(raw[30:]) / np.std(smooth[30:])
    # measured here: 3.3x (5 points), 4.5x (68 points); the module docstring has more
    assert reduction > min_reduction, reduction


def test_smoothing_lag_is_small_for_steady_motion():
    rng = np.random.default_rng(2)
    shape = _landmarks(np.array([0.0, 0.0, 60.0, 60.0]))
    filt = video.LandmarkFilter()
    lags = []
    for t in range(120):
        truth = shape + np.array([5.0 * t, 0.0])
        out, box = filt(
            truth + rng.normal(0.0, 1.0, truth.shape), np.array([5.0 * t, 0, 5.0 * t + 60, 60])
        )
        lags.append((truth - out)[:, 0].mean())
    lag = np.mean(lags[30:])
    assert 0.3 < lag < 1.5, lag  # measured 1.2 px; causal, so it lags a little
    assert box[0] == pytest.approx(5.0 * 119, abs=2.0)

    params = video.SmoothingParams()
    # the bound the docstring promises: the steady-state lag of a one-pole low-pass at any speed
    for v in (0.5, 2.0, 5.0, 20.0, 100.0):
        assert v / (2 * np.pi * (params.min_cutoff + params.beta * v)) < 1 / (
            2 * np.pi * params.beta
        )


def test_smoothed_crops_flicker_less():
    """A patch pasted where noisy landmarks put it flickers; at the smoothed landmarks, less."""
    rng = np.random.default_rng(3)
    patch = render_face(5, 48)
    base = _landmarks(np.array([56.0, 36.0, 104.0, 84.0]))
    tracker = video.Tracker()
    raw_frames, smooth_frames = [], []
    for _ in range(30):
        noisy = base + rng.normal(0.0, 1.0, base.shape)
        (out,) = tracker.update([Det(np.array([56.0, 36.0, 104.0, 84.0]), noisy, 0.9)])
        for landmarks, frames in ((noisy, raw_frames), (out.face.landmarks, smooth_frames)):
            shift = (landmarks - base).mean(0)
            m = np.array([[1.0, 0.0, 56.0 + shift[0]], [0.0, 1.0, 36.0 + shift[1]]])
            frames.append(cv2.warpAffine(patch, m, (W, H), flags=cv2.INTER_LINEAR))
    mask = video.boxes_mask(H, W, [np.array([56.0, 36.0, 104.0, 84.0])])
    raw, smooth = (
        video.flicker(raw_frames[5:], [mask] * 25),
        video.flicker(smooth_frames[5:], [mask] * 25),
    )
    assert smooth < 0.3 * raw, (raw, smooth)  # measured: 3.4 -> 0.58


# ------------------------------------------------------------------------------------------
# Flicker


def test_flicker_is_zero_for_a_still_video(tmp_path):
    frames, _ = _scene()
    still = [frames[0]] * 6
    assert video.flicker(still) == 0.0
    assert video.flicker(iter(still), [np.ones((H, W), bool)] * 6) == 0.0

    path = str(tmp_path / "still.mp4")
    with video.VideoWriter(path, fps=25) as writer:
        for frame in still:
            writer.write(frame)
    assert video.flicker(video.read_frames(path)) < 0.5  # codec noise only


def test_flicker_matches_hand_computed_values():
    f0 = np.zeros((2, 2, 3), np.uint8)
    f1 = f0.copy()
    f1[0, 0] = (30, 30, 30)  # mean over channels 30
    f1[1, 1] = (0, 0, 90)  # 30
    f2 = f1.copy()
    f2[0, 1, 0] = 60  # 20
    frames = [f0, f1, f2]
    # whole frames: pair 1 changes 30 + 30 over 4 px, pair 2 changes 20: (60 + 20) / 8
    assert video.flicker(frames) == pytest.approx(10.0)

    top = np.array([[True, True], [False, False]])
    # per frame masks: pair weight = both frames' masks
    assert video.flicker(frames, [top, top, top]) == pytest.approx((30 + 20) / 4)
    assert video.flicker(frames, [top, np.zeros((2, 2), bool), top]) == pytest.approx(
        float("nan"), nan_ok=True
    )
    # one mask per pair (inferred from the count), float weights
    w = np.array([[1.0, 0.0], [0.0, 0.5]])
    assert video.flicker(frames, [w, top]) == pytest.approx((30 + 0.5 * 30 + 20) / (1.5 + 2))
    assert video.flicker(iter(frames), iter([w, top]), per_pair=True) == pytest.approx(65 / 3.5)

    with pytest.raises(ValueError, match="2 frames"):
        video.flicker([f0])
    with pytest.raises(ValueError, match="masks for 3 frames"):
        video.flicker(frames, [top])
    with pytest.raises(ValueError, match="fewer masks"):
        video.flicker(iter(frames), iter([top, top]))
    with pytest.raises(ValueError, match="does not match"):
        video.flicker(frames, [np.ones((3, 3))] * 3)
