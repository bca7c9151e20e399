"""``python -m artfr_jax.restore --mode=whole|auto``: whole photos and videos through the command,
with stand-in restorers (identity, invert) and, apart from the real-photo test, a stand-in
detector whose faces are placed by known similarities."""

from __future__ import annotations

import os

import cv2
import jax
import numpy as np
import pytest
from absl import flags

from artfr_jax import restore
from artfr_jax.data.synthetic import render_face
from artfr_jax.faces import align, detection, paste, pipeline, video
from artfr_jax.faces.detection import Face
from tests import photos

S = 64  # the stand-in restorers' image size


class Identity:
    image_size = S

    def __init__(self):
        self.batches = []

    def __call__(self, lq, rng):
        self.batches.append(lq.shape[0])
        return lq.copy()


class Invert(Identity):
    def __call__(self, lq, rng):
        super().__call__(lq, rng)
        return 255 - lq


class FixedFaces:
    """A detector that finds ``faces`` (a list, or a function of the call number) in any image."""

    def __init__(self, faces):
        self.faces, self.calls = faces, 0

    def detect(self, image):
        self.calls += 1
        return list(self.faces(self.calls - 1) if callable(self.faces) else self.faces)


def _similarity(angle_deg, scale, tx, ty):
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.concatenate([rot, [[tx], [ty]]], 1)


def _face(placement, size=512):
    """The dlib-5 template at ``size`` px moved by ``placement`` (crop -> photo)."""
    lm = align.apply(placement, align.template("dlib5", size))
    x0, y0 = lm.min(0) - 10
    x1, y1 = lm.max(0) + 10
    return Face(box=np.array([x0, y0, x1, y1]), landmarks=lm, kind="dlib5", score=1.0)


PLACEMENTS = [_similarity(10, 0.45, 20, 30), _similarity(-15, 0.3, 260, 120)]


