"""FID: parity of ``FIDInceptionV3`` and the Fréchet distance with pytorch-fid 0.3.0 (random
weights, nothing downloaded), the converter, statistics files and the folder cache."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from artfr_jax.convert import fid_inception as convert_fid
from artfr_jax.evaluation import fid, inception
from artfr_jax.evaluation.inception import (
    FID_WEIGHTS_FILENAME,
    load_inception_params,
    resize_bilinear,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional
pfi = pytest.importorskip("pytorch_fid.inception")
fid_score = pytest.importorskip("pytorch_fid.fid_score")


def _random_state_dict(seed: int = 0) -> dict:
    """A state dict shaped like pytorch-fid's file, with every BN statistic randomised."""
    template = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, v in template.items():
        if key.endswith("num_batches_tracked"):
            out[key] = v.clone()
        elif key.endswith("conv.weight"):  # He init keeps activations O(1) through 94 layers
            out[key] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        elif key.endswith(("bn.weight", "running_var")):
            out[key] = 0.5 + torch.rand(v.shape, generator=g)
        else:  # bn.bias, running_mean, fc
            out[key] = 0.1 * torch.randn(v.shape, generator=g)
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # On a shared 2-core machine torch's thread pool mostly waits on XLA's; one thread is faster.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """pytorch-fid's ``InceptionV3`` on random weights, and those weights as a ``.pth`` file."""
    state = _random_state_dict()

    def fake_download(url, *args, **kwargs):
        assert url.endswith(FID_WEIGHTS_FILENAME)
        return state

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url", fake_download)
        model = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    assert isinstance(model.blocks[3][1], pfi.FIDInceptionE_1)  # really the FID variant
    path = tmp_path_factory.mktemp("fid_pth") / FID_WEIGHTS_FILENAME
    torch.save(state, path)
    return model, state, str(path)


@pytest.fixture(scope="module")
def params(reference, tmp_path_factory):
    _, _, pth = reference
    out = tmp_path_factory.mktemp("fid_out") / "inception_fid.msgpack"
    convert_fid.main([f"--input={pth}", f"--output={out}"])
    return load_inception_params(str(out))


@pytest.fixture(scope="module")
def extractor(params):
    return fid.InceptionExtractor(params, batch_size=2)


