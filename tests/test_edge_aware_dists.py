"""EA-DISTS (OSDFace Eq. 14): Sobel map against torch, the score against ``DISTS_pytorch``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artfr_jax.convert import dists as convert_dists
from artfr_jax.losses.edge_aware import (
    GRAY_BT601,
    GRAY_MEAN,
    ea_dists,
    ea_dists_terms,
    sobel_magnitude,
)

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
DISTS_pt = pytest.importorskip("DISTS_pytorch.DISTS_pt")
F = torch.nn.functional

_TORCH_PAD = {"zeros": "constant", "reflect": "reflect", "edge": "replicate"}


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _torch_sobel(x_nchw, gray=GRAY_MEAN, padding="zeros", eps=1e-6):
    """The authors' demo: gray image, ``Conv2d(1, 1, 3)`` with Sobel kernels, sqrt(gx^2+gy^2+eps)."""
    w = torch.tensor(gray, dtype=x_nchw.dtype).view(1, 3, 1, 1)
    g = (x_nchw * w).sum(1, keepdim=True)
    g = F.pad(g, (1, 1, 1, 1), mode=_TORCH_PAD[padding])
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    gx = F.conv2d(g, kx.to(g.dtype))
    gy = F.conv2d(g, kx.transpose(2, 3).to(g.dtype))
    return torch.sqrt(gx**2 + gy**2 + eps)  # [B, 1, H, W], as the demo hands it to DISTS


@pytest.fixture(scope="module")
def reference():
    """DISTS_pytorch (the package's alpha/beta, random VGG16 and biases) and the same weights as a
    JAX params tree, built as in tests/test_dists_parity.py but without the file round trip."""
    random_vgg16 = torchvision.models.vgg16
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torchvision.models, "vgg16", lambda **_: random_vgg16(weights=None))
        torch.manual_seed(1)
        model = DISTS_pt.DISTS(load_weights=False).eval()
    real = convert_dists.read_torch_state_dict(convert_dists.default_weights_path())
    named = dict(model.named_parameters())
    tv = {}
    with torch.no_grad():
        model.alpha.copy_(torch.from_numpy(real["alpha"]))
        model.beta.copy_(torch.from_numpy(real["beta"]))
        for key, value in model.state_dict().items():
            if key.startswith("stage") and key.endswith(("weight", "bias")):
                _, idx, kind = key.split(".")  # stage{k}.{idx}.{weight,bias}
                if kind == "bias":  # torchvision zero-inits biases; make them matter
                    named[key].copy_(torch.randn_like(value) * 0.05)
                tv[f"features.{idx}.{kind}"] = named[key].detach().numpy().copy()
    params = convert_dists.convert_dists(tv, real)
    return model, jax.tree.map(jnp.asarray, params)


def _images(seed, n=2, size=40):
    g = np.random.default_rng(seed)
    y = g.uniform(0, 1, (n, size, size, 3)).astype(np.float32)
    x = np.clip(y + g.normal(0, 0.15, y.shape), 0, 1).astype(np.float32)
    return x, y


