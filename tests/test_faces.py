"""Whole-photo face pipeline: detection, alignment, paste-back (artfr_jax/faces/)."""

import logging
import tracemalloc

import cv2
import numpy as np
import pytest

from artfr_jax.data.synthetic import render_face
from artfr_jax.faces import align, detection, paste
from artfr_jax.faces.detection import Face
from tests import photos

_REASON = detection.dlib_available()
needs_dlib = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))
S = 512


def _similarity(angle_deg, scale, tx, ty):
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.concatenate([rot, [[tx], [ty]]], 1)


def _psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - b) ** 2)
    return 10 * np.log10(255.0**2 / mse)


def _face(placement, kind="dlib5"):
    """A Face whose landmarks are the dlib-5 template moved by ``placement`` (crop -> photo)."""
    lm = align.apply(placement, align.template("dlib5", S))
    return Face(box=np.zeros(4), landmarks=lm, kind=kind, score=1.0)


@pytest.fixture(scope="module")
def photo():
    """A 1000 x 1400 smooth background with two synthetic faces placed by known similarities
    (a 538 px face turned 12 degrees, a 256 px face turned -20 degrees): (image, placements)."""
    h, w = 1000, 1400
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bg = np.stack(
        [
            120 + 60 * np.sin(xx / 170),
            100 + 50 * np.cos(yy / 130),
            140 + 40 * np.sin((xx + yy) / 210),
        ],
        -1,
    )
    image = np.clip(bg, 0, 255)
    placements = [_similarity(12, 1.05, 60, 120), _similarity(-20, 0.5, 900, 500)]
    for i, pl in enumerate(placements):
        face = cv2.warpAffine(render_face(i, S), pl, (w, h), flags=cv2.INTER_AREA)
        cover = cv2.warpAffine(np.ones((S, S), np.float32), pl, (w, h))[..., None]
        image = image * (1 - cover) + face * cover
    return np.rint(image).astype(np.uint8), placements


@pytest.fixture(scope="module")
def astronaut():
    import skimage.data

    return skimage.data.astronaut()


# --- align ------------------------------------------------------------------------------------


def test_umeyama_recovers_similarity():
    rng = np.random.default_rng(0)
    for kind in align.TEMPLATES:
        src = align.template(kind, S)
        for _ in range(5):
            m = _similarity(
                rng.uniform(-180, 180), rng.uniform(0.05, 20), *rng.uniform(-1e3, 1e3, 2)
            )
            fit = align.umeyama(src, align.apply(m, src))
            np.testing.assert_allclose(fit, m, atol=1e-9 * max(1.0, np.abs(m).max()))
    rigid = _similarity(33, 1.0, 5, -7)
    src = rng.normal(size=(7, 2)) * 50
    np.testing.assert_allclose(
        align.umeyama(src, align.apply(rigid, src), scale=False), rigid, atol=1e-9
    )
    # A mirror image cannot be fitted by a proper similarity: the fit stays a rotation.
    mirrored = src * [-1, 1]
    assert np.linalg.det(align.umeyama(src, mirrored)[:, :2]) > 0
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        align.umeyama(src, src[:3])


def test_template_scaling_is_pixel_centred():
    t1024 = align.template("dlib5", 1024)
    np.testing.assert_allclose(t1024, align.DLIB5_TEMPLATE_1024)
    t512 = align.template("dlib5", 512)
    # Scaling a point of a 1024 px image down to 512 px in the pixel-centre convention.
    np.testing.assert_allclose(t512, (t1024 + 0.5) / 2 - 0.5)
    np.testing.assert_allclose(align.template("retinaface5", 512), align.RETINAFACE5_TEMPLATE_512)
    # dlib order: image-right eye (outer, inner), image-left eye (outer, inner), nose.
    x = t512[:, 0]
    assert x[0] > x[1] > x[4] > x[3] > x[2]
    with pytest.raises(ValueError, match="unknown kind"):
        align.template("nope")


