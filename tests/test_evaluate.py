"""The evaluate command: pairing, metric values against independent references, reports, test sets."""

import json
import os
import subprocess
import sys

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import serialization
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from artfr_jax import evaluate
from artfr_jax.evaluation import metrics as metrics_lib
from artfr_jax.evaluation import niqe as niqe_lib
from artfr_jax.evaluation import pairs, report, suite, testset
from artfr_jax.losses import perceptual
from artfr_jax.utils import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def _read(path):
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _noisy(img, std, seed):
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0, std, img.shape), 0, 255).astype(np.uint8)


def _run(argv):
    fv = flags.FlagValues()
    evaluate.define_flags(fv)
    fv(cli.underscore_flag_names(["evaluate", "--noprogress", *argv], fv))
    return evaluate.main(["evaluate"], fv)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    assert _run(["--make_testset", "--synthetic=5", "--size=48", f"--out={root}"]) == 0
    return root


def test_make_testset_is_reproducible_and_per_image(split, tmp_path):
    meta = json.loads((split / "testset.json").read_text())
    assert meta["num_images"] == 5 and meta["preset"] == "vqfr" and meta["size"] == 48
    assert set(meta["images"]) == {f"synthetic_{i:05d}" for i in range(5)}
    # Fewer images, same seed: the shared images are byte-identical (rng keyed by stem).
    assert _run(["--make-testset", "--synthetic=3", "--size=48", f"--out={tmp_path}"]) == 0
    for i in range(3):
        name = f"synthetic_{i:05d}.png"
        np.testing.assert_array_equal(_read(tmp_path / "lq" / name), _read(split / "lq" / name))
        np.testing.assert_array_equal(_read(tmp_path / "gt" / name), _read(split / "gt" / name))
    lq, gt = (
        _read(split / "lq" / "synthetic_00000.png"),
        _read(split / "gt" / "synthetic_00000.png"),
    )
    assert lq.shape == gt.shape == (48, 48, 3) and not np.array_equal(lq, gt)
    # A different seed gives a different degradation.
    assert (
        _run(["--make_testset", "--synthetic=1", "--size=48", "--seed=1", f"--out={tmp_path}/s1"])
        == 0
    )
    assert not np.array_equal(_read(tmp_path / "s1" / "lq" / "synthetic_00000.png"), lq)


def test_make_testset_takes_a_configs_degradation(tmp_path):
    """A config's ``data.degradation`` (the ablations' 32-px demo model) replaces the preset; its
    drawn ranges are the ones recorded."""
    from artfr_jax.data import degradations
    from artfr_jax.evaluation import testset

    cfg = degradations.degradation_preset("artfr")
    cfg.update(blur_sigma=(0.1, 0.2), noise_range=(1.0, 2.0), noise_levels=(1.0, 2.0))
    meta = testset.make_testset(
        str(tmp_path / "c"), synthetic=2, size=32, degradation=cfg, progress=False, log=print
    )
    assert meta["preset"] == "(config)" and meta["degradation"]["blur_sigma"] == [0.1, 0.2]
    assert all(
        0.1 <= p["sigma_x"] <= 0.2 and 1 <= p["noise_std"] <= 2 for p in meta["images"].values()
    )


