"""Real photos for the whole-photo tests, from installed or cached registry packages; none is
committed. The group photo (six people) is package data of insightface's pure-Python wheel;
``.ci/run`` downloads it (no install, nothing of it runs):

    pip download --no-deps --only-binary :all: insightface==2.1 -d ~/.cache/artfr_jax

(``ARTFR_TEST_CACHE`` names another folder). A test that needs it fails on CI if it is missing.
"""

from __future__ import annotations

import os
import zipfile

import cv2
import numpy as np
import pytest

GROUP_WHEEL = os.path.join(
    os.environ.get("ARTFR_TEST_CACHE", os.path.expanduser("~/.cache/artfr_jax")),
    "insightface-2.1-py3-none-any.whl",
)
GROUP_MEMBER = "insightface/data/images/t1.jpg"
GROUP_FACES = 6


def astronaut() -> np.ndarray:
    """scikit-image's astronaut: RGB uint8 [512, 512, 3], one face."""
    import skimage.data

    return skimage.data.astronaut()


def group_photo_bytes() -> bytes:
    if not os.path.isfile(GROUP_WHEEL):
        pytest.skip(
            f"{GROUP_WHEEL} is missing: pip download --no-deps --only-binary :all: "
            f"insightface==2.1 -d {os.path.dirname(GROUP_WHEEL)}"
        )
    with zipfile.ZipFile(GROUP_WHEEL) as z:
        return z.read(GROUP_MEMBER)


def group_photo() -> np.ndarray:
    """Six people, RGB uint8 [886, 1280, 3]."""
    data = np.frombuffer(group_photo_bytes(), np.uint8)
    return np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])


def check_whole_photos(tmp_path, *args: str) -> None:
    """Runs ``python -m artfr_jax.restore --mode=whole ARGS`` (e.g. ``--workdir=...``) on the
    astronaut and the group photo: every face restored, pixels outside the faces unchanged."""
    from absl import flags

    from artfr_jax import restore
    from artfr_jax.faces import align, detection, paste

    src, out = tmp_path / "photos", tmp_path / "photos_out"
    src.mkdir()
    imgs = {"astronaut.png": astronaut(), "group.png": group_photo()}
    for name, img in imgs.items():
        cv2.imwrite(str(src / name), img[..., ::-1])
    fv = flags.FlagValues()
    restore.define_flags(fv)
    fv(["restore", "--mode=whole", f"--input={src}", f"--output={out}", *args])
    assert restore.main(["restore"], fv) == 0
    faces = sorted(os.listdir(out / "restored_faces"))
    assert faces == ["astronaut_00.png"] + [f"group_{k:02d}.png" for k in range(GROUP_FACES)]
    size = cv2.imread(str(out / "restored_faces" / faces[0])).shape[0]
    det = detection.make_detector(min_score=0.25)  # the command's default
    for name, img in imgs.items():
        got = cv2.imread(str(out / "restored_imgs" / name))[..., ::-1]
        inside = np.zeros(img.shape[:2], bool)
        for f in det.detect(img):
            (y0, y1, x0, x1), alpha = paste.paste_alpha(
                align.transform(f, size), (size, size), img.shape
            )
            inside[y0:y1, x0:x1] |= alpha > 0
        np.testing.assert_array_equal(got[~inside], img[~inside])
        assert (got[inside] != img[inside]).any(axis=-1).mean() > 0.5, name
