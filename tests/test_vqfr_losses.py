"""VQFR stage-II losses: LPIPS + Gram style loss, SWAGAN global discriminator, softplus/hinge/R1.

The references are torch re-statements of the official VQFR code (``vqfr/losses/lpips.py``,
``vqfr/archs/swagan_arch.py`` with the native ``upfirdn2d``, ``vqfr/losses/losses.py``) run on the
same random weights.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artfr_jax.convert import lpips_vgg
from artfr_jax.losses import adversarial
from artfr_jax.losses.perceptual import lpips_distance
from artfr_jax.losses.style import gram_matrix, perceptual_style_loss, style_distance
from artfr_jax.models import stylegan_disc
from artfr_jax.models.stylegan_disc import SWADiscriminator, haar_dwt, haar_idwt

torch = pytest.importorskip("torch")
F = torch.nn.functional

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torchvision")

_LPIPS_ENDS = (3, 8, 15, 22, 29)  # relu1_2 ... relu5_3 in torchvision's vgg16.features


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


# ----------------------------------------------------------------------------- perceptual + style


@pytest.fixture(scope="module")
def vgg_reference():
    """Random torchvision VGG16 trunk + lpips' real v0.1 heads, and the converted JAX params."""
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features[:30].eval()
    with torch.no_grad():
        for name, p in features.named_parameters():
            if name.endswith("bias"):  # torchvision zero-inits biases; make them count
                p.normal_(0.0, 0.05)
    sd = {f"features.{k}": v.numpy() for k, v in features.state_dict().items()}
    heads = lpips_vgg.read_torch_state_dict(lpips_vgg.default_heads_path())
    params = lpips_vgg.convert_lpips_vgg(sd, heads)
    head_w = [torch.from_numpy(np.asarray(heads[f"lin{k}.model.1.weight"])) for k in range(5)]
    return features, head_w, params