def _torch_features(model, images_uint8: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images_uint8.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    with torch.no_grad():
        return model(x)[0].reshape(len(images_uint8), -1).numpy().astype(np.float64)


@pytest.mark.parametrize(
    "hw,out", [((64, 48), (299, 299)), ((512, 512), (299, 299)), ((299, 299), (299, 299)),
               ((7, 300), (299, 299)), ((40, 41), (17, 90))]
)  # fmt: skip
def test_resize_matches_torch_interpolate(hw, out):
    x = np.random.default_rng(0).uniform(0, 1, (2, *hw, 3)).astype(np.float32)
    got = np.asarray(jax.jit(resize_bilinear, static_argnums=1)(jnp.asarray(x), out))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    want = F.interpolate(xt, size=out, mode="bilinear", align_corners=False)
    want = want.numpy().transpose(0, 2, 3, 1)
    assert got.shape == (2, *out, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    if hw == (512, 512):  # an antialiased resize would be caught by this test
        aa = np.asarray(jax.image.resize(jnp.asarray(x), (2, *out, 3), "bilinear"))
        assert np.abs(aa - want).max() > 0.05


@pytest.mark.parametrize("n,hw", [(3, (64, 48)), (2, (512, 512))])
def test_inception_parity_with_pytorch_fid(reference, extractor, n, hw):
    model, _, _ = reference
    images = np.random.default_rng(hw[0]).integers(0, 256, (n, *hw, 3), dtype=np.uint8)
    want = _torch_features(model, images)
    got = extractor(images)  # n=3 with batch 2 pads the last batch
    assert got.shape == (n, 2048) and got.dtype == np.float64
    assert want.std() > 0.5 and np.abs(want[0] - want[1]).max() > 0.1  # not degenerate
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < 1e-4
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
    # A lone image (padded batch) gets the same features as inside a full batch.
    np.testing.assert_allclose(extractor(images[1:2]), got[1:2], rtol=1e-6, atol=1e-6 * scale)


def test_extractor_input_errors(extractor):
    with pytest.raises(ValueError, match=r"expected uint8 images \[N, H, W, 3\], got float32"):
        extractor(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="got uint8"):
        extractor(np.zeros((1, 8, 8), np.uint8))
    assert extractor(np.zeros((0, 8, 8, 3), np.uint8)).shape == (0, 2048)
    assert len(extractor.weights_id) == 16


def _stats(seed, n, d, shift=0.0):
    f = np.random.default_rng(seed).normal(size=(n, d)) + shift
    return np.mean(f, axis=0), np.cov(f, rowvar=False)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning", "ignore::RuntimeWarning")
def test_frechet_distance_matches_pytorch_fid(caplog):
    ref = fid_score.calculate_frechet_distance
    cases = {
        "full rank": (*_stats(0, 300, 16), *_stats(1, 200, 16, 0.3)),
        "near singular (N < D)": (*_stats(2, 10, 64), *_stats(3, 12, 64, 0.1)),
    }
    # A nilpotent block makes sqrtm(S1 S2) infinite, forcing the eps * I fallback in both.
    s1 = np.eye(8)
    s1[:2, :2] = [[0.0, 1.0], [0.0, 0.0]]
    cases["fallback"] = (np.zeros(8), s1, np.ones(8), np.eye(8))
    from scipy import linalg

    with pytest.warns(linalg.LinAlgWarning):
        assert not np.isfinite(linalg.sqrtm(s1 @ np.eye(8))).all()
    for name, (m1, c1, m2, c2) in cases.items():
        want = ref(m1, c1, m2, c2)
        got = fid.frechet_distance(m1, c1, m2, c2)
        assert isinstance(got, float) and np.isfinite(got), name
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10, err_msg=name)
    assert "adding 1e-06 to the diagonal" in caplog.text
    m, c = _stats(0, 50, 8)
    assert abs(fid.frechet_distance(m, c, m, c)) < 1e-8
    assert fid.frechet_distance(m, c, m + 1, c) == pytest.approx(8.0, rel=1e-6)
    # Invalid covariances: both refuse on the imaginary part of the square root.
    with pytest.raises(ValueError, match="Imaginary"):
        ref(m, -np.eye(8), m, np.eye(8))
    with pytest.raises(ValueError, match="imaginary component"):
        fid.frechet_distance(m, -np.eye(8), m, np.eye(8))
    with pytest.raises(ValueError, match="means differ in shape"):
        fid.frechet_distance(m, c, m[:4], c)
    with pytest.raises(ValueError, match="covariances differ in shape"):
        fid.frechet_distance(m, c, m, c[:4, :4])


def test_feature_statistics():
    f = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    mu, sigma = fid.feature_statistics(f)
    np.testing.assert_array_equal(mu, np.mean(f.astype(np.float64), axis=0))
    np.testing.assert_array_equal(sigma, np.cov(f.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.feature_statistics(f[:1])


def test_converter_round_trip_and_errors(reference, params, tmp_path, capsys):
    _, state, _ = reference
    w = state["Mixed_6b.branch7x7_2.conv.weight"].numpy()  # [Cout, Cin, 1, 7]
    np.testing.assert_array_equal(
        params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"], w.transpose(2, 3, 1, 0)
    )
    bn = params["Mixed_7c"]["branch_pool"]["bn"]
    for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                         ("var", "running_var")):  # fmt: skip
        np.testing.assert_array_equal(bn[ours], state[f"Mixed_7c.branch_pool.bn.{theirs}"].numpy())

    # CLI: a file with a missing key is a one-line error naming the file, exit code 1.
    broken = dict(state)
    del broken["Mixed_5c.branch5x5_2.bn.running_var"]
    bad = tmp_path / "broken.pth"
    torch.save(broken, bad)
    out = tmp_path / "o.msgpack"
    with pytest.raises(SystemExit) as exc:
        convert_fid.main([f"--input={bad}", f"--output={out}"])
    assert exc.value.code == 1 and not out.exists()
    err = capsys.readouterr().err
    assert str(bad) in err and "Mixed_5c.branch5x5_2.bn.running_var" in err
    assert err.count("\n") == 1

    numpy_state = {k: v.numpy() for k, v in state.items()}
    extra = {**numpy_state, "AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)}
    with pytest.raises(ValueError, match=r"x.pth: unexpected 1 key\(s\) \['AuxLogits"):
        convert_fid.convert_inception(extra, source="x.pth")
    wrong = {**numpy_state, "Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5), np.float32)}
    with pytest.raises(ValueError, match=r"Conv2d_1a_3x3.conv.weight has shape \(32, 3, 5, 5\)"):
        convert_fid.convert_inception(wrong, source="x.pth")
    tv = {**numpy_state, "fc.weight": np.zeros((1000, 2048), np.float32)}
    with pytest.raises(ValueError, match="torchvision's ImageNet Inception"):
        convert_fid.convert_inception(tv, source="x.pth")

    assert inception.CONVERTED_FILE == "inception_fid.msgpack"
    assert inception.convert_command("w/i.msgpack") == (
        f"python -m artfr_jax.convert.fid_inception --input={FID_WEIGHTS_FILENAME} "
        "--output=w/i.msgpack"
    )
    with pytest.raises(ValueError, match="none was given"):
        load_inception_params("")
    with pytest.raises(FileNotFoundError, match="convert.fid_inception --input=pt_inception"):
        load_inception_params(str(tmp_path / "missing.msgpack"))


def test_statistics_files_compatible_with_pytorch_fid(tmp_path):
    mu, sigma = _stats(0, 20, 6)
    theirs = tmp_path / "theirs.npz"
    np.savez_compressed(theirs, mu=mu, sigma=sigma)  # what `pytorch_fid --save-stats` writes
    m, s, meta = fid.load_statistics(theirs)
    np.testing.assert_array_equal(m, mu)
    np.testing.assert_array_equal(s, sigma)
    assert meta == {}

    ours = tmp_path / "ours.stats"  # written at exactly this path, no suffix added
    fid.save_statistics(ours, mu, sigma, num_images=20, reference="FFHQ 512")
    assert sorted(os.listdir(tmp_path)) == ["ours.stats", "theirs.npz"]
    m, s, meta = fid.load_statistics(ours)
    np.testing.assert_array_equal(s, sigma)
    assert meta == {"num_images": 20, "reference": "FFHQ 512"}
    os.rename(ours, tmp_path / "ours.npz")  # pytorch-fid reads our file
    m2, s2 = fid_score.compute_statistics_of_path(str(tmp_path / "ours.npz"), None, 1, 6, "cpu")
    np.testing.assert_array_equal(m2, mu)
    np.testing.assert_array_equal(s2, sigma)

    np.savez(tmp_path / "nomu.npz", sigma=sigma)
    with pytest.raises(ValueError, match=r"nomu.npz: missing \['mu'\]"):
        fid.load_statistics(tmp_path / "nomu.npz")
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=sigma[:3])
    with pytest.raises(ValueError, match=r"shape.npz: 'mu' has shape \(6,\) and 'sigma' \(3, 6\)"):
        fid.load_statistics(tmp_path / "shape.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npz: not a readable .npz"):
        fid.load_statistics(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="gone.npz"):
        fid.load_statistics(tmp_path / "gone.npz")


def _write_images(folder, rng):
    """3 images at 64x48 (RGB, gray, RGBA) and 2 at 512x512, plus files FID must ignore."""
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8)).save(folder / "b_gray.png")
    Image.fromarray(rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)).save(folder / "c.PNG")
    for name in ("d.png", "e.png"):
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(folder / "sub" / "ignored.png")


