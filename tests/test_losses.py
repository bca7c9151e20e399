"""Pixel, adversarial and LPIPS losses: hand-checked values and properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util

from artfr_jax.losses import (
    adversarial_weight,
    charbonnier_loss,
    generator_adv_loss,
    hinge_d_loss,
    l1_loss,
    l2_loss,
    load_lpips_params,
    lpips_distance,
    vanilla_d_loss,
)
from artfr_jax.losses.perceptual import lpips_param_shapes, unit_normalize

_dist = jax.jit(lpips_distance, static_argnames="dtype")


def test_pixel_losses_known_values():
    x = jnp.array([[0.0, 1.0], [2.0, -1.0]])
    y = jnp.array([[1.0, 1.0], [0.0, 1.0]])
    assert float(l1_loss(x, y)) == pytest.approx((1 + 0 + 2 + 2) / 4)
    assert float(l2_loss(x, y)) == pytest.approx((1 + 0 + 4 + 4) / 4)
    assert float(charbonnier_loss(x, x, eps=1e-3)) == pytest.approx(1e-3)
    assert float(charbonnier_loss(x, y, eps=0.0)) == pytest.approx(float(l1_loss(x, y)))
    assert l2_loss(x.astype(jnp.bfloat16), y).dtype == jnp.float32
    with pytest.raises(ValueError, match="shapes differ"):
        l1_loss(x, y[:1])


def test_hinge_d_loss_known_values():
    real = jnp.array([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2 -> mean 2.5 / 3
    fake = jnp.array([-2.0, 0.0])  # relu(1 + f) = 0, 1 -> mean 0.5
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 0.5))
    # A perfect discriminator (margins met) has zero loss.
    assert float(hinge_d_loss(jnp.full((2, 4, 4, 1), 3.0), jnp.full((2, 4, 4, 1), -3.0))) == 0.0


def test_vanilla_d_loss_known_values():
    # At logits 0 both BCE terms are log 2.
    assert float(vanilla_d_loss(jnp.zeros(5), jnp.zeros(3))) == pytest.approx(np.log(2.0))
    real, fake = jnp.array([1.0]), jnp.array([-2.0])
    want = 0.5 * (np.log1p(np.exp(-1.0)) + np.log1p(np.exp(-2.0)))
    assert float(vanilla_d_loss(real, fake)) == pytest.approx(want, rel=1e-6)
    # Large logits do not overflow.
    assert np.isfinite(float(vanilla_d_loss(jnp.array([-1e4]), jnp.array([1e4]))))


def test_generator_adv_loss_known_values():
    fake = jnp.array([1.0, -3.0])
    assert float(generator_adv_loss(fake, "hinge")) == pytest.approx(1.0)
    want = 0.5 * (np.log1p(np.exp(-1.0)) + np.log1p(np.exp(3.0)))
    assert float(generator_adv_loss(fake, "vanilla")) == pytest.approx(want, rel=1e-6)
    assert float(generator_adv_loss(fake, "non_saturating")) == pytest.approx(want, rel=1e-6)
    # Non-saturating: the gradient stays large where the discriminator confidently rejects.
    g = jax.grad(lambda f: generator_adv_loss(f, "vanilla"))(jnp.array([-10.0]))
    assert float(g[0]) == pytest.approx(-1.0, abs=1e-4)
    with pytest.raises(ValueError, match="kind='wgan'"):
        generator_adv_loss(fake, "wgan")


def test_adversarial_weight_switches_at_start_step():
    assert float(adversarial_weight(0, 100, 0.8)) == 0.0
    assert float(adversarial_weight(99, 100, 0.8)) == 0.0
    assert float(adversarial_weight(100, 100, 0.8)) == pytest.approx(0.8)
    steps = jnp.arange(98, 103)
    w = jax.jit(jax.vmap(lambda s: adversarial_weight(s, 100, 0.8)))(steps)
    np.testing.assert_allclose(np.asarray(w), [0, 0, 0.8, 0.8, 0.8], rtol=1e-7)
    assert w.dtype == jnp.float32


def test_unit_normalize_zero_vector_has_finite_gradient():
    f = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([3.0, 4.0, 0.0, 0.0]))
    out = unit_normalize(f)
    np.testing.assert_allclose(np.asarray(out[0, 0, 0]), [0.6, 0.8, 0, 0], rtol=1e-6)
    assert float(jnp.abs(out[0, 1]).max()) == 0.0
    g = jax.grad(lambda t: jnp.sum(unit_normalize(t) ** 2))(f)
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.fixture(scope="module")
def lpips_params():
    """Random He-scaled trunk with non-negative heads (as the calibrated LPIPS heads are)."""
    g = np.random.default_rng(0)
    flat = {}
    for key, shape in lpips_param_shapes().items():
        if key[-1] == "bias":
            flat[key] = g.normal(0, 0.05, shape).astype(np.float32)
        else:  # conv [3, 3, Cin, Cout] or head [C, 1]
            fan_in = int(np.prod(shape[:-1]))
            w = g.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
            flat[key] = np.abs(w) if key[0].startswith("lin") else w
    return traverse_util.unflatten_dict(flat)


def test_lpips_properties(lpips_params):
    g = np.random.default_rng(0)
    x = jnp.asarray(g.uniform(-1, 1, (3, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(g.uniform(-1, 1, (3, 32, 32, 3)), jnp.float32)
    dist = _dist
    np.testing.assert_array_equal(np.asarray(dist(lpips_params, x, x)), 0.0)
    dxy, dyx = np.asarray(dist(lpips_params, x, y)), np.asarray(dist(lpips_params, y, x))
    assert dxy.shape == (3,)
    assert np.all(dxy > 0)
    np.testing.assert_allclose(dxy, dyx, rtol=1e-6)
    # Closer images are closer in LPIPS.
    near = np.asarray(dist(lpips_params, x, x + 0.01 * (y - x)))
    assert np.all(near < dxy)
    with pytest.raises(ValueError, match="same shape"):
        dist(lpips_params, x, y[..., :2])


def test_lpips_gradient_and_bf16(lpips_params):
    g = np.random.default_rng(1)
    x = jnp.asarray(g.uniform(-1, 1, (3, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(g.uniform(-1, 1, (3, 32, 32, 3)), jnp.float32)
    grad = jax.jit(jax.grad(lambda a, b: lpips_distance(lpips_params, a, b).mean()))
    gx = np.asarray(grad(x, y))
    assert np.all(np.isfinite(gx)) and np.abs(gx).max() > 0
    # A small step against the gradient lowers the distance.
    d0 = float(_dist(lpips_params, x, y).mean())
    d1 = float(_dist(lpips_params, x - 0.01 * gx / np.abs(gx).max(), y).mean())
    assert d1 < d0
    bf16 = _dist(lpips_params, x, y, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf16), np.asarray(_dist(lpips_params, x, y)), rtol=0.05)


def test_load_lpips_params_missing_file_names_convert_command(tmp_path):
    path = tmp_path / "lpips_vgg.msgpack"
    with pytest.raises(FileNotFoundError) as e:
        load_lpips_params(str(path))
    msg = str(e.value)
    assert str(path) in msg and "python -m artfr_jax.convert.lpips_vgg --vgg16=" in msg
    assert "\n" not in msg
    with pytest.raises(ValueError, match="python -m artfr_jax.convert.lpips_vgg"):
        load_lpips_params(None)
    with pytest.raises(ValueError, match="python -m artfr_jax.convert.lpips_vgg"):
        load_lpips_params("")


def test_load_lpips_params_round_trip_and_malformed(tmp_path, lpips_params):
    good = tmp_path / "good.msgpack"
    good.write_bytes(serialization.msgpack_serialize(jax.tree.map(np.asarray, lpips_params)))
    loaded = load_lpips_params(str(good))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(lpips_params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))

    garbage = tmp_path / "garbage.msgpack"
    garbage.write_bytes(b"\xc1not msgpack at all")
    with pytest.raises(ValueError, match=r"garbage\.msgpack.*convert\.lpips_vgg"):
        load_lpips_params(str(garbage))

    wrong = dict(jax.tree.map(np.asarray, lpips_params))
    wrong["lin2"] = {"kernel": np.zeros((128, 1), np.float32)}
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(serialization.msgpack_serialize(wrong))
    with pytest.raises(ValueError, match=r"bad\.msgpack: lin2/kernel is shape \(128, 1\)"):
        load_lpips_params(str(bad))