def _torch_vqfr_lpips(features, head_w, x, y, perceptual_weight, style_weight):
    """The official ``LPIPS.forward`` (inputs in [-1, 1], style_measure L1) restated."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(img):
        h, outs = (img - shift) / scale, []
        for i in range(30):
            h = features[i](h)
            if i in _LPIPS_ENDS:
                outs.append(h)
        return outs

    def normalize(t):
        return t / (torch.sqrt(torch.sum(t**2, dim=1, keepdim=True)) + 1e-10)

    def gram(t):
        n, c, h, w = t.size()
        f = t.view(n, c, w * h)
        return f.bmm(f.transpose(1, 2)) / (c * h * w)

    val, style = 0.0, 0.0
    for k, (a, b) in enumerate(zip(feats(x), feats(y), strict=True)):
        a, b = normalize(a), normalize(b)
        val = val + F.conv2d((a - b) ** 2, head_w[k]).mean([2, 3], keepdim=True)
        style = style + F.l1_loss(gram(a), gram(b))
    return perceptual_weight * torch.mean(val), style_weight * style


def _images(seed, n=2, size=48):
    g = np.random.default_rng(seed)
    x = g.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    y = np.clip(x + g.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    return x, y


def test_gram_matrix_matches_numpy():
    f = np.random.default_rng(0).normal(size=(2, 5, 7, 6)).astype(np.float32)
    n, h, w, c = f.shape
    flat = f.transpose(0, 3, 1, 2).reshape(n, c, h * w).astype(np.float64)  # official layout
    want = flat @ flat.transpose(0, 2, 1) / (c * h * w)
    got = np.asarray(gram_matrix(jnp.asarray(f)))
    assert got.shape == (2, 6, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got, got.transpose(0, 2, 1), rtol=1e-6)
    with pytest.raises(ValueError, match=r"gram_matrix.*\[B, H, W, C\]"):
        gram_matrix(jnp.zeros((3, 4, 5)))


# One compiled loss for all tests (the weights are traced arguments, so changing them is free).
_loss = jax.jit(perceptual_style_loss)


def test_perceptual_style_parity(vgg_reference):
    features, head_w, params = vgg_reference
    x, y = _images(1)
    with torch.no_grad():
        want_p, want_s = _torch_vqfr_lpips(features, head_w, _nchw(x), _nchw(y), 1.0, 2000.0)
    with jax.default_matmul_precision("highest"):
        total, terms = _loss(params, jnp.asarray(x), jnp.asarray(y))
        lp = jax.jit(lpips_distance)(params, jnp.asarray(x), jnp.asarray(y))
    want_p, want_s = float(want_p), float(want_s)
    assert want_p > 0.01 and want_s > 1e-3  # a non-degenerate reference
    np.testing.assert_allclose(float(terms["perceptual"]), want_p, rtol=1e-4)
    np.testing.assert_allclose(float(terms["style"]), want_s, rtol=1e-4)
    np.testing.assert_allclose(float(total), want_p + want_s, rtol=1e-4)
    # The content term is exactly the package LPIPS averaged over the batch.
    np.testing.assert_allclose(float(terms["perceptual"]), float(jnp.mean(lp)), rtol=1e-5)

    # The weights scale the terms linearly.
    with jax.default_matmul_precision("highest"):
        t2, terms2 = _loss(params, x, y, perceptual_weight=0.5, style_weight=0.0)
    np.testing.assert_allclose(float(terms2["perceptual"]), 0.5 * want_p, rtol=1e-4)
    assert float(terms2["style"]) == 0.0 and float(t2) == float(terms2["perceptual"])


def test_style_zero_for_identical_positive_otherwise_and_grads(vgg_reference):
    _, _, params = vgg_reference
    x, y = _images(2)
    with jax.default_matmul_precision("highest"):  # the parity test's compiled loss
        total, terms = _loss(params, x, x)
        _, terms_xy = _loss(params, x, y)
    assert float(terms["style"]) == 0.0 and abs(float(terms["perceptual"])) < 1e-6
    assert abs(float(total)) < 1e-6
    terms = terms_xy
    assert float(terms["style"]) > 0 and float(terms["perceptual"]) > 0

    x1, y1 = jnp.asarray(x[:1, :32, :32]), jnp.asarray(y[:1, :32, :32])
    val, g = jax.jit(jax.value_and_grad(lambda a: perceptual_style_loss(params, a, y1)[0]))(x1)
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))
    assert float(jnp.abs(g).max()) > 0
    # L2 measure: zero for identical features, positive otherwise.
    fa, fb = {"a": jnp.asarray(x[..., :2])}, {"a": jnp.asarray(y[..., :2])}
    assert float(style_distance(fa, fa, measure="L2")) == 0.0
    assert float(style_distance(fa, fb, measure="L2")) > 0.0


def test_perceptual_style_bad_inputs(vgg_reference):
    _, _, params = vgg_reference
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="same shape"):
        perceptual_style_loss(params, x, jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="style_measure='cos'"):
        perceptual_style_loss(params, x, x, style_measure="cos")


# ----------------------------------------------------------------------------- SWA discriminator


def _t_upfirdn2d(x, kernel, up=1, down=1, pad=(0, 0)):
    """``upfirdn2d_native`` for non-negative pads: zero-insert, pad, convolve, subsample (NCHW)."""
    b, c, h, w = x.shape
    x = x.reshape(b * c, 1, h, w)
    if up > 1:
        z = x.new_zeros(b * c, 1, h * up, w * up)
        z[:, :, ::up, ::up] = x
        x = z
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    x = F.conv2d(x, torch.flip(kernel, [0, 1])[None, None])[:, :, ::down, ::down]
    return x.reshape(b, c, x.shape[-2], x.shape[-1])


def _t_haar():
    lo = torch.ones(1, 2) / 2**0.5
    hi = torch.ones(1, 2) / 2**0.5
    hi[0, 0] = -hi[0, 0]
    return lo.T * lo, hi.T * lo, lo.T * hi, hi.T * hi  # ll, lh, hl, hh


def _t_dwt(x):
    return torch.cat([_t_upfirdn2d(x, k, down=2) for k in _t_haar()], 1)


def _t_idwt(x):
    ll, lh, hl, hh = _t_haar()
    parts = x.chunk(4, 1)
    ks = (ll, -lh, -hl, hh)
    return sum(_t_upfirdn2d(p, k, up=2, pad=(1, 0)) for p, k in zip(parts, ks, strict=True))


def _t_kernel(k=(1, 3, 3, 1)):
    k = torch.tensor(k, dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum()


class _TSpectralNorm(torch.nn.Module):
    """Official ``SpectralNorm``: weight_bar/u/v on the wrapped module, one iteration a call."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        w = module.weight
        h = w.shape[0]
        u = torch.nn.functional.normalize(torch.randn(h), dim=0, eps=0)
        v = torch.nn.functional.normalize(torch.randn(w.view(h, -1).shape[1]), dim=0, eps=0)
        del module._parameters["weight"]
        module.register_parameter("weight_u", torch.nn.Parameter(u, requires_grad=False))
        module.register_parameter("weight_v", torch.nn.Parameter(v, requires_grad=False))
        module.register_parameter("weight_bar", torch.nn.Parameter(w.data))

    def forward(self, x):
        m = self.module
        w = m.weight_bar
        h = w.shape[0]
        wm = w.view(h, -1)
        m.weight_v.data = _l2n(torch.mv(wm.data.t(), m.weight_u.data))
        m.weight_u.data = _l2n(torch.mv(wm.data, m.weight_v.data))
        sigma = m.weight_u.dot(wm.mv(m.weight_v))
        m.weight = w / sigma
        return m.forward(x)