def _listing(folder):
    return sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_folder_statistics_cache(reference, extractor, tmp_path):
    model, _, _ = reference
    folder, cache = tmp_path / "imgs", tmp_path / "cache"
    _write_images(folder, np.random.default_rng(0))
    before = _listing(folder)

    mu, sigma, info = fid.folder_statistics(str(folder), extractor, cache_dir=str(cache))
    assert info["num_images"] == 5 and info["cached"] is False
    assert os.path.dirname(info["cache_path"]) == str(cache.resolve())
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    # pytorch-fid itself on the same files (PIL decoding, batch 1 since the sizes differ).
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    feats = fid_score.get_activations(files, model, batch_size=1, dims=2048, num_workers=0)
    want_mu, want_sigma = np.mean(feats, axis=0), np.cov(feats, rowvar=False)
    scale = np.abs(want_mu).max()
    np.testing.assert_allclose(mu, want_mu, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-3, atol=1e-4 * np.abs(want_sigma).max())

    def must_not_run(images):
        raise AssertionError("cached statistics were recomputed")

    must_not_run.weights_id = extractor.weights_id
    mu2, sigma2, info2 = fid.folder_statistics(str(folder), must_not_run, cache_dir=str(cache))
    assert info2["cached"] is True and info2["cache_path"] == info["cache_path"]
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)

    # Other weights -> other cache entry.
    with pytest.raises(AssertionError, match="recomputed"):
        fid.folder_statistics(str(folder), must_not_run, cache_dir=str(cache), weights_id="other")

    # Rewriting one image invalidates the cache.
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(folder / "a.png")
    st = os.stat(folder / "a.png")
    os.utime(folder / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    mu3, _, info3 = fid.folder_statistics(str(folder), extractor, cache_dir=str(cache))
    assert info3["cached"] is False and info3["cache_path"] != info["cache_path"]
    assert np.abs(mu3 - mu).max() > 1e-3

    # Nothing was written into the image folder; the cache holds only finished .npz files.
    after = _listing(folder)
    assert [p for p, _ in after] == [p for p, _ in before]
    assert sorted(os.listdir(cache)) == sorted(
        os.path.basename(i["cache_path"]) for i in (info, info3)
    )
    with pytest.raises(ValueError, match="inside the image folder"):
        fid.folder_statistics(str(folder), extractor, cache_dir=str(folder / "sub"))


def test_folder_statistics_needs_two_images(tmp_path, monkeypatch):
    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "only.png")
    with pytest.raises(
        ValueError, match=r"has 1 png/jpg/jpeg/webp image\(s\); FID needs at least 2"
    ):
        fid.folder_statistics(str(folder), lambda x: x, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="does not exist"):
        fid.folder_statistics(str(tmp_path / "nope"), lambda x: x)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fid.default_cache_dir() == str(tmp_path / "xdg" / "artfr_jax" / "fid_stats")


def test_folder_statistics_batches_by_size(tmp_path):
    """Two sizes over several decode chunks: batches are uniform and every image counts once."""
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    want = []
    for i in range(37):
        shape = (8, 8, 3) if i % 3 else (6, 10, 3)
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
        want.append(img.reshape(-1, 3).mean(0))
    calls = []

    def colour_means(images):
        calls.append(images.shape)
        return images.reshape(len(images), -1, 3).mean(1)

    colour_means.batch_size = 4
    mu, sigma, info = fid.folder_statistics(
        str(folder),
        colour_means,
        cache_dir=str(tmp_path / "c"),
        weights_id="colour",
        progress=False,
    )
    assert info["num_images"] == 37 and sum(s[0] for s in calls) == 37
    assert all(s[0] <= 4 for s in calls) and {s[1:] for s in calls} == {(8, 8, 3), (6, 10, 3)}
    np.testing.assert_allclose(mu, np.mean(want, axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(np.array(want), rowvar=False), rtol=1e-10)
