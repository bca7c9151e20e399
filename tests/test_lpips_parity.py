"""Parity of the JAX LPIPS (VGG) with the reference ``lpips`` package on random trunk weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artfr_jax.convert import lpips_vgg
from artfr_jax.losses.perceptual import LPIPS, load_lpips_params, lpips_distance
from artfr_jax.models.vgg import LPIPS_LAYERS, VGG

torch = pytest.importorskip("torch")
lpips = pytest.importorskip("lpips")

# lpips builds its trunk with torchvision's deprecated `pretrained=` argument.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torchvision")

# lpips' five slices end at these torchvision indices (relu1_2 ... relu5_3).
_SLICE_ENDS = (3, 8, 15, 22, 29)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """lpips model (real v0.1 heads, random VGG16 trunk) and its trunk as a torchvision file."""
    torch.manual_seed(0)
    # pnet_rand=True: torchvision VGG16 with random init, nothing is downloaded.
    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if name.endswith("bias"):  # torchvision zero-inits biases; make the mapping testable
                p.normal_(0.0, 0.05)
    tv = {}
    for key, value in model.net.state_dict().items():
        _, idx, kind = key.split(".")  # slice{k}.{idx}.{weight,bias}
        tv[f"features.{idx}.{kind}"] = value.clone()
    path = tmp_path_factory.mktemp("lpips") / "vgg16_random.pth"
    torch.save(tv, path)
    return model, str(path)


def _images(seed, n=2, size=64):
    g = np.random.default_rng(seed)
    x = g.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    y = np.clip(x + g.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    return x, y


def _torch_nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def test_lpips_parity_distance_and_features(reference, tmp_path):
    model, vgg_path = reference
    out = tmp_path / "lpips_vgg.msgpack"
    converted = lpips_vgg.convert_files(vgg_path, str(out))
    params = load_lpips_params(str(out))

    # The heads are the package's real (non-negative, calibrated) weights.
    heads = lpips_vgg.read_torch_state_dict(lpips_vgg.default_heads_path())
    for k in range(5):
        ref = heads[f"lin{k}.model.1.weight"].reshape(-1)
        np.testing.assert_array_equal(params[f"lin{k}"]["kernel"][:, 0], ref)
        assert ref.min() >= 0 and ref.max() > 0
    np.testing.assert_array_equal(
        params["vgg"]["conv28"]["bias"], converted["vgg"]["conv28"]["bias"]
    )

    x, y = _images(1)
    with torch.no_grad():
        want = model(_torch_nchw(x), _torch_nchw(y), normalize=False).reshape(-1).numpy()
        ref_feats = model.net(model.scaling_layer(_torch_nchw(x)))
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(lpips_distance)(params, jnp.asarray(x), jnp.asarray(y)))
        scaled = (jnp.asarray(x) - jnp.asarray([-0.030, -0.088, -0.188])) / jnp.asarray(
            [0.458, 0.448, 0.450]
        )
        feats = VGG(output_layers=LPIPS_LAYERS).apply({"params": params["vgg"]}, scaled)

    for name, ref in zip(LPIPS_LAYERS, ref_feats, strict=True):
        ref = ref.numpy().transpose(0, 2, 3, 1)
        err = np.max(np.abs(np.asarray(feats[name]) - ref)) / np.max(np.abs(ref))
        assert err < 1e-5, (name, err)
    assert want.shape == got.shape == (2,)
    assert np.all(want > 0.01), want  # a meaningful (non-degenerate) distance
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


def test_lpips_parity_cli_and_per_layer(reference, tmp_path, capsys):
    model, vgg_path = reference
    out = tmp_path / "sub" / "lpips.msgpack"
    heads = lpips_vgg.default_heads_path()
    lpips_vgg.main([f"--vgg16={vgg_path}", f"--heads={heads}", f"--output={out}"])
    assert "wrote" in capsys.readouterr().out
    params = load_lpips_params(str(out))

    x, y = _images(2, n=1, size=48)
    with torch.no_grad():
        want, want_layers = model(_torch_nchw(x), _torch_nchw(y), retPerLayer=True)
    with jax.default_matmul_precision("highest"):
        got, got_layers = LPIPS().apply({"params": params}, x, y, per_layer=True)
    np.testing.assert_allclose(np.asarray(got), want.reshape(-1).numpy(), rtol=1e-5)
    for g, w in zip(got_layers, want_layers, strict=True):
        np.testing.assert_allclose(np.asarray(g), w.reshape(-1).numpy(), rtol=1e-5, atol=1e-9)


def test_lpips_parity_bf16_close(reference, tmp_path):
    """The bf16 compute path stays close to float32 (a training-time option, not exact parity)."""
    _, vgg_path = reference
    params = lpips_vgg.convert_files(vgg_path, str(tmp_path / "l.msgpack"))
    x, y = _images(3)
    f32 = np.asarray(lpips_distance(params, x, y))
    bf16 = np.asarray(lpips_distance(params, x, y, dtype=jnp.bfloat16))
    np.testing.assert_allclose(bf16, f32, rtol=0.05)


def test_converter_rejects_wrong_state_dict(tmp_path):
    bad = tmp_path / "not_vgg.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 5, 5)}, bad)
    heads = lpips_vgg.default_heads_path()
    with pytest.raises(ValueError, match=r"not_vgg\.pth.*features\.0"):
        lpips_vgg.convert_files(str(bad), str(tmp_path / "o.msgpack"), heads)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        lpips_vgg.convert_files(str(tmp_path / "nope.pth"), str(tmp_path / "o.msgpack"), heads)
    with pytest.raises(SystemExit):
        lpips_vgg.main([f"--vgg16={tmp_path / 'nope.pth'}", f"--output={tmp_path / 'o.msgpack'}"])
    assert not (tmp_path / "o.msgpack").exists()
