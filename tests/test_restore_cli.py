"""The restore command's file handling, with a fake model (colour inversion) in place of the real one."""

import io
import os
import subprocess
import sys
import textwrap

import cv2
import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from artfr_jax import restore
from artfr_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32


class FakeRestorer:
    """Inverts colours; records every batch and key it was called with."""

    def __init__(self, image_size=SIZE):
        self.image_size = image_size
        self.calls = []

    def __call__(self, lq, rng):
        assert lq.dtype == np.uint8 and lq.shape[1:] == (self.image_size, self.image_size, 3)
        self.calls.append((lq.copy(), jax.random.key_data(rng)))
        return 255 - lq


def _rand(h, w, c, seed, dtype=np.uint8):
    hi = 65535 if dtype == np.uint16 else 255
    arr = np.random.default_rng(seed).integers(0, hi + 1, (h, w, c) if c else (h, w))
    return arr.astype(dtype)


def _save(path, arr, **kw):
    Image.fromarray(arr).save(path, **kw)
    return str(path)


def _good_folder(folder):
    """3 good images (different sizes, one non-square, one RGBA) and a 16-bit gray PNG."""
    folder.mkdir()
    good = [
        _save(folder / "small.png", _rand(20, 20, 3, 0)),
        _save(folder / "wide.jpg", _rand(48, 64, 3, 1), quality=95),
        _save(folder / "rgba.png", _rand(40, 40, 4, 2)),
    ]
    gray16 = str(folder / "gray16.png")
    assert cv2.imwrite(gray16, _rand(36, 36, 0, 3, np.uint16))
    return good, gray16


def _mixed_folder(folder):
    """Good images + a truncated PNG, a text file renamed .jpg, an empty file, a hidden file and a
    subfolder."""
    good, gray16 = _good_folder(folder)
    full = folder / "full.tmp"
    _save(full, _rand(64, 64, 3, 4), format="PNG")
    data = full.read_bytes()
    full.unlink()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.jpg").write_text("this is not an image\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / ".hidden.png").write_bytes(b"junk")
    (folder / "sub").mkdir()
    _save(folder / "sub" / "nested.png", _rand(16, 16, 3, 5))
    bad = [str(folder / n) for n in ("truncated.png", "notes.jpg", "empty.png")]
    return good + [gray16], bad


def _snapshot(folder):
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def _read_png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _model_input(path):
    return sources.center_crop_resize(sources.load_image(path), SIZE)


def _run_main(monkeypatch, fake, *args):
    """Runs ``restore.main`` with parsed flags and the fake model; returns the exit status."""
    monkeypatch.setattr(restore, "_load_restorer", lambda workdir, **kw: fake)
    fv = flags.FlagValues()
    restore.define_flags(fv)
    mode = [] if any(a.startswith("--mode") for a in args) else ["--mode=aligned"]
    fv(["restore", "--workdir=unused", *mode, *args])
    return restore.main(["restore"], fv)


def test_mixed_folder_restores_good_images_and_reports_bad_ones(tmp_path, monkeypatch, capsys):
    good, bad = _mixed_folder(tmp_path / "in")
    before = _snapshot(tmp_path / "in")
    out = tmp_path / "out"
    fake = FakeRestorer()
    code = _run_main(monkeypatch, fake, f"--input={tmp_path / 'in'}", f"--output={out}")
    stdout, stderr = capsys.readouterr()

    assert code == 1
    assert f"restored 4 of 7 images into {out}; 3 failed" in stdout
    for p in good:
        stem = os.path.splitext(os.path.basename(p))[0]
        lq = _model_input(p)
        restored = _read_png(out / f"{stem}.png")
        assert restored.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(restored, 255 - lq)
        np.testing.assert_array_equal(
            _read_png(out / "side_by_side" / f"{stem}.png"), np.concatenate([lq, 255 - lq], 1)
        )
    # the 16-bit gray PNG is restored as 8-bit gray RGB
    gray = _read_png(out / "gray16.png")
    assert np.ptp(gray.astype(int), axis=2).max() == 0 and np.unique(gray).size > 100
    lines = stderr.splitlines()
    for p in bad:
        assert any(line.startswith(f"{p}: ") and len(line) > len(p) + 4 for line in lines), p
        assert not (out / (os.path.splitext(os.path.basename(p))[0] + ".png")).exists()
    assert f"{tmp_path / 'in' / 'truncated.png'}: truncated or corrupt PNG data" in stderr
    assert f"{tmp_path / 'in' / 'empty.png'}: empty file" in stderr
    assert "hidden" not in stderr and not (out / "nested.png").exists()
    assert sorted(os.listdir(out)) == sorted(
        ["side_by_side", "gray16.png", "rgba.png", "small.png", "wide.png"]
    )
    # the input folder is untouched
    assert _snapshot(tmp_path / "in") == before


