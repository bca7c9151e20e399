"""The precision policy (models/factory.py): every config declares it, every network follows it, a
bfloat16 forward stays within a stated bound of the float32 one, and what leaves a network (images,
logits, distances) is float32 whatever the compute dtype."""

import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from artfr_jax.losses.perceptual import LPIPS
from artfr_jax.models import factory
from artfr_jax.models.discriminators import PatchDiscriminator
from artfr_jax.models.stylegan_disc import SWADiscriminator
from artfr_jax.models.vqfr import VQFRv1
from artfr_jax.train import perceptual

VARIANTS = {
    "vqgan": {None: "bfloat16", "smoke": "float32", "tiny": "float32", "vqfr": "bfloat16"},
    "art": {None: "bfloat16", "smoke": "float32", "demo": "float32", "tiny": "float32"},
    "vqfr": {None: "bfloat16", "smoke": "float32", "tiny": "float32"},
}
X = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)


def _config(name, variant):
    return importlib.import_module(f"configs.{name}").get_config(variant)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_config_declares_the_policy(name):
    """Paper configurations compute in bfloat16 (accelerators), the CPU variants in float32;
    parameters are float32 and the kernels 'auto' everywhere, stage I of a stage II included."""
    for variant, dtype in VARIANTS[name].items():
        config = _config(name, variant)
        sections = [config.model]
        if "stage1" in config:
            sections.append(config.stage1.config.model)
        for model in sections:
            assert (model.dtype, model.param_dtype, model.kernels) == (dtype, "float32", "auto")
            factory.policy(model)  # valid values


# (network, inputs, bound on |bf16 - f32| / |f32| of the output): measured 0.8-2.1% for the
# models, 0.2-0.5% for the discriminators and 0.01% for LPIPS at these sizes and random weights.
def _tokenizer(variant):
    return factory.tokenizer(_config("vqgan", variant).model.to_dict())


