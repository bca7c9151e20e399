"""OSDFace's visual representation embedder (Sec. 3.2, Eqs. 5-6, 9-10) on tiny configs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artfr_jax.losses.association import LOGIT_SCALE_INIT, LogitScale, association_loss
from artfr_jax.models.kernels import Kernels
from artfr_jax.models.osdface import (
    NUM_PROMPT_TOKENS,
    PromptProjection,
    VisualRepresentationEmbedder,
    make_vre,
    nearest_codes,
    select_prompt_codes,
    visual_prompt,
    vre_autoencoder_kwargs,
)
from artfr_jax.models.vqgan import VQGAN, nearest_code

T = NUM_PROMPT_TOKENS


def reference_prompt_codes(codes, distances, num_tokens=T):
    """The official greedy loop: positions by ascending distance, each code at its first sight."""
    selected = []
    for i in np.argsort(distances, kind="stable"):
        if int(codes[i]) not in selected:
            selected.append(int(codes[i]))
        if len(selected) == num_tokens:
            break
    return selected


def random_tokens(rng, batch, n, num_codes, tie_levels=None):
    codes = rng.integers(0, num_codes, (batch, n)).astype(np.int32)
    if tie_levels:  # few distinct distances: many ties, resolved by position
        distances = rng.integers(0, tie_levels, (batch, n)).astype(np.float32)
    else:
        distances = rng.uniform(0, 10, (batch, n)).astype(np.float32)
    return codes, distances


@pytest.mark.parametrize(
    "num_codes,tie_levels",
    [(40, None), (300, None), (1024, 5)],
    ids=["fewer-distinct", "more-distinct", "ties"],
)
def test_prompt_codes_match_the_greedy_loop_per_example_and_in_one_jit(num_codes, tie_levels):
    rng = np.random.default_rng(num_codes)
    codes, distances = random_tokens(rng, 3, 256, num_codes, tie_levels)
    selected, mask = jax.jit(select_prompt_codes)(codes, distances)
    assert selected.shape == (3, T) and mask.shape == (3, T)
    for b in range(3):
        ref = reference_prompt_codes(codes[b], distances[b])
        k = len(ref)
        assert int(mask[b].sum()) == k and bool(mask[b, :k].all())
        np.testing.assert_array_equal(np.asarray(selected[b, :k]), ref)
        one_sel, one_mask = select_prompt_codes(codes[b : b + 1], distances[b : b + 1])
        np.testing.assert_array_equal(np.asarray(one_sel[0]), np.asarray(selected[b]))
        np.testing.assert_array_equal(np.asarray(one_mask[0]), np.asarray(mask[b]))
    if num_codes == 40:
        assert int(mask.sum(axis=1).max()) <= 40
    else:
        assert bool(mask.all())


def test_visual_prompt_rows_are_distinct_codes_by_distance_then_zeros():
    rng = np.random.default_rng(0)
    codebook = jnp.asarray(rng.normal(size=(50, 6)), jnp.float32)
    # 16 x 16 positions over 10 codes; the distance of each position is unique.
    codes = rng.integers(0, 10, (2, 16, 16)).astype(np.int32)
    distances = rng.permutation(512).reshape(2, 16, 16).astype(np.float32)
    prompt, mask = jax.jit(visual_prompt)(codes, distances, codebook)
    assert prompt.shape == (2, T, 6) and prompt.dtype == jnp.float32
    for b in range(2):
        k = len(np.unique(codes[b]))
        assert int(mask[b].sum()) == k
        np.testing.assert_array_equal(np.asarray(prompt[b, k:]), 0.0)
        c, d = codes[b].ravel(), distances[b].ravel()
        closest = [d[c == q].min() for q in range(10) if (c == q).any()]
        order = [q for q in range(10) if (c == q).any()]
        expected = np.asarray(order)[np.argsort(closest)]
        np.testing.assert_array_equal(np.asarray(prompt[b, :k]), np.asarray(codebook)[expected])


def test_exactly_num_tokens_nearest_when_all_codes_distinct():
    rng = np.random.default_rng(1)
    codes = np.stack([rng.permutation(1024)[:256] for _ in range(2)]).astype(np.int32)
    distances = rng.uniform(size=(2, 256)).astype(np.float32)
    selected, mask = select_prompt_codes(codes, distances)
    assert bool(mask.all())
    for b in range(2):
        np.testing.assert_array_equal(
            np.asarray(selected[b]), codes[b][np.argsort(distances[b])][:T]
        )


def test_nearest_codes_agree_with_the_vqgan_lookup():
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.normal(size=(2, 4, 4, 8)), jnp.float32)
    codebook = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    codes, dist = nearest_codes(z, codebook)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(nearest_code(z, codebook)))
    brute = ((np.asarray(z)[..., None, :] - np.asarray(codebook)) ** 2).sum(-1)
    np.testing.assert_allclose(np.asarray(dist), brute.min(-1), rtol=1e-4, atol=1e-4)


def reference_association(z_hq, z_lq, s, group_size):
    """Eqs. 9-10 in NumPy (float64), DAEFR's flattening within each group of images."""
    b, c = z_hq.shape[0], z_hq.shape[-1]
    g = b if group_size is None else group_size
    losses = []
    for i in range(0, b, g):
        h = z_hq[i : i + g].reshape(-1, c).astype(np.float64)
        lq = z_lq[i : i + g].reshape(-1, c).astype(np.float64)
        h /= np.linalg.norm(h, axis=1, keepdims=True)
        lq /= np.linalg.norm(lq, axis=1, keepdims=True)
        logits = np.exp(s) * h @ lq.T

        def ce(m):
            m = m - m.max(axis=1, keepdims=True)
            logp = m - np.log(np.exp(m).sum(axis=1, keepdims=True))
            return -np.mean(np.diag(logp))

        losses.append((ce(logits) + ce(logits.T)) / 2)
    return float(np.mean(losses))


