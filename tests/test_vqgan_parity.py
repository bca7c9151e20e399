"""Parity of :class:`VQGAN` + the diffusers converter against diffusers' ``VQModel``.

A small ``VQModel`` (3 levels, attention at the lowest level and in the bottleneck, vq_embed_dim
different from latent_channels) gets deterministic random values in every parameter, norms
included; the converted JAX model must reproduce encode, quantisation indices and decode.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from artfr_jax.convert import diffusers_vq
from artfr_jax.models.cpu_kernels import CpuKernels
from artfr_jax.models.kernels import Kernels
from artfr_jax.models.vqgan import VQGAN

CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [16, 32, 48],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 12,
    "num_vq_embeddings": 64,
    "norm_num_groups": 8,
    "vq_embed_dim": 8,
    "mid_block_add_attention": True,
}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


@pytest.fixture(scope="module")
def models():
    from diffusers import VQModel

    torch.manual_seed(0)
    tm = VQModel(**CONFIG).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name != "quantize.embedding.weight":
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in) ** 0.5)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        h = tm.encode(_nchw(x)).latents
        # Codebook on the latents' scale so that the nearest code is a real decision.
        tm.quantize.embedding.weight.copy_(
            h.std() * torch.randn(tm.quantize.embedding.weight.shape, generator=g)
        )
    kwargs = diffusers_vq.vqgan_kwargs_from_diffusers_config(CONFIG)
    params = diffusers_vq.convert_state_dict(tm.state_dict(), kwargs)
    return tm, VQGAN(**kwargs), {"params": params}, x


ALL = ((0, 1),)
KERNELS = {
    # Plain XLA ops, as every GPU and TPU program runs them.
    "xla": Kernels("xla"),
    # The CPU kernels at their default sizes: direct 3x3 convolutions at these sizes, phase
    # upsampling, group norm's backward, patch weight gradients.
    "cpu": Kernels("cpu"),
    # Every 3x3 convolution as Winograd F(4x4, 3x3), the upsampling as F(4x4, 2x2).
    "winograd": Kernels(
        "cpu",
        CpuKernels(winograd_min_sizes=ALL, upsample_min_sizes=ALL, upsample_grad_min_sizes=ALL),
    ),
}


@pytest.fixture(params=sorted(KERNELS))
def conv_path(request) -> Kernels:
    return KERNELS[request.param]


def test_vqgan_encode_quantize_decode_parity(models, conv_path):
    tm, jm, variables, x = models
    jm = jm.clone(kernels=conv_path)
    with torch.no_grad():
        t_lat = tm.encode(_nchw(x)).latents
        t_q, _, (_, _, t_idx) = tm.quantize(t_lat)
        t_dec = tm.decode(t_q, force_not_quantize=True).sample
        t_full = tm(_nchw(x)).sample
    with jax.default_matmul_precision("highest"):
        j_lat = jm.apply(variables, x, method=VQGAN.encode)
        j_q, j_idx, _ = jm.apply(variables, j_lat, method=VQGAN.quantize)
        j_dec = jm.apply(variables, jnp.asarray(_nhwc(t_q)), method=VQGAN.decode)
        j_full, aux = jm.apply(variables, x)

    assert j_lat.shape == (2, 8, 8, 8)
    print("rel err encode", _rel(j_lat, _nhwc(t_lat)))
    assert _rel(j_lat, _nhwc(t_lat)) < 1e-4

    t_idx = t_idx.numpy().reshape(2, 8, 8)
    mismatch = np.asarray(j_idx) != t_idx
    if mismatch.any():
        # Only ties within float error may differ: the two codes must be equally near.
        z = _nhwc(t_lat)[mismatch].astype(np.float64)
        e = tm.quantize.embedding.weight.detach().numpy().astype(np.float64)
        d_j = np.sum((z - e[np.asarray(j_idx)[mismatch]]) ** 2, -1)
        d_t = np.sum((z - e[t_idx[mismatch]]) ** 2, -1)
        np.testing.assert_allclose(d_j, d_t, rtol=1e-5)
    assert mismatch.sum() <= 1
    assert len(np.unique(t_idx)) > 10  # the comparison exercised many different codes
    assert _rel(j_q, _nhwc(t_q)) < 1e-4 or mismatch.any()

    print("rel err decode", _rel(j_dec, _nhwc(t_dec)), "full", _rel(j_full, _nhwc(t_full)))
    print("index mismatches", int(mismatch.sum()), "distinct codes", len(np.unique(t_idx)))
    assert _rel(j_dec, _nhwc(t_dec)) < 1e-4
    assert _rel(j_full, _nhwc(t_full)) < 1e-4
    np.testing.assert_array_equal(aux["indices"], j_idx)


def test_vqgan_decode_indices_parity(models):
    tm, jm, variables, _ = models
    idx = np.random.default_rng(1).integers(0, CONFIG["num_vq_embeddings"], (2, 4, 4))
    with torch.no_grad():
        emb = tm.quantize.get_codebook_entry(torch.from_numpy(idx).reshape(-1), (2, 4, 4, 8))
        t_dec = tm.decode(emb, force_not_quantize=True).sample
    with jax.default_matmul_precision("highest"):
        j_dec = jm.apply(variables, jnp.asarray(idx, jnp.int32), method=VQGAN.decode_indices)
    assert j_dec.shape == (2, 16, 16, 3)
    assert _rel(j_dec, _nhwc(t_dec)) < 1e-4


def test_converter_cli_parity(models, tmp_path):
    from safetensors.torch import save_file

    tm, _, variables, x = models
    model_dir = tmp_path / "vq"
    model_dir.mkdir()
    save_file(
        {k: v.contiguous() for k, v in tm.state_dict().items()},
        str(model_dir / "diffusion_pytorch_model.safetensors"),
    )
    (model_dir / "config.json").write_text(json.dumps({"_class_name": "VQModel", **CONFIG}))
    out = tmp_path / "out" / "vq.msgpack"
    assert diffusers_vq.main([f"--input={model_dir}", f"--output={out}"]) == 0
    kwargs, loaded = diffusers_vq.load_converted(str(out))
    assert kwargs == diffusers_vq.vqgan_kwargs_from_diffusers_config(CONFIG)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)
    with torch.no_grad():
        t_full = tm(_nchw(x)).sample
    with jax.default_matmul_precision("highest"):
        j_full, _ = VQGAN(**kwargs).apply(loaded, x)
    assert _rel(j_full, _nhwc(t_full)) < 1e-4

    # A bare .bin file with a separate config goes through torch.load(weights_only=True).
    torch.save(tm.state_dict(), tmp_path / "w.bin")
    (tmp_path / "c.json").write_text(json.dumps(CONFIG))
    k2, p2 = diffusers_vq.load_diffusers_vq(str(tmp_path / "w.bin"), str(tmp_path / "c.json"))
    assert k2 == kwargs
    jax.tree_util.tree_map(np.testing.assert_array_equal, {"params": p2}, variables)


def test_converter_errors_name_the_key(models):
    tm, _, _, _ = models
    kwargs = diffusers_vq.vqgan_kwargs_from_diffusers_config(CONFIG)
    sd = dict(tm.state_dict())
    missing = dict(sd)
    del missing["decoder.up_blocks.0.attentions.1.to_k.weight"]
    with pytest.raises(
        diffusers_vq.ConversionError,
        match=r"missing key 'decoder\.up_blocks\.0"
        r"\.attentions\.1\.to_k\.weight' \(expected shape \(48, 48\)",
    ):
        diffusers_vq.convert_state_dict(missing, kwargs)
    bad = dict(sd)
    bad["encoder.conv_in.weight"] = torch.zeros(16, 3, 5, 5)
    with pytest.raises(
        diffusers_vq.ConversionError,
        match=r"'encoder\.conv_in\.weight' has "
        r"shape \(16, 3, 5, 5\), expected \(16, 3, 3, 3\)",
    ):
        diffusers_vq.convert_state_dict(bad, kwargs)
    extra = {**sd, "encoder.extra.weight": torch.zeros(1)}
    with pytest.raises(diffusers_vq.ConversionError, match=r"unexpected key 'encoder\.extra"):
        diffusers_vq.convert_state_dict(extra, kwargs)
    with pytest.raises(diffusers_vq.ConversionError, match="up_block_types entry 'Foo'"):
        diffusers_vq.vqgan_kwargs_from_diffusers_config(
            {**CONFIG, "up_block_types": ["Foo", "UpDecoderBlock2D", "UpDecoderBlock2D"]}
        )


def test_converter_legacy_attention_names(models):
    tm, _, variables, _ = models
    kwargs = diffusers_vq.vqgan_kwargs_from_diffusers_config(CONFIG)
    legacy = {
        k.replace(".to_q.", ".query.")
        .replace(".to_k.", ".key.")
        .replace(".to_v.", ".value.")
        .replace(".to_out.0.", ".proj_attn."): v
        for k, v in tm.state_dict().items()
    }
    assert any(".proj_attn." in k for k in legacy)
    params = diffusers_vq.convert_state_dict(legacy, kwargs)
    jax.tree_util.tree_map(np.testing.assert_array_equal, {"params": params}, variables)


def test_param_count_parity_paper_config():
    """The paper-config VQGAN has exactly as many parameters as the equivalent VQModel."""
    from diffusers import VQModel

    chans = (64, 128, 128, 256, 256, 512)
    config = {
        "down_block_types": ["DownEncoderBlock2D"] * 5 + ["AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 5,
        "block_out_channels": list(chans),
        "layers_per_block": 2,
        "latent_channels": 256,
        "num_vq_embeddings": 1024,
        "vq_embed_dim": 256,
    }
    with torch.device("meta"):
        tm = VQModel(**config)
    n_torch = sum(p.numel() for p in tm.parameters())
    kwargs = diffusers_vq.vqgan_kwargs_from_diffusers_config(config)
    assert kwargs["attention_levels"] == (5,) and kwargs["decoder_attention_levels"] is None
    shapes = diffusers_vq.expected_param_shapes(kwargs)
    assert sum(int(np.prod(s)) for s in shapes.values()) == n_torch
    default = jax.eval_shape(VQGAN().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert sum(a.size for a in jax.tree_util.tree_leaves(default)) == n_torch


def test_vqgan_gradient_parity(models, conv_path):
    """Parameter gradients of decode(encode(x)) agree with torch autograd (checks GroupNorm's
    hand-written backward and every transposed layout)."""
    tm, jm, variables, x = models
    jm = jm.clone(kernels=conv_path)
    w = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    tm.zero_grad(set_to_none=True)
    out = tm.decode(tm.encode(_nchw(x)).latents, force_not_quantize=True).sample
    (out * _nchw(w)).sum().backward()
    t_grads = {k: p.grad for k, p in tm.named_parameters() if p.grad is not None}

    def loss(params):
        v = {"params": params}
        z = jm.apply(v, x, method=VQGAN.encode)
        return jnp.sum(jm.apply(v, z, method=VQGAN.decode) * w)

    with jax.default_matmul_precision("highest"):
        j_grads = jax.jit(jax.grad(loss))(variables["params"])
    expected = diffusers_vq.convert_state_dict(
        {k: t_grads.get(k, torch.zeros_like(v)) for k, v in tm.state_dict().items()},
        diffusers_vq.vqgan_kwargs_from_diffusers_config(CONFIG),
    )
    del expected["quantizer"], j_grads["quantizer"]
    flat_j = jax.tree_util.tree_leaves_with_path(j_grads)
    flat_t = dict(jax.tree_util.tree_leaves_with_path(expected))
    assert len(flat_j) == len(flat_t) > 100
    for path, g in flat_j:
        name = jax.tree_util.keystr(path)
        if "['k']['bias']" in name:
            # softmax is invariant to the key bias: its true gradient is 0, both sides are noise.
            assert float(jnp.max(jnp.abs(g))) < 1e-4, name
            continue
        assert _rel(g, flat_t[path]) < 1e-4, name
