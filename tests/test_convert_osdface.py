"""``convert/osdface.py``: the official OSDFace release -> one folder of flax params.

The official VQ autoencoder (``lq_embed/vqvae.py``; RestoreFormer/taming layout: ``encoder.down.i.
block.j``, ``attn.j`` with ``norm1``/``norm2``/``q``/``k``/``v``/``proj_out``, ``mid.block_1``,
``decoder.up.i``, ``quantize.embedding``, ``quant_conv``, ``post_quant_conv``) and the prompt
projection (``TwoLayerConv1x1``) are rebuilt here in torch with the same module and parameter names
at a tiny size, filled with random values and saved as the release nests them (``associate_2.ckpt``
= ``{'state_dict': {'vqvae.*', 'vqvae_LQ.*', ...}}``, ``embedding_change_weights.pth`` = a bare
state dict). The converted modules must reproduce them; the UNet LoRA is a PEFT adapter saved by
diffusers on a tiny UNet (``tests/test_lora.py``'s config and targets).
"""

import json
import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util
from torch import nn

from artfr_jax.convert import osdface as conv
from artfr_jax.models import lora
from artfr_jax.models.kernels import Kernels
from artfr_jax.models.osdface import PromptProjection, nearest_codes, visual_prompt
from artfr_jax.models.unet import UNet
from artfr_jax.models.vqgan import VQGAN
from tests.test_lora import TARGETS, UNET_CONFIG
from tests.test_unet_parity import VAE_CONFIG, _nchw, _nhwc, _randomise, _rel

# Tiny official config: 32 px, widths (32, 32, 64), attention at 8 px (the last level) and in the
# bottleneck, one block per encoder level, z 64, codebook 64 x 32.
VQ = dict(
    ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=32, z_channels=64
)
N_EMBED, EMBED_DIM = 64, 32
SIZE = 32
PROMPT_TOKENS = 77


# ------------------------------------------------- torch modules named as the official ones


def _norm(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)
        self.cin, self.cout = cin, cout

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if self.cin != self.cout else x) + h


class MultiHeadAttnBlock(nn.Module):
    """One head; ``norm2`` exists but only normalises a cross-attention input (never used)."""

    def __init__(self, c):
        super().__init__()
        self.norm1, self.norm2 = _norm(c), _norm(c)
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm1(x)
        q = self.q(y).reshape(b, c, h * w).transpose(1, 2)
        k = self.k(y).reshape(b, c, h * w)
        v = self.v(y).reshape(b, c, h * w)
        a = torch.softmax(q @ k * c**-0.5, dim=-1)  # [b, query, key]
        o = (v @ a.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(o)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = (
        ResnetBlock(c, c),
        MultiHeadAttnBlock(c),
        ResnetBlock(c, c),
    )
    return mid


def _run_mid(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class MultiHeadEncoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, cin = resolution, ch
        for i, m in enumerate(ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(cin, ch * m))
                cin = ch * m
                if res in attn_resolutions:
                    level.attn.append(MultiHeadAttnBlock(cin))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(cin)
                res //= 2
            self.down.append(level)
        self.mid = _mid(cin)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return {"out": self.conv_out(F.silu(self.norm_out(h)))}


class MultiHeadDecoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels):
        super().__init__()
        cin = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = _mid(cin)
        self.up = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, ch * ch_mult[i]))
                cin = ch * ch_mult[i]
                if res in attn_resolutions:
                    level.attn.append(MultiHeadAttnBlock(cin))
            if i != 0:
                level.upsample = Upsample(cin)
                res *= 2
            self.up.insert(0, level)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = _run_mid(self.mid, self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_e, e_dim):
        super().__init__()
        self.embedding = nn.Embedding(n_e, e_dim)


class VQVAEGAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = MultiHeadEncoder(**VQ)
        self.decoder = MultiHeadDecoder(**VQ)
        self.quantize = VectorQuantizer(N_EMBED, EMBED_DIM)
        self.quant_conv = nn.Conv2d(VQ["z_channels"], EMBED_DIM, 1)
        self.post_quant_conv = nn.Conv2d(EMBED_DIM, VQ["z_channels"], 1)