def test_upscaled_and_resized_maps_points():
    m = _similarity(17, 1.7, 30.25, -12.5)
    u = np.array([[0.0, 0.0], [10.0, 3.0], [123.4, 77.7]])
    for s in (2, 3, 0.5, 1.25):
        # An upscaled pixel centre u is the original point (u + 0.5) / s - 0.5.
        np.testing.assert_allclose(
            align.apply(align.upscaled(m, s), u), align.apply(m, (u + 0.5) / s - 0.5), atol=1e-9
        )
        # A crop resized by s puts crop point v at (v + 0.5) * s - 0.5.
        np.testing.assert_allclose(
            align.apply(align.resized(m, s), u), (align.apply(m, u) + 0.5) * s - 0.5, atol=1e-9
        )
    # Image edges stay edges: the upscaled image's -0.5 edge is the original's.
    np.testing.assert_allclose(
        align.apply(align.upscaled(m, 4), [-0.5, -0.5]), align.apply(m, [-0.5, -0.5])
    )
    np.testing.assert_allclose(
        paste.inverse(m) @ np.append(align.apply(m, u[2]), 1), u[2], atol=1e-9
    )


def test_ffhq_quad_to_crop_edges():
    rng = np.random.default_rng(1)
    lm = rng.uniform(100, 300, (68, 2))
    quad = align.ffhq_quad(lm)
    m = align.landmarks_transform(lm, "dlib68", S)
    np.testing.assert_allclose(
        align.apply(m, quad),
        [[-0.5, -0.5], [-0.5, S - 0.5], [S - 0.5, S - 0.5], [S - 0.5, -0.5]],
        atol=1e-9,
    )
    # The quad is a square: the matrix is a similarity (equal singular values).
    sv = np.linalg.svd(m[:, :2], compute_uv=False)
    np.testing.assert_allclose(sv[0], sv[1], rtol=1e-12)
    face = Face(box=np.zeros(4), landmarks=lm, kind="dlib68", score=0.0)
    np.testing.assert_array_equal(align.transform(face, S), m)
    with pytest.raises(ValueError, match="unknown landmark kind"):
        align.landmarks_transform(lm, "sfd", S)


def test_warp_face_recovers_placed_face(photo):
    image, placements = photo
    for i, pl in enumerate(placements):
        m = align.transform(_face(pl), S)
        np.testing.assert_allclose(m, paste.inverse(pl), atol=1e-9)
        crop = align.warp_face(image, m, S)
        assert crop.shape == (S, S, 3) and crop.dtype == np.uint8
        # Both resamplings smooth the face a little; the interior must still be the same face.
        inner = slice(64, S - 64)
        assert _psnr(crop[inner, inner], render_face(i, S)[inner, inner]) > 28


def test_warp_face_antialiases_and_borders():
    checker = (np.indices((1024, 1024)).sum(0) % 2 * 255).astype(np.uint8)
    image = np.repeat(checker[..., None], 3, -1)
    m = _similarity(0, 0.25, 0, 0)  # a 1024 px face into a 256 px crop
    crop = align.warp_face(image, m, 256)
    assert abs(crop.mean() - 127.5) < 1 and crop.std() < 2  # no aliasing moire
    naive = cv2.warpAffine(image, m, (256, 256))
    assert abs(naive.mean() - 127.5) > 100  # a plain bilinear warp samples one colour of four
    gray = align.warp_face(image[:100, :100], _similarity(0, 1, 50, 50), 64, border="constant")
    np.testing.assert_array_equal(gray[0, 0], align.GRAY)
    reflected = align.warp_face(image[:100, :100], _similarity(0, 1, 50, 50), 64)
    np.testing.assert_array_equal(reflected[49, 49], image[0, 0])
    np.testing.assert_array_equal(reflected[48, 48], image[0, 0])  # BORDER_REFLECT repeats the edge
    with pytest.raises(ValueError, match="border"):
        align.warp_face(image, m, 64, border="wrap")


# --- paste ------------------------------------------------------------------------------------


