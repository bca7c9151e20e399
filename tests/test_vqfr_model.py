"""VQFR v1 networks and their checkpoint converter.

The parity tests run a PyTorch re-statement of the official modules (TencentARC/VQFR at commit
239c77a: ``vqfr/archs/vqganv1_arch.py``, ``vqfrv1_arch.py``, ``quantizer_arch.py``; same class
structure and parameter names) on random weights, convert its state dict and compare outputs.
torchvision's compiled ``deform_conv2d`` does not load here, so the reference DCNv2 is a small
pure-torch bilinear implementation with torchvision's conventions.
"""

from __future__ import annotations

import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from artfr_jax.convert import vqfr as conv
from artfr_jax.models.vqfr import VQFRv1, VQGANv1, resize_bilinear, vqfr_params_from_vqgan

# sha256 and size of the sorted "key (shape)" lines of the official state dicts at the paper
# configs (options/train/VQGAN/train_vqgan_v1_B16_800K.yml, options/test/VQFR/test_vqfr_v1.yml),
# taken by instantiating the official classes of commit 239c77a on the meta device.
OFFICIAL_TABLES = {
    "vqgan_v1": (275, "3924341d1cda57e617e76cfd1b92cc3b48b8c5dbaef772b2b2a380c4f1665c49"),
    "vqfr_v1": (459, "b5c68865713bd1e1ac32165a5fffa9c44727c7c020088d85732dd66b155b5b71"),
}

PAPER = dict(
    base_channels=128,
    proj_patch_size=32,
    resolution_scale_rates=[1, 2, 2, 2, 2, 2],
    channel_multipliers=[1, 1, 2, 2, 2, 4],
    encoder_num_blocks=2,
    decoder_num_blocks=3,
    num_code=1024,
    code_dim=256,
)
TINY = dict(
    base_channels=16,
    proj_patch_size=8,
    resolution_scale_rates=[1, 2, 2, 2],
    channel_multipliers=[1, 1, 2, 2],
    encoder_num_blocks=1,
    decoder_num_blocks=2,
    num_code=32,
    code_dim=8,
)
TINY_GROUPS = 4
TINY_COND = 8


def jax_kwargs(cfg: dict, groups: int) -> dict:
    return dict(
        base_channels=cfg["base_channels"],
        channel_multipliers=tuple(cfg["channel_multipliers"]),
        resolution_scale_rates=tuple(cfg["resolution_scale_rates"]),
        encoder_num_blocks=cfg["encoder_num_blocks"],
        decoder_num_blocks=cfg["decoder_num_blocks"],
        num_embeddings=cfg["num_code"],
        embedding_dim=cfg["code_dim"],
        norm_groups=groups,
    )


# ----------------------------------------------------------------------------------------------
# PyTorch re-statement of the official v1 modules (parameter names as in the release).