def _l2n(v, eps=1e-12):
    return v / (v.norm() + eps)


class _TConvLayer(torch.nn.Sequential):
    def __init__(self, cin, cout, k, downsample=False):
        layers = []
        if downsample:  # UpFirDnSmooth(down=2, kernel_size=k): pad (2, 2) for k = 3
            layers.append(_TBlur(((4 - 2 + k - 1 + 1) // 2, (4 - 2 + k - 1) // 2), 1))
        stride, pad = (2, 0) if downsample else (1, k // 2)
        layers += [
            _TSpectralNorm(torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad)),
            torch.nn.LeakyReLU(0.2),
        ]
        super().__init__(*layers)


class _TBlur(torch.nn.Module):
    def __init__(self, pad, down):
        super().__init__()
        self.pad, self.down = pad, down

    def forward(self, x):
        return _t_upfirdn2d(x, _t_kernel(), down=self.down, pad=self.pad)


class _TFromRGB(torch.nn.Module):
    def __init__(self, cout, downsample=True):
        super().__init__()
        self.downsample = downsample
        self.conv = _TConvLayer(12, cout, 3)

    def forward(self, x, skip=None):
        if self.downsample:
            x = _t_dwt(_t_upfirdn2d(_t_idwt(x), _t_kernel(), down=2, pad=(1, 1)))
        out = self.conv(x)
        return x, out if skip is None else out + skip


class _TConvBlock(torch.nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = _TConvLayer(cin, cin, 3)
        self.conv2 = _TConvLayer(cin, cout, 3, downsample=True)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class _TSWADiscriminator(torch.nn.Module):
    """Official ``SWADiscriminator`` (channel table through ``swa_channels``)."""

    def __init__(self, out_size, channels):
        super().__init__()
        self.from_rgbs, self.convs = torch.nn.ModuleList(), torch.nn.ModuleList()
        log_size = int(math.log(out_size, 2)) - 1
        cin = channels[out_size]
        for i in range(log_size, 2, -1):
            cout = channels[2 ** (i - 1)]
            self.from_rgbs.append(_TFromRGB(cin, downsample=i != log_size))
            self.convs.append(_TConvBlock(cin, cout))
            cin = cout
        self.from_rgbs.append(_TFromRGB(channels[4]))
        self.final_conv = _TConvLayer(cin + 1, channels[4], 3)
        self.final_linear = torch.nn.Sequential(
            _TSpectralNorm(torch.nn.Linear(channels[4] * 16, channels[4])),
            torch.nn.LeakyReLU(0.2),
            _TSpectralNorm(torch.nn.Linear(channels[4], 1)),
        )

    def forward(self, x):
        x, out = _t_dwt(x), None
        for from_rgb, conv in zip(self.from_rgbs, self.convs, strict=False):
            x, out = from_rgb(x, out)
            out = conv(out)
        _, out = self.from_rgbs[-1](x, out)
        b, c, h, w = out.shape
        g = min(b, 4)
        std = out.view(g, -1, 1, c, h, w)
        std = torch.sqrt(std.var(0, unbiased=False) + 1e-8)
        std = std.mean([2, 3, 4], keepdim=True).squeeze(2).repeat(g, 1, h, w)
        out = self.final_conv(torch.cat([out, std], 1))
        return self.final_linear(out.view(b, -1))


def _torch_to_flax(model):
    """Torch state dict -> ``{'params', 'spectral'}`` by the names in the module docstring."""
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    n = len(model.convs)
    prefixes = {f"from_rgb{k}": f"from_rgbs.{k}.conv.0.module" for k in range(n + 1)}
    for k in range(n):
        prefixes[f"conv{k}_1"] = f"convs.{k}.conv1.0.module"
        prefixes[f"conv{k}_2"] = f"convs.{k}.conv2.1.module"
    prefixes["final_conv"] = "final_conv.0.module"
    prefixes["final_linear0"] = "final_linear.0.module"
    prefixes["final_linear1"] = "final_linear.2.module"
    params, spectral = {}, {}
    for name, pre in prefixes.items():
        w = sd.pop(f"{pre}.weight_bar")
        w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
        params[name] = {"kernel": w, "bias": sd.pop(f"{pre}.bias")}
        spectral[name] = {"u": sd.pop(f"{pre}.weight_u")}
        sd.pop(f"{pre}.weight_v")  # recomputed from u before use
    assert not sd, sorted(sd)
    return {"params": params, "spectral": spectral}


def test_haar_matches_upfirdn_and_inverts():
    x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
    want = _t_dwt(_nchw(x)).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(haar_dwt(jnp.asarray(x)))
    assert got.shape == (2, 4, 6, 12)
    np.testing.assert_allclose(got, want, atol=1e-6)
    w = np.random.default_rng(1).normal(size=(2, 4, 6, 12)).astype(np.float32)
    want = _t_idwt(_nchw(w)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(haar_idwt(jnp.asarray(w))), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(haar_idwt(haar_dwt(jnp.asarray(x)))), x, atol=1e-6)


@pytest.mark.parametrize(
    ("size", "batch", "fields"),
    [
        (32, 8, dict(max_channels=8)),  # two stddev samples per group
        (64, 2, dict(channel_multiplier=1, narrow=1 / 16)),  # 16 -> 32 channels
    ],
)
def test_swa_discriminator_parity(size, batch, fields):
    torch.manual_seed(size)
    channels = stylegan_disc.swa_channels(**fields)
    ref = _TSWADiscriminator(size, channels).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    variables = _torch_to_flax(ref)
    d = SWADiscriminator(out_size=size, **fields)
    x = np.random.default_rng(size).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)

    shapes = jax.eval_shape(d.init, jax.random.key(0), jnp.asarray(x))
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(np.shape, variables)
    n_torch = sum(p.numel() for n, p in ref.named_parameters() if not n.endswith(("_u", "_v")))
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes["params"])) == n_torch

    apply = jax.jit(lambda v, a: d.apply(v, a, update_stats=True, mutable=[stylegan_disc.SPECTRAL]))
    for _ in range(2):  # the second call starts from the advanced power iteration
        with torch.no_grad():
            want = ref(_nchw(x)).numpy()
        with jax.default_matmul_precision("highest"):
            got, state = apply(variables, jnp.asarray(x))
        variables = {"params": variables["params"], **state}
        assert got.shape == (batch, 1) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
        u_ref = _torch_to_flax(ref)["spectral"]
        for name, u in state["spectral"].items():
            np.testing.assert_allclose(np.asarray(u["u"]), u_ref[name]["u"], atol=1e-5)
    assert np.std(want) > 0  # samples differ


@pytest.mark.parametrize("size", [32, 64])
def test_swa_discriminator_shapes_and_bf16(size):
    d = SWADiscriminator(out_size=size, max_channels=16, dtype=jnp.bfloat16)
    x = jnp.zeros((4, size, size, 3))
    out, variables = jax.eval_shape(lambda a: d.init_with_output(jax.random.key(0), a), x)
    assert out.shape == (4, 1) and out.dtype == jnp.float32
    assert set(variables) == {"params", "spectral"}
    n_blocks = int(math.log2(size)) - 3
    assert sorted(variables["params"]) == sorted(
        [f"from_rgb{k}" for k in range(n_blocks + 1)]
        + [f"conv{k}_{j}" for k in range(n_blocks) for j in (1, 2)]
        + ["final_conv", "final_linear0", "final_linear1"]
    )
    assert variables["params"]["from_rgb0"]["kernel"].shape == (3, 3, 12, 16)
    assert variables["params"]["final_linear0"]["kernel"].shape == (16 * 16, 16)


def test_swa_discriminator_paper_config_size():
    """Official config (512 px, channel_multiplier 2): the torch re-statement's parameter count."""
    d = SWADiscriminator()
    shapes = jax.eval_shape(d.init, jax.random.key(0), jnp.zeros((1, 512, 512, 3)))
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes["params"]))
    with torch.device("meta"):
        ref = _TSWADiscriminator(512, stylegan_disc.swa_channels(2))
    n_ref = sum(p.numel() for k, p in ref.named_parameters() if not k.endswith(("_u", "_v")))
    assert n == n_ref == 27_707_009
    assert shapes["params"]["from_rgb0"]["kernel"].shape == (3, 3, 12, 64)
    assert shapes["params"]["final_linear0"]["kernel"].shape == (512 * 16, 512)


