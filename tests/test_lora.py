"""LoRA (``models/lora.py``) and PEFT/diffusers LoRA files (``convert/peft_lora.py``).

A small linen model checks the mechanics (zero ``B`` is the identity, merged equals unmerged,
``unmerge`` inverts ``merge``, target matching, clear errors); a tiny diffusers
``UNet2DConditionModel`` with a PEFT adapter checks parity in both directions (PEFT file -> here,
here -> ``load_lora_adapter``); a jitted LoRA train step on the tiny UNet checks that only the
LoRA trains, and that the step on 8 simulated devices equals the 1-device step.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from flax import linen as nn

from artfr_jax.convert import peft_lora
from artfr_jax.models import layers, lora
from artfr_jax.models.cpu_kernels import CpuKernels
from artfr_jax.models.kernels import Kernels
from artfr_jax.train import sharding
from tests.test_unet_parity import _nchw, _nhwc, _randomise, _rel


def _tree_rel(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = sum(
        float(np.sum((np.float64(x) - np.float64(y)) ** 2)) for x, y in zip(la, lb, strict=True)
    )
    den = sum(float(np.sum(np.float64(y) ** 2)) for y in lb)
    return (num / den) ** 0.5


def _tree_equal(a, b):
    """Same structure and bit-identical leaves (compared in NumPy: eager jax ops per leaf shape
    compile one program each)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True)
    )


