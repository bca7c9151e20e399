"""Behaviour of the stage-I VQGAN tokenizer (ART-FR Sec. 3.1, Eqs. 1-3) on tiny configs."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artfr_jax.models import kernels as kernels_lib
from artfr_jax.models.kernels import Kernels
from artfr_jax.models.layers import remat_mode
from artfr_jax.models.vqgan import VQGAN, VectorQuantizer, code_usage_stats, nearest_code

TINY = dict(
    block_out_channels=(16, 32),
    attention_levels=(1,),
    latent_channels=8,
    num_embeddings=32,
    embedding_dim=4,
    norm_num_groups=8,
)
AUX_KEYS = {"vq_loss", "codebook_loss", "commit_loss", "perplexity", "usage", "indices"}


def random_variables(model, x, seed=0):
    """Deterministic random params from numpy (XLA-compiling ``model.init`` takes ~15 s on CPU)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def draw(path, a):
        name = jax.tree_util.keystr(path)
        if "codebook" in name:
            return jnp.asarray(rng.uniform(-1, 1, a.shape), jnp.float32)
        if "norm" in name and "scale" in name:
            return jnp.asarray(1 + 0.1 * rng.normal(size=a.shape), jnp.float32)
        fan_in = int(np.prod(a.shape[:-1])) or 1
        return jnp.asarray(rng.normal(size=a.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny():
    model = VQGAN(**TINY)
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
    return model, random_variables(model, x), x


def test_codebook_init_is_uniform_in_plus_minus_one_over_k():
    vq = VectorQuantizer(num_embeddings=64, embedding_dim=8)
    cb = vq.init(jax.random.key(0), jnp.zeros((1, 2, 2, 8)))["params"]["codebook"]
    assert cb.shape == (64, 8)
    assert float(jnp.max(jnp.abs(cb))) <= 1 / 64 and float(jnp.std(cb)) > 0.5 / 64 / np.sqrt(3)


def test_shapes_and_aux(tiny):
    model, variables, x = tiny
    recon, aux = model.apply(variables, x)
    assert recon.shape == (2, 32, 32, 3) and recon.dtype == jnp.float32
    assert set(aux) == AUX_KEYS
    assert aux["indices"].shape == (2, 16, 16) and aux["indices"].dtype == jnp.int32
    for k in AUX_KEYS - {"indices"}:
        assert aux[k].shape == () and np.isfinite(aux[k])
    z = model.apply(variables, x, method=VQGAN.encode)
    assert z.shape == (2, 16, 16, 4)
    assert model.apply(variables, aux["indices"], method=VQGAN.lookup).shape == (2, 16, 16, 4)
    assert variables["params"]["quantizer"]["codebook"].shape == (32, 4)
    assert variables["params"]["quant_conv"]["kernel"].shape == (1, 1, 8, 4)
    assert variables["params"]["post_quant_conv"]["kernel"].shape == (1, 1, 4, 8)


def test_straight_through_gradient_reaches_encoder(tiny):
    model, variables, x = tiny

    def loss(params):
        recon, _ = model.apply({"params": params}, x)
        return jnp.mean(recon**2)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    enc = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grads["encoder"])))
    assert float(enc) > 0
    assert float(jnp.abs(grads["quant_conv"]["kernel"]).sum()) > 0
    # The reconstruction loss alone does not move the codebook (only Eq. 3 does).
    assert float(jnp.abs(grads["quantizer"]["codebook"]).sum()) == 0

    # d zq / d z is the identity.
    vq = VectorQuantizer(num_embeddings=32, embedding_dim=4)
    z = jax.random.normal(jax.random.key(2), (2, 3, 3, 4))
    w = jax.random.normal(jax.random.key(3), z.shape)
    qparams = {"params": variables["params"]["quantizer"]}
    g = jax.grad(lambda z: jnp.sum(vq.apply(qparams, z)[0] * w))(z)
    np.testing.assert_allclose(g, w, rtol=1e-6)


def test_vq_loss_matches_eq3_by_hand():
    codebook = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    z = jnp.array([[[[0.1, 0.2], [0.9, -0.1]], [[0.2, 0.7], [0.8, 0.1]]]])  # [1, 2, 2, 2]
    beta = 0.25
    vq = VectorQuantizer(num_embeddings=3, embedding_dim=2, beta=beta)
    params = {"params": {"codebook": codebook}}
    zq, idx, aux = vq.apply(params, z)
    np.testing.assert_array_equal(idx, [[[0, 1], [2, 1]]])
    zq_hand = np.array([[[[0, 0], [1, 0]], [[0, 1], [1, 0]]]], np.float32)
    np.testing.assert_allclose(zq, zq_hand, atol=1e-7)
    mse = np.mean((np.asarray(z) - zq_hand) ** 2)  # (0.05+0.02+0.13+0.05)/8
    np.testing.assert_allclose(mse, 0.25 / 8, rtol=1e-6)
    np.testing.assert_allclose(aux["codebook_loss"], mse, rtol=1e-6)
    np.testing.assert_allclose(aux["commit_loss"], mse, rtol=1e-6)
    np.testing.assert_allclose(aux["vq_loss"], (1 + beta) * mse, rtol=1e-6)

    # Eq. 3 placement: weight 1 on the codebook term, beta on the commitment (encoder) term.
    def vq_loss(cb, z):
        return vq.apply({"params": {"codebook": cb}}, z)[2]["vq_loss"]

    g_cb, g_z = jax.grad(vq_loss, argnums=(0, 1))(codebook, z)
    n = z.size
    diff = (zq_hand - np.asarray(z)).reshape(-1, 2)
    g_cb_hand = np.zeros((3, 2), np.float32)
    np.add.at(g_cb_hand, np.asarray(idx).reshape(-1), 2 * diff / n)
    np.testing.assert_allclose(g_cb, g_cb_hand, rtol=1e-5, atol=1e-7)
    g_z_hand = beta * 2 * (np.asarray(z) - zq_hand) / n
    np.testing.assert_allclose(g_z, g_z_hand, rtol=1e-5, atol=1e-7)