@pytest.mark.parametrize(
    "gray,padding", [(GRAY_MEAN, "zeros"), (GRAY_BT601, "reflect"), (GRAY_MEAN, "edge")]
)
def test_sobel_matches_torch(gray, padding):
    x = np.random.default_rng(0).uniform(0, 1, (2, 11, 9, 3)).astype(np.float32)
    want = _torch_sobel(_nchw(x).double(), gray, padding).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(
        jax.jit(sobel_magnitude, static_argnames=("gray_weights", "padding"))(
            jnp.asarray(x), gray_weights=gray, padding=padding
        )
    )
    assert got.shape == (2, 11, 9, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_sobel_known_values_and_errors():
    # A vertical step 0 -> 1 between columns 3 and 4: |gx| = 4 on both sides of it (interior rows).
    x = np.zeros((1, 6, 8, 3), np.float32)
    x[:, :, 4:] = 1.0
    m = np.asarray(sobel_magnitude(jnp.asarray(x), padding="edge"))[0, :, :, 0]
    np.testing.assert_allclose(m[:, 3:5], np.sqrt(16 + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(m[:, :2], 1e-3, rtol=1e-5)  # flat: sqrt(eps)
    # Zero padding turns the border of a flat grey image into an edge, as the reference does.
    z = np.asarray(sobel_magnitude(jnp.full((1, 5, 5, 3), 0.5)))[0, :, :, 0]
    np.testing.assert_allclose(z[1:-1, 1:-1], 1e-3, rtol=1e-5)
    assert np.all(z[0] > 1.0)
    with pytest.raises(ValueError, match="padding must be one of"):
        sobel_magnitude(jnp.zeros((1, 4, 4, 3)), padding="circular")
    with pytest.raises(ValueError, match=r"expected RGB images \[B, H, W, 3\]"):
        sobel_magnitude(jnp.zeros((1, 4, 4, 1)))


def test_ea_dists_matches_reference_and_identity(reference):
    model, params = reference
    x, y = _images(3)
    # Pairs: (x0, y0), (x1, y1), (y0, y0); the last one checks identical images give ~0.
    a, b = np.concatenate([x, y[:1]]), np.concatenate([y, y[:1]])
    at, bt = _nchw(a), _nchw(b)
    with torch.no_grad():
        d_img = model(at, bt).numpy()
        # 1-channel edge maps, exactly as the authors' demo feeds DISTS (it broadcasts to 3).
        d_edge = model(_torch_sobel(at), _torch_sobel(bt)).numpy()

    def scores(p, a_, b_):
        weighted = ea_dists(p, a_, b_, image_weight=0.5, edge_weight=2.0)
        return ea_dists_terms(p, a_, b_), ea_dists(p, a_, b_), weighted

    with jax.default_matmul_precision("highest"):
        (got_img, got_edge), total, weighted = jax.jit(scores)(params, jnp.asarray(a), b)
    assert total.shape == (3,) and total.dtype == jnp.float32
    assert np.all(d_img[:2] > 5e-3) and np.all(d_edge[:2] > 5e-3)
    # A score is 1 - (sum close to 1): float32 rounding of that sum is ~1e-7 absolute.
    tol = dict(rtol=1e-5, atol=3e-7)
    np.testing.assert_allclose(np.asarray(got_img[:2]), d_img[:2], **tol)
    np.testing.assert_allclose(np.asarray(got_edge[:2]), d_edge[:2], **tol)
    np.testing.assert_allclose(np.asarray(total[:2]), d_img[:2] + d_edge[:2], **tol)
    np.testing.assert_allclose(np.asarray(weighted[:2]), 0.5 * d_img[:2] + 2.0 * d_edge[:2], **tol)
    assert abs(float(got_img[2])) < 1e-5 and abs(float(got_edge[2])) < 1e-5
    assert abs(float(d_edge[2])) < 1e-5


def test_ea_dists_gradient_reference_and_flat(reference):
    model, params = reference
    x, y = _images(4, n=2, size=16)
    xt = _nchw(x).requires_grad_(True)
    yt = _nchw(y)
    loss = model(xt, yt, require_grad=True) + model(
        _torch_sobel(xt), _torch_sobel(yt), require_grad=True
    )
    loss.sum().backward()
    want = xt.grad.numpy().transpose(0, 2, 3, 1)

    # One compiled gradient for every check: weights are traced, params an argument.
    def loss_fn(a, p, b, wi, we):
        return jnp.sum(ea_dists(p, a, b, image_weight=wi, edge_weight=we))

    grad = jax.jit(jax.grad(loss_fn))
    with jax.default_matmul_precision("highest"):
        got = np.asarray(grad(jnp.asarray(x), params, jnp.asarray(y), 1.0, 1.0))
    assert np.all(np.isfinite(got)) and np.abs(got).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())

    # Flat images: the Sobel map is sqrt(eps) inside, gx = gy = 0; the gradient stays finite
    # (no 0/0 in the square root) for flat x against textured y and for x == y flat, for the sum
    # and for the edge term alone.
    flat = np.full_like(x, 0.4)
    targets = np.concatenate([y[:1], flat[:1]])
    for wi in (1.0, 0.0):
        g = np.asarray(grad(jnp.asarray(flat), params, jnp.asarray(targets), wi, 1.0))
        assert np.all(np.isfinite(g)), wi
        assert np.abs(g[0]).max() > 0, wi
    with pytest.raises(ValueError, match="differ in shape"):
        ea_dists(params, jnp.asarray(flat), jnp.asarray(flat[:, :12]))