def test_swa_discriminator_errors():
    key = jax.random.key(0)
    x = jnp.zeros((2, 32, 32, 3))
    with pytest.raises(ValueError, match="out_size=48"):
        jax.eval_shape(SWADiscriminator(out_size=48).init, key, jnp.zeros((2, 48, 48, 3)))
    with pytest.raises(ValueError, match=r"expected input \[B, 64, 64, 3\]"):
        jax.eval_shape(SWADiscriminator(out_size=64).init, key, x)
    d = SWADiscriminator(out_size=32, max_channels=8)
    variables = jax.eval_shape(d.init, key, jnp.zeros((4, 32, 32, 3)))
    with pytest.raises(ValueError, match="divisible by the group size 4"):
        jax.eval_shape(d.apply, variables, jnp.zeros((6, 32, 32, 3)))
    with pytest.raises(ValueError, match="no 'spectral' state"):
        jax.eval_shape(d.apply, {"params": variables["params"]}, x)


# ----------------------------------------------------------------------------- GAN losses, R1


def _softplus(v):
    return math.log1p(math.exp(v))


def test_softplus_and_hinge_values():
    real = jnp.asarray([1.0, -2.0])
    fake = jnp.asarray([[0.5], [3.0]])
    want_d = 0.5 * (_softplus(-1.0) + _softplus(2.0)) + 0.5 * (_softplus(0.5) + _softplus(3.0))
    np.testing.assert_allclose(float(adversarial.softplus_d_loss(real, fake)), want_d, rtol=1e-6)
    want_g = 0.5 * (_softplus(-0.5) + _softplus(-3.0))
    np.testing.assert_allclose(float(adversarial.softplus_g_loss(fake)), want_g, rtol=1e-6)
    assert float(adversarial.hinge_g_loss(fake)) == pytest.approx(-1.75)
    # VQFR's local D: 0.5 * (relu(1 - real).mean() + relu(1 + fake).mean()) = 0.5 * (1.5 + 2.75).
    assert float(adversarial.hinge_d_loss(real, fake)) == pytest.approx(2.125)
    # The softplus G loss is the existing non-saturating generator loss.
    assert float(adversarial.softplus_g_loss(fake)) == pytest.approx(
        float(adversarial.generator_adv_loss(fake, "non_saturating"))
    )
    assert adversarial.softplus_d_loss(real.astype(jnp.bfloat16), fake).dtype == jnp.float32


