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