def _coverage(faces_m, shape, size=S):
    """Union of the canvas pixels that any paste mask touches (alpha > 0)."""
    cover = np.zeros(shape[:2], bool)
    for m in faces_m:
        (y0, y1, x0, x1), alpha = paste.paste_alpha(m, (size, size), shape)
        cover[y0:y1, x0:x1] |= alpha > 0
    return cover


def test_identity_restorer_round_trip(photo):
    """Warp out, change nothing, paste back: close inside the masks, bit-equal elsewhere.

    Two bilinear resamplings (photo -> crop -> photo) low-pass the face: 45.5 dB (measured) on
    the 538 px drawn face (anti-aliased edges on smooth shading). The 256 px face's crop is a 2x
    upsample that paste area-averages 2x before warping back (its anti-aliasing for real
    restored detail), a further blur: 39.0 dB. The bounds leave 3-4 dB.
    """
    image, placements = photo
    out = image.copy()
    ms = [align.transform(_face(pl), S) for pl in placements]
    for m in ms:
        before = out.copy()
        region = paste.paste(out, align.warp_face(image, m, S), m)
        y0, y1, x0, x1 = region
        changed = np.any(out != before, -1)
        assert changed[y0:y1, x0:x1].any()
        changed[y0:y1, x0:x1] = False
        assert not changed.any()  # nothing outside this face's region moved
    cover = _coverage(ms, image.shape)
    np.testing.assert_array_equal(out[~cover], image[~cover])
    for m, bound in zip(ms, (42, 35), strict=True):
        y0, y1, x0, x1 = paste.face_region(m, (S, S), image.shape)
        sel = np.zeros_like(cover)
        sel[y0:y1, x0:x1] = cover[y0:y1, x0:x1]
        assert _psnr(out[sel], image[sel]) > bound