def test_restore_paths_report(tmp_path):
    good, bad = _mixed_folder(tmp_path / "in")
    paths = restore.list_inputs(str(tmp_path / "in"))
    assert sorted(paths) == sorted(good + bad)  # hidden files and subfolders are not candidates
    report = restore.restore_paths(FakeRestorer(), paths, str(tmp_path / "out"), progress=False)
    assert sorted(report.restored) == sorted(good)
    reasons = dict(report.failed)
    assert sorted(reasons) == sorted(bad)
    assert reasons[str(tmp_path / "in" / "empty.png")] == "empty file"
    assert reasons[str(tmp_path / "in" / "notes.jpg")].startswith("not a decodable image")
    assert reasons[str(tmp_path / "in" / "truncated.png")].startswith("truncated or corrupt PNG")
    assert all(os.path.isfile(report.outputs[p]) for p in good)
    assert report.total == 7 and not report.skipped


def test_truncated_image_rejected_even_if_opencv_decodes_it(tmp_path, monkeypatch):
    # Some OpenCV builds decode a truncated file into a partly grey image without an error.
    data = _rand(64, 64, 3, 6)
    full = tmp_path / "full.png"
    _save(full, data)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:-200])
    monkeypatch.setattr(sources, "load_image", lambda path: data)
    with pytest.raises(ValueError, match=r"cut\.png: truncated or corrupt PNG data"):
        restore.read_image(str(cut))
    np.testing.assert_array_equal(restore.read_image(str(full)), data)