def test_make_testset_from_folder_reports_bad_files_and_protects_inputs(split, tmp_path, capsys):
    gt = tmp_path / "faces"
    for name in ("a.png", "b.jpg"):
        _save(gt / name, _read(split / "gt" / "synthetic_00001.png"))
    (gt / "broken.png").write_bytes(b"not an image")
    before = {p.name: p.read_bytes() for p in gt.iterdir()}
    out = tmp_path / "split"
    assert (
        _run(["--make_testset", f"--gt={gt}", "--size=32", "--preset=artfr", f"--out={out}"]) == 1
    )
    assert sorted(os.listdir(out / "lq")) == ["a.png", "b.png"]
    meta = json.loads((out / "testset.json").read_text())
    assert (
        list(meta["failed"]) == ["broken"] and "not a decodable image" in meta["failed"]["broken"]
    )
    assert {p.name: p.read_bytes() for p in gt.iterdir()} == before
    # No silent rebuild over an existing split, and never inside the GT folder.
    assert _run(["--make_testset", f"--gt={gt}", "--size=32", f"--out={out}"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _run(["--make_testset", f"--gt={gt}", "--size=32", f"--out={gt}/sub"]) == 2
    assert "inside --gt" in capsys.readouterr().err
    assert _run(["--make_testset", "--size=32", f"--out={tmp_path}/x"]) == 2


def test_pair_by_stem():
    p = pairs.pair_by_stem(
        ["r/a.png", "r/b.png", "r/c.png", "r/d.png", "r/d.jpg"], ["g/a.jpg", "g/b.png", "g/e.png"]
    )
    assert p.pairs == [("r/a.png", "g/a.jpg"), ("r/b.png", "g/b.png")]
    assert p.unpaired == ["r/c.png"] and p.missing == ["g/e.png"] and p.ambiguous == ["d"]
    assert len(p.problems()) == 3


def test_psnr_ssim_match_scikit_image_and_rows(split, tmp_path):
    gt_dir = split / "gt"
    rows = {}
    for std in (5, 20):
        folder = tmp_path / f"noise{std}"
        rows[folder.name] = []
        for i, name in enumerate(sorted(os.listdir(gt_dir))):
            img = _noisy(_read(gt_dir / name), std, i)
            _save(folder / name, img)
            rows[folder.name].append((img, _read(gt_dir / name)))
    out = tmp_path / "rep"
    argv = [f"--restored={tmp_path}/noise5", f"--restored={tmp_path}/noise20", f"--gt={gt_dir}"]
    assert _run([*argv, "--metrics=psnr,ssim", f"--out={out}", "--batch_size=2"]) == 0
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert [r["name"] for r in rep["rows"]] == ["noise5", "noise20"]
    for r in rep["rows"]:
        ref = rows[r["name"]]
        psnr = np.mean([peak_signal_noise_ratio(g, x, data_range=255) for x, g in ref])
        ssim = np.mean(
            [
                structural_similarity(
                    g,
                    x,
                    gaussian_weights=True,
                    sigma=1.5,
                    use_sample_covariance=False,
                    data_range=255,
                    channel_axis=-1,
                )
                for x, g in ref
            ]
        )
        assert r["values"]["psnr"] == pytest.approx(psnr, abs=1e-3)
        assert r["values"]["ssim"] == pytest.approx(ssim, abs=1e-4)
        assert r["num_scored"] == 5 and not r["failed"]
    assert rep["rows"][0]["values"]["psnr"] > rep["rows"][1]["values"]["psnr"] + 5
    md = (tmp_path / "rep.md").read_text()
    assert "| Method | PSNR↑ | SSIM↑ |" in md and "| noise5 | " in md
    # The report is not replaced silently.
    assert _run([*argv, "--metrics=psnr", f"--out={out}.json"]) == 2
    assert _run([*argv, "--metrics=psnr", f"--out={out}.json", "--overwrite"]) == 0


def test_pairing_problems_and_bad_files_are_reported(split, tmp_path):
    restored = tmp_path / "restored"
    names = sorted(os.listdir(split / "gt"))
    for name in names[:3]:
        _save(restored / name, _read(split / "lq" / name))
    _save(restored / "stranger.png", _read(split / "lq" / names[0]))  # no GT
    _save(restored / names[3], np.zeros((20, 20, 3), np.uint8))  # wrong size
    (restored / names[4]).write_bytes(b"\x89PNG broken")
    (restored / "notes.txt").write_text("not an image")
    os.makedirs(restored / "side_by_side")  # the restore command's subfolder is not read
    out = tmp_path / "rep"
    rc = _run([f"--restored={restored}", f"--gt={split}/gt", "--metrics=psnr", f"--out={out}"])
    assert rc == 1
    row = json.loads((tmp_path / "rep.json").read_text())["rows"][0]
    assert row["num_pairs"] == 5 and row["num_scored"] == 3
    assert [os.path.basename(p) for p in row["unpaired"]] == ["stranger.png"]
    failed = {os.path.basename(k): v for k, v in row["failed"].items()}
    assert "20x20 but its GT" in failed[names[3]]
    assert names[4] in failed
    expected = np.mean(
        [
            peak_signal_noise_ratio(
                _read(split / "gt" / n), _read(split / "lq" / n), data_range=255
            )
            for n in names[:3]
        ]
    )
    assert row["values"]["psnr"] == pytest.approx(expected, abs=1e-3)


def test_skips_have_reasons_and_no_reference_metrics_run_without_gt(tmp_path):
    rng = np.random.default_rng(0)
    faces = [
        cv2.resize(_read_synthetic(i), (192, 192), interpolation=cv2.INTER_CUBIC) for i in range(2)
    ]
    for i, img in enumerate(faces):
        _save(tmp_path / "r" / f"{i}.png", _noisy(img, 3, int(rng.integers(100))))
    out = tmp_path / "rep"
    argv = [f"--restored={tmp_path}/r", f"--out={out}", f"--weights_dir={tmp_path}/none"]
    assert _run([*argv, "--metrics=niqe,psnr,lpips,fid"]) == 0
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert set(rep["skipped"]) == {"psnr", "lpips", "fid"}
    assert "needs --gt" in rep["skipped"]["psnr"] and "needs --gt" in rep["skipped"]["lpips"]
    assert "inception_fid.msgpack" in rep["skipped"]["fid"]
    assert "python -m artfr_jax.convert.fid_inception" in rep["skipped"]["fid"]
    expected = np.mean([niqe_lib.niqe(_read(tmp_path / "r" / f"{i}.png")) for i in range(2)])
    assert rep["rows"][0]["values"]["niqe"] == pytest.approx(expected, rel=1e-9)
    md = (tmp_path / "rep.md").read_text()
    assert "| Method | FID↓ | NIQE↓ | LPIPS↓ | PSNR↑ |" in md and "- **lpips**: " in md


def _read_synthetic(i):
    from artfr_jax.data.synthetic import render_face

    return render_face(i, 64)


def test_lpips_from_weights_dir_equals_direct_call(split, tmp_path):
    z = jnp.zeros((1, 48, 48, 3))
    params = perceptual.LPIPS().init(jax.random.key(3), z, z)["params"]
    # Random init gives zero-ish heads; make them positive so distances are informative.
    params = jax.tree.map(lambda x: x, params)
    for k in [k for k in params if k.startswith("lin")]:
        params[k]["kernel"] = jnp.abs(
            jax.random.normal(jax.random.key(7), params[k]["kernel"].shape)
        )
    wdir = tmp_path / "w"
    wdir.mkdir()
    (wdir / suite.LPIPS_FILE).write_bytes(serialization.msgpack_serialize(jax.device_get(params)))
    out = tmp_path / "rep"
    argv = [f"--restored={split}/lq", f"--gt={split}/gt", f"--weights_dir={wdir}", f"--out={out}"]
    assert _run([*argv, "--metrics=lpips", "--batch_size=3"]) == 0
    got = json.loads((tmp_path / "rep.json").read_text())["rows"][0]
    names = sorted(os.listdir(split / "gt"))
    r = np.stack([_read(split / "lq" / n) for n in names]).astype(np.float32) / 127.5 - 1
    g = np.stack([_read(split / "gt" / n) for n in names]).astype(np.float32) / 127.5 - 1
    want = np.asarray(perceptual.lpips_distance(params, r, g))
    assert got["values"]["lpips"] == pytest.approx(float(want.mean()), rel=1e-5)
    per = [got["per_image"][os.path.splitext(n)[0]]["lpips"] for n in names]
    np.testing.assert_allclose(per, want, rtol=1e-5)


def test_report_paths_and_markdown_layout():
    assert report.report_paths("a/rep") == ("a/rep.json", "a/rep.md")
    assert report.report_paths("a/rep.md") == ("a/rep.json", "a/rep.md")
    md = report.markdown(
        {
            "metrics": ["psnr", "fid", "lmd", "deg"],
            "skipped": {"fid": "why"},
            "conventions": {},
            "rows": [
                {
                    "name": "x",
                    "values": {"psnr": 21.8123, "deg": 57.5, "lmd": 4.681},
                    "restored": "/r",
                    "gt": "/g",
                    "num_scored": 1,
                    "num_pairs": 1,
                    "notes": [],
                }
            ],
        }
    )
    assert "| Method | FID↓ | Deg↓ | LMD↓ | PSNR↑ |" in md  # Table 1 (a) order
    assert "| x | – | 57.50 | 4.68 | 21.81 |" in md


def test_testset_rng_depends_on_seed_and_name():
    a = testset.image_rng(0, "x").random()
    assert a == testset.image_rng(0, "x").random()
    assert a != testset.image_rng(1, "x").random() and a != testset.image_rng(0, "y").random()


def test_command_line_usage_errors(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")

    def run(*args):
        cmd = [sys.executable, "-m", "artfr_jax.evaluate", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    res = run(f"--restored={tmp_path}/nope", f"--out={tmp_path}/r")
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = run(f"--restored={tmp_path}", "--metrics=psnr,bogus", f"--out={tmp_path}/r")
    assert res.returncode == 2 and "bogus" in res.stderr
    res = run("--make-testset", "--synthetic=2", "--size=16", f"--out={tmp_path}/t", "--noprogress")
    assert res.returncode == 0, res.stderr
    assert "wrote 2 GT/LQ pairs" in res.stderr


def test_deg_uses_arcface_weights_when_present_else_dlib(split, tmp_path):
    from artfr_jax.evaluation import arcface, dlib_face

    module = arcface.arcface_module("resnet18")
    variables = module.init(jax.random.key(0), jnp.zeros((1, *arcface.input_shape("resnet18"))))
    variables = jax.tree.map(
        lambda x: x + 0.01 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), variables
    )
    wdir = tmp_path / "w"
    wdir.mkdir()
    converted = arcface.ARCFACE_FILES["resnet18"].converted
    (wdir / converted).write_bytes(serialization.msgpack_serialize(jax.device_get(variables)))
    argv = [f"--restored={split}/lq", f"--gt={split}/gt", "--metrics=deg,lmd"]
    assert _run([*argv, f"--weights_dir={wdir}", f"--out={tmp_path}/a"]) == 0
    rep = json.loads((tmp_path / "a.json").read_text())
    assert "ArcFace ResNet-18" in rep["conventions"]["deg"]
    names = sorted(os.listdir(split / "gt"))
    r = np.stack([_read(split / "lq" / n) for n in names])
    g = np.stack([_read(split / "gt" / n) for n in names])
    embed = arcface.ArcFaceEmbedder(
        "resnet18", arcface.load_arcface_params("resnet18", str(wdir / converted))
    )
    want = metrics_lib.angle_degrees(embed(r), embed(g))
    got = [rep["rows"][0]["per_image"][os.path.splitext(n)[0]]["deg"] for n in names]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # LMD: dlib landmarks on the GT's box, in 512-px units.
    boxes, _ = dlib_face.detect_boxes(g)
    marks = dlib_face.DlibLandmarks()
    lmd = dlib_face.landmark_distance(marks(r, boxes), marks(g, boxes), g.shape[1])
    assert rep["rows"][0]["values"]["lmd"] == pytest.approx(float(np.mean(lmd)), rel=1e-6)

    # Without ArcFace weights the offline dlib descriptor is used, and the report names it.
    assert _run([*argv, f"--out={tmp_path}/b"]) == 0
    rep = json.loads((tmp_path / "b.json").read_text())
    assert "dlib ResNet face descriptor" in rep["conventions"]["deg"]
    assert rep["rows"][0]["values"]["deg"] > 0
    # Asking for an ArcFace model whose file is absent is a skip with the converter command.
    assert _run([*argv, "--deg_embedder=arcface_iresnet100", f"--out={tmp_path}/c"]) == 0
    rep = json.loads((tmp_path / "c.json").read_text())
    assert "python -m artfr_jax.convert.arcface --arch=iresnet100" in rep["skipped"]["deg"]


@pytest.mark.slow  # about a minute: Inception at 299 px on CPU
def test_fid_against_gt_or_a_statistics_file(split, tmp_path):
    from artfr_jax.evaluation import fid, inception

    params = inception.FIDInceptionV3().init(jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
    wdir = tmp_path / "w"
    wdir.mkdir()
    (wdir / inception.CONVERTED_FILE).write_bytes(
        serialization.msgpack_serialize(jax.device_get(params["params"]))
    )
    cache = tmp_path / "cache"
    base = [f"--restored={split}/lq", "--metrics=fid", f"--weights_dir={wdir}", "--batch_size=5"]
    base.append(f"--fid_cache_dir={cache}")
    assert _run([*base, f"--gt={split}/gt", f"--out={tmp_path}/a"]) == 0
    rep = json.loads((tmp_path / "a.json").read_text())
    assert "the test set's GT (--gt)" in rep["conventions"]["fid"]

    extractor = fid.InceptionExtractor(params["params"], batch_size=5)
    feats = {
        k: extractor(np.stack([_read(p) for p in sorted((split / k).iterdir())]))
        for k in ("lq", "gt")
    }
    mu_r, s_r = fid.feature_statistics(feats["lq"])
    mu_g, s_g = fid.feature_statistics(feats["gt"])
    want = fid.frechet_distance(mu_r, s_r, mu_g, s_g)
    assert rep["rows"][0]["values"]["fid"] == pytest.approx(want, rel=1e-4)
    assert len(list(cache.iterdir())) == 2  # GT and restored folder statistics cached

    # A statistics file as the reference (e.g. all of FFHQ), no GT needed.
    fid.save_statistics(tmp_path / "ref.npz", mu_g, s_g)
    assert _run([*base, f"--fid_ref={tmp_path}/ref.npz", f"--out={tmp_path}/b"]) == 0
    rep = json.loads((tmp_path / "b.json").read_text())
    assert f"statistics file {tmp_path}/ref.npz" in rep["conventions"]["fid"]
    assert rep["rows"][0]["values"]["fid"] == pytest.approx(want, rel=1e-4)
