"""ArrayRecord shards: `artfr_jax.data.pack` folder -> shards, read back by the array_record source."""

import json
import logging
import os

import cv2
import numpy as np
import pytest
from absl import flags

from artfr_jax.data import pack, sources
from artfr_jax.data import pipeline as data
from artfr_jax.utils import cli

SIZE = 32


def _folder(root, n=7):
    """``n`` random 40x48 PNGs (so packing crops and resizes) and one broken file; returns the
    readable paths in sorted order."""
    os.makedirs(root / "sub")
    paths = []
    for i in range(n):
        path = root / ("sub" if i == n - 1 else "") / f"{i:02d}.png"
        img = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        cv2.imwrite(str(path), img)
        paths.append(str(path))
    (root / "03x.png").write_bytes(b"not a png")
    return sorted(paths)


def _pack_cli(*argv):
    fv = flags.FlagValues()
    pack.define_flags(fv)
    fv(cli.underscore_flag_names(["pack", "--noprogress", *argv], fv))
    return pack.main(["pack"], fv)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("ar")
    paths = _folder(root / "in")
    prefix = str(root / "out" / "faces")
    rc = _pack_cli(
        f"--input={root / 'in'}", f"--output={prefix}", "--num_shards=3", f"--size={SIZE}"
    )
    assert rc == 1  # one unreadable file: packed the rest, said so in the exit status
    return paths, prefix


def test_pack_writes_shards_and_index(packed, capsys):
    paths, prefix = packed
    with open(prefix + ".index.json") as f:
        index = json.load(f)
    assert index["count"] == len(paths) == 7 and index["size"] == SIZE and index["skipped"] == 1
    assert [s["count"] for s in index["shards"]] == [2, 2, 3]  # 8 inputs in 3 runs, 03x bad
    assert [s["path"] for s in index["shards"]] == [
        f"faces.array_record-0000{k}-of-00003" for k in range(3)
    ]
    assert sorted(os.listdir(os.path.dirname(paths[0]))) == [
        "00.png",
        "01.png",
        "02.png",
        "03.png",
        "03x.png",
        "04.png",
        "05.png",
        "sub",
    ]  # nothing written into the input
    assert sorted(os.listdir(os.path.dirname(prefix))) == sorted(
        [s["path"] for s in index["shards"]] + ["faces.index.json"]
    )


def test_source_reads_the_same_pixels_in_order(packed):
    paths, prefix = packed
    src = sources.ArrayRecordSource(prefix, SIZE)
    assert len(src) == len(paths)
    for i, path in enumerate(paths):  # PNG is lossless: exactly what the folder source reads
        np.testing.assert_array_equal(
            src[i], sources.center_crop_resize(sources.load_image(path), SIZE)
        )
    assert src.where(2).endswith("faces.array_record-00001-of-00003[0]")
    glob_src = sources.ArrayRecordSource(prefix + ".array_record-*", SIZE, start=5)
    np.testing.assert_array_equal(glob_src[1], src[6])


def test_training_pipeline_from_array_record(packed):
    paths, prefix = packed
    cfg = data.default_config(SIZE)
    cfg.update(source="array_record", array_record=prefix, eval_holdout=2, num_workers=0)
    cfg.shuffle = False
    b = next(data.make_train_iterator(cfg, global_batch_size=4, seed=0))
    assert b["hq"].shape == b["lq"].shape == (4, SIZE, SIZE, 3) and b["hq"].dtype == np.uint8
    src = sources.ArrayRecordSource(prefix, SIZE)
    np.testing.assert_array_equal(b["hq"], np.stack([src[i] for i in range(4)]))
    ev = data.make_eval_batches(cfg, num_images=5, batch_size=4, seed=0)
    assert sum(len(e["hq"]) for e in ev) == 2  # the held-out tail
    np.testing.assert_array_equal(ev[0]["hq"], np.stack([src[5], src[6]]))


def test_missing_or_foreign_shards_are_one_line_errors(packed, tmp_path):
    _, prefix = packed
    with pytest.raises(ValueError, match=r"data.array_record is empty; set it to the PREFIX"):
        sources.ArrayRecordSource("", SIZE)
    with pytest.raises(ValueError, match=r"no pack index /no/such.index.json and no shard file"):
        sources.ArrayRecordSource("/no/such", SIZE)
    bad = tmp_path / "bad.array_record"
    bad.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match=rf"{bad} is not an ArrayRecord file \(.*64KB"):
        sources.ArrayRecordSource(str(bad), SIZE)
    # An index whose shard went missing names the shard and the index.
    copy = tmp_path / "copy"
    with open(prefix + ".index.json") as f:
        index = json.load(f)
    for shard in index["shards"]:  # absolute paths in an index are taken as they are
        shard["path"] = os.path.join(os.path.dirname(prefix), shard["path"])
    index["shards"][1]["path"] = "gone.array_record-00001-of-00003"
    (tmp_path / "copy.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shard .*gone.array_record-00001-of-00003 listed in"):
        sources.ArrayRecordSource(str(copy), SIZE)


def test_undecodable_record_is_skipped_like_a_bad_file(packed, tmp_path, caplog):
    from array_record.python import array_record_module

    paths, _ = packed
    path = str(tmp_path / "mixed.array_record")
    writer = array_record_module.ArrayRecordWriter(path, sources.WRITER_OPTIONS)
    for rec in (open(paths[0], "rb").read(), b"garbage", open(paths[1], "rb").read()):
        writer.write(rec)
    writer.close()
    src = sources.ArrayRecordSource(path, 40)  # the inputs are 40x48: crop only
    with caplog.at_level(logging.WARNING, logger="artfr_jax.data.sources"):
        np.testing.assert_array_equal(src[1], src[2])  # the next readable record stands in
    assert f"{path}[1]: not a decodable image" in caplog.text


def test_pack_refuses_to_overwrite_and_replaces_with_overwrite(tmp_path, capsys):
    _folder(tmp_path / "in", n=3)
    out = str(tmp_path / "out" / "f")
    args = [f"--input={tmp_path / 'in'}", f"--output={out}", f"--size={SIZE}"]
    assert _pack_cli(*args, "--num_shards=2") == 1
    capsys.readouterr()
    assert _pack_cli(*args) == 2
    assert "f.index.json exists; pass --overwrite" in capsys.readouterr().err
    assert _pack_cli(f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'in' / 'x'}") == 2
    assert "is inside --input" in capsys.readouterr().err
    assert _pack_cli(*args, "--num_shards=1", "--format=jpeg", "--overwrite") == 1
    assert sorted(os.listdir(tmp_path / "out")) == ["f.array_record-00000-of-00001", "f.index.json"]
    src = sources.ArrayRecordSource(out, SIZE)
    assert len(src) == 3 and src[0].shape == (SIZE, SIZE, 3)
    assert "packed 3 images (32 px jpeg) into 1 shard(s)" in capsys.readouterr().out


def test_worker_processes_read_the_shards(packed):
    """The source is pickled into a grain worker process (readers reopen there) and gives the
    same batches as in-process reading."""
    _, prefix = packed
    cfg = data.default_config(SIZE)
    cfg.update(source="array_record", array_record=prefix, eval_holdout=1, num_workers=0)
    one = next(data.make_train_iterator(cfg, global_batch_size=3, seed=1))
    cfg.num_workers = 1
    it = data.make_train_iterator(cfg, global_batch_size=3, seed=1)
    try:
        two = next(it)
    finally:
        it.close()
    for k in ("hq", "lq"):
        np.testing.assert_array_equal(one[k], two[k])