def test_partial_last_batch_and_keys(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    paths = [_save(folder / f"{i}.png", _rand(SIZE, SIZE, 3, 10 + i)) for i in range(5)]
    fake = FakeRestorer()
    report = restore.restore_paths(
        fake, paths, str(tmp_path / "out"), batch_size=2, seed=3, progress=False
    )
    assert report.restored == paths and not report.failed
    assert [lq.shape[0] for lq, _ in fake.calls] == [2, 2, 2]  # last batch padded
    assert not fake.calls[-1][0][1].any()  # the padding row is black
    for i, (_, key) in enumerate(fake.calls):
        expected = jax.random.key_data(jax.random.fold_in(jax.random.key(3), i))
        np.testing.assert_array_equal(key, expected)
    for p in paths:
        restored = _read_png(tmp_path / "out" / os.path.basename(p))
        np.testing.assert_array_equal(restored, 255 - _model_input(p))


def test_single_file_input_and_no_side_by_side(tmp_path, monkeypatch, capsys):
    src = _save(tmp_path / "face.jpg", _rand(50, 30, 3, 7))
    out = tmp_path / "out"
    fake = FakeRestorer()
    code = _run_main(monkeypatch, fake, f"--input={src}", f"--output={out}", "--noside_by_side")
    assert code == 0
    assert f"restored 1 of 1 images into {out}; 0 failed" in capsys.readouterr().out
    assert os.listdir(out) == ["face.png"]
    np.testing.assert_array_equal(_read_png(out / "face.png"), 255 - _model_input(src))
    assert [lq.shape[0] for lq, _ in fake.calls] == [1]  # no padding up to batch_size


@pytest.mark.parametrize("where", ["same", "inside", "side_by_side"])
def test_output_in_input_folder_refused(tmp_path, monkeypatch, capsys, where):
    _good_folder(tmp_path / "in")
    before = _snapshot(tmp_path / "in")
    inp = {"same": tmp_path / "in", "inside": tmp_path / "in", "side_by_side": tmp_path / "in"}
    out = {
        "same": tmp_path / "in",
        "inside": tmp_path / "in" / "restored",
        "side_by_side": tmp_path,  # writes tmp/side_by_side; make that the input folder
    }[where]
    if where == "side_by_side":
        (tmp_path / "in").rename(tmp_path / "side_by_side")
        inp[where] = tmp_path / "side_by_side"
    fake = FakeRestorer()
    code = _run_main(monkeypatch, fake, f"--input={inp[where]}", f"--output={out}")
    err = capsys.readouterr().err
    assert code == 2 and not fake.calls
    assert err.startswith("error: --output") and err.count("\n") == 1
    assert _snapshot(inp[where]) == before
    if where != "inside":  # restore_paths alone only knows the inputs' own folders
        with pytest.raises(ValueError, match="holds the input"):
            restore.restore_paths(fake, restore.list_inputs(str(inp[where])), str(out))


def test_output_next_to_single_input_file_refused(tmp_path, monkeypatch, capsys):
    src = _save(tmp_path / "face.png", _rand(32, 32, 3, 8))
    code = _run_main(monkeypatch, FakeRestorer(), f"--input={src}", f"--output={tmp_path}")
    assert code == 2 and "folder of the input file" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["face.png"]


def test_existing_output_kept_unless_overwrite(tmp_path, monkeypatch, capsys):
    good, gray16 = _good_folder(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "small.png").write_bytes(b"keep me")
    code = _run_main(monkeypatch, FakeRestorer(), f"--input={tmp_path / 'in'}", f"--output={out}")
    stdout = capsys.readouterr().out
    assert code == 0
    assert "restored 3 of 4 images" in stdout and "1 skipped" in stdout
    assert (out / "small.png").read_bytes() == b"keep me"
    assert not (out / "side_by_side" / "small.png").exists()
    assert (out / "wide.png").exists() and (out / "gray16.png").exists()

    report = restore.restore_paths(FakeRestorer(), good, str(out), overwrite=True, progress=False)
    assert report.restored == good and not report.skipped
    np.testing.assert_array_equal(_read_png(out / "small.png"), 255 - _model_input(good[0]))


def test_colliding_stems_do_not_overwrite(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    a_png = _save(folder / "a.png", _rand(SIZE, SIZE, 3, 20))
    a_jpg = _save(folder / "a.jpg", _rand(SIZE, SIZE, 3, 21), quality=95)
    b = _save(folder / "b.png", _rand(SIZE, SIZE, 3, 22))
    paths = restore.list_inputs(str(folder))
    report = restore.restore_paths(FakeRestorer(), paths, str(tmp_path / "out"), progress=False)
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["a.jpg.png", "a.png.png", "b.png", "side_by_side"]
    for src, name in [(a_png, "a.png.png"), (a_jpg, "a.jpg.png"), (b, "b.png")]:
        assert report.outputs[src] == str(out / name)
        np.testing.assert_array_equal(_read_png(out / name), 255 - _model_input(src))
    assert restore.output_names(["x/c.png", "y/c.png", "c_1.png", "C.jpg"]) == [
        "c.png.png",
        "c.png_1.png",
        "c_1.png",
        "C.jpg.png",
    ]


def test_usage_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty_dir").mkdir()
    fake = FakeRestorer()
    assert _run_main(monkeypatch, fake, f"--input={tmp_path / 'nope'}", "--output=o") == 2
    assert "does not exist" in capsys.readouterr().err
    assert _run_main(monkeypatch, fake, f"--input={tmp_path / 'empty_dir'}", "--output=o") == 2
    assert "contains no files" in capsys.readouterr().err

    def no_checkpoint(workdir, **kw):
        raise FileNotFoundError(f"{workdir}: no checkpoint found")

    src = _save(tmp_path / "face.png", _rand(32, 32, 3, 9))
    fv = flags.FlagValues()
    restore.define_flags(fv)
    fv(["restore", "--workdir=w", f"--input={src}", f"--output={tmp_path / 'out'}"])
    monkeypatch.setattr(restore, "_load_restorer", no_checkpoint)
    assert restore.main(["restore"], fv) == 2
    assert capsys.readouterr().err == "error: --workdir 'w': w: no checkpoint found\n"
    with pytest.raises(flags.IllegalFlagValueError):
        fv(["restore", "--batch_size=0"])


_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from artfr_jax import restore

    class Invert:
        image_size = 16
        def __call__(self, lq, rng):
            return 255 - lq

    restore._load_restorer = lambda workdir, **kw: Invert()
    restore.cli()
    """
)


def test_command_exit_status(tmp_path):
    """Through absl's app.run in a fresh process: 1 when a file failed, 2 for a bad flag."""
    folder = tmp_path / "in"
    folder.mkdir()
    _save(folder / "ok.png", _rand(20, 20, 3, 30))
    (folder / "bad.png").write_bytes(b"nope")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")

    def run(*args):
        cmd = [sys.executable, "-c", _SCRIPT, "--workdir=w", f"--input={folder}", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    res = run(f"--output={tmp_path / 'out'}", "--batch_size=3")
    assert res.returncode == 1, res.stderr
    assert f"{folder / 'bad.png'}: not a decodable image" in res.stderr
    assert res.stdout.strip() == f"restored 1 of 2 images into {tmp_path / 'out'}; 1 failed"
    assert _read_png(tmp_path / "out" / "ok.png").shape == (16, 16, 3)

    res = run(f"--output={tmp_path / 'out2'}", "--batch-size=3", "--no-side-by-side")
    assert res.returncode == 1, res.stderr  # dashed spellings are the same flags
    assert not (tmp_path / "out2" / "side_by_side").exists()

    res = run(f"--output={tmp_path / 'out3'}", "--batch-sise=3")
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and "batch-sise" in res.stderr
    assert not (tmp_path / "out3").exists()


def test_progress_lines_when_not_a_terminal(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(restore, "LOG_EVERY_S", -1.0)
    stderr = io.StringIO()  # not a terminal: no bar, progress goes to the log
    monkeypatch.setattr(sys, "stderr", stderr)
    folder = tmp_path / "in"
    folder.mkdir()
    paths = [_save(folder / f"{i}.png", _rand(SIZE, SIZE, 3, 40 + i)) for i in range(3)]
    (folder / "x.png").write_bytes(b"bad")
    with caplog.at_level("INFO"):
        restore.restore_paths(
            FakeRestorer(), paths + [str(folder / "x.png")], str(tmp_path / "o"), batch_size=2
        )
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("restore: ")]
    assert progress[-1].startswith("restore: 4/4 images")
    assert stderr.getvalue() == f"{folder / 'x.png'}: not a decodable image (png/jpg/jpeg/webp)\n"