def gn(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class UpDownSample(nn.Module):
    def __init__(self, cin, cout, rate, direction):
        super().__init__()
        self.rate, self.direction = rate, direction
        if rate != 1:
            self.conv = nn.Conv2d(cin, cout, 3, 1, 1)

    def forward(self, x):
        if self.rate == 1:
            return x
        h, w = x.shape[-2:]
        if self.direction == "up":
            size = (int(self.rate * h), int(self.rate * w))
            return F.interpolate(self.conv(x), size=size, mode="bilinear", align_corners=False)
        size = (int(h / self.rate), int(w / self.rate))
        return self.conv(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = gn(cin, groups), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = gn(cout, groups), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.shortcut_conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.shortcut_conv(x) if hasattr(self, "shortcut_conv") else x) + h


def levels(cfg):
    n = int(math.log2(cfg["proj_patch_size"])) + 1
    return [f"Level_{2**s}" for s in range(n)]


class VQGANEncoder(nn.Module):
    def __init__(self, cfg, groups):
        super().__init__()
        names = levels(cfg)
        ch = {
            n: m * cfg["base_channels"]
            for n, m in zip(names, cfg["channel_multipliers"], strict=True)
        }
        rate = dict(zip(names, cfg["resolution_scale_rates"], strict=True))
        self.names = names
        self.conv_in = nn.Conv2d(3, ch[names[0]], 3, 1, 1)
        self.encoder_dict = nn.ModuleDict()
        self.pre_downsample_dict = nn.ModuleDict()
        for s, n in enumerate(names):
            cin = ch[names[max(s - 1, 0)]]
            self.encoder_dict[n] = nn.Sequential(
                *[ResnetBlock(ch[n], ch[n], groups) for _ in range(cfg["encoder_num_blocks"])]
            )
            self.pre_downsample_dict[n] = UpDownSample(cin, ch[n], rate[n], "down")
        top = names[-1]
        self.enc_convout_dict = nn.ModuleDict(
            {
                top: nn.Sequential(
                    gn(ch[top], groups), nn.SiLU(), nn.Conv2d(ch[top], ch[top], 3, 1, 1)
                )
            }
        )

    def forward(self, x):
        x = self.conv_in(x)
        for n in self.names:
            x = self.encoder_dict[n](self.pre_downsample_dict[n](x))
        return self.enc_convout_dict[self.names[-1]](x)


class VQGANDecoder(nn.Module):
    def __init__(self, cfg, groups):
        super().__init__()
        names = levels(cfg)
        ch = {
            n: m * cfg["base_channels"]
            for n, m in zip(names, cfg["channel_multipliers"], strict=True)
        }
        rate = dict(zip(names, cfg["resolution_scale_rates"][::-1], strict=True))
        self.names = names
        self.decoder_dict = nn.ModuleDict()
        self.pre_upsample_dict = nn.ModuleDict()
        for s in range(len(names) - 1, -1, -1):
            n = names[s]
            cin = ch[names[min(s + 1, len(names) - 1)]]
            self.decoder_dict[n] = nn.Sequential(
                *[ResnetBlock(ch[n], ch[n], groups) for _ in range(cfg["decoder_num_blocks"])]
            )
            self.pre_upsample_dict[n] = UpDownSample(cin, ch[n], rate[n], "up")
        c0 = ch[names[0]]
        self.conv_out = nn.Sequential(gn(c0, groups), nn.SiLU(), nn.Conv2d(c0, 3, 3, 1, 1))

    def forward(self, x):
        feats = {}
        for n in self.names[::-1]:
            x = self.decoder_dict[n](self.pre_upsample_dict[n](x))
            feats[n] = x
        return self.conv_out(x), feats


class L2VectorQuantizerKmeans(nn.Module):
    def __init__(self, num_code, in_dim, code_dim):
        super().__init__()
        self.code_dim, self.beta = code_dim, 0.25
        self.quant_conv = nn.Conv2d(in_dim, code_dim, 1)
        self.post_quant_conv = nn.Conv2d(code_dim, in_dim, 1)
        self.embedding = nn.Embedding(num_code, code_dim)

    def forward(self, z):
        z_conv = self.quant_conv(z)
        z = z_conv.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, self.code_dim)
        e = self.embedding.weight
        d = (flat**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * flat @ e.t()
        idx = torch.argmin(d, dim=1)
        zq = self.embedding(idx).view(z.shape)
        loss = ((zq.detach() - z) ** 2).mean() + self.beta * ((zq - z.detach()) ** 2).mean()
        zq = z + (zq - z).detach()
        zq_before = zq.permute(0, 3, 1, 2).contiguous()
        extra = {"z_conv": z_conv, "z_quant_before_conv": zq_before, "idx": idx}
        return self.post_quant_conv(zq_before), loss, extra


class GeneralizedQuantizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        top = levels(cfg)[-1]
        in_dim = cfg["base_channels"] * cfg["channel_multipliers"][-1]
        self.top = top
        self.quantize_dict = nn.ModuleDict(
            {top: L2VectorQuantizerKmeans(cfg["num_code"], in_dim, cfg["code_dim"])}
        )

    def forward(self, h):
        return self.quantize_dict[self.top](h)


class TorchVQGANv1(nn.Module):
    def __init__(self, cfg, groups=32):
        super().__init__()
        self.encoder = VQGANEncoder(cfg, groups)
        self.decoder = VQGANDecoder(cfg, groups)
        self.quantizer = GeneralizedQuantizer(cfg)

    def forward(self, x):
        hq, loss, extra = self.quantizer(self.encoder(x))
        return self.decoder(hq)[0], loss, extra


def ref_deform_conv2d(x, offset, mask, weight, bias, padding=1):
    """DCNv2 with torchvision's conventions: offset channel 2*(g*K+k) = dy, +1 = dx; a sample
    outside (-1, H) x (-1, W) is zero, and so is each bilinear corner outside the image."""
    b, c, h, w = x.shape
    cout, _, kh, kw = weight.shape
    k = kh * kw
    g = offset.shape[1] // (2 * k)
    ho, wo = offset.shape[-2:]
    off = offset.view(b, g, k, 2, ho, wo)
    ki = torch.arange(kh).repeat_interleave(kw).view(1, 1, k, 1, 1)
    kj = torch.arange(kw).repeat(kh).view(1, 1, k, 1, 1)
    py = torch.arange(ho).view(1, 1, 1, ho, 1) - padding + ki + off[:, :, :, 0]
    px = torch.arange(wo).view(1, 1, 1, 1, wo) - padding + kj + off[:, :, :, 1]
    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    y0, x0 = torch.floor(py), torch.floor(px)
    xg = x.reshape(b, g, c // g, h * w)
    cols = 0.0
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            ok = inside & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).long().view(b, g, 1, -1)
            vals = torch.gather(xg, 3, idx.expand(b, g, c // g, idx.shape[-1]))
            vals = vals.view(b, g, c // g, k, ho, wo)
            cols = cols + vals * (wy * wx * ok)[:, :, None]
    cols = (cols * mask.view(b, g, 1, k, ho, wo)).reshape(b, c, k, ho, wo)
    out = torch.einsum("bckhw,ock->bohw", cols, weight.reshape(cout, c, k))
    return out + bias.view(1, -1, 1, 1)


class DCNv2Pack(nn.Module):
    def __init__(self, cin, cout, deformable_groups):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.conv_offset = nn.Conv2d(cin, deformable_groups * 27, 3, 1, 1)

    def forward(self, x, feat):
        o1, o2, mask = torch.chunk(self.conv_offset(feat), 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        return ref_deform_conv2d(x, offset, torch.sigmoid(mask), self.weight, self.bias)


class TextureWarpingModule(nn.Module):
    def __init__(self, channel, cond_channels, rate, dg, prev_channel, groups):
        super().__init__()
        self.downsample = UpDownSample(cond_channels, cond_channels, rate, "down")
        self.offset_conv1 = nn.Sequential(
            nn.Conv2d(channel + cond_channels, channel, 1),
            gn(channel, groups),
            nn.SiLU(),
            nn.Conv2d(channel, channel, 7, padding=3, groups=channel),
            gn(channel, groups),
            nn.SiLU(),
            nn.Conv2d(channel, channel, 1),
        )
        self.offset_conv2 = nn.Sequential(
            nn.Conv2d(channel + prev_channel, channel, 3, 1, 1), gn(channel, groups), nn.SiLU()
        )
        self.dcn = DCNv2Pack(channel, channel, dg)

    def forward(self, x_main, prior, previous_offset=None):
        offset = self.offset_conv1(torch.cat([self.downsample(prior), x_main], dim=1))
        if previous_offset is not None:
            offset = torch.cat([offset, previous_offset], dim=1)
        offset = self.offset_conv2(offset)
        return self.dcn(x_main, offset), offset


class MainDecoder(nn.Module):
    def __init__(self, cfg, cond, dg, groups):
        super().__init__()
        names = levels(cfg)
        ch = {
            n: m * cfg["base_channels"]
            for n, m in zip(names, cfg["channel_multipliers"], strict=True)
        }
        rate = dict(zip(names, cfg["resolution_scale_rates"][::-1], strict=True))
        self.names = names
        self.decoder_dict = nn.ModuleDict()
        self.pre_upsample_dict = nn.ModuleDict()
        for s in range(len(names) - 2, -1, -1):
            n = names[s]
            self.decoder_dict[n] = ResnetBlock(2 * ch[n], ch[n], groups)
            self.pre_upsample_dict[n] = UpDownSample(ch[names[s + 1]], ch[n], rate[n], "up")
        self.align_func_dict = nn.ModuleDict()
        for s in range(len(names) - 1, -1, -1):
            prev = 0 if s == len(names) - 1 else ch[names[s + 1]]
            self.align_func_dict[names[s]] = TextureWarpingModule(
                ch[names[s]], cond, 2**s, dg, prev, groups
            )
        c0 = ch[names[0]]
        self.conv_out_1 = nn.Sequential(gn(c0, groups), nn.SiLU())
        self.conv_out = nn.Sequential(nn.Conv2d(c0 + 3, 3, 3, 1, 1))

    def forward(self, feats, prior, x_lq):
        top = self.names[-1]
        x, offset = self.align_func_dict[top](feats[top], prior)
        for n in self.names[-2::-1]:
            x = self.pre_upsample_dict[n](x)
            up = F.interpolate(offset, scale_factor=2, align_corners=False, mode="bilinear") * 2
            warp, offset = self.align_func_dict[n](feats[n], prior, previous_offset=up)
            x = self.decoder_dict[n](torch.cat([x, warp], dim=1))
        return self.conv_out(torch.cat([self.conv_out_1(x), x_lq], dim=1))


class InpFeatConv(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, padding=1)


class TorchVQFRv1(nn.Module):
    def __init__(self, cfg, groups=32, cond=32, dg=4):
        super().__init__()
        self.inpfeat_extraction = InpFeatConv(3, cond)
        self.encoder = VQGANEncoder(cfg, groups)
        self.decoder = VQGANDecoder(cfg, groups)
        self.main_decoder = MainDecoder(cfg, cond, dg, groups)
        self.quantizer = GeneralizedQuantizer(cfg)

    def forward(self, x_lq):
        inpfeat = self.inpfeat_extraction.conv(x_lq)
        hq, _, extra = self.quantizer(self.encoder(x_lq))
        dec, feats = self.decoder(hq)
        return self.main_decoder(feats, inpfeat, x_lq), dec, extra


# ----------------------------------------------------------------------------------------------


def randomize(model: nn.Module, seed: int) -> None:
    """Random weights at scales that keep activations O(1) (and offsets around a pixel)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 4:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("embedding.weight"):
                p.copy_(noise)
            elif p.ndim == 1 and name.endswith("weight"):  # GroupNorm scale
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def image(seed: int, size: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def test_ref_deform_conv_is_a_conv_at_zero_offset():
    """Sanity of the test's reference DCN: zero offsets and unit masks give an ordinary conv, and
    an integer offset reads the shifted pixel (zero past the border)."""
    g = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(2, 8, 6, 5, generator=g),
        torch.randn(4, 8, 3, 3, generator=g),
        torch.randn(4),
    )
    zero, ones = torch.zeros(2, 2 * 2 * 9, 6, 5), torch.ones(2, 2 * 9, 6, 5)
    torch.testing.assert_close(ref_deform_conv2d(x, zero, ones, w, b), F.conv2d(x, w, b, padding=1))
    shift = zero.clone()
    shift[:, 1::2] = 1.0  # dx = +1 for every tap and group
    # y[.., c] reads x[.., c + j] for taps j = 0..2 (zero past the right border).
    want = F.conv2d(F.pad(x, (0, 2, 1, 1)), w, b)
    torch.testing.assert_close(ref_deform_conv2d(x, shift, ones, w, b), want)


def test_resize_bilinear_matches_torch():
    x = np.random.default_rng(0).normal(size=(2, 64, 48, 3)).astype(np.float32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    for size in ((2, 3), (32, 24), (128, 96), (64, 48)):
        want = to_nhwc(F.interpolate(t, size=size, mode="bilinear", align_corners=False))
        np.testing.assert_allclose(resize_bilinear(jnp.asarray(x), size), want, atol=1e-5)


def random_params(arch: str, seed: int):
    """(flax model, params converted from a randomised torch reference) at the tiny config.

    Converting is far cheaper than ``model.init`` here (whose cost is XLA compilation on CPU)."""
    if arch == "vqgan_v1":
        ref, model = TorchVQGANv1(TINY, TINY_GROUPS), VQGANv1(**jax_kwargs(TINY, TINY_GROUPS))
    else:
        ref = TorchVQFRv1(TINY, TINY_GROUPS, cond=TINY_COND)
        model = VQFRv1(cond_channels=TINY_COND, **jax_kwargs(TINY, TINY_GROUPS))
    randomize(ref, seed)
    return model, conv.convert_state_dict(ref.state_dict(), model)


def shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def test_vqgan_v1_shapes_and_warmup():
    model, params = random_params("vqgan_v1", 0)
    x = jnp.asarray(image(0, 32))
    # init traces and builds exactly the converted tree (the official layout)
    init = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert shapes(init) == shapes(params)
    assert init["quantizer"]["embedding"].shape == (32, 8)

    @jax.jit
    def run(params, x, skip):
        v = {"params": params}
        recon, aux = model.apply(v, x)
        recon_w, aux_w = model.apply(v, x, skip_quantization=skip)
        dec = model.apply(v, aux["indices"], method=VQGANv1.decode_indices)
        return recon, aux, recon_w, aux_w, dec

    recon, aux, recon_w, aux_w, dec = run(params, x, jnp.asarray(True))
    assert recon.shape == (2, 32, 32, 3)
    assert aux["z"].shape == aux["zq"].shape == (2, 4, 4, 8)
    assert aux["features"].shape == (32, 8) and aux["indices"].shape == (2, 4, 4)
    assert aux["indices"].dtype == jnp.int32
    np.testing.assert_array_equal(aux["features"], np.asarray(aux["z"]).reshape(32, 8))
    assert float(aux["vq_loss"]) > 0
    # both terms have the same value; only their gradients differ
    np.testing.assert_allclose(aux["vq_loss"], 1.25 * aux["commit_loss"], rtol=1e-6)
    # the release's warm-up (here a traced flag): no quantisation and zero loss
    np.testing.assert_array_equal(aux_w["zq"], aux_w["z"])
    assert float(aux_w["vq_loss"]) == 0.0
    assert not np.allclose(recon_w, recon)
    # decoding the indices reproduces the forward pass
    np.testing.assert_allclose(dec, recon, atol=1e-5)


def test_vqfr_v1_shapes_gradients_and_stage1_start():
    model, params = random_params("vqfr_v1", 1)
    x = jnp.asarray(image(1, 32))
    init = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert shapes(init) == shapes(params)
    restored = jax.eval_shape(
        lambda p: model.apply({"params": p}, x, method=VQFRv1.restore), params
    )
    assert [r.shape for r in restored] == [(2, 32, 32, 3)] * 2

    def loss(params):
        main, texture, aux = model.apply({"params": params}, x)
        return jnp.mean(jnp.abs(main)) + jnp.mean(jnp.abs(texture)) + aux["vq_loss"], (
            main,
            texture,
            aux,
        )

    (_, (main, texture, aux)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert main.shape == texture.shape == (2, 32, 32, 3)
    assert aux["z"].shape == aux["zq"].shape == (2, 4, 4, 8)
    assert aux["indices"].shape == (2, 4, 4)
    assert not np.allclose(main, texture)
    gnorm = {
        k: float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(v)))) for k, v in grads.items()
    }
    assert all(np.isfinite(v) for v in gnorm.values())
    assert min(gnorm[k] for k in ("main_decoder", "encoder", "decoder", "inpfeat_conv")) > 0
    dcn_grad = grads["main_decoder"]["Level_1_twm"]["dcn"]["conv_offset"]["kernel"]
    assert float(jnp.max(jnp.abs(dcn_grad))) > 0  # gradients reach the offsets
    assert float(jnp.max(jnp.abs(grads["quantizer"]["embedding"]))) == 0.0  # frozen codebook

    # stage II starts from the stage-I encoder, quantiser and decoder
    _, gan_params = random_params("vqgan_v1", 7)
    merged = vqfr_params_from_vqgan(params, gan_params)
    for name in ("encoder", "quantizer", "decoder"):
        assert merged[name] is gan_params[name]
    assert merged["main_decoder"] is params["main_decoder"]
    bad = {**gan_params, "quantizer": {**gan_params["quantizer"], "embedding": np.zeros((4, 8))}}
    with pytest.raises(ValueError, match="'quantizer' shapes differ"):
        vqfr_params_from_vqgan(params, bad)


def test_remat_computes_the_same_function_and_gradients():
    model, params = random_params("vqfr_v1", 2)
    remat = model.clone(remat=True)
    x = jnp.asarray(image(2, 32))
    assert shapes(jax.eval_shape(remat.init, jax.random.key(0), x)["params"]) == shapes(params)

    def loss_fn(m):
        def loss(params):
            main, texture, aux = m.apply({"params": params}, x)
            return jnp.mean(jnp.abs(main)) + jnp.mean(texture**2) + jnp.mean(aux["z"] ** 2)

        return loss

    # per level: encoder + texture-decoder blocks and a warping module; a fuse block per level
    # but the last
    n = len(TINY["channel_multipliers"])
    blocks = n * (TINY["encoder_num_blocks"] + TINY["decoder_num_blocks"] + 1) + n - 1
    assert str(jax.make_jaxpr(loss_fn(remat))(params)).count("remat2[") == blocks
    assert "remat2[" not in str(jax.make_jaxpr(loss_fn(model))(params))
    grad_fns = [jax.jit(jax.value_and_grad(loss_fn(m))) for m in (model, remat)]
    (v0, g0), (v1, g1) = (f(params) for f in grad_fns)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        # Recomputation may round differently; absolute slack relative to the leaf's scale.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))


def test_bad_config_and_input_errors():
    with pytest.raises(ValueError, match="resolution_scale_rates must be"):
        VQFRv1(resolution_scale_rates=(2, 2, 2, 2, 2, 2)).init(
            jax.random.key(0), jnp.zeros((1, 64, 64, 3))
        )
    model = VQGANv1(**jax_kwargs(TINY, TINY_GROUPS))
    with pytest.raises(ValueError, match="multiples of the downsampling factor 8"):
        model.init(jax.random.key(0), jnp.zeros((1, 20, 20, 3)))
    with pytest.raises(ValueError, match="norm_groups=32 must divide"):
        VQGANv1(**{**jax_kwargs(TINY, TINY_GROUPS), "norm_groups": 32}).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3))
        )


def test_vqgan_v1_parity_with_torch_reference():
    ref = TorchVQGANv1(TINY, groups=TINY_GROUPS).eval()
    randomize(ref, 0)
    x = image(2, 32)
    with torch.no_grad():
        want, want_loss, extra = ref(torch.from_numpy(x).permute(0, 3, 1, 2))
    model = VQGANv1(**jax_kwargs(TINY, TINY_GROUPS))
    params = conv.convert_vqgan_v1({"params": ref.state_dict()}, model)
    recon, aux = jax.jit(model.apply)({"params": params}, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(aux["indices"]).reshape(-1), extra["idx"].numpy())
    assert len(np.unique(aux["indices"])) > 4  # the lookup is exercised, not one code
    assert rel_err(aux["z"], to_nhwc(extra["z_conv"])) < 1e-4
    assert rel_err(aux["zq"], to_nhwc(extra["z_quant_before_conv"])) < 1e-4
    assert rel_err(recon, to_nhwc(want)) < 1e-4
    assert abs(float(aux["vq_loss"]) - float(want_loss)) < 1e-4 * float(want_loss)


def test_vqfr_v1_parity_with_torch_reference():
    ref = TorchVQFRv1(TINY, groups=TINY_GROUPS, cond=TINY_COND, dg=4).eval()
    randomize(ref, 1)
    x = image(3, 32)
    offsets = []
    for twm in ref.main_decoder.align_func_dict.values():
        twm.dcn.conv_offset.register_forward_hook(
            lambda mod, inp, out: offsets.append(float(out[:, : 2 * 4 * 9].abs().mean()))
        )
    with torch.no_grad():
        want_main, want_tex, extra = ref(torch.from_numpy(x).permute(0, 3, 1, 2))
    # Offsets of about a pixel, so bilinear sampling and the borders are exercised.
    assert len(offsets) == 4 and min(offsets) > 0.3, offsets
    model = VQFRv1(cond_channels=TINY_COND, deformable_groups=4, **jax_kwargs(TINY, TINY_GROUPS))
    params = conv.convert_vqfr_v1({"params_ema": ref.state_dict()}, model)
    main, texture, aux = jax.jit(model.apply)({"params": params}, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(aux["indices"]).reshape(-1), extra["idx"].numpy())
    assert rel_err(aux["z"], to_nhwc(extra["z_conv"])) < 1e-4
    assert rel_err(texture, to_nhwc(want_tex)) < 1e-4
    assert rel_err(main, to_nhwc(want_main)) < 1e-4


def _table_digest(table: dict) -> tuple[int, str]:
    lines = "\n".join(f"{k} {tuple(s)}" for k, s in sorted(table.items()))
    return len(table), hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize(
    "arch, jax_model, torch_model",
    [
        ("vqgan_v1", VQGANv1, lambda: TorchVQGANv1(PAPER)),
        ("vqfr_v1", VQFRv1, lambda: TorchVQFRv1(PAPER)),
    ],
)
def test_converter_keys_equal_official_names_at_paper_config(arch, jax_model, torch_model):
    with torch.device("meta"):
        ref = torch_model()
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: shape for k, (_, shape) in conv.key_table(jax_model()).items()}
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:5]
    assert got == want
    # ... and the same table as the official classes of commit 239c77a.
    assert _table_digest(got) == OFFICIAL_TABLES[arch]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    ref = TorchVQGANv1(TINY, groups=TINY_GROUPS)
    randomize(ref, 3)
    sd = ref.state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "tiny_vqgan.pth"
    torch.save({"params": sd, "params_ema": {k: v + 1 for k, v in sd.items()}}, path)
    return path, sd


def test_convert_file_cli_and_loader_roundtrip(tiny_checkpoint, tmp_path):
    path, sd = tiny_checkpoint
    model = VQGANv1(**jax_kwargs(TINY, TINY_GROUPS))
    out = tmp_path / "tiny.msgpack"
    params = conv.convert_file("vqgan_v1", str(path), str(out), model=model)
    loaded = conv.load_vqgan_v1_params(str(out), model)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    key = "quantizer.quantize_dict.Level_8.embedding.weight"
    np.testing.assert_array_equal(loaded["quantizer"]["embedding"], sd[key].numpy())
    ema = conv.convert_state_dict(torch.load(path, weights_only=True), model, key="params_ema")
    np.testing.assert_allclose(ema["quantizer"]["embedding"], sd[key].numpy() + 1)
    # The paper-config loader rejects the tiny file, naming it and the converter command.
    with pytest.raises(ValueError, match=rf"{out}.*python -m artfr_jax\.convert\.vqfr"):
        conv.load_vqgan_v1_params(str(out))
    with pytest.raises(FileNotFoundError, match="--arch=vqfr_v1"):
        conv.load_vqfr_v1_params(str(tmp_path / "absent.msgpack"))


def test_converter_errors_name_the_file(tiny_checkpoint, tmp_path, capsys):
    path, sd = tiny_checkpoint
    model = VQGANv1(**jax_kwargs(TINY, TINY_GROUPS))
    src = str(path)
    key = "encoder.encoder_dict.Level_2.0.conv1.weight"

    def check(state, pattern, **kw):
        with pytest.raises(conv.ConversionError, match=pattern) as info:
            conv.convert_state_dict(state, model, source=src, **kw)
        assert src in str(info.value) and "\n" not in str(info.value)

    check({k: v for k, v in sd.items() if k != key}, rf"missing 1 VQGANv1 key\(s\), first '{key}'")
    check({**sd, "encoder.extra.weight": sd[key]}, "unexpected key.*'encoder.extra.weight'")
    check(
        {**sd, key: sd[key][:, :4]}, rf"{key} has shape \(16, 4, 3, 3\), expected \(16, 16, 3, 3\)"
    )
    check({"params": sd}, "no top-level key 'ema'", key="ema")
    # The release's quantiser buffers are skipped, not reported.
    extra = {"quantizer.quantize_dict.Level_8.reestimation_reservoir.buffer": torch.zeros(4, 8)}
    conv.convert_state_dict({**sd, **extra}, model, source=src)
    # The CLI (paper config) turns a mismatch into one line on stderr and exit status 1.
    rc = conv.main(["--arch=vqfr_v1", f"--input={src}", f"--output={tmp_path / 'x.msgpack'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith(f"error: {src}: missing") and "\n" not in err
    rc = conv.main(["--arch=vqgan_v1", f"--input={tmp_path / 'no.pth'}", "--output=x.msgpack"])
    assert rc == 1 and "no.pth not found" in capsys.readouterr().err


def test_restore_command_with_converted_official_weights(tmp_path, monkeypatch, capsys):
    """Release-format checkpoint -> converter CLI -> ``restore --weights``: the written faces are
    the reference network's main branch (texture branch with ``--texture``)."""
    from absl import flags
    from PIL import Image

    from artfr_jax import inference, restore

    ref = TorchVQFRv1(TINY, groups=TINY_GROUPS, cond=TINY_COND, dg=4).eval()
    randomize(ref, 4)
    pth, out = tmp_path / "VQFR_v1.pth", tmp_path / "vqfr_v1.msgpack"
    torch.save({"params_ema": ref.state_dict()}, pth)
    model = VQFRv1(cond_channels=TINY_COND, deformable_groups=4, **jax_kwargs(TINY, TINY_GROUPS))
    conv.convert_file("vqfr_v1", str(pth), str(out), model=model, key="params_ema")
    faces = tmp_path / "faces"
    faces.mkdir()
    x = (image(5, 32) + 1) * 127.5
    for i, face in enumerate(np.clip(np.round(x), 0, 255).astype(np.uint8)):
        Image.fromarray(face).save(faces / f"f{i}.png")
    lq = np.stack([np.asarray(Image.open(faces / f"f{i}.png")) for i in range(2)])
    with torch.no_grad():
        want_main, want_tex, _ = ref(torch.from_numpy(lq / 127.5 - 1.0).float().permute(0, 3, 1, 2))

    def load(workdir, *, texture=False, weights=None, **kw):
        assert workdir is None and weights == str(out)
        return inference.load_converted_vqfr(weights, texture=texture, model=model, image_size=32)

    monkeypatch.setattr(restore, "_load_restorer", load)
    for extra, want in (([], want_main), (["--texture"], want_tex)):
        fv = flags.FlagValues()
        restore.define_flags(fv)
        dst = tmp_path / f"out{len(extra)}"
        fv(
            [
                "restore",
                "--mode=aligned",
                f"--weights={out}",
                f"--input={faces}",
                f"--output={dst}",
                *extra,
            ]
        )
        assert restore.main(["restore"], fv) == 0
        want_u8 = np.clip(np.round((to_nhwc(want) + 1) * 127.5), 0, 255)
        for i in range(2):
            got = np.asarray(Image.open(dst / f"f{i}.png")).astype(np.float64)
            assert np.abs(got - want_u8[i]).max() <= 1.0
    # A file that is not VQFR v1 at the paper configuration: one line naming it and the converter.
    fv = flags.FlagValues()
    restore.define_flags(fv)
    fv(
        [
            "restore",
            "--mode=aligned",
            f"--weights={out}",
            f"--input={faces}",
            f"--output={tmp_path / 'o'}",
        ]
    )
    monkeypatch.setattr(
        restore, "_load_restorer", lambda w, **kw: inference.load_converted_vqfr(kw["weights"])
    )
    assert restore.main(["restore"], fv) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"error: --weights '{out}': ") and "python -m artfr_jax.convert.vqfr" in err
    )
    assert "\n" not in err
    with pytest.raises(flags.IllegalFlagValueError):
        fv(["restore", "--mode=aligned", "--workdir=w", f"--weights={out}"])