def test_r1_penalty_closed_forms():
    g = np.random.default_rng(0)
    w = jnp.asarray(g.normal(size=(4, 4, 3)), jnp.float32)
    x = jnp.asarray(g.normal(size=(3, 4, 4, 3)), jnp.float32)
    # Linear D(x) = <w, x>: the gradient is w for every image.
    linear = adversarial.r1_penalty(lambda a: jnp.sum(a * w, axis=(1, 2, 3)), x)
    np.testing.assert_allclose(float(linear), float(jnp.sum(w**2)), rtol=1e-5)
    # D(x) = 0.5 * ||x||^2 with [B, 1] logits: the gradient is x itself.
    quad = adversarial.r1_penalty(lambda a: 0.5 * jnp.sum(a**2, axis=(1, 2, 3))[:, None], x)
    np.testing.assert_allclose(float(quad), float(jnp.mean(jnp.sum(x**2, (1, 2, 3)))), rtol=1e-5)


def test_r1_penalty_parity_and_param_grads():
    """R1 on the SWA discriminator matches torch autograd; its param gradient is finite."""
    torch.manual_seed(1)
    channels = stylegan_disc.swa_channels(max_channels=8)
    ref = _TSWADiscriminator(32, channels)
    variables = _torch_to_flax(ref)
    x = np.random.default_rng(3).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    real = _nchw(x).requires_grad_(True)
    pred = ref(real)
    grad = torch.autograd.grad(pred.sum(), real, create_graph=True)[0]
    want = float(grad.pow(2).view(grad.shape[0], -1).sum(1).mean().detach())

    d = SWADiscriminator(out_size=32, max_channels=8)

    def r1(params):
        return adversarial.r1_penalty(
            lambda a: d.apply({"params": params, "spectral": variables["spectral"]}, a),
            jnp.asarray(x),
        )

    with jax.default_matmul_precision("highest"):
        val, grads = jax.jit(jax.value_and_grad(r1))(variables["params"])
    assert want > 0
    np.testing.assert_allclose(float(val), want, rtol=1e-4)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in leaves)
    assert sum(float(jnp.abs(v).sum()) for v in leaves) > 0
