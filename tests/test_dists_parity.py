"""Parity of the JAX DISTS with the reference ``DISTS_pytorch`` package on random VGG16 weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artfr_jax.convert import dists as convert_dists
from artfr_jax.losses.dists import DISTS, DISTS_LAYERS, dists, l2_pool, load_dists_params
from artfr_jax.models.vgg import VGG, imagenet_normalize

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
DISTS_pt = pytest.importorskip("DISTS_pytorch.DISTS_pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """DISTS_pytorch model (real alpha/beta, random VGG16) and its trunk as a torchvision file."""
    # DISTS() calls torchvision.models.vgg16(pretrained=True), which would download ImageNet
    # weights; hand it a randomly initialised VGG16 instead.
    random_vgg16 = torchvision.models.vgg16
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torchvision.models, "vgg16", lambda **_: random_vgg16(weights=None))
        torch.manual_seed(0)
        model = DISTS_pt.DISTS(load_weights=False).eval()
    real = convert_dists.read_torch_state_dict(convert_dists.default_weights_path())
    with torch.no_grad():
        model.alpha.copy_(torch.from_numpy(real["alpha"]))
        model.beta.copy_(torch.from_numpy(real["beta"]))
    tv = {}
    for key, value in model.state_dict().items():
        if key.startswith("stage") and key.endswith(("weight", "bias")):
            _, idx, kind = key.split(".")  # stage{k}.{idx}.{weight,bias}
            if kind == "bias":  # torchvision zero-inits biases; make the mapping testable
                value = torch.randn_like(value) * 0.05
                dict(model.named_parameters())[key].data.copy_(value)
            tv[f"features.{idx}.{kind}"] = value.clone()
    assert len(tv) == 26
    path = tmp_path_factory.mktemp("dists") / "vgg16_random.pth"
    torch.save(tv, path)
    return model, str(path)


@pytest.fixture(scope="module")
def params(reference, tmp_path_factory):
    _, vgg_path = reference
    out = tmp_path_factory.mktemp("dists_out") / "dists.msgpack"
    convert_dists.main([f"--vgg16={vgg_path}", f"--output={out}"])
    return load_dists_params(str(out))


def _images(seed, n=2, size=64):
    g = np.random.default_rng(seed)
    x = g.uniform(0, 1, (n, size, size, 3)).astype(np.float32)
    y = np.clip(x + g.normal(0, 0.2, x.shape), 0, 1).astype(np.float32)
    return x, y


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def test_l2_pool_matches_reference():
    x = np.random.default_rng(0).normal(size=(2, 9, 8, 5)).astype(np.float32)
    want = DISTS_pt.L2pooling(channels=5)(_nchw(x)).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(l2_pool(jnp.asarray(x)))
    assert got.shape == (2, 5, 4, 5)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_dists_parity_score_and_features(reference, params):
    model, _ = reference
    real = convert_dists.read_torch_state_dict(convert_dists.default_weights_path())
    np.testing.assert_array_equal(params["alpha"], real["alpha"].reshape(-1))
    np.testing.assert_array_equal(params["beta"], real["beta"].reshape(-1))

    x, y = _images(1)
    with torch.no_grad():
        want = model(_nchw(x), _nchw(y)).reshape(-1).numpy()
        ref_feats = model.forward_once(_nchw(x))[1:]
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(dists)(params, jnp.asarray(x), jnp.asarray(y)))
        feats = VGG(output_layers=DISTS_LAYERS, pool=l2_pool).apply(
            {"params": params["vgg"]}, imagenet_normalize(jnp.asarray(x))
        )
    for name, ref in zip(DISTS_LAYERS, ref_feats, strict=True):
        ref = ref.numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(feats[name]), ref, rtol=1e-4, atol=1e-4 * ref.std())

    assert got.shape == (2,)
    assert np.all(want > 0.01) and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
    # Different image pairs give different scores: the comparison is not vacuous.
    assert abs(got[0] - got[1]) > 1e-4 or abs(want[0] - want[1]) <= 1e-4


def test_dists_gradient_matches_reference(reference, params):
    model, _ = reference
    x, y = _images(2)
    xt = _nchw(x).requires_grad_(True)
    model(xt, _nchw(y), require_grad=True).sum().backward()
    want = xt.grad.numpy().transpose(0, 2, 3, 1)

    def loss(x_):
        return jnp.sum(dists(params, x_, jnp.asarray(y)))

    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x)))
    assert np.all(np.isfinite(got)) and np.abs(got).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_dists_identity_batch_one_and_errors(params):
    x, y = _images(3, n=1, size=20)
    run = jax.jit(dists, static_argnames="dtype")
    both = np.asarray(
        run(params, jnp.asarray(np.concatenate([x, x])), jnp.asarray(np.concatenate([x, y])))
    )
    d_same, d = both[:1], both[1:]
    assert d_same.shape == (1,) and abs(d_same[0]) < 1e-5
    assert d[0] > d_same[0] + 1e-3
    with pytest.raises(ValueError, match=r"DISTS: expected two images"):
        dists(params, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 1)))
    # bfloat16 trunk stays close to float32.
    d_bf16 = np.asarray(run(params, jnp.asarray(x), jnp.asarray(y), dtype=jnp.bfloat16))
    np.testing.assert_allclose(d_bf16, d, rtol=0.05)
    # Fresh init gives a usable tree of the same structure.
    init = jax.eval_shape(DISTS().init, jax.random.key(0), jnp.asarray(x), jnp.asarray(y))
    shapes = jax.tree.map(lambda a: tuple(a.shape), init["params"])
    assert shapes == jax.tree.map(np.shape, params)


def test_load_and_convert_errors(tmp_path, reference):
    _, vgg_path = reference
    with pytest.raises(ValueError, match="none was given"):
        load_dists_params("")
    with pytest.raises(FileNotFoundError, match="convert.dists"):
        load_dists_params(str(tmp_path / "missing.msgpack"))
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"not msgpack")
    with pytest.raises(ValueError, match="not a flax msgpack"):
        load_dists_params(str(bad))
    wrong = tmp_path / "wrong.pt"
    torch.save({"alpha": torch.ones(1, 10, 1, 1), "beta": torch.ones(1, 1475, 1, 1)}, wrong)
    with pytest.raises(ValueError, match=r"'alpha' has shape \(1, 10, 1, 1\)"):
        convert_dists.convert_files(vgg_path, str(tmp_path / "o.msgpack"), str(wrong))
    with pytest.raises(SystemExit) as exc:
        convert_dists.main(["--vgg16=/nonexistent.pth", f"--output={tmp_path / 'o.msgpack'}"])
    assert exc.value.code == 1
