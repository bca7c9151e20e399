"""Parity of the linen ArcFace backbones and embedders with PyTorch references on random weights.

The torch modules below restate the official definitions with the same parameter names and
shapes: ``ResNetFace``/``IRBlock`` of ronghuaiyang/arcface-pytorch ``models/resnet.py`` (@47ace80)
and ``IResNet``/``IBasicBlock`` of deepinsight/insightface
``recognition/arcface_torch/backbones/iresnet.py`` (@d9cb10e). Every BatchNorm gets random running
statistics and affine weights and every PReLU random slopes, so a wrong mapping shows.
"""

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artfr_jax.convert import arcface as convert_arcface
from artfr_jax.evaluation import arcface
from artfr_jax.evaluation.metrics import angle_degrees

torch = pytest.importorskip("torch")
tnn = torch.nn

SMALL_LAYERS = (1, 2, 1, 1)  # covers first (downsampling) and plain blocks


def _conv3x3(cin, cout, stride=1):
    return tnn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _downsample(cin, cout, stride):
    return tnn.Sequential(
        tnn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), tnn.BatchNorm2d(cout)
    )


class TorchIRBlock(tnn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn0 = tnn.BatchNorm2d(inplanes)
        self.conv1 = _conv3x3(inplanes, inplanes)
        self.bn1 = tnn.BatchNorm2d(inplanes)
        self.prelu = tnn.PReLU()
        self.conv2 = _conv3x3(inplanes, planes, stride)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.prelu(self.bn1(self.conv1(self.bn0(x))))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.prelu(out + residual)


class TorchResNetFace(tnn.Module):
    """``resnet_face18(use_se=False)``."""

    def __init__(self, layers=(2, 2, 2, 2)):
        super().__init__()
        self.inplanes = 64
        self.conv1 = tnn.Conv2d(1, 64, kernel_size=3, padding=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(64)
        self.prelu = tnn.PReLU()
        self.maxpool = tnn.MaxPool2d(kernel_size=2, stride=2)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn4 = tnn.BatchNorm2d(512)
        self.dropout = tnn.Dropout()
        self.fc5 = tnn.Linear(512 * 8 * 8, 512)
        self.bn5 = tnn.BatchNorm1d(512)

    def _make_layer(self, planes, blocks, stride=1):
        down = None
        if stride != 1 or self.inplanes != planes:
            down = _downsample(self.inplanes, planes, stride)
        layers = [TorchIRBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [TorchIRBlock(planes, planes) for _ in range(1, blocks)]
        return tnn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.prelu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn4(x))
        return self.bn5(self.fc5(x.view(x.size(0), -1)))


class TorchIBasicBlock(tnn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = tnn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = tnn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = tnn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = tnn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        out = self.prelu(self.bn2(self.conv1(self.bn1(x))))
        out = self.bn3(self.conv2(out))
        return out + (x if self.downsample is None else self.downsample(x))


class TorchIResNet(tnn.Module):
    def __init__(self, layers, num_features=512):
        super().__init__()
        self.inplanes = 64
        self.conv1 = tnn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(64, eps=1e-05)
        self.prelu = tnn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0], stride=2)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn2 = tnn.BatchNorm2d(512, eps=1e-05)
        self.dropout = tnn.Dropout(p=0, inplace=True)
        self.fc = tnn.Linear(512 * 7 * 7, num_features)
        self.features = tnn.BatchNorm1d(num_features, eps=1e-05)

    def _make_layer(self, planes, blocks, stride):
        down = None
        if stride != 1 or self.inplanes != planes:
            down = _downsample(self.inplanes, planes, stride)
        layers = [TorchIBasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [TorchIBasicBlock(planes, planes) for _ in range(1, blocks)]
        return tnn.Sequential(*layers)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def _randomize(model, seed):
    """Random BN statistics / affine weights and PReLU slopes (torch inits them to constants)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tnn.BatchNorm2d | tnn.BatchNorm1d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            elif isinstance(m, tnn.PReLU):
                m.weight.copy_(0.5 * torch.rand(m.weight.shape, generator=g))
            elif isinstance(m, tnn.Linear):
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def _torch_embed(model, x_nhwc):
    with torch.no_grad():
        # Default NCHW strides: a transposed C=1 view would run channels-last and break .view().
        x = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2))
        return model(x.clone(memory_format=torch.contiguous_format)).numpy()


def _assert_close(got, want, tol=1e-4):
    assert got.shape == want.shape and np.all(np.isfinite(got))
    rel = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
    assert rel.max() < tol, rel
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """Random ``resnet_face18`` saved like ``resnet18_110.pth`` (DataParallel keys) + converted."""
    torch.manual_seed(0)
    model = _randomize(TorchResNetFace(), 1)
    d = tmp_path_factory.mktemp("arcface18")
    ckpt, out = d / "resnet18_110.pth", d / "arcface_resnet18.msgpack"
    torch.save(tnn.DataParallel(model).state_dict(), ckpt)
    convert_arcface.main(["--arch=resnet18", f"--input={ckpt}", f"--output={out}"])
    return model, arcface.load_arcface_params("resnet18", str(out)), str(ckpt)


@pytest.fixture(scope="module")
def iresnet_small(tmp_path_factory):
    torch.manual_seed(2)
    model = _randomize(TorchIResNet(SMALL_LAYERS), 3)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    variables = convert_arcface.convert_arcface("iresnet50", sd, layers=SMALL_LAYERS)
    return model, variables


def test_resnet18_checkpoint_keys_and_parity(resnet18):
    model, variables, ckpt = resnet18
    keys = set(torch.load(ckpt, weights_only=True))
    assert all(k.startswith("module.") for k in keys)
    table = convert_arcface.torch_key_table("resnet18")
    assert {k for k in keys if not k.endswith("num_batches_tracked")} == {
        "module." + k for k in table
    }
    x = np.random.default_rng(0).uniform(-1, 1, (3, 128, 128, 1)).astype(np.float32)
    got = np.asarray(jax.jit(arcface.ResNetFace18().apply)(variables, jnp.asarray(x)))
    want = _torch_embed(model, x)
    assert got.shape == (3, 512)
    _assert_close(got, want)
    # bfloat16 compute keeps the identity direction.
    bf = np.asarray(jax.jit(arcface.ResNetFace18(dtype=jnp.bfloat16).apply)(variables, x))
    assert bf.dtype == np.float32 and np.all(angle_degrees(bf, want) < 5.0)


def test_iresnet_small_parity(iresnet_small):
    model, variables = iresnet_small
    x = np.random.default_rng(1).uniform(-1, 1, (2, 112, 112, 3)).astype(np.float32)
    module = arcface.IResNet(SMALL_LAYERS)
    got = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(x)))
    _assert_close(got, _torch_embed(model, x))


@pytest.mark.parametrize(
    ("arch", "n_params"), [("iresnet50", 43_590_848), ("iresnet100", 65_156_160)]
)
def test_iresnet_full_depth_key_tables(arch, n_params):
    """The converter expects exactly the official state dict (built on the meta device, no FLOPs)."""
    with torch.device("meta"):
        model = TorchIResNet(arcface.IRESNET_LAYERS[arch])
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {k: s for k, s in want.items() if not k.endswith("num_batches_tracked")}
    table = convert_arcface.torch_key_table(arch)
    assert {k: s for k, (_, s) in table.items()} == want
    assert sum(p.numel() for p in model.parameters()) == n_params
    shapes = arcface.arcface_variable_shapes(arch)
    assert sum(int(np.prod(s)) for k, s in shapes.items() if k[0] == "params") == n_params


def _script_gray(png_path, size=128):
    """VQFR ``calculate_cos_dist.load_image`` up to the torch conversion."""
    image = cv2.imread(png_path, 0)  # only on gray images
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    image = image[np.newaxis, :, :].astype(np.float32, copy=False)
    image -= 127.5
    image /= 127.5
    return image  # [1, 128, 128]


def _write_png(path, rgb):
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return str(path)


def _insightface_rgb(img_rgb, size=112):
    img = cv2.resize(img_rgb, (size, size), interpolation=cv2.INTER_LINEAR)
    t = torch.from_numpy(np.transpose(img, (2, 0, 1))).unsqueeze(0).float()
    return t.div_(255).sub_(0.5).div_(0.5)


def _faces(seed, n, h=150, w=130):
    """Smooth random uint8 RGB "faces" (noise would make resizing differences dominate)."""
    g = np.random.default_rng(seed)
    small = g.uniform(0, 255, (n, h // 10, w // 10, 3)).astype(np.float32)
    return np.stack(
        [cv2.resize(s, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255) for s in small]
    ).astype(np.uint8)


def test_png_gray_equals_imread_gray(tmp_path):
    g = np.random.default_rng(4)
    img = g.integers(0, 256, (300, 301, 3), dtype=np.uint8)
    img[0, :256] = np.arange(256)[:, None]  # every gray level (r == g == b) too
    path = _write_png(tmp_path / "face.png", img)
    np.testing.assert_array_equal(arcface.png_gray(img), cv2.imread(path, 0))
    # ...which is not cvtColor: the protocol needs the libpng formula.
    assert np.any(arcface.png_gray(img) != cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))


def test_embedder_resnet18_matches_script(resnet18, tmp_path):
    model, variables, _ = resnet18
    images = _faces(0, 3)
    emb = arcface.ArcFaceEmbedder("resnet18", variables, batch_size=2)
    assert "ResNet-18" in emb.name and "flip" not in emb.name
    got = emb(images)
    x = np.stack(
        [_script_gray(_write_png(tmp_path / f"{i}.png", im)) for i, im in enumerate(images)]
    )
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 512) and got.dtype == np.float32
    _assert_close(got, want)
    np.testing.assert_array_equal(arcface.preprocess("resnet18", images), x.transpose(0, 2, 3, 1))

    flip = arcface.ArcFaceEmbedder("resnet18", variables, batch_size=2, flip_concat=True)
    assert "flip-concat" in flip.name
    both = flip(images[:1])
    with torch.no_grad():
        want_flip = model(torch.from_numpy(np.ascontiguousarray(x[:1, :, :, ::-1]))).numpy()
    assert both.shape == (1, 1024)
    _assert_close(both[:, :512], want[:1])
    _assert_close(both[:, 512:], want_flip)
    assert emb(images[:0]).shape == (0, 512)


def test_embedder_iresnet_matches_inference_script(iresnet_small):
    model, variables = iresnet_small
    images = _faces(1, 3, h=112, w=112)
    images[2] = _faces(2, 1, h=200, w=180)[0][:112, :112]
    emb = arcface.ArcFaceEmbedder("iresnet50", variables, batch_size=4, layers=SMALL_LAYERS)
    assert emb.name == "ArcFace IResNet-50 (insightface, 112px RGB)"
    big = _faces(3, 2, h=224, w=200)  # resized to 112 like the resnet18 protocol
    got = np.concatenate([emb(images), emb(big)])
    with torch.no_grad():
        want = model(torch.cat([_insightface_rgb(im) for im in [*images, *big]])).numpy()
    _assert_close(got, want)


def test_angle_of_image_with_itself(resnet18):
    _, variables, _ = resnet18
    a, b = _faces(10, 2)
    e = arcface.ArcFaceEmbedder("resnet18", variables, batch_size=4)(np.stack([a, a, b]))
    same = angle_degrees(e[:1], e[1:2])
    other = angle_degrees(e[:1], e[2:])
    assert same[0] < 1e-3
    assert other[0] > 10 * same[0] + 0.1
    mean, identical = arcface.vqfr_deg(np.array([0.2, 5.0, 7.0]))
    assert identical == 1 and mean == pytest.approx(6.0)


def test_converter_and_loader_errors(tmp_path, resnet18, iresnet_small):
    model, _, ckpt = resnet18
    sd = {k: v.numpy() for k, v in model.state_dict().items()}

    def fails(match, state_dict, arch="resnet18", **kw):
        with pytest.raises(ValueError, match=match):
            convert_arcface.convert_arcface(arch, state_dict, source="ckpt.pth", **kw)

    fails(
        r"ckpt\.pth: missing 1 key\(s\).*'bn5\.running_var'",
        {k: v for k, v in sd.items() if k != "bn5.running_var"},
    )
    fails(
        r"ckpt\.pth: 1 unexpected.*use_se=False", {**sd, "layer1.0.se.fc.0.weight": sd["bn5.bias"]}
    )
    fails(
        r"ckpt\.pth: conv1\.weight has shape \(64, 3, 3, 3\), expected \(64, 1, 3, 3\)",
        {**sd, "conv1.weight": np.zeros((64, 3, 3, 3), np.float32)},
    )
    fails(r"ckpt\.pth: .*unexpected key.*--arch=iresnet50", sd, arch="iresnet50")

    # A whole pickled model (not a state dict) is refused by weights_only loading.
    pickled = tmp_path / "whole_model.pth"
    torch.save(iresnet_small[0], pickled)
    with pytest.raises(ValueError, match=r"whole_model\.pth holds a pickled object .*state_dict"):
        convert_arcface.read_checkpoint(str(pickled))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth: not a torch checkpoint"):
        convert_arcface.read_checkpoint(str(garbage))
    with pytest.raises(SystemExit) as exc:
        convert_arcface.main(["--arch=resnet18", "--input=/nonexistent.pth", "--output=o.msgpack"])
    assert exc.value.code == 1
    # Wrong --arch on a real file: the message names the file.
    with pytest.raises(ValueError, match=r"resnet18_110\.pth: .*--arch=iresnet100"):
        convert_arcface.convert_file("iresnet100", ckpt, str(tmp_path / "x.msgpack"))

    with pytest.raises(ValueError, match=r"none was given.*convert\.arcface --arch=resnet18"):
        arcface.load_arcface_params("resnet18", "")
    with pytest.raises(FileNotFoundError, match=r"missing\.msgpack.*--arch=iresnet100"):
        arcface.load_arcface_params("iresnet100", str(tmp_path / "missing.msgpack"))
    small = tmp_path / "small.msgpack"
    from flax import serialization

    small.write_bytes(serialization.msgpack_serialize(iresnet_small[1]))
    with pytest.raises(ValueError, match=r"small\.msgpack: .*expected shape"):
        arcface.load_arcface_params("iresnet50", str(small))
    with pytest.raises(ValueError, match="unknown ArcFace arch"):
        arcface.ArcFaceEmbedder("resnet34", {})
    with pytest.raises(ValueError, match=r"expected uint8 RGB images"):
        arcface.preprocess("resnet18", np.zeros((1, 8, 8, 3), np.float32))


def test_iresnet50_full_depth_parity():
    torch.manual_seed(4)
    model = _randomize(TorchIResNet(arcface.IRESNET_LAYERS["iresnet50"]), 5)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    variables = convert_arcface.convert_arcface("iresnet50", sd)
    x = np.random.default_rng(6).uniform(-1, 1, (1, 112, 112, 3)).astype(np.float32)
    got = np.asarray(jax.jit(arcface.IResNet((3, 4, 14, 3)).apply)(variables, jnp.asarray(x)))
    _assert_close(got, _torch_embed(model, x))