def test_indices_equal_brute_force_argmin():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 5, 7, 16)).astype(np.float32)
    codebook = rng.normal(size=(100, 16)).astype(np.float32)
    brute = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
    idx = nearest_code(jnp.asarray(z), jnp.asarray(codebook))
    assert idx.dtype == jnp.int32 and idx.shape == (3, 5, 7)
    np.testing.assert_array_equal(idx, brute)


def test_perplexity_and_usage_on_known_histograms():
    s = code_usage_stats(jnp.array([[0, 0], [1, 1]]), 8)
    np.testing.assert_allclose(s["perplexity"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(s["usage"], 2 / 8)
    s = code_usage_stats(jnp.array([3, 3, 3, 5]), 16)
    p = np.array([0.75, 0.25])
    np.testing.assert_allclose(s["perplexity"], np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
    np.testing.assert_allclose(s["usage"], 2 / 16)
    s = code_usage_stats(jnp.arange(8), 8)
    np.testing.assert_allclose(s["perplexity"], 8.0, rtol=1e-6)
    np.testing.assert_allclose(s["usage"], 1.0)


def test_decode_indices_equals_decode_of_lookup(tiny):
    model, variables, x = tiny
    idx = jax.random.randint(jax.random.key(5), (2, 16, 16), 0, 32)
    a = model.apply(variables, idx, method=VQGAN.decode_indices)
    b = model.apply(
        variables, model.apply(variables, idx, method=VQGAN.lookup), method=VQGAN.decode
    )
    assert a.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    # Reconstruction through __call__ equals decoding its own indices.
    recon, aux = model.apply(variables, x)
    np.testing.assert_allclose(
        recon, model.apply(variables, aux["indices"], method=VQGAN.decode_indices), atol=1e-5
    )


def test_paper_config_param_count_and_shapes():
    model = VQGAN()
    x = jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    # Equal to diffusers' VQModel at the same configuration (see test_vqgan_parity.py).
    assert sum(a.size for a in jax.tree_util.tree_leaves(shapes)) == 72_672_835
    p = shapes["params"]
    assert p["quantizer"]["codebook"].shape == (1024, 256)
    assert p["quant_conv"]["kernel"].shape == (1, 1, 256, 256)
    assert "attn_0" in p["encoder"]["down_5"] and "attn_0" not in p["encoder"]["down_4"]
    assert "attn_0" in p["decoder"]["up_0"] and "downsample" not in p["encoder"]["down_5"]
    recon, aux = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(x.shape)), shapes)
    assert recon.shape == (1, 512, 512, 3) and aux["indices"].shape == (1, 16, 16)


def test_bfloat16_forward_is_finite(tiny):
    _, variables, x = tiny
    model = VQGAN(**TINY, dtype=jnp.bfloat16)
    recon, aux = jax.jit(model.apply)(variables, x)
    assert recon.dtype == jnp.float32  # images leave the model in float32, for the losses
    assert bool(jnp.all(jnp.isfinite(recon.astype(jnp.float32))))
    assert aux["vq_loss"].dtype == jnp.float32 and np.isfinite(aux["vq_loss"])
    # Indices may flip between near-equidistant codes, so compare decoding of fixed indices.
    idx = aux["indices"]
    dec = lambda m: jax.jit(partial(m.apply, method=VQGAN.decode_indices))(variables, idx)  # noqa: E731
    a, b = dec(model), dec(VQGAN(**TINY))
    assert a.dtype == jnp.float32
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 0.05


@pytest.mark.parametrize("mode", ["full", "matmuls", True])
def test_remat_matches_plain(mode):
    small = dict(TINY, block_out_channels=(8,), attention_levels=(0,), norm_num_groups=4)
    model, remat = VQGAN(**small), VQGAN(**small, remat=mode)
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
    variables = random_variables(model, x)

    def loss(m, params):
        recon, aux = m.apply({"params": params}, x)
        return jnp.mean(recon**2) + aux["vq_loss"]

    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(variables["params"])
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(variables["params"])
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_bad_inputs_raise_clear_errors(tiny):
    model, variables, _ = tiny
    with pytest.raises(ValueError, match=r"expected x of shape \[B, H, W, 3\]"):
        model.apply(variables, jnp.zeros((1, 32, 32, 4)))
    with pytest.raises(ValueError, match="multiples of 2"):
        model.apply(variables, jnp.zeros((1, 31, 32, 3)))
    with pytest.raises(ValueError, match="norm_num_groups=8 must divide"):
        VQGAN(**{**TINY, "block_out_channels": (16, 20)}).init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 3))
        )


