"""Image loading, folder/TFDS/synthetic sources and their one-line errors."""

import logging

import cv2
import numpy as np
import pytest

from artfr_jax.data import sources
from artfr_jax.data.sources import load_image


def _write(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, img)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def test_load_image_formats(tmp_path):
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 200  # red in RGB
    bgr = rgb[..., ::-1]
    out = load_image(_write(tmp_path / "a.png", bgr))
    np.testing.assert_array_equal(out, rgb)
    assert load_image(_write(tmp_path / "b.jpg", bgr))[..., 0].mean() > 180
    assert load_image(_write(tmp_path / "c.webp", bgr)).shape == (10, 12, 3)
    gray = load_image(_write(tmp_path / "g.png", np.full((5, 6), 77, np.uint8)))
    assert gray.shape == (5, 6, 3) and (gray == 77).all()
    rgba = np.concatenate([bgr, np.full((10, 12, 1), 9, np.uint8)], -1)
    np.testing.assert_array_equal(load_image(_write(tmp_path / "d.png", rgba)), rgb)
    deep = load_image(_write(tmp_path / "e.png", np.full((4, 4, 3), 65535, np.uint16)))
    assert deep.dtype == np.uint8 and (deep == 255).all()
    deep = load_image(_write(tmp_path / "f.png", np.full((4, 4), 257 * 100, np.uint16)))
    assert (deep == 100).all()


def test_load_image_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.png: cannot read file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png: empty file"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"junk.jpg: not a decodable image"):
        load_image(tmp_path / "junk.jpg")


def test_center_crop_resize():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 255  # the centre square
    out = sources.center_crop_resize(img, 20)
    assert out.shape == (20, 20, 3) and (out == 255).all()
    assert sources.center_crop_resize(np.zeros((8, 8, 3), np.uint8), 32).shape == (32, 32, 3)


def test_list_images_recursive_and_errors(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    for name in ["b/x.PNG", "a.jpg", "b/c/y.jpeg", "z.webp"]:
        _write(tmp_path / name, img) if not name.endswith("PNG") else _write(
            tmp_path / "b/x.png", img
        ).rename(tmp_path / name)
    (tmp_path / "notes.txt").write_text("hi")
    paths = sources.list_images(str(tmp_path))
    assert [p[len(str(tmp_path)) + 1 :] for p in paths] == [
        "a.jpg",
        "z.webp",
        "b/x.PNG",
        "b/c/y.jpeg",
    ]
    with pytest.raises(ValueError, match=r"data.folder '/nonexistent/x' does not exist"):
        sources.list_images("/nonexistent/x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"contains no images \(png/jpg/jpeg/webp\)"):
        sources.list_images(str(tmp_path / "empty"))


def test_folder_source_skips_unreadable(tmp_path, caplog):
    for i in range(4):
        _write(tmp_path / f"{i}.png", np.full((30, 20, 3), 10 * (i + 1), np.uint8))
    (tmp_path / "1.png").write_bytes(b"corrupt")
    src = sources.FolderSource(sources.list_images(str(tmp_path)), 16)
    with caplog.at_level(logging.WARNING):
        out = src[1]
    assert out.shape == (16, 16, 3) and (out == 30).all()  # substituted by record 2
    assert "1.png: not a decodable image" in caplog.text
    assert (src[0] == 10).all() and (src[3] == 40).all()
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(b"")
    with pytest.raises(RuntimeError, match="consecutive unreadable records"):
        src[0]


def test_synthetic_source():
    src = sources.SyntheticSource(10, 32, offset=5)
    assert len(src) == 10 and src[0].shape == (32, 32, 3)
    np.testing.assert_array_equal(src[0], sources.SyntheticSource(10, 32)[5])


_TINY_TFDS_BUILDER = []  # tfds registers builder classes by name: define it once per process


def _prepare_tiny_tfds(data_dir, num_train=5):
    """Prepare a tiny ArrayRecord TFDS dataset 'artfr_tiny_faces' in ``data_dir``.

    Record i of the train split is a constant 20x30 image of value 20 * i.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    if not _TINY_TFDS_BUILDER:

        class ArtfrTinyFaces(tfds.core.GeneratorBasedBuilder):
            # A one-part module name makes tfds skip its package-resource lookup for the code
            # path (which needs the missing `importlib_resources` package).
            __module__ = "artfr_tiny_faces_builder"
            VERSION = tfds.core.Version("1.0.0")
            num_train = 5

            def _info(self):
                feats = {"image": tfds.features.Image(shape=(None, None, 3)), "id": np.int64}
                info = tfds.features.FeaturesDict(feats)
                return tfds.core.DatasetInfo(builder=self, features=info)

            def _split_generators(self, dl_manager):
                return {
                    "train": self._generate_examples(self.num_train),
                    "test": self._generate_examples(2),
                }

            def _generate_examples(self, n):
                for i in range(n):
                    yield i, {"image": np.full((20, 30, 3), 20 * i, np.uint8), "id": i}

        _TINY_TFDS_BUILDER.append(ArtfrTinyFaces)
    builder = _TINY_TFDS_BUILDER[0](data_dir=str(data_dir), file_format="array_record")
    builder.num_train = num_train
    builder.download_and_prepare()


def test_tfds_source(tmp_path):
    _prepare_tiny_tfds(tmp_path)
    src = sources.TfdsSource("artfr_tiny_faces", "train", 8, data_dir=str(tmp_path))
    assert len(src) == 5
    values = sorted(int(src[i][0, 0, 0]) for i in range(5))
    assert values == [0, 20, 40, 60, 80] and src[0].shape == (8, 8, 3)
    held = sources.TfdsSource("artfr_tiny_faces", "train", 8, data_dir=str(tmp_path), start=3)
    assert len(held) == 2
    with pytest.raises(ValueError, match=r"data.tfds_image_key 'img' not in dataset"):
        sources.TfdsSource("artfr_tiny_faces", "train", 8, data_dir=str(tmp_path), image_key="img")
    with pytest.raises(ValueError, match=r"data.tfds_name 'no_such_ds' split 'train'.*cannot open"):
        sources.TfdsSource("no_such_ds", "train", 8, data_dir=str(tmp_path))


def test_tfds_source_through_worker_processes(tmp_path):
    """The TFDS source is pickled into grain's worker processes and reopened there by name."""
    from artfr_jax.data import pipeline

    _prepare_tiny_tfds(tmp_path, num_train=6)
    cfg = pipeline.default_config(16)
    cfg.update(source="tfds", tfds_name="artfr_tiny_faces", tfds_data_dir=str(tmp_path))
    cfg.update(eval_holdout=2, num_workers=2)
    train = pipeline.train_source(cfg)
    train_values = sorted(int(train[i][0, 0, 0]) for i in range(len(train)))
    assert len(train_values) == 4
    it = pipeline.make_train_iterator(cfg, global_batch_size=2, seed=0)
    try:
        batches = [next(it) for _ in range(4)]  # two epochs of the four training records
    finally:
        it.close()
    seen = [int(v) for b in batches for v in b["hq"][:, 0, 0, 0]]
    assert sorted(seen) == sorted(train_values * 2)  # every record twice, held-out ones never