@pytest.mark.parametrize("group_size", [1, 2, None])
def test_association_loss_matches_numpy_reference(group_size):
    rng = np.random.default_rng(3)
    z_hq = rng.normal(size=(4, 3, 3, 8)).astype(np.float32)
    z_lq = (z_hq + 0.5 * rng.normal(size=z_hq.shape)).astype(np.float32)
    s = 1.3
    got = jax.jit(association_loss, static_argnames="group_size")(
        z_hq, z_lq, jnp.float32(s), group_size=group_size
    )
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(
        float(got), reference_association(z_hq, z_lq, s, group_size), rtol=1e-5
    )


def test_association_loss_prefers_aligned_pairs_and_is_float32_for_bf16():
    rng = np.random.default_rng(4)
    z_hq = rng.normal(size=(2, 4, 4, 16)).astype(np.float32)
    z_lq = z_hq + 0.3 * rng.normal(size=z_hq.shape).astype(np.float32)
    s = LogitScale().apply(LogitScale().init(jax.random.key(0)))
    assert math.isclose(float(s), math.log(1 / 0.07), rel_tol=1e-6) and s.dtype == jnp.float32
    assert math.isclose(LOGIT_SCALE_INIT, math.log(1 / 0.07))
    shuffled = z_lq.reshape(2, 16, 16)[:, rng.permutation(16)].reshape(z_lq.shape)
    aligned = association_loss(z_hq, z_lq, s)
    assert float(aligned) < float(association_loss(z_hq, shuffled, s))
    low = association_loss(jnp.asarray(z_hq, jnp.bfloat16), jnp.asarray(z_lq, jnp.bfloat16), s)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(float(low), float(aligned), rtol=0.05)
    grad = jax.grad(lambda t: association_loss(z_hq, z_lq, t))(s)
    assert np.isfinite(float(grad)) and float(grad) != 0.0
    with pytest.raises(ValueError, match="group_size"):
        association_loss(z_hq, z_lq, s, group_size=3)


# Tiny VRE: two levels, 32 px -> 16 x 16 = 256 tokens, plain XLA kernels (fast to compile).
TINY = vre_autoencoder_kwargs(
    base_channels=16,
    channel_multipliers=(1, 2),
    layers_per_block=1,
    latent_channels=8,
    num_embeddings=512,
    embedding_dim=8,
    norm_num_groups=8,
)