def test_paste_feathered_mask(photo):
    image, placements = photo
    m = align.transform(_face(placements[0]), S)
    canvas = image.copy()
    white = np.full((S, S, 3), 255, np.uint8)
    paste.paste(canvas, white, m)
    crop_pts = np.array([[S / 2, S / 2], [S / 2, 0.5], [S / 2, 25.5]])  # centre, edge, mid-band
    p = np.rint(align.apply(paste.inverse(m), crop_pts)).astype(int)
    np.testing.assert_array_equal(canvas[p[0, 1], p[0, 0]], [255, 255, 255])
    np.testing.assert_array_equal(canvas[p[1, 1], p[1, 0]], image[p[1, 1], p[1, 0]])
    mid = canvas[p[2, 1], p[2, 0]].astype(float)
    assert np.all(mid > image[p[2, 1], p[2, 0]] + 20) and np.all(mid < 250)
    mask = paste.soft_mask((S, S))
    assert mask.dtype == np.float32 and mask.min() == 0 and mask.max() == 1
    assert mask[:, :2].max() == 0 and mask[S // 2, S // 2] == 1
    assert (
        abs(mask[S // 2, 25:27].mean() - 0.5) < 0.05
    )  # half way at 25.5 px of 512 (module docstring)


@pytest.mark.parametrize("s", [2, 1])
def test_paste_upscale_geometry(s):
    """A marker in the crop lands at s p + (s - 1) / 2 on an s x Lanczos-upscaled canvas
    (2 p + 0.5 at --upscale=2; s = 1 takes the shrink-first path, the crop is 3.3x its place)."""
    image = np.full((300, 400, 3), 100, np.uint8)
    m = align.umeyama(
        align.apply(_similarity(-25, 0.3, 120, 60), align.template("dlib5", S)),
        align.template("dlib5", S),
    )
    crop = np.full((S, S, 3), 100, np.float32)
    v = np.array([250.0, 270.0])
    yy, xx = np.mgrid[0:S, 0:S]
    crop += (150 * np.exp(-((xx - v[0]) ** 2 + (yy - v[1]) ** 2) / (2 * 6.0**2)))[..., None]
    crop = np.rint(crop).astype(np.uint8)
    canvas = cv2.resize(image, (400 * s, 300 * s), interpolation=cv2.INTER_LANCZOS4)
    paste.paste(canvas, crop, align.upscaled(m, s))
    w = canvas[..., 0].astype(np.float64) - 100
    yy, xx = np.mgrid[0 : 300 * s, 0 : 400 * s]
    centroid = np.array([(w * xx).sum(), (w * yy).sum()]) / w.sum()
    p = align.apply(paste.inverse(m), v)
    np.testing.assert_allclose(centroid, s * p + (s - 1) / 2, atol=0.05)


def test_paste_memory_stays_regional():
    """A face pasted into a 12-megapixel photo allocates about its region, not the photo."""
    canvas = np.zeros((3000, 4000, 3), np.uint8)
    face = render_face(0, S)
    m = align.umeyama(
        align.apply(_similarity(10, 0.9, 2000, 1000), align.template("dlib5", S)),
        align.template("dlib5", S),
    )
    tracemalloc.start()
    try:
        region = paste.paste(canvas, face, m)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    y0, y1, x0, x1 = region
    assert (y1 - y0) * (x1 - x0) < 0.03 * canvas.shape[0] * canvas.shape[1]
    assert peak < 48 * (y1 - y0) * (x1 - x0)  # a few float32 [h, w, 3] temporaries (36 B/px)
    assert peak < canvas.size  # far below one float copy of the photo (4 x canvas.size)


def test_paste_dtypes_hull_and_errors(photo):
    image, placements = photo
    m = align.transform(_face(placements[0]), S)
    crop = align.warp_face(image, m, S)
    # Float canvas: the same blend without rounding.
    fl = image.astype(np.float32)
    paste.paste(fl, np.full((S, S, 3), 255, np.float32), m)
    u8 = image.copy()
    paste.paste(u8, np.full((S, S, 3), 255, np.uint8), m)
    assert np.abs(fl - u8).max() <= 0.5
    # Grayscale canvas and crop.
    g = image[..., 0].copy()
    paste.paste(g, crop[..., 0], m)
    # A landmark-hull mask leaves the crop outside the hull alone.
    hull_pts = align.template("dlib5", S)
    hull_pts = np.concatenate([hull_pts, [[256, 440]]])  # with the chin
    mask = paste.hull_mask(hull_pts, S, grow=1.3)
    canvas = image.copy()
    paste.paste(canvas, np.zeros((S, S, 3), np.uint8), m, mask=mask)
    corner = np.rint(align.apply(paste.inverse(m), [60, 60])).astype(int)
    np.testing.assert_array_equal(canvas[corner[1], corner[0]], image[corner[1], corner[0]])
    nose = np.rint(align.apply(paste.inverse(m), hull_pts[4])).astype(int)
    np.testing.assert_array_equal(canvas[nose[1], nose[0]], [0, 0, 0])
    # Out of the canvas: nothing to do.
    assert paste.paste(image.copy(), crop, align.compose(m, _similarity(0, 1, 5000, 0))) is None
    with pytest.raises(ValueError, match="channels"):
        paste.paste(image.copy(), crop[..., :2], m)
    ro = image.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        paste.paste(ro, crop, m)
    with pytest.raises(ValueError, match="mask must be"):
        paste.paste(image.copy(), crop, m, mask=np.ones((S, 10)))


@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_color_transfer_matches_reference_colour(method):
    reference = render_face(3, S)
    shifted = np.clip(reference.astype(np.float32) * [0.8, 1.0, 1.1] + [30, -20, 10], 0, 255)
    shifted = np.rint(shifted).astype(np.uint8)
    out = paste.color_transfer(shifted, reference, method=method)
    assert out.dtype == np.uint8 and out.shape == reference.shape
    before = np.abs(shifted.mean((0, 1)) - reference.mean((0, 1))).max()
    after = np.abs(out.mean((0, 1)) - reference.mean((0, 1))).max()
    assert before > 15 and after < 1.0, (before, after)
    assert _psnr(out, reference) > _psnr(shifted, reference) + 10
    # Half-size reference (an input crop at another size) is resized first.
    half = cv2.resize(reference, (S // 2, S // 2), interpolation=cv2.INTER_AREA)
    assert (
        np.abs(
            paste.color_transfer(shifted, half, method).mean((0, 1)) - reference.mean((0, 1))
        ).max()
        < 1.5
    )
    with pytest.raises(ValueError, match="method"):
        paste.color_transfer(shifted, reference, method="hist")


# --- detection --------------------------------------------------------------------------------


def test_face_helpers_without_dlib():
    def mk(box, eyes_dx):
        lm = np.array([[50 + eyes_dx, 50], [40 + eyes_dx, 50], [50, 50], [60, 50], [55, 70.0]])
        return Face(box=np.array(box, float), landmarks=lm, kind="dlib5", score=1.0)

    faces = [mk([0, 0, 10, 10], 30), mk([80, 80, 120, 130], 40), mk([45, 40, 60, 60], 20)]
    assert detection.largest(faces) is faces[1]
    assert detection.center_face(faces, (100, 100, 3)) is faces[2]
    assert detection.largest([]) is None and detection.center_face([], (5, 5)) is None
    # dlib5: eye centres are the corner midpoints, (55, 50) and (75, 50) for eyes_dx = 30.
    assert detection.eye_distance(faces[0]) == pytest.approx(20.0)
    lm68 = np.zeros((68, 2))
    lm68[36:42] = [10, 20]
    lm68[42:48] = [40, 60]
    assert detection.eye_distance(Face(np.zeros(4), lm68, "dlib68", 0.0)) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="uint8 \\[H, W, 3\\] RGB"):
        detection.check_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="16-bit"):
        detection.check_image(np.zeros((4, 4, 3), np.uint16))


@pytest.mark.parametrize("missing", ["dlib", "face_recognition_models"])
def test_missing_dlib_is_one_line(monkeypatch, missing):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install -e \. ") as err:
        detection.make_detector()
    assert missing in str(err.value) and "\n" not in str(err.value)


@needs_dlib
def test_detect_astronaut_and_align_like_ffhq(astronaut):
    """The dlib-5 template alignment matches the exact FFHQ (68-point) alignment of a real face.

    Measured at 512 px: the 68 landmarks through both matrices differ by a mean 1.6 px (max 3.1);
    a mirrored point order (eyes swapped) puts them 150 px apart.
    """
    found5 = detection.make_detector().detect(astronaut)
    found68 = detection.make_detector(landmarks="68").detect(astronaut)
    # HOG at upsample 1 also fires (score 0.12) on the astronaut's glove; the face comes first.
    assert len(found5) == len(found68) == 2 and found5[1].score < 0.2
    f5, f68 = found5[0], found68[0]
    assert f5.kind == "dlib5" and f5.landmarks.shape == (5, 2) and f5.landmarks.dtype == np.float64
    assert f68.kind == "dlib68" and f68.landmarks.shape == (68, 2)
    np.testing.assert_array_equal(f5.box, f68.box)
    np.testing.assert_array_equal(f5.box, [174.5, 75.5, 265.5, 166.5])  # dlib's (175, 76, 265, 166)
    assert f5.score > 0.5
    x0, y0, x1, y1 = f5.box
    assert np.all((f5.landmarks >= [x0, y0]) & (f5.landmarks <= [x1, y1]))
    lm = f68.landmarks
    m5, m68 = align.transform(f5, S), align.transform(f68, S)
    err = np.linalg.norm(align.apply(m5, lm) - align.apply(m68, lm), axis=1)
    assert err.mean() < 2.5 and err.max() < 5, err
    swapped = align.umeyama(f5.landmarks[[2, 3, 0, 1, 4]], align.template("dlib5", S))
    assert np.linalg.norm(align.apply(swapped, lm) - align.apply(m68, lm), axis=1).mean() > 50
    # The eye distance agrees between the landmark sets.
    assert detection.eye_distance(f5) == pytest.approx(detection.eye_distance(f68), rel=0.05)
    # FFHQ geometry of the dlib-5 crop (dlib_face's aligned-face check uses the same numbers).
    eyes = align.apply(m5, np.stack(detection.eye_centers(f68))) / S
    np.testing.assert_allclose(eyes, [[0.375, 0.48], [0.625, 0.48]], atol=0.03)


@needs_dlib
def test_detect_large_photo_maps_back_exactly(astronaut):
    """Detection at max_side on a 4x (pixel-replicated) photo: the box is the 1x box mapped by
    the resize, landmarks come from the full-resolution photo (within 2 px = half an input px)."""
    det = detection.make_detector()
    small = det.detect(astronaut)[0]
    big = cv2.resize(astronaut, None, fx=4, fy=4, interpolation=cv2.INTER_NEAREST)
    face = detection.make_detector(max_side=512).detect(big)[0]
    np.testing.assert_allclose(face.box, (small.box + 0.5) * 4 - 0.5, atol=1e-9)
    np.testing.assert_allclose(face.landmarks, 4 * small.landmarks + 1.5, atol=2.0)
    assert face.score == pytest.approx(small.score)


@needs_dlib
def test_detect_sorted_and_empty(photo, astronaut):
    det = detection.make_detector()
    assert det.detect(np.full((64, 64, 3), 128, np.uint8)) == []
    head = astronaut[30:230, 120:320]  # the face, without the glove HOG also fires on
    group = np.full((900, 1300, 3), 90, np.uint8)
    for scale, (y, x) in [(0.7, (100, 100)), (1.0, (600, 1000)), (0.85, (300, 600))]:
        h = round(200 * scale)
        group[y : y + h, x : x + h] = cv2.resize(head, (h, h), interpolation=cv2.INTER_AREA)
    faces = det.detect(group)
    assert len(faces) == 3
    assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)
    assert faces[0].box[1] > 600 and faces[2].box[1] < 300  # the largest, lowest face first
    with pytest.raises(ValueError, match="RGB"):
        det.detect(group[..., 0])
    with pytest.raises(ValueError, match="landmarks"):
        detection.make_detector(landmarks="81")


@needs_dlib
def test_68_point_licence_warning_once(monkeypatch, caplog):
    monkeypatch.setattr(detection, "_warned_68", False)
    with caplog.at_level(logging.WARNING, logger=detection.__name__):
        detection.make_detector(landmarks="68")
        detection.make_detector(landmarks="68")
        detection.make_detector(landmarks="5")
    warnings = [r for r in caplog.records if "iBUG 300-W" in r.getMessage()]
    assert len(warnings) == 1 and "commercial" in warnings[0].getMessage()


@needs_dlib
def test_cnn_detector(astronaut):
    """dlib's mmod CNN (about 3 s on two CPU cores for a 512 px photo at upsample 0)."""
    reason = detection.dlib_available(("mmod_human_face_detector.dat",))
    if reason is not None:
        pytest.skip(reason)
    (face,) = detection.make_detector("cnn", upsample=0).detect(astronaut)
    assert face.kind == "dlib5" and face.score > 0.5
    hog = detection.make_detector().detect(astronaut)[0]
    assert np.linalg.norm(face.center - hog.center) < 10


@needs_dlib
def test_group_photo_pipeline():
    image = photos.group_photo()
    faces = detection.make_detector().detect(image)
    assert len(faces) == photos.GROUP_FACES
    ms = [align.transform(f, S) for f in faces]
    crops = np.stack([align.warp_face(image, m, S) for m in ms])  # one batch for the restorer
    out = image.copy()
    for crop, m in zip(crops, ms, strict=True):
        paste.paste(out, crop, m)
    cover = _coverage(ms, image.shape)
    np.testing.assert_array_equal(out[~cover], image[~cover])
    assert _psnr(out[cover], image[cover]) > 35