def _randomise_b(tree, seed, std=0.1):
    """Non-zero ``B`` factors (``init`` makes them zero), drawn in NumPy (quicker than compiling
    a draw per leaf shape)."""
    rng = np.random.default_rng(seed)

    def f(path, x):
        if path[-1].key != "lora_B":
            return x
        return (std * rng.standard_normal(x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(f, tree)


def _random_params(model, seed, *args):
    """Seeded normal(0, 0.1) params (norm scales 1 + normal) for ``model``, drawn in NumPy from
    the shapes of ``model.init`` (compiling the initialisers takes longer than the test)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def f(path, x):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return (base + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(f, shapes)


# ----------------------------------------------------------------------------- a small model


class Small(nn.Module):
    """A strided conv, a remat'ed residual block (two 3x3 convs), an upsampling conv, a Dense."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, kernels=Kernels("cpu", CpuKernels()))
        x = layers.Conv(8, (3, 3), strides=(2, 2), name="conv_in", **kw)(x)
        x = nn.remat(layers.ResnetBlock)(8, num_groups=2, name="block", **kw)(x)
        x = layers.Upsample(name="up", **kw)(x)
        return nn.Dense(5, dtype=self.dtype, name="proj")(x)


@pytest.fixture(scope="module")
def small():
    model = Small()
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    return model, _random_params(model, 0, x), x


def test_zero_b_is_base_and_merge_matches(small):
    model, params, x = small
    cfg = lora.LoraConfig(rank=2, alpha=4.0, target_modules=["conv_in", "conv1", "up.conv", "proj"])
    tree = lora.init(jax.random.key(2), params, cfg)
    assert jax.tree.map(jnp.shape, tree) == {
        "conv_in": {"lora_A": (3, 3, 3, 2), "lora_B": (1, 1, 2, 8)},
        "block": {"conv1": {"lora_A": (3, 3, 8, 2), "lora_B": (1, 1, 2, 8)}},
        "up": {"conv": {"lora_A": (3, 3, 8, 2), "lora_B": (1, 1, 2, 8)}},
        "proj": {"lora_A": (8, 2), "lora_B": (2, 5)},
    }
    bound = 1 / np.sqrt(3 * 3 * 3)  # kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))
    a = np.asarray(tree["conv_in"]["lora_A"])
    assert a.max() <= bound and a.min() >= -bound and a.std() > bound / 3

    run = jax.jit(lambda p, t: lora.apply(model, {"params": p, "lora": t}, x, scale=cfg.scale))
    base = jax.jit(model.apply)({"params": params}, x)
    np.testing.assert_array_equal(run(params, tree), base)  # B = 0: the base model exactly

    tree = _randomise_b(tree, 3)
    unmerged = run(params, tree)
    assert _rel(unmerged, base) > 1e-2  # the LoRA changes the output
    merged = jax.jit(model.apply)({"params": lora.merge(params, tree, cfg.scale)}, x)
    assert _rel(merged, unmerged) < 1e-5
    restored = lora.unmerge(lora.merge(params, tree, cfg.scale), tree, cfg.scale)
    assert _tree_rel(restored, params) < 1e-6
    untouched = lora.merge(params, tree, cfg.scale)["block"]["conv2"]["kernel"]
    assert untouched is params["block"]["conv2"]["kernel"]

    # a bfloat16 model computes the branch in bfloat16 from the float32 LoRA leaves
    bf16 = Small(dtype=jnp.bfloat16)
    out = jax.jit(lambda p, t: lora.apply(bf16, {"params": p, "lora": t}, x, scale=cfg.scale))(
        params, tree
    )
    assert out.dtype == jnp.bfloat16 and _rel(np.float32(out), unmerged) < 2e-2
    dense = nn.Dense(5, dtype=jnp.bfloat16, name="proj")
    variables = {"params": params["proj"], "lora": tree["proj"]}
    jaxpr = jax.make_jaxpr(lambda v: lora.apply(dense, v, jnp.ones((2, 8)), scale=2.0))(variables)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # W x, A x, B (A x)
    assert {v.aval.dtype for e in dots for v in e.invars} == {jnp.dtype(jnp.bfloat16)}


def test_target_matching(small):
    _, params, _ = small
    paths = lambda t: sorted(lora.target_paths(params, lora.LoraConfig(1, 1.0, t)))  # noqa: E731
    # a list entry matches the whole name or a '.'-suffix: 'conv' is up.conv, not conv_in
    assert paths(["conv"]) == [("up", "conv")]
    assert paths(("conv1", "block.conv2")) == [("block", "conv1"), ("block", "conv2")]
    # a string is a regular expression over the whole dotted name
    assert paths(r"block\.conv\d") == [("block", "conv1"), ("block", "conv2")]
    assert paths(r".*conv.*") == [
        ("block", "conv1"),
        ("block", "conv2"),
        ("conv_in",),
        ("up", "conv"),
    ]
    with pytest.raises(ValueError, match=r"target_modules='conv' matched none of the 5"):
        paths("conv")
    with pytest.raises(ValueError, match="matched none"):
        paths(["onv1", "norm1"])  # no partial names; norms are not Dense/Conv
    with pytest.raises(ValueError, match="rank"):
        lora.LoraConfig(0, 1.0, ["proj"])


class _Odd(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, x):
        if self.kind == "grouped":
            return nn.Conv(4, (3, 3), feature_group_count=2, name="c")(x)
        return nn.ConvTranspose(4, (3, 3), name="c")(x)


@pytest.mark.parametrize("kind, error", [("grouped", "grouped"), ("transpose", "ConvTranspose")])
def test_unsupported_layers_are_rejected(kind, error):
    model, x = _Odd(kind), jnp.ones((1, 4, 4, 4))
    params = model.init(jax.random.key(0), x)["params"]
    tree = lora.init(jax.random.key(1), params, lora.LoraConfig(2, 2.0, ["c"]))
    with pytest.raises((ValueError, TypeError), match=error):
        lora.apply(model, {"params": params, "lora": tree}, x, scale=1.0)


def test_wrong_shapes_are_rejected(small):
    model, params, x = small
    tree = lora.init(jax.random.key(2), params, lora.LoraConfig(2, 2.0, ["proj"]))
    tree["proj"]["lora_B"] = jnp.zeros((2, 6))
    with pytest.raises(ValueError, match=r"LoRA on proj: .* do not fit kernel \(8, 5\)"):
        lora.apply(model, {"params": params, "lora": tree}, x, scale=1.0)


# ------------------------------------------------------------------ parity with PEFT / diffusers

UNET_CONFIG = {
    "sample_size": 16,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 24,
    "norm_num_groups": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": [2, 4],
    "use_linear_projection": False,  # 1x1 conv proj_in/proj_out: Conv LoRA on 1x1 kernels
}
# 'conv' is the strided downsampler and the upsampler's conv; the rest as OSDFace's UNet LoRA
TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "conv1",
    "conv2",
    "conv",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
]


def _inputs(seed=0, batch=2, seq=5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((batch, seq, UNET_CONFIG["cross_attention_dim"])).astype(np.float32)
    return x, np.array([10, 700]), ctx


def _torch_out(model, x, t, ctx):
    with torch.no_grad():
        return _nhwc(model(_nchw(x), torch.as_tensor(t), torch.from_numpy(ctx)).sample)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random UNet saved without its adapter, the PEFT adapter (r=4, alpha=8, random
    factors) saved by diffusers' ``save_lora_weights``, and the torch outputs with the adapter."""
    import peft
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    unet = _randomise(UNet2DConditionModel(**UNET_CONFIG), 1)
    unet.save_pretrained(root / "unet")
    x, t, ctx = _inputs()
    base_out = _torch_out(unet, x, t, ctx)
    unet.add_adapter(
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    )
    StableDiffusionPipeline.save_lora_weights(
        root / "lora",
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    return {
        "root": root,
        "inputs": (x, t, ctx),
        "torch_out": _torch_out(unet, x, t, ctx),
        "torch_base_out": base_out,
    }


def test_peft_file_parity(saved):
    """A PEFT adapter saved by diffusers, merged by ``load_unet`` and applied unmerged, equals
    the torch model with the adapter."""
    from artfr_jax.convert import diffusers_sd

    root, (x, t, ctx) = saved["root"], saved["inputs"]
    file = root / "lora" / peft_lora.WEIGHT_NAME
    unet, base = diffusers_sd.load_unet(str(root / "unet"), kernels="xla")
    tree, cfg = peft_lora.load(file, base)
    assert (cfg.rank, cfg.scale) == (4, 2.0)  # lora_alpha from the file's metadata
    assert "down_blocks.0.downsamplers.0.conv" in cfg.target_modules
    assert tree["up_blocks_0"]["upsamplers_0"]["conv"]["lora_A"].shape == (3, 3, 64, 4)
    assert peft_lora.load(file, base, alpha=4.0)[1].scale == 1.0  # the argument wins

    _, merged = diffusers_sd.load_unet(str(root / "unet"), lora_weights=str(file), kernels="xla")
    with jax.default_matmul_precision("highest"):
        out_merged = jax.jit(unet.apply)({"params": merged}, x, t, ctx)
        out_lora = jax.jit(
            lambda p, tr: lora.apply(unet, {"params": p, "lora": tr}, x, t, ctx, scale=cfg.scale)
        )(base, tree)
    ref = saved["torch_out"]
    assert _rel(saved["torch_base_out"], ref) > 1e-2  # the adapter matters
    assert _rel(out_merged, ref) < 1e-4
    assert _rel(out_lora, ref) < 1e-4


def test_our_lora_in_diffusers(saved, tmp_path):
    """A LoRA made here (one module with another rank) saved by ``peft_lora.save`` and loaded by
    diffusers' ``load_lora_adapter`` on a fresh model equals our unmerged output; the file reads
    back unchanged."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from artfr_jax.convert import diffusers_sd

    root, (x, t, ctx) = saved["root"], saved["inputs"]
    unet, base = diffusers_sd.load_unet(str(root / "unet"), kernels="xla")
    cfg = lora.LoraConfig(rank=4, alpha=2.0, target_modules=r".*(to_[qkv]|to_out\.0|conv\d?)")
    tree = _randomise_b(lora.init(jax.random.key(5), base, cfg), 6)
    odd = tree["mid_block"]["resnets_0"]["conv1"]  # rank 2 there, the scale kept by alpha_pattern
    odd["lora_A"], odd["lora_B"] = odd["lora_A"][..., :2], odd["lora_B"][..., :2, :]
    file = peft_lora.save(tmp_path, tree, cfg)
    folded = peft_lora.save(tmp_path / "folded.safetensors", tree, cfg, fold_scale=True)

    # what pipe.load_lora_weights does; diffusers reads the metadata where it reads the file as
    # safetensors (load_lora_adapter(file) without weight_name does not: alpha = r there)
    tm = UNet2DConditionModel.from_pretrained(root / "unet").eval()
    sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(tmp_path, return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(sd, alphas, tm, metadata=meta)
    assert tm.mid_block.resnets[0].conv1.r["default_0"] == 2
    assert tm.mid_block.resnets[0].conv1.scaling["default_0"] == cfg.scale
    tm_folded = UNet2DConditionModel.from_pretrained(root / "unet").eval()
    tm_folded.load_lora_adapter(folded, prefix="unet")
    with jax.default_matmul_precision("highest"):
        out = jax.jit(
            lambda p, tr: lora.apply(unet, {"params": p, "lora": tr}, x, t, ctx, scale=cfg.scale)
        )(base, tree)
    assert _rel(saved["torch_base_out"], out) > 1e-2  # the LoRA matters
    assert _rel(out, _torch_out(tm, x, t, ctx)) < 1e-4
    assert _rel(out, _torch_out(tm_folded, x, t, ctx)) < 1e-4

    back, back_cfg = peft_lora.load(file, base)
    assert back_cfg.scale == cfg.scale and back_cfg.rank == 4
    assert _tree_equal(back, tree)
    with pytest.raises(ValueError, match="per-module scales alpha/r differ"):
        peft_lora.load(file, base, alpha=2.0)  # one alpha for ranks 4 and 2: two scales
    # save_lora_adapter's layout (no prefixes) reads back with or without a prefix asked for
    bare = peft_lora.save(tmp_path / "bare.safetensors", tree, cfg, prefix=None)
    for prefix in (None, "unet"):
        back, back_cfg = peft_lora.load(bare, base, prefix=prefix)
        assert back_cfg.scale == cfg.scale and _tree_equal(back, tree)


def test_load_errors(saved, tmp_path):
    from safetensors.numpy import save_file

    from artfr_jax.convert import diffusers_sd

    _, base = diffusers_sd.load_unet(str(saved["root"] / "unet"), kernels="xla")
    sd, _ = peft_lora.read(saved["root"] / "lora")
    cases = {
        "unknown": (
            {
                **sd,
                "unet.mid_block.nope.lora_A.weight": np.zeros((4, 8)),
                "unet.mid_block.nope.lora_B.weight": np.zeros((8, 4)),
            },
            "no Dense/Conv module 'mid_block.nope'",
        ),
        "shape": (
            {**sd, "unet.mid_block.resnets.0.conv1.lora_A.weight": np.zeros((4, 5, 3, 3))},
            r"'unet\.mid_block\.resnets\.0\.conv1\.lora_A\.weight'.*do not fit",
        ),
        "alone": ({"unet.conv_in.lora_A.weight": np.zeros((4, 4, 3, 3))}, "both"),
        "kohya": ({"lora_unet_down_blocks_0.lora_down.weight": np.zeros((4, 4))}, "kohya"),
    }
    for name, (bad, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: np.asarray(v, np.float32) for k, v in bad.items()}, path)
        with pytest.raises(ValueError, match=match):
            peft_lora.load(path, base)
    # diffusers' older '.lora.down/.lora.up' keys, no prefix and no metadata: scale 1
    old = {
        k.removeprefix("unet.").replace("lora_A", "lora.down").replace("lora_B", "lora.up"): v
        for k, v in sd.items()
    }
    save_file(old, tmp_path / "old.safetensors")
    tree, cfg = peft_lora.load(tmp_path / "old.safetensors", base)
    assert cfg.scale == 1.0 and cfg.rank == 4
    ref, _ = peft_lora.load(saved["root"] / "lora", base)
    assert _tree_equal(tree, ref)
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pickles"):
        peft_lora.load(tmp_path / "x.bin", base)


# ------------------------------------------------------------------------------- training


def _train_step(unet, scale, tx):
    def loss_fn(lora_params, params, batch):
        variables = {"params": params, "lora": lora_params}
        y = lora.apply(unet, variables, batch["x"], batch["t"], batch["ctx"], scale=scale)
        return jnp.mean((y - batch["target"]) ** 2)

    def step(lora_params, opt_state, params, batch):
        loss, grads = jax.value_and_grad(loss_fn)(lora_params, params, batch)
        updates, opt_state = tx.update(grads, opt_state, lora_params)
        return optax.apply_updates(lora_params, updates), opt_state, loss

    return step


def _run(step, lora_params, opt_state, params, batch, n=3):
    losses = []
    for _ in range(n):
        lora_params, opt_state, loss = step(lora_params, opt_state, params, batch)
        losses.append(float(loss))
    return lora_params, opt_state, losses


def test_lora_train_step_and_sharding():
    """3 jitted Adam steps on the LoRA of a one-level UNet: only the LoRA trains and the
    optimizer holds LoRA-shaped leaves; the step on a (data=4, fsdp=2) mesh equals 1 device."""
    from artfr_jax.models.unet import UNet

    unet = UNet(
        block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        layers_per_block=1,
        attention_head_dim=2,
        cross_attention_dim=8,
        norm_num_groups=8,
        kernels=Kernels("xla"),
    )
    rng = np.random.default_rng(1)
    batch = {
        "x": rng.standard_normal((8, 8, 8, 4), np.float32),
        "t": rng.integers(0, 1000, (8,)),
        "ctx": rng.standard_normal((8, 3, 8), np.float32),
        "target": rng.standard_normal((8, 8, 8, 4), np.float32),
    }
    params = _random_params(unet, 2, batch["x"][:1], 1, batch["ctx"][:1])
    cfg = lora.LoraConfig(rank=4, alpha=4.0, target_modules=["to_q", "to_v", "conv2", "proj_out"])
    lora_params = lora.init(jax.random.key(0), params, cfg)
    tx = optax.adam(1e-2)
    step = _train_step(unet, cfg.scale, tx)
    opt_state = tx.init(lora_params)
    lora_shapes = {x.shape for x in jax.tree.leaves(lora_params)}
    assert all(x.shape in lora_shapes | {()} for x in jax.tree.leaves(opt_state))
    params_before = jax.tree.map(np.array, params)

    one = jax.device_put((lora_params, opt_state, params, batch), jax.devices()[0])
    out1, opt1, losses1 = _run(jax.jit(step), *one)
    assert losses1[-1] < losses1[0]
    assert _tree_equal(params, params_before)
    assert _tree_rel(out1, lora_params) > 1e-3  # the LoRA trained
    assert all(x.shape in lora_shapes | {()} for x in jax.tree.leaves(opt1))

    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2)))
    state_sh = sharding.state_shardings(jax.eval_shape(lambda: (lora_params, opt_state)), mesh)
    params_sh = sharding.state_shardings(jax.eval_shape(lambda: params), mesh, min_size=2**10)
    batch_sh = jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch)
    with jax.set_mesh(mesh):
        sharded = jax.jit(
            step,
            in_shardings=(*state_sh, params_sh, batch_sh),
            out_shardings=(*state_sh, sharding.replicated(mesh)),
        )
        placed = jax.device_put(
            (lora_params, opt_state, params, batch), (*state_sh, params_sh, batch_sh)
        )
        out8, _, losses8 = _run(sharded, *placed)
    assert np.allclose(losses8, losses1, rtol=1e-5)
    assert _tree_rel(out8, out1) < 1e-5