def _photo(h=300, w=420):
    """A smooth background with two synthetic faces at ``PLACEMENTS`` (512-px face units)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([120 + 60 * np.sin(xx / 40), 100 + 50 * np.cos(yy / 30), 140 + 0 * xx], -1)
    for i, pl in enumerate(PLACEMENTS):
        face = cv2.warpAffine(render_face(i, 512), pl, (w, h), flags=cv2.INTER_AREA)
        cover = cv2.warpAffine(np.ones((512, 512), np.float32), pl, (w, h))[..., None]
        img = img * (1 - cover) + face * cover
    return np.rint(img).astype(np.uint8)


def _masks(shape, faces, s=1):
    """Union of the paste weights > 0 of ``faces`` on a canvas of ``shape`` (upscale ``s``)."""
    union = np.zeros(shape[:2], bool)
    for f in faces:
        m = align.upscaled(align.transform(f, S), s)
        (y0, y1, x0, x1), alpha = paste.paste_alpha(m, (S, S), shape)
        union[y0:y1, x0:x1] |= alpha > 0
    return union


def _run(monkeypatch, tmp_path, restorer, detector, *args, inputs=None):
    monkeypatch.setattr(restore, "_load_restorer", lambda workdir, **kw: restorer)
    monkeypatch.setattr(detection, "make_detector", lambda *a, **kw: detector)
    fv = flags.FlagValues()
    restore.define_flags(fv)
    src = inputs or str(tmp_path / "in")
    fv(["restore", "--workdir=unused", f"--input={src}", f"--output={tmp_path / 'out'}", *args])
    return restore.main(["restore"], fv)


def _save(path, img):
    assert pipeline.write_photo(img, str(path)) is None
    return str(path)


def _read(path):
    return pipeline.read_photo(str(path))


@pytest.fixture
def two_faces(tmp_path):
    (tmp_path / "in").mkdir()
    img = _photo()
    _save(tmp_path / "in" / "group.png", img)
    return img, [_face(p) for p in PLACEMENTS]


def test_identity_restorer_keeps_the_photo(two_faces, tmp_path, monkeypatch, capsys):
    img, faces = two_faces
    restorer = Identity()
    assert _run(monkeypatch, tmp_path, restorer, FixedFaces(faces), "--mode=whole") == 0
    assert restorer.batches == [2]  # both faces of the photo in one model call
    out = _read(tmp_path / "out" / "restored_imgs" / "group.png")
    inside = _masks(img.shape, faces)
    assert out.shape == img.shape and out.dtype == img.dtype
    np.testing.assert_array_equal(out[~inside], img[~inside])  # bit for bit outside the masks
    mse = np.mean((out[inside].astype(np.float64) - img[inside]) ** 2)
    assert 10 * np.log10(255**2 / mse) > 28  # two bilinear resamplings of 0.3-0.45x faces
    for d in ("cropped_faces", "restored_faces"):
        assert sorted(os.listdir(tmp_path / "out" / d)) == ["group_00.png", "group_01.png"]
    sbs = _read(tmp_path / "out" / "side_by_side" / "group.png")
    assert sbs.shape == (img.shape[0], 2 * img.shape[1], 3)
    assert "restored 1 of 1 images" in capsys.readouterr().out
    assert os.listdir(tmp_path / "in") == ["group.png"]  # nothing written into the input


def test_two_faces_each_change_only_their_region(two_faces, tmp_path, monkeypatch):
    img, faces = two_faces
    assert _run(monkeypatch, tmp_path, Invert(), FixedFaces(faces), "--mode=whole") == 0
    out = _read(tmp_path / "out" / "restored_imgs" / "group.png")
    changed = np.any(out != img, axis=-1)
    for i, f in enumerate(faces):
        own = _masks(img.shape, [f])
        others = _masks(img.shape, faces[:i] + faces[i + 1 :])
        assert changed[own & ~others].mean() > 0.9  # inverted inside the face's own mask
    assert not changed[~_masks(img.shape, faces)].any()


def test_upscale_two_geometry(two_faces, tmp_path, monkeypatch):
    img, faces = two_faces
    assert _run(monkeypatch, tmp_path, Identity(), FixedFaces(faces), "--upscale=2") == 0
    out = _read(tmp_path / "out" / "restored_imgs" / "group.png")
    want = cv2.resize(img, (2 * img.shape[1], 2 * img.shape[0]), interpolation=cv2.INTER_LANCZOS4)
    inside = _masks(want.shape, faces, s=2)
    assert out.shape == want.shape
    np.testing.assert_array_equal(out[~inside], want[~inside])
    # The identity restorer puts each face back where the upscaled photo has it.
    err = np.abs(out[inside].astype(np.float64) - want[inside]).mean()
    assert err < 4.0, err
    # The crop of the first face, warped from the output at 2x, is the crop of the input.
    m = align.transform(faces[0], S)
    a = align.warp_face(img, m, S)
    b = align.warp_face(out, align.upscaled(m, 2), S)
    assert np.abs(a.astype(np.float64) - b).mean() < 3.0


@pytest.mark.parametrize("kind", ["gray", "rgba", "rgb16", "gray_alpha16"])
def test_photo_formats_are_kept(kind, tmp_path, monkeypatch):
    base = _photo()
    img = {
        "gray": cv2.cvtColor(base, cv2.COLOR_RGB2GRAY),
        "rgba": np.concatenate(
            [base, (np.arange(base.size // 3) % 251).reshape(*base.shape[:2], 1).astype(np.uint8)],
            -1,
        ),
        "rgb16": base.astype(np.uint16) * 257 + 3,
        "gray_alpha16": np.stack(
            [
                cv2.cvtColor(base, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257,
                40000 + 0 * base[..., 0].astype(np.uint16),
            ],
            -1,
        ),
    }[kind]
    (tmp_path / "in").mkdir()
    _save(tmp_path / "in" / "p.png", img)
    faces = [_face(p) for p in PLACEMENTS]
    assert _run(monkeypatch, tmp_path, Invert(), FixedFaces(faces), "--mode=whole") == 0
    out = _read(tmp_path / "out" / "restored_imgs" / "p.png")
    if kind == "gray_alpha16":  # written as RGBA with equal colour channels
        assert out.shape[2] == 4 and (out[..., 1] == out[..., 0]).all()
        out = out[..., [0, 3]]
    assert out.shape == img.shape and out.dtype == img.dtype
    inside = _masks(img.shape, faces)
    np.testing.assert_array_equal(out[~inside], img[~inside])
    if img.ndim == 3 and img.shape[2] in (2, 4):
        np.testing.assert_array_equal(out[..., -1], img[..., -1])  # alpha untouched
    color = out if out.ndim == 2 else out[..., 0]
    assert (color[inside] != (img if img.ndim == 2 else img[..., 0])[inside]).mean() > 0.9


def test_photo_without_a_face_is_copied_and_reported(tmp_path, monkeypatch, capsys):
    (tmp_path / "in").mkdir()
    img = _photo()
    _save(tmp_path / "in" / "empty.png", img)
    assert _run(monkeypatch, tmp_path, Invert(), FixedFaces([]), "--upscale=2") == 0
    out = _read(tmp_path / "out" / "restored_imgs" / "empty.png")
    want = cv2.resize(img, (2 * img.shape[1], 2 * img.shape[0]), interpolation=cv2.INTER_LANCZOS4)
    np.testing.assert_array_equal(out, want)
    captured = capsys.readouterr()
    assert "empty.png: no face found" in captured.err
    assert "1 without a face" in captured.out


def test_min_face_and_largest_face_filters(two_faces, tmp_path, monkeypatch):
    img, faces = two_faces
    restorer = Identity()
    big_eyes = detection.eye_distance(faces[0])
    args = ["--mode=whole", f"--min_face={big_eyes - 1}"]
    assert _run(monkeypatch, tmp_path, restorer, FixedFaces(faces), *args) == 0
    assert restorer.batches == [1]
    assert os.listdir(tmp_path / "out" / "restored_faces") == ["group_00.png"]


def test_auto_mode_sorts_crops_from_photos(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    crop = render_face(3, 128)
    _save(tmp_path / "in" / "crop.png", crop)
    _save(tmp_path / "in" / "photo.png", _photo())

    def faces_for(call):  # classify sees the crop only; the whole loop sees the photo
        return [_face(_similarity(0, 128 / 512, 0, 0))] if call == 0 else [_face(PLACEMENTS[0])]

    assert _run(monkeypatch, tmp_path, Identity(), FixedFaces(faces_for)) == 0
    assert os.path.isfile(tmp_path / "out" / "crop.png")  # the aligned-crop layout
    assert os.listdir(tmp_path / "out" / "restored_imgs") == ["photo.png"]


def test_bad_files_in_whole_mode(tmp_path, monkeypatch, capsys):
    (tmp_path / "in").mkdir()
    _save(tmp_path / "in" / "good.png", _photo())
    (tmp_path / "in" / "notes.jpg").write_text("not an image")
    (tmp_path / "in" / "clip.mp4").write_bytes(b"\x00" * 100)
    before = sorted(os.listdir(tmp_path / "in"))
    faces = [_face(p) for p in PLACEMENTS]
    assert _run(monkeypatch, tmp_path, Identity(), FixedFaces(faces), "--mode=whole") == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'in' / 'notes.jpg'}: not a decodable image" in err
    assert f"{tmp_path / 'in' / 'clip.mp4'}:" in err
    assert os.path.isfile(tmp_path / "out" / "restored_imgs" / "good.png")
    assert sorted(os.listdir(tmp_path / "in")) == before
    assert not os.path.exists(tmp_path / "out" / "restored_videos" / "clip.mp4")


def _clip(path, frames=16, h=120, w=160):
    """A clip whose face moves 2 px per frame to the right; returns the placements."""
    placements = [_similarity(0, 0.15, 20 + 2 * i, 20) for i in range(frames)]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bg = np.stack([100 + 40 * np.sin(xx / 20), 90 + 0 * xx, 120 + 30 * np.cos(yy / 15)], -1)
    with video.VideoWriter(str(path), 10.0) as writer:
        for pl in placements:
            face = cv2.warpAffine(render_face(0, 512), pl, (w, h), flags=cv2.INTER_AREA)
            cover = cv2.warpAffine(np.ones((512, 512), np.float32), pl, (w, h))[..., None]
            writer.write(np.rint(bg * (1 - cover) + face * cover).astype(np.uint8))
    return placements


def test_video_faces_tracked_smoothed_and_written(tmp_path, monkeypatch, capsys):
    (tmp_path / "in").mkdir()
    placements = _clip(tmp_path / "in" / "clip.mp4")
    noise = np.random.default_rng(0).normal(0, 1.5, (len(placements), 5, 2))

    def noisy(call):
        f = _face(placements[call])
        return [Face(f.box, f.landmarks + noise[call], f.kind, 1.0)]

    assert _run(monkeypatch, tmp_path, Invert(), FixedFaces(noisy), "--mode=whole") == 0
    out = str(tmp_path / "out" / "restored_videos" / "clip.mp4")
    info = video.video_info(out)
    assert (info.frame_count, info.width, info.height) == (len(placements), 160, 120)

    # Smoothing: the pasted (inverted) face jitters less than with raw landmarks.
    def flicker(tracker):
        det = FixedFaces(noisy)
        report = pipeline.restore_video(
            str(tmp_path / "in" / "clip.mp4"),
            str(tmp_path / f"t{id(tracker)}.mp4"),
            det,
            Invert(),
            jax.random.key(0),
            pipeline.Options(),
            tracker=tracker,
        )
        assert report.frames == len(placements) and report.faces == len(placements)
        return report.flicker_output

    raw = video.Tracker(smoothing=video.SmoothingParams(min_cutoff=10.0, beta=0.0))
    assert flicker(video.Tracker()) < flicker(raw)


def test_real_photos_every_face_found_and_pasted(tmp_path, monkeypatch, capsys):
    """scikit-image's astronaut and a six-person group photo (``tests/photos.py``) through the
    real dlib detector: every face restored, nothing changed outside the faces."""
    (tmp_path / "in").mkdir()
    imgs = {"astronaut.png": photos.astronaut(), "group.png": photos.group_photo()}
    for name, img in imgs.items():
        _save(tmp_path / "in" / name, img)
    monkeypatch.setattr(restore, "_load_restorer", lambda workdir, **kw: Invert())
    fv = flags.FlagValues()
    restore.define_flags(fv)
    fv(["restore", "--workdir=u", f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'out'}"])
    assert restore.main(["restore"], fv) == 0
    faces = sorted(os.listdir(tmp_path / "out" / "restored_faces"))
    assert faces == ["astronaut_00.png"] + [f"group_{k:02d}.png" for k in range(photos.GROUP_FACES)]
    det = detection.make_detector(min_score=0.25)  # the command's default
    for name, img in imgs.items():
        out = _read(tmp_path / "out" / "restored_imgs" / name)
        inside = _masks(img.shape, det.detect(img))
        np.testing.assert_array_equal(out[~inside], img[~inside])
        assert (out[inside] != img[inside]).mean() > 0.9
    assert "7 faces" in capsys.readouterr().out
