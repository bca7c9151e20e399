"""Parity of :class:`UNet` / :class:`AutoencoderKL` and ``convert.diffusers_sd`` with diffusers.

Tiny diffusers ``UNet2DConditionModel`` and ``AutoencoderKL`` models get seeded random values in
every parameter (zero-initialised output layers included), are written with ``save_pretrained``
and loaded through :func:`diffusers_sd.load_unet` / :func:`diffusers_sd.load_vae`; the linen
modules must reproduce diffusers' outputs in float32.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from artfr_jax.convert import diffusers_sd
from artfr_jax.models import naming
from artfr_jax.models.cpu_kernels import CpuKernels
from artfr_jax.models.kernels import Kernels

TOL = 1e-4

BASE = {
    "sample_size": 16,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 16,
    "norm_num_groups": 8,
}
UNET_CONFIGS = {
    # (a) linear projections, per-block head counts (diffusers' attention_head_dim), SD-2.x style
    "linear_heads": {
        **BASE,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": [2, 4],
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    # (b) 1x1 conv projections, one head value, two resnets per down level
    "conv_proj": {
        **BASE,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": 4,
        "layers_per_block": [2, 1],
        "use_linear_projection": False,
    },
    # (c) a level without attention and two transformer blocks in the other
    "plain_level": {
        **BASE,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": [2, 4],
        "transformer_layers_per_block": [2, 1],
        "use_linear_projection": True,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
    },
}
VAE_CONFIG = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 16,
}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _inputs(seed=0, batch=2, size=16, seq=7, ctx=16):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, 4)).astype(np.float32)
    context = rng.standard_normal((batch, seq, ctx)).astype(np.float32)
    return x, context


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every tiny UNet saved (one as .bin, one as an fp16-variant name) plus a pipeline folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = tmp_path_factory.mktemp("sd")
    out = {}
    for i, (name, cfg) in enumerate(UNET_CONFIGS.items()):
        torch.manual_seed(i)
        tm = _randomise(UNet2DConditionModel(**cfg), 10 + i)
        folder = root / name
        kw = {"conv_proj": {"safe_serialization": False}, "plain_level": {"variant": "fp16"}}
        tm.save_pretrained(folder, **kw.get(name, {}))
        out[name] = (tm, str(folder))
    vae = _randomise(AutoencoderKL(**VAE_CONFIG), 20)
    out["vae"] = (vae, None)
    pipe = root / "pipe"
    out["linear_heads"][0].save_pretrained(pipe / "unet")
    vae.save_pretrained(pipe / "vae")
    out["pipe"] = (None, str(pipe))
    return out


def test_weight_files_written(saved):
    assert os.listdir(saved["conv_proj"][1]).count("diffusion_pytorch_model.bin") == 1
    assert "diffusion_pytorch_model.fp16.safetensors" in os.listdir(saved["plain_level"][1])


@pytest.mark.parametrize(
    "name, kernels, timesteps",
    [
        ("linear_heads", Kernels("xla"), np.array([10, 981])),
        ("conv_proj", Kernels("xla"), np.array([3.5, 700.0], np.float32)),
        # the CPU kernels, with query blocks small enough that the 16x16 self-attention takes them
        ("plain_level", Kernels("cpu", CpuKernels(attention_block=64)), 999),
    ],
)
def test_unet_parity(saved, name, kernels, timesteps):
    tm, folder = saved[name]
    unet, params = diffusers_sd.load_unet(folder, kernels=kernels.mode)
    unet = unet.clone(kernels=kernels)
    x, ctx = _inputs()
    with torch.no_grad():
        t = torch.as_tensor(timesteps)
        ref = _nhwc(tm(_nchw(x), t, torch.from_numpy(ctx)).sample)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(unet.apply)({"params": params}, x, timesteps, ctx)
    assert out.dtype == jnp.float32 and out.shape == x.shape
    assert _rel(out, ref) <= TOL, _rel(out, ref)


def test_param_names_are_diffusers_names(saved):
    tm, folder = saved["plain_level"]
    _, params = diffusers_sd.load_unet(folder)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = {naming.torch_name(tuple(k.key for k in path[:-1])) for path, _ in flat}
    torch_modules = {k.rsplit(".", 1)[0] for k in tm.state_dict()}
    assert names == torch_modules
    kwargs = diffusers_sd.unet_kwargs_from_diffusers_config(dict(tm.config))
    # nn.remat keeps the names
    shapes = diffusers_sd.unet_param_shapes(kwargs)
    assert diffusers_sd.unet_param_shapes({**kwargs, "remat": True}) == shapes
    path = ("down_blocks_0", "attentions_0", "transformer_blocks_1", "attn1", "to_q")
    assert naming.torch_name(path) == "down_blocks.0.attentions.0.transformer_blocks.1.attn1.to_q"
    assert (
        "kernel"
        in params["up_blocks_1"]["attentions_1"]["transformer_blocks_0"]["ff"]["net_0"]["proj"]
    )


def test_vae_parity(saved):
    tm, _ = saved["vae"]
    vae, params = diffusers_sd.load_vae(os.path.join(saved["pipe"][1], "vae"), kernels="xla")
    x = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z = np.random.default_rng(2).standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        dist = tm.encode(_nchw(x)).latent_dist
        ref_mean, ref_logvar = _nhwc(dist.mean), _nhwc(dist.logvar)
        ref_dec = _nhwc(tm.decode(_nchw(z)).sample)
    v = {"params": params}
    with jax.default_matmul_precision("highest"):
        mean, logvar = jax.jit(lambda v, x: vae.apply(v, x, method="encode"))(v, x)
        dec = jax.jit(lambda v, z: vae.apply(v, z, method="decode"))(v, z)
    assert _rel(mean, ref_mean) <= TOL and _rel(logvar, ref_logvar) <= TOL
    assert _rel(dec, ref_dec) <= TOL
    assert vae.scaling_factor == pytest.approx(0.18215)


def test_pipeline_cli_and_load_converted(saved, tmp_path, capsys):
    pipe = saved["pipe"][1]
    out = tmp_path / "conv" / "sd.msgpack"
    assert diffusers_sd.main([f"--input={pipe}", f"--output={out}"]) == 0
    assert "sd_unet.msgpack" in capsys.readouterr().out
    unet, up = diffusers_sd.load_converted(str(tmp_path / "conv" / "sd_unet.msgpack"))
    vae, vp = diffusers_sd.load_converted(str(tmp_path / "conv" / "sd_vae.msgpack"))
    ref_unet, ref_up = diffusers_sd.load_unet(pipe)
    ref_vae, ref_vp = diffusers_sd.load_vae(pipe)
    assert unet == ref_unet and vae == ref_vae
    for a, b in ((up, ref_up), (vp, ref_vp)):
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        assert all(
            np.array_equal(p, q)
            for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
        )
    # A component folder writes that component under the given name.
    single = tmp_path / "vae_only.msgpack"
    assert diffusers_sd.main([f"--input={pipe}/vae", f"--output={single}"]) == 0
    assert json.loads(single.with_suffix(".json").read_text())["component"] == "vae"


def test_errors(saved, tmp_path, capsys):
    folder = saved["linear_heads"][1]
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    for field, value in (
        ("class_embed_type", "timestep"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("only_cross_attention", True),
        ("conv_in_kernel", 7),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("center_input_sample", True),
        ("time_embedding_type", "fourier"),
        ("dropout", 0.1),
    ):
        with pytest.raises(diffusers_sd.ConversionError, match=rf"config: {field}=.* unsupported"):
            diffusers_sd.unet_kwargs_from_diffusers_config({**cfg, field: value})
    with pytest.raises(diffusers_sd.ConversionError, match="up_block_types entry 'Foo'"):
        diffusers_sd.unet_kwargs_from_diffusers_config(
            {**cfg, "up_block_types": ["Foo", "CrossAttnUpBlock2D"]}
        )
    with pytest.raises(diffusers_sd.ConversionError, match="unknown field new_thing=1"):
        diffusers_sd.unet_kwargs_from_diffusers_config({**cfg, "new_thing": 1})
    # a field newer than the converter, switched off, changes nothing
    off = diffusers_sd.unet_kwargs_from_diffusers_config({**cfg, "new_thing": None})
    assert off == diffusers_sd.unet_kwargs_from_diffusers_config(cfg)
    with pytest.raises(diffusers_sd.ConversionError, match="config: shift_factor="):
        diffusers_sd.vae_kwargs_from_diffusers_config({**VAE_CONFIG, "shift_factor": 0.1})

    kwargs = diffusers_sd.unet_kwargs_from_diffusers_config(cfg)
    sd = saved["linear_heads"][0].state_dict()
    missing = {k: v for k, v in sd.items() if k != "mid_block.attentions.0.proj_in.weight"}
    with pytest.raises(diffusers_sd.ConversionError, match=r"missing key 'mid_block\.attentions"):
        diffusers_sd.convert_unet_state_dict(missing, kwargs)
    with pytest.raises(diffusers_sd.ConversionError, match=r"unexpected key 'extra\.weight'"):
        diffusers_sd.convert_unet_state_dict({**sd, "extra.weight": torch.zeros(1)}, kwargs)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "addition_embed_type": "text"}))
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert diffusers_sd.main([f"--input={bad}", f"--output={tmp_path / 'x.msgpack'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: config: addition_embed_type=") and err.count("\n") == 1
    (bad / "config.json").write_text(json.dumps(cfg))
    assert diffusers_sd.main([f"--input={bad}", f"--output={tmp_path / 'x.msgpack'}"]) == 1
    assert "diffusion_pytorch_model.safetensors: cannot read the weights" in capsys.readouterr().err
    assert diffusers_sd.main([f"--input={tmp_path / 'none'}", "--output=x.msgpack"]) == 1
    assert "error: " in capsys.readouterr().err
    (bad / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="bad: no diffusion_pytorch_model.safetensors or"):
        diffusers_sd.load_unet(str(bad))


def test_unet_bfloat16_close_to_float32(saved):
    tm, folder = saved["linear_heads"]
    unet, params = diffusers_sd.load_unet(folder, dtype="bfloat16", kernels="xla")
    x, ctx = _inputs(seed=3)
    with torch.no_grad():
        ref = _nhwc(tm(_nchw(x), torch.tensor(500), torch.from_numpy(ctx)).sample)
    out = jax.jit(unet.apply)({"params": params}, x, 500, ctx)
    assert out.dtype == jnp.float32
    assert jax.tree_util.tree_leaves(params)[0].dtype == np.float32
    # Measured 0.017 (2-core CPU, XLA ops) against the float32 reference (the float32 UNet is
    # within 2e-6 of it); the bound leaves 3x margin for other backends.
    assert _rel(out, ref) <= 0.05, _rel(out, ref)
