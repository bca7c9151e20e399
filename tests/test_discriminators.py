"""PatchGAN discriminator: output shapes, parameter layout, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artfr_jax.losses import generator_adv_loss, hinge_d_loss
from artfr_jax.models.discriminators import PatchDiscriminator


def _taming_param_count(ndf: int, n_layers: int, in_ch: int = 3) -> int:
    """Parameters of taming's NLayerDiscriminator with BatchNorm (affine only, no running stats)."""
    count = 16 * in_ch * ndf + ndf
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2**n, 8)
        count += 16 * ndf * prev * ndf * mult + 2 * ndf * mult
    return count + 16 * ndf * mult + 1


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("num_layers", [2, 3])
def test_output_shape(size, num_layers):
    d = PatchDiscriminator(base_features=8, num_layers=num_layers)
    x = jnp.zeros((2, size, size, 3))
    out = jax.eval_shape(lambda: d.init_with_output(jax.random.key(0), x)[0])
    side = size // 2**num_layers - 2
    assert out.shape == (2, side, side, 1)
    assert out.dtype == jnp.float32


def test_paper_size_and_taming_layout():
    d = PatchDiscriminator()  # base_features=64, num_layers=3, GroupNorm
    x = jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32)
    out, variables = jax.eval_shape(lambda v: d.init_with_output(jax.random.key(0), v), x)
    assert out.shape == (1, 62, 62, 1)
    assert set(variables) == {"params"}  # no batch_stats: the train state stays pure
    params = variables["params"]
    # conv/norm names are the indices in taming's `main` Sequential.
    assert sorted(params) == sorted(
        ["conv0", "conv2", "norm3", "conv5", "norm6", "conv8", "norm9", "conv11"]
    )
    assert params["conv8"]["kernel"].shape == (4, 4, 256, 512)
    assert "bias" not in params["conv5"] and "bias" in params["conv11"]
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert n == _taming_param_count(64, 3) == 2_765_633


@pytest.mark.parametrize("norm", ["group", "instance", "none"])
def test_gradients_finite_and_train_signal(norm):
    d = PatchDiscriminator(base_features=16, num_layers=3, norm=norm)
    g = np.random.default_rng(0)
    real = jnp.asarray(g.uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
    fake = jnp.asarray(g.uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
    params = jax.jit(d.init)(jax.random.key(1), real)["params"]

    def d_loss(p):
        return hinge_d_loss(d.apply({"params": p}, real), d.apply({"params": p}, fake))

    loss, grads = jax.jit(jax.value_and_grad(d_loss))(params)
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    assert sum(float(jnp.abs(x).sum()) for x in leaves) > 0
    gx = jax.jit(jax.grad(lambda x: generator_adv_loss(d.apply({"params": params}, x))))(fake)
    assert gx.shape == fake.shape and np.all(np.isfinite(np.asarray(gx)))
    assert float(jnp.abs(gx).max()) > 0


def test_bf16_compute_returns_float32_logits():
    d = PatchDiscriminator(base_features=8, num_layers=2, dtype=jnp.bfloat16)
    x = jnp.ones((1, 64, 64, 3))
    out, _ = jax.jit(d.init_with_output)(jax.random.key(0), x)
    assert out.dtype == jnp.float32 and out.shape == (1, 14, 14, 1)


def test_bad_fields_and_inputs_raise():
    x = jnp.zeros((1, 64, 64, 3))
    with pytest.raises(ValueError, match="norm='batch'"):
        PatchDiscriminator(norm="batch").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="num_layers=0"):
        PatchDiscriminator(num_layers=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="too small"):
        PatchDiscriminator(base_features=8, num_layers=3).init(jax.random.key(0), x[:, :16, :16])
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        PatchDiscriminator(base_features=8).init(jax.random.key(0), x[0])