class Association(nn.Module):
    """The stage-I model whose checkpoint is ``associate_2.ckpt``: HQ ``vqvae``, LQ ``vqvae_LQ``."""

    def __init__(self):
        super().__init__()
        self.vqvae, self.vqvae_LQ = VQVAEGAN(), VQVAEGAN()
        self.logit_scale = nn.Parameter(torch.ones([]))


class TwoLayerConv1x1(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cin // 2, kernel_size=1)
        self.conv2 = nn.Conv1d(cin // 2, cout, kernel_size=1)

    def forward(self, x):  # [B, T, C]
        x = F.silu(self.conv1(x.permute(0, 2, 1)))
        return F.silu(self.conv2(x)).permute(0, 2, 1)


class Custom:
    """A class ``torch.load(weights_only=True)`` refuses to unpickle."""


def official_prompt(h, codebook, n_min):
    """The official ``VectorQuantizer.inference``, per example: positions sorted by their nearest
    code's distance, the first ``n_min`` distinct codes, zero rows when fewer."""
    b, c = h.shape[:2]
    z = h.permute(0, 2, 3, 1).reshape(b, -1, c)
    d = (z**2).sum(-1, keepdim=True) + (codebook**2).sum(1) - 2 * z @ codebook.t()
    out = torch.zeros(b, n_min, c)
    for i in range(b):
        mins, idx = d[i].min(dim=1)
        chosen = []
        for code in idx[torch.sort(mins).indices].tolist():
            if code not in chosen:
                chosen.append(code)
            if len(chosen) == n_min:
                break
        out[i, : len(chosen)] = codebook[chosen]
    return out, d.argmin(-1)


# ---------------------------------------------------------------------------------- fixtures


def _lq(seed=0, batch=2):
    x = np.random.default_rng(seed).uniform(-1, 1, (batch, SIZE, SIZE, 3)).astype(np.float32)
    return conv.vre_input(x)  # the official double normalisation: [-3, 1]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Torch models and the release files: a tiny SD folder (unet/, vae/, scheduler/), a PEFT
    LoRA saved by diffusers, the projection and the association checkpoint; plus the converted
    folder."""
    import peft
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("osdface")
    torch.manual_seed(0)
    assoc = _randomise(Association(), 1)
    ckpt = root / "pretrained" / "associate_2.ckpt"
    ckpt.parent.mkdir()
    # Lightning-style, with numpy values in its bookkeeping (allowed to weights_only loading)
    bookkeeping = {"epoch": 3, "global_step": 7, "callbacks": {"score": np.float64(0.5)}}
    torch.save({"state_dict": assoc.state_dict(), **bookkeeping}, ckpt)

    proj = _randomise(TwoLayerConv1x1(EMBED_DIM, UNET_CONFIG["cross_attention_dim"]), 2)
    proj_file = root / "pretrained" / "embedding_change_weights.pth"
    torch.save(proj.state_dict(), proj_file)

    sd = root / "sd21"
    unet = _randomise(UNet2DConditionModel(**UNET_CONFIG), 3)
    unet.save_pretrained(sd / "unet")
    _randomise(AutoencoderKL(**VAE_CONFIG), 4).save_pretrained(sd / "vae")
    (sd / "scheduler").mkdir()
    scheduler = {
        "_class_name": "PNDMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
    }
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))

    unet.add_adapter(
        peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)
    )
    StableDiffusionPipeline.save_lora_weights(
        root / "pretrained",
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([399, 399])
    ctx = rng.standard_normal((2, PROMPT_TOKENS, UNET_CONFIG["cross_attention_dim"]))
    ctx = ctx.astype(np.float32)
    with torch.no_grad():
        unet_out = _nhwc(unet(_nchw(x), torch.as_tensor(t), torch.from_numpy(ctx)).sample)

    files = {
        "sd_folder": str(sd),
        "lora": str(root / "pretrained" / "pytorch_lora_weights.safetensors"),
        "projection": str(proj_file),
        "vre": str(ckpt),
    }
    out = root / "release"
    meta = conv.convert_release(**files, output=str(out))
    return {
        "root": root,
        "files": files,
        "assoc": assoc,
        "proj": proj,
        "out": str(out),
        "meta": meta,
        "unet_case": (x, t, ctx, unet_out),
        "state_dict": assoc.state_dict(),
        "torch_unet": unet,
        "torch_vae": AutoencoderKL.from_pretrained(sd / "vae"),
    }


# ------------------------------------------------------------------------------------ tests


def test_vre_kwargs_from_keys(release):
    kw = conv.vre_kwargs_from_state_dict(release["state_dict"])
    assert kw["block_out_channels"] == (32, 32, 64)
    assert (kw["layers_per_block"], kw["decoder_layers_per_block"]) == (1, 2)
    assert kw["attention_levels"] == (2,) and kw["decoder_attention_levels"] is None
    assert kw["mid_attention"] and (kw["latent_channels"], kw["embedding_dim"]) == (64, EMBED_DIM)
    assert kw["num_embeddings"] == N_EMBED and (kw["norm_num_groups"], kw["norm_eps"]) == (32, 1e-6)
    # the HQ branch (prefix 'vqvae.') reads the same way: the prefix is the only difference
    assert conv.vre_kwargs_from_state_dict(release["state_dict"], "vqvae.") == kw
    # without a decoder (the official loader drops it) the restoration part still converts
    no_dec = {
        k: v
        for k, v in release["state_dict"].items()
        if not k.startswith(("vqvae_LQ.decoder.", "vqvae_LQ.post_quant_conv."))
    }
    params = conv.vre_params_from_state_dict(no_dec)
    assert set(params) == {"encoder", "quant_conv", "quantizer"}


def test_vre_matches_official_lq_branch(release):
    """Encoder + quant_conv features, nearest codes, the 77-token visual prompt and the decoder
    of the converted LQ branch equal the torch module's (the paper's VRE input range [-3, 1])."""
    sd = release["state_dict"]
    kw = conv.vre_kwargs_from_state_dict(sd)
    params = conv.vre_params_from_state_dict(sd)
    assert {"encoder", "quant_conv", "quantizer", "decoder", "post_quant_conv"} == set(params)
    model = VQGAN(**kw, kernels=Kernels("xla"))
    lq = _lq()
    assert lq.min() < -2 and lq.max() <= 1
    tq = release["assoc"].vqvae_LQ
    with torch.no_grad():
        h = tq.quant_conv(tq.encoder(_nchw(lq))["out"])
        ref_prompt, ref_codes = official_prompt(h, tq.quantize.embedding.weight, PROMPT_TOKENS)
        zq = tq.quantize.embedding.weight[ref_codes].reshape(2, 8, 8, EMBED_DIM)
        ref_recon = _nhwc(tq.decoder(tq.post_quant_conv(zq.permute(0, 3, 1, 2))))

    with jax.default_matmul_precision("highest"):
        z = model.apply({"params": params}, lq, method=VQGAN.encode)
        codebook = params["quantizer"]["codebook"]
        codes, dist = nearest_codes(z, codebook)
        prompt, mask = visual_prompt(codes, dist, codebook, PROMPT_TOKENS)
        recon = model.apply(
            {"params": params},
            model.apply({"params": params}, codes, method=VQGAN.lookup),
            method=VQGAN.decode,
        )
    assert _rel(z, _nhwc(h)) < 1e-4
    np.testing.assert_array_equal(np.asarray(codes).reshape(2, -1), ref_codes.numpy())
    assert 1 < int(mask[0].sum()) < PROMPT_TOKENS  # fewer distinct codes than tokens: zero rows
    np.testing.assert_allclose(np.asarray(prompt), ref_prompt.numpy(), atol=1e-6)
    assert _rel(recon, ref_recon) < 1e-4


def test_projection_matches_conv1d_silu(release):
    sd = release["proj"].state_dict()
    kw = conv.projection_kwargs_from_state_dict(sd)
    assert kw == {"hidden_features": EMBED_DIM // 2, "features": UNET_CONFIG["cross_attention_dim"]}
    params = conv.projection_params_from_state_dict(sd)
    np.testing.assert_array_equal(params["conv1"]["kernel"], sd["conv1.weight"][:, :, 0].T.numpy())
    p = np.random.default_rng(1).standard_normal((2, PROMPT_TOKENS, EMBED_DIM)).astype(np.float32)
    with torch.no_grad():
        ref = release["proj"](torch.from_numpy(p)).numpy()
    with jax.default_matmul_precision("highest"):
        out = PromptProjection(**kw).apply({"params": params}, p)
    assert _rel(out, ref) < 1e-5


def test_release_round_trip_and_lora(release):
    """convert_release -> load_release: settings, shapes, the official schedule and the LoRA
    UNet equal to diffusers + PEFT."""
    from diffusers import DDIMScheduler

    out, meta = release["out"], release["meta"]
    assert sorted(os.listdir(out)) == sorted([conv.META_FILE, *conv.FILES.values()])
    with open(os.path.join(out, conv.META_FILE)) as f:
        assert json.load(f) == json.loads(json.dumps(meta))
    assert meta["lora"]["rank"] == 4 and meta["lora"]["alpha"] == 4.0
    assert (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        in (meta["lora"]["target_modules"])
    )
    assert meta["vre_decoder"] is True

    rel = conv.load_release(out, kernels="xla")
    assert isinstance(rel["unet"], UNet) and isinstance(rel["vre"], VQGAN)
    assert rel["timestep"] == 399 and rel["prompt_tokens"] == 77 and rel["sample_posterior"]
    assert rel["vre_input"] == "double_normalized" and rel["vre_resolution"] == 512
    assert rel["lora_scale"] == 1.0
    assert rel["projection"].features == UNET_CONFIG["cross_attention_dim"]
    ddim = DDIMScheduler.from_pretrained(release["files"]["sd_folder"], subfolder="scheduler")
    np.testing.assert_allclose(rel["schedule"].alphas_cumprod, ddim.alphas_cumprod, rtol=1e-6)

    flat = traverse_util.flatten_dict(rel["vre_params"])
    direct = traverse_util.flatten_dict(conv.vre_params_from_state_dict(release["state_dict"]))
    assert flat.keys() == direct.keys()
    assert all(np.array_equal(flat[k], direct[k]) for k in flat)

    x, t, ctx, ref = release["unet_case"]
    with jax.default_matmul_precision("highest"):
        got = jax.jit(
            lambda p, tr: lora.apply(
                rel["unet"], {"params": p, "lora": tr}, x, t, ctx, scale=rel["lora_scale"]
            )
        )(rel["unet_params"], rel["lora"])
    assert _rel(got, ref) < 1e-4

    bf16 = conv.load_release(out, param_dtype="bfloat16", dtype="bfloat16", kernels="xla")
    assert bf16["vre_params"]["quantizer"]["codebook"].dtype == jnp.bfloat16


def test_cli_without_lora(release, tmp_path, capsys):
    files = dict(release["files"])
    argv = [
        f"--sd={files['sd_folder']}",
        f"--projection={files['projection']}",
        f"--vre={files['vre']}",
        f"--output={tmp_path / 'r'}",
    ]
    assert conv.main(argv) == 0
    assert "no LoRA" in capsys.readouterr().out
    rel = conv.load_release(str(tmp_path / "r"), kernels="xla")
    assert rel["lora"] is None and not os.path.exists(tmp_path / "r" / "lora.msgpack")


def _one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, msg


def test_bad_inputs(release, tmp_path, capsys):
    files = release["files"]
    sd = release["state_dict"]

    def run(output=None, **changes):
        return conv.convert_release(**{**files, **changes}, output=str(output or tmp_path / "o"))

    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError) as e:
        run(vre=str(missing))
    _one_line(e, missing, "associate_2.ckpt")

    only_hq = tmp_path / "hq.ckpt"
    torch.save({"state_dict": {k: v for k, v in sd.items() if k.startswith("vqvae.")}}, only_hq)
    with pytest.raises(conv.ConversionError) as e:
        run(vre=str(only_hq))
    _one_line(e, only_hq, "vqvae_LQ.")

    key = "vqvae_LQ.encoder.down.1.block.0.conv2.weight"
    holed = tmp_path / "holed.ckpt"
    torch.save({"state_dict": {k: v for k, v in sd.items() if k != key}}, holed)
    with pytest.raises(conv.ConversionError) as e:
        run(vre=str(holed))
    _one_line(e, holed, key)

    odd = tmp_path / "odd.ckpt"
    extra = {**sd, "vqvae_LQ.encoder.down.0.block.0.temb_proj.weight": torch.zeros(32, 8)}
    torch.save({"state_dict": extra}, odd)
    with pytest.raises(conv.ConversionError) as e:
        run(vre=str(odd))
    _one_line(e, odd, "temb_proj")

    pickled = tmp_path / "pickled.ckpt"
    with open(pickled, "wb") as f:
        torch.save({"state_dict": {}, "obj": Custom()}, f, pickle_module=pickle)
    with pytest.raises(conv.ConversionError) as e:
        run(vre=str(pickled))
    _one_line(e, pickled, "weights_only")

    bad_proj = tmp_path / "proj.pth"
    torch.save({"weight": torch.zeros(3, 3, 1)}, bad_proj)
    with pytest.raises(conv.ConversionError) as e:
        run(projection=str(bad_proj))
    _one_line(e, bad_proj, "conv1.weight")

    narrow = tmp_path / "narrow.pth"
    torch.save(TwoLayerConv1x1(EMBED_DIM, 16).state_dict(), narrow)
    with pytest.raises(conv.ConversionError) as e:
        run(projection=str(narrow))
    _one_line(e, narrow, "cross_attention_dim")

    with pytest.raises(conv.ConversionError) as e:
        run(output=os.path.join(files["sd_folder"], "out"))
    _one_line(e, "inside the input SD folder")
    with pytest.raises(conv.ConversionError) as e:
        run(output=files["vre"])
    _one_line(e, files["vre"])
    assert not os.path.exists(tmp_path / "o")  # nothing written on any error

    assert (
        conv.main(
            [
                f"--sd={files['sd_folder']}",
                f"--projection={bad_proj}",
                f"--vre={files['vre']}",
                f"--output={tmp_path / 'o'}",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(bad_proj) in err


def test_load_release_errors(release, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        conv.load_release(str(tmp_path / "missing"))
    _one_line(e, tmp_path / "missing", "python -m artfr_jax.convert.osdface")

    folder = tmp_path / "copy"
    folder.mkdir()
    for name in os.listdir(release["out"]):
        (folder / name).write_bytes(open(os.path.join(release["out"], name), "rb").read())
    meta = json.loads((folder / conv.META_FILE).read_text())
    (folder / conv.META_FILE).write_text(json.dumps({**meta, "format": "other/0"}))
    with pytest.raises(ValueError) as e:
        conv.load_release(str(folder))
    _one_line(e, conv.META_FILE, conv.FORMAT)

    (folder / conv.META_FILE).write_text(json.dumps(meta))
    (folder / "vre.msgpack").write_bytes(b"not msgpack")
    with pytest.raises(ValueError) as e:
        conv.load_release(str(folder))
    _one_line(e, "vre.msgpack", "python -m artfr_jax.convert.osdface")

    os.remove(folder / "lora.msgpack")
    (folder / "vre.msgpack").write_bytes(
        open(os.path.join(release["out"], "vre.msgpack"), "rb").read()
    )
    with pytest.raises(FileNotFoundError) as e:
        conv.load_release(str(folder))
    _one_line(e, "lora.msgpack")


def test_paper_config_keys():
    """The official paper-size LQ autoencoder (``lq_embed/inference.py`` defaults, shapes only on
    the meta device) reads as ``vre_autoencoder_kwargs()``, and its keys and our params map one
    to one (391 tensors; the attention blocks' unused ``norm2`` aside)."""
    from artfr_jax.convert.diffusers_vq import expected_param_shapes
    from artfr_jax.models.osdface import vre_autoencoder_kwargs

    paper = dict(
        ch=64,
        ch_mult=(1, 2, 2, 2, 4, 8),
        num_res_blocks=2,
        attn_resolutions=(16,),
        resolution=512,
        z_channels=512,
    )
    with torch.device("meta"):
        parts = {"encoder": MultiHeadEncoder(**paper), "decoder": MultiHeadDecoder(**paper)}
        parts["quantize"] = VectorQuantizer(1024, 512)
        parts["quant_conv"] = nn.Conv2d(512, 512, 1)
        parts["post_quant_conv"] = nn.Conv2d(512, 512, 1)
    sd = {f"vqvae_LQ.{n}.{k}": v for n, m in parts.items() for k, v in m.state_dict().items()}
    kw = conv.vre_kwargs_from_state_dict(sd)
    assert kw == {
        **vre_autoencoder_kwargs(),
        "in_channels": 3,
        "out_channels": 3,
        "decoder_attention_levels": None,
    }
    ours = {conv._vre_key(p, 6, "vqvae_LQ.") for p in expected_param_shapes(kw)}
    theirs = {k for k in sd if ".norm2." not in k or ".attn" not in k}
    assert ours == theirs and len(ours) == 391


def test_restoration_matches_the_official_pipeline(release):
    """The whole official inference (double-normalised VRE prompt, projection, LoRA UNet at
    t = 399, x0 with the SD schedule, VAE decode) in torch against the converted restorer, with
    the posterior mean on both sides (the release samples it)."""
    from artfr_jax import inference

    rel = conv.load_release(release["out"], kernels="xla")
    keys = ("unet", "unet_params", "vae", "vae_params", "vre", "vre_params", "projection")
    restorer = inference.OSDFaceRestorer(
        **{k: rel[k] for k in keys},
        projection_params=rel["projection_params"],
        schedule=rel["schedule"],
        image_size=SIZE,
        lora=rel["lora"],
        lora_scale=rel["lora_scale"],
        timestep=rel["timestep"],
        vre_input=rel["vre_input"],
        sample_posterior=False,
    )
    lq_u8 = np.random.default_rng(3).integers(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
    with jax.default_matmul_precision("highest"):
        ours = restorer(lq_u8, jax.random.key(0))

    x = torch.from_numpy(lq_u8.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    tq, vae, unet = release["assoc"].vqvae_LQ, release["torch_vae"], release["torch_unet"]
    abar = torch.from_numpy(np.asarray(rel["schedule"].alphas_cumprod, np.float64))[399]
    with torch.no_grad():
        h = tq.quant_conv(tq.encoder((x - 0.5) / 0.5)["out"])
        prompt, _ = official_prompt(h, tq.quantize.embedding.weight, PROMPT_TOKENS)
        context = release["proj"](prompt)
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        eps = unet(z, torch.tensor([399, 399]), encoder_hidden_states=context).sample
        z0 = (z.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()
        img = vae.decode((z0 / vae.config.scaling_factor).float()).sample.clamp(-1, 1)
    ref = np.round((img.permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255)
    diff = np.abs(ours.astype(np.float64) - ref)
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_restore_command_with_the_release(release, tmp_path):
    from absl import flags
    from PIL import Image

    from artfr_jax import restore

    # The release restores at 512 px; a copy that says 32 keeps the test quick.
    folder = tmp_path / "release"
    shutil.copytree(release["out"], folder)
    meta = json.loads((folder / conv.META_FILE).read_text())
    (folder / conv.META_FILE).write_text(json.dumps({**meta, "vre_resolution": SIZE}))
    src = tmp_path / "in"
    src.mkdir()
    img = np.random.default_rng(4).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    Image.fromarray(img).save(src / "face.png")
    fv = flags.FlagValues()
    restore.define_flags(fv)
    fv(
        [
            "restore",
            "--mode=aligned",
            f"--weights={folder}",
            f"--input={src}",
            f"--output={tmp_path / 'o'}",
        ]
    )
    assert restore.main(["restore"], fv) == 0
    assert np.asarray(Image.open(tmp_path / "o" / "face.png")).shape == (SIZE, SIZE, 3)
    fv = flags.FlagValues()
    restore.define_flags(fv)
    fv(
        [
            "restore",
            "--mode=aligned",
            f"--weights={folder}",
            f"--input={src}",
            f"--output={tmp_path / 'x'}",
        ]
    )
    fv.method = "vqfr"
    assert restore.main(["restore"], fv) == 2  # the folder holds OSDFace, not VQFR