def random_variables(shapes, seed=0):
    """Random params from NumPy (skips compiling ``init``); codes spread like the features."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        name = jax.tree_util.keystr(path)
        if "codebook" in name:
            return jnp.asarray(rng.normal(size=a.shape), jnp.float32)
        fan_in = int(np.prod(a.shape[:-1])) or 1
        return jnp.asarray(rng.normal(size=a.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def test_tiny_vre_branches_and_prompt_path():
    vre = make_vre(**TINY, kernels=Kernels("xla"))
    assert isinstance(vre, VisualRepresentationEmbedder)
    rng = np.random.default_rng(5)
    hq = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    lq = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    variables = random_variables(jax.eval_shape(vre.init, jax.random.key(0), hq, lq))
    assert set(variables["params"]) == {"hq", "lq"}

    out = jax.jit(vre.apply)(variables, hq, lq)
    for name in ("hq", "lq"):
        assert out[f"{name}_recon"].shape == (2, 32, 32, 3)
        assert out[f"{name}_features"].shape == (2, 16, 16, 8)
        assert out[f"{name}_aux"]["indices"].shape == (2, 16, 16)
        assert bool(jnp.isfinite(out[f"{name}_recon"]).all())
    # A branch's params are a plain VQGAN's.
    plain = VQGAN(**TINY, kernels=Kernels("xla"))
    z_lq = plain.apply({"params": variables["params"]["lq"]}, lq, method=VQGAN.encode)
    np.testing.assert_allclose(np.asarray(z_lq), np.asarray(out["lq_features"]), atol=1e-5)

    def prompt_path(variables, proj_params, lq):
        codes, _ = vre.apply(variables, lq, method="tokenize")
        p, mask = vre.apply(variables, lq, method="prompt")
        return codes, p, mask, PromptProjection().apply({"params": proj_params}, p)

    proj = PromptProjection()
    proj_params = proj.init(jax.random.key(1), jnp.zeros((1, T, 8)))["params"]
    codes, p, mask, context = jax.jit(prompt_path)(variables, proj_params, lq)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(out["lq_aux"]["indices"]))
    assert p.shape == (2, T, 8) and mask.shape == (2, T)
    assert context.shape == (2, T, 1024) and context.dtype == jnp.float32
    for b in range(2):
        k = min(len(np.unique(np.asarray(codes[b]))), T)
        assert int(mask[b].sum()) == k
    codebook = np.asarray(variables["params"]["lq"]["quantizer"]["codebook"])
    rows = np.asarray(p[0][np.asarray(mask[0])])
    assert all((codebook == r).all(axis=1).any() for r in rows)


def test_prompt_projection_names_shapes_and_pytorch_conv1d_parity():
    torch = pytest.importorskip("torch")
    proj = PromptProjection(hidden_features=6, features=10)
    p = np.random.default_rng(6).normal(size=(2, T, 12)).astype(np.float32)
    params = proj.init(jax.random.key(0), p)["params"]
    assert jax.tree.map(jnp.shape, params) == {
        "conv1": {"kernel": (12, 6), "bias": (6,)},
        "conv2": {"kernel": (6, 10), "bias": (10,)},
    }
    # PyTorch Conv1d's default init: U(+-1/sqrt(fan_in)).
    assert float(jnp.abs(params["conv1"]["kernel"]).max()) <= 1 / math.sqrt(12)
    assert float(jnp.abs(params["conv2"]["bias"]).max()) <= 1 / math.sqrt(6)
    assert float(jnp.abs(params["conv2"]["bias"]).max()) > 0
    conv1, conv2 = torch.nn.Conv1d(12, 6, 1), torch.nn.Conv1d(6, 10, 1)
    with torch.no_grad():
        for conv, name in ((conv1, "conv1"), (conv2, "conv2")):
            conv.weight.copy_(
                torch.from_numpy(np.array(params[name]["kernel"]).T[:, :, None].copy())
            )
            conv.bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))
        x = torch.from_numpy(p).permute(0, 2, 1)
        ref = torch.nn.functional.silu(conv2(torch.nn.functional.silu(conv1(x))))
    np.testing.assert_allclose(
        np.asarray(proj.apply({"params": params}, p)), ref.permute(0, 2, 1).numpy(), atol=1e-5
    )


def test_paper_vre_shapes_and_parameter_count():
    kwargs = vre_autoencoder_kwargs()
    assert kwargs["block_out_channels"] == (64, 128, 128, 128, 256, 512)
    vre = make_vre(**kwargs)
    x = jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32)
    shapes = jax.eval_shape(vre.init, jax.random.key(0), x, x)
    (codes, _), (p, _) = jax.eval_shape(
        lambda v, x: (vre.apply(v, x, method="tokenize"), vre.apply(v, x, method="prompt")),
        shapes,
        x,
    )
    assert codes.shape == (1, 16, 16)  # 256 tokens
    assert p.shape == (1, T, 512)
    assert shapes["params"]["lq"]["quantizer"]["codebook"].shape == (1024, 512)
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
    print(f"paper VRE parameters: {count:,} ({count // 2:,} per branch)")
    assert count == 140_751_494