def _group_norm(mode):
    """Group norm as the models compute it with the CPU kernels (hand-written backward) or XLA."""
    return lambda x, scale, bias, groups, eps: kernels_lib.group_norm(
        x, scale, bias, groups, eps, Kernels(mode)
    )


@pytest.mark.parametrize("mode", ["cpu", "xla"])
def test_group_norm_matches_reference_values_and_gradients(mode):
    group_norm = _group_norm(mode)
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 16)) * 3 + 1
    scale = 1 + 0.2 * jax.random.normal(jax.random.key(1), (16,))
    bias = 0.1 * jax.random.normal(jax.random.key(2), (16,))
    w = jax.random.normal(jax.random.key(3), x.shape)

    def reference(x, scale, bias):
        xg = x.reshape(2, -1, 4, 4)
        mean = xg.mean((1, 3), keepdims=True)
        var = xg.var((1, 3), keepdims=True)
        return ((xg - mean) / jnp.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias

    ours = lambda *a: group_norm(*a, 4, 1e-6)  # noqa: E731
    np.testing.assert_allclose(ours(x, scale, bias), reference(x, scale, bias), atol=1e-5)
    g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums=(0, 1, 2))(x, scale, bias)
    g_ref = jax.grad(lambda *a: jnp.sum(reference(*a) * w), argnums=(0, 1, 2))(x, scale, bias)
    for a, b in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # bfloat16 input: float32 statistics, cotangent returned in the input dtype.
    gx = jax.grad(lambda x: jnp.sum(ours(x, scale, bias) * w))(x.astype(jnp.bfloat16))
    assert gx.dtype == jnp.bfloat16
    np.testing.assert_allclose(gx.astype(jnp.float32), g_ref[0], atol=0.05)


@pytest.mark.parametrize("mode", ["cpu", "xla"])
@pytest.mark.parametrize("shape", [(1, 7, 1, 8), (1, 13, 8), (3, 4, 6, 8)])
def test_group_norm_any_position_count(shape, mode):
    """Positions are regrouped as N1 x N2 for the CPU's reductions (prime counts, rank 3 too)."""
    group_norm = _group_norm(mode)
    x = jax.random.normal(jax.random.key(0), shape) * 2 + 1
    w = jax.random.normal(jax.random.key(1), shape)
    ones, zeros = jnp.ones(shape[-1]), jnp.zeros(shape[-1])

    def reference(x):
        xg = x.reshape(shape[0], -1, 2, shape[-1] // 2)
        mean, var = xg.mean((1, 3), keepdims=True), xg.var((1, 3), keepdims=True)
        return ((xg - mean) / jnp.sqrt(var + 1e-6)).reshape(shape)

    ours = lambda x: group_norm(x, ones, zeros, 2, 1e-6)  # noqa: E731
    np.testing.assert_allclose(ours(x), reference(x), atol=1e-5)
    np.testing.assert_allclose(
        jax.grad(lambda x: jnp.sum(ours(x) * w))(x),
        jax.grad(lambda x: jnp.sum(reference(x) * w))(x),
        rtol=1e-4,
        atol=1e-5,
    )


def test_remat_modes_keep_what_they_say():
    """``matmuls`` keeps the convolution outputs (no more FLOPs than ``none``, fewer than ``full``,
    which recomputes them) and recomputes the norms and activations (less memory than ``none``)."""
    kw = dict(TINY, block_out_channels=(16, 32), norm_num_groups=4, kernels=Kernels("xla"))
    x = jnp.zeros((2, 32, 32, 3))
    params = random_variables(VQGAN(**kw), x)["params"]
    cost = {}
    for mode in ("none", "matmuls", "full"):
        model = VQGAN(**kw, remat=mode)

        def loss(p, model=model):
            recon, aux = model.apply({"params": p}, x)
            return jnp.mean(recon**2) + aux["vq_loss"]

        options = kernels_lib.compiler_options(jax.devices())
        compiled = jax.jit(jax.grad(loss)).lower(params).compile(compiler_options=options)
        cost[mode] = (
            compiled.cost_analysis()["flops"],
            compiled.memory_analysis().temp_size_in_bytes,
        )
    (f_none, t_none), (f_mm, t_mm), (f_full, _) = cost["none"], cost["matmuls"], cost["full"]
    assert f_mm < 1.02 * f_none and f_full > 1.05 * f_none, cost
    assert t_mm < 0.8 * t_none, cost


def test_remat_mode_names():
    assert [remat_mode(v) for v in (False, True, "off", "ON", "matmuls")] == [
        "none",
        "full",
        "none",
        "full",
        "matmuls",
    ]
    with pytest.raises(ValueError, match=r"config.model.remat='some'.*expected one of"):
        remat_mode("some")