CASES = {
    "vqgan_encode": (lambda: _tokenizer("smoke"), "encode", 0.04),
    "vqgan_decode": (lambda: _tokenizer("smoke"), "decode", 0.04),
    "vqganv1_encode": (lambda: _tokenizer("vqfr_tiny"), "encode", 0.04),
    "vqganv1_decode": (lambda: _tokenizer("vqfr_tiny"), "decode", 0.04),
    "patchgan": (lambda: PatchDiscriminator(base_features=8, num_layers=2), None, 0.02),
    "swagan": (
        lambda: SWADiscriminator(out_size=32, channel_multiplier=1, max_channels=16),
        None,
        0.02,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bfloat16_forward_is_close_to_float32(case):
    make, method, bound = CASES[case]
    net = make()
    variables = net.init(jax.random.key(0), X)
    bf16 = net.clone(dtype=jnp.bfloat16)
    if method is None:
        a, b = net.apply(variables, X), bf16.apply(variables, X)
    elif method == "encode":
        a = net.apply(variables, X, method=type(net).encode)
        b = bf16.apply(variables, X, method=type(net).encode)
    else:  # decode one code, the float32 forward's, so that quantisation is not compared
        z = net.apply(variables, X, method=type(net).encode)
        zq = net.apply(variables, z, method=type(net).quantize)[0]
        a = net.apply(variables, zq, method=type(net).decode)
        b = bf16.apply(variables, zq, method=type(net).decode)
        assert b.dtype == jnp.float32  # images leave the model in float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    assert _rel(b, a) < bound, (case, _rel(b, a))


def test_vqfr_branches_in_bfloat16():
    config = _config("vqfr", "tiny")
    net = factory.vqfr(config)
    variables = net.init(jax.random.key(0), X)
    bf16 = net.clone(dtype=jnp.bfloat16)
    z = net.apply(variables, X, method=VQFRv1.encode)
    zq = net.apply(variables, z, method=VQFRv1.quantize)[0]
    t32, feats = net.apply(variables, zq, method=VQFRv1.decode_texture)
    t16, _ = bf16.apply(variables, zq, method=VQFRv1.decode_texture)
    m32 = net.apply(variables, feats, X, method=VQFRv1.decode_main)
    m16 = bf16.apply(variables, feats, X, method=VQFRv1.decode_main)
    assert _rel(t16, t32) < 0.04 and _rel(m16, m32) < 0.04
    main, texture, _ = bf16.apply(variables, X)
    assert main.dtype == texture.dtype == jnp.float32


def test_art_logits_in_bfloat16():
    config = _config("art", "tiny")
    tokenizer = factory.tokenizer(config.stage1.config.model.to_dict())
    art = factory.art(config, tokenizer)
    n = art.transformer.num_tokens
    tokens = jax.random.randint(jax.random.key(1), (2, n), 0, tokenizer.num_embeddings + 1)
    variables = art.init(jax.random.key(0), X, tokens)
    config.model.dtype = "bfloat16"
    art16 = factory.art(config, tokenizer)
    assert art16.lq_encoder.dtype == art16.transformer.dtype == jnp.bfloat16
    (a, fa), (b, fb) = art.apply(variables, X, tokens), art16.apply(variables, X, tokens)
    assert b.dtype == jnp.float32  # logits, for the cross-entropy
    assert _rel(b, a) < 0.04 and _rel(fb, fa) < 0.04


def test_art_remat_of_each_part():
    """``model.remat`` for the LQ encoder, ``model.transformer_remat`` for the transformer;
    a saved config without the second (older runs) uses the first for both."""
    config = _config("art", "tiny")
    tokenizer = factory.tokenizer(config.stage1.config.model.to_dict())
    config.model.update(remat="matmuls", transformer_remat="full")
    art = factory.art(config, tokenizer)
    assert (art.lq_encoder.remat, art.transformer.remat) == ("matmuls", "full")
    older = ml_collections.ConfigDict(config.to_dict())
    del older.model["transformer_remat"]
    assert factory.art(older, tokenizer).transformer.remat == "matmuls"
    config.model.transformer_remat = "some"
    with pytest.raises(ValueError, match=r"^config.model.transformer_remat='some': expected"):
        factory.art(config, tokenizer)


def test_lpips_in_bfloat16_and_the_loss_follows_the_policy(monkeypatch):
    variables = LPIPS().init(jax.random.key(0), X, Y)
    a = LPIPS().apply(variables, X, Y)
    b = LPIPS(dtype=jnp.bfloat16).apply(variables, X, Y)
    assert b.dtype == jnp.float32 and _rel(b, a) < 1e-3
    config = _config("vqgan", None)  # paper: bfloat16, LPIPS required
    config.loss.lpips_weights = "lpips.msgpack"
    monkeypatch.setattr(perceptual.perceptual, "load_lpips_params", lambda path: {})
    _, lpips = perceptual.loss_lpips(config)
    assert lpips.dtype == jnp.bfloat16 and lpips.param_dtype == jnp.float32


def test_frozen_and_adversarial_networks_follow_the_stage():
    """A stage's discriminators and its frozen stage-I tokenizer compute in the stage's dtype."""
    vqfr = _config("vqfr", None)
    assert factory.vqfr(vqfr).dtype == jnp.bfloat16
    assert (
        factory.discriminator(vqfr.local_discriminator.to_dict(), vqfr.model.to_dict(), "x").dtype
        == jnp.bfloat16
    )
    stage1_model = _config("vqgan", "tiny").model.to_dict()  # trained in float32
    frozen = factory.tokenizer(stage1_model, _config("art", None).model.to_dict())
    assert frozen.dtype == jnp.bfloat16 and frozen.param_dtype == jnp.float32
    assert factory.tokenizer({k: v for k, v in stage1_model.items() if k != "dtype"}).dtype == (
        jnp.float32  # an older saved config without the field
    )
