"""Masked token transformer and ART-FR model: shapes, condition modes, long skips, ablations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artfr_jax.models.artfr import ARTFR
from artfr_jax.models.transformer import MaskedTokenTransformer
from artfr_jax.models.vqgan import VQGAN

K, N, W = 16, 16, 32


def _transformer(**kw):
    args = dict(
        num_embeddings=K,
        num_tokens=N,
        num_condition_tokens=N,
        width=W,
        depth=5,
        num_heads=4,
        mlp_dim=64,
    )
    return MaskedTokenTransformer(**{**args, **kw})


def _inputs(seed=0, b=2):
    r1, r2 = jax.random.split(jax.random.key(seed))
    tokens = jax.random.randint(r1, (b, N), 0, K + 1)
    cond = jax.random.normal(r2, (b, N, W))
    return tokens, cond


@pytest.mark.parametrize("mode", ["prefix", "concat", "cross_attention"])
def test_condition_modes_give_logits_at_hq_positions(mode):
    model = _transformer(condition_mode=mode)
    tokens, cond = _inputs()
    params = model.init(jax.random.key(1), tokens, cond)["params"]
    logits = model.apply({"params": params}, tokens, cond)
    assert logits.shape == (2, N, K) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    # The condition reaches the prediction in every mode.
    other = model.apply({"params": params}, tokens, cond + 1.0)
    assert float(jnp.max(jnp.abs(other - logits))) > 1e-3
    assert ("pos_embed" in params) and params["pos_embed"].shape[0] == (
        2 * N if mode == "prefix" else N
    )
    assert ("concat_linear" in params) == (mode == "concat")
    assert ("cross_attn" in params["mid"]) == (mode == "cross_attention")


def test_attention_is_bidirectional():
    model = _transformer()
    tokens, cond = _inputs()
    params = model.init(jax.random.key(1), tokens, cond)["params"]
    base = model.apply({"params": params}, tokens, cond)
    changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % K)
    out = model.apply({"params": params}, changed, cond)
    # Changing the last token moves the prediction at the first position (no causal mask).
    assert float(jnp.max(jnp.abs(out[:, 0] - base[:, 0]))) > 1e-4


def test_long_skips_fuse_mirrored_blocks():
    tokens, cond = _inputs()
    with_skips = _transformer(depth=7).init(jax.random.key(1), tokens, cond)["params"]
    without = _transformer(depth=7, long_skips=False).init(jax.random.key(1), tokens, cond)[
        "params"
    ]
    for i in range(3):
        kernel = with_skips[f"out_{i}"]["skip_linear"]["kernel"]
        assert kernel.shape == (2 * W, W)  # Linear(Concat(h_main, h_skip))
        assert "skip_linear" not in without[f"out_{i}"]
        assert "skip_linear" not in with_skips[f"in_{i}"]
    assert "skip_linear" not in with_skips["mid"]


def test_bad_shapes_and_fields_are_clear_errors():
    tokens, cond = _inputs()
    with pytest.raises(ValueError, match="odd"):
        _transformer(depth=4).init(jax.random.key(0), tokens, cond)
    with pytest.raises(ValueError, match="condition_mode"):
        _transformer(condition_mode="film").init(jax.random.key(0), tokens, cond)
    with pytest.raises(ValueError, match="expected tokens"):
        _transformer().init(jax.random.key(0), tokens[:, :-1], cond)


@pytest.mark.parametrize("mode", [True, "matmuls"])
def test_remat_and_dropout_keep_the_function(mode):
    tokens, cond = _inputs()
    plain = _transformer()
    params = plain.init(jax.random.key(1), tokens, cond)["params"]
    remat = _transformer(remat=mode)
    np.testing.assert_allclose(
        remat.apply({"params": params}, tokens, cond),
        plain.apply({"params": params}, tokens, cond),
        rtol=1e-5,
        atol=1e-5,
    )
    grads = [
        jax.grad(lambda p, m=m: jnp.sum(m.apply({"params": p}, tokens, cond) ** 2))(params)
        for m in (plain, remat)
    ]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), *grads)
    drop = _transformer(dropout_rate=0.5)
    eval_out = drop.apply({"params": params}, tokens, cond)
    np.testing.assert_allclose(eval_out, plain.apply({"params": params}, tokens, cond), atol=1e-6)
    train_out = drop.apply(
        {"params": params}, tokens, cond, train=True, rngs={"dropout": jax.random.key(2)}
    )
    assert float(jnp.max(jnp.abs(train_out - eval_out))) > 1e-3


def _tiny_vqgan():
    return VQGAN(
        block_out_channels=(8, 16),
        layers_per_block=1,
        attention_levels=(),
        latent_channels=8,
        num_embeddings=K,
        embedding_dim=4,
        norm_num_groups=4,
    )


def test_artfr_param_layout_matches_stage_one_encoder():
    vq = _tiny_vqgan()
    x = jnp.zeros((1, 8, 8, 3))
    art = ARTFR(lq_encoder=vq, transformer=_transformer())
    params = art.init(jax.random.key(0), x, jnp.zeros((1, N), jnp.int32))["params"]
    stage1 = vq.init(jax.random.key(0), x)["params"]
    assert set(params) == {"lq_encoder", "projector", "transformer"}
    assert set(params["lq_encoder"]) == {"encoder", "quant_conv"}
    same = jax.tree.map(
        lambda a, b: a.shape == b.shape, params["lq_encoder"]["encoder"], stage1["encoder"]
    )
    assert all(jax.tree.leaves(same))
    assert params["projector"]["kernel"].shape == (4, W)
    logits, f_l = art.apply({"params": params}, x, jnp.full((1, N), K))
    assert logits.shape == (1, N, K) and f_l.shape == (1, 4, 4, 4)


def test_artfr_without_transformer_is_the_encoder_only():
    art = ARTFR(lq_encoder=_tiny_vqgan(), transformer=None)
    x = jnp.zeros((1, 8, 8, 3))
    params = art.init(jax.random.key(0), x, jnp.zeros((1, N), jnp.int32))["params"]
    assert set(params) == {"lq_encoder"}
    logits, f_l = art.apply({"params": params}, x, None)
    assert logits is None and f_l.shape == (1, 4, 4, 4)
