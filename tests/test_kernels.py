"""The one kernel switch (models/kernels.py): 'auto' gives the CPU kernels only to programs lowered
for the CPU (a TPU program lowered on this CPU host gets plain XLA ops), every layer of every network
follows the model's ``kernels`` field, and the modes agree numerically."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artfr_jax.models import factory
from artfr_jax.models.discriminators import PatchDiscriminator
from artfr_jax.models.kernels import Kernels, compiler_options
from artfr_jax.models.vqgan import VQGAN
from configs import art as art_config
from configs import vqfr as vqfr_config

# The custom VJPs of the CPU kernels, as jaxprs name them.
CPU_KERNELS = ("name=group_norm", "name=_conv", "name=_phase_conv", "name=_blocked")

# Big enough for every CPU kernel at its default sizes: a 64x64x64 level (Winograd 3x3 and banded
# or patch weight gradients), a 32x32x64 -> 64x64 upsampling (phase convolution) and attention
# over 32x32 positions (query blocks).
MODEL = VQGAN(
    block_out_channels=(64, 64),
    layers_per_block=1,
    attention_levels=(1,),
    latent_channels=16,
    num_embeddings=32,
    embedding_dim=8,
    norm_num_groups=16,
)
X = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)


def _fwd_bwd(model):
    def loss(params, x):
        recon, aux = model.apply({"params": params}, x)
        return jnp.mean(jnp.square(recon - x)) + aux["vq_loss"]

    return jax.value_and_grad(loss)


def _params():
    return jax.eval_shape(lambda: MODEL.init(jax.random.key(0), jnp.zeros(X.shape))["params"])


def _convolutions(model, platform: str) -> int:
    """Convolutions left in the optimised program of ``model``'s training gradient lowered for
    ``platform`` (compiled here, on the CPU: the ops are generic)."""
    fn = jax.jit(_fwd_bwd(model))
    lowered = fn.trace(_params(), X).lower(lowering_platforms=(platform,))
    return lowered.compile().as_text().count(" convolution(")


def test_tpu_program_lowered_on_a_cpu_host_gets_plain_xla_ops():
    xla = _convolutions(MODEL.clone(kernels=Kernels("xla")), "cpu")
    tpu = _convolutions(MODEL, "tpu")  # 'auto', the default
    cpu = _convolutions(MODEL, "cpu")
    assert tpu == xla
    assert cpu < xla - 5, (cpu, xla)  # Winograd, patch and phase kernels replaced convolutions


def test_modes_agree_and_auto_is_the_cpu_kernels_here():
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, X.shape), jnp.float32)
    params = MODEL.init(jax.random.key(0), x)["params"]
    out = {}
    for mode in ("auto", "cpu", "xla"):
        loss, grads = jax.jit(_fwd_bwd(MODEL.clone(kernels=Kernels(mode))))(params, x)
        out[mode] = (loss, grads)
    for a, b in zip(jax.tree.leaves(out["auto"]), jax.tree.leaves(out["cpu"]), strict=True):
        np.testing.assert_array_equal(a, b)
    total = float(optax_norm(out["cpu"][1]))
    np.testing.assert_allclose(out["xla"][0], out["cpu"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out["xla"][1]), jax.tree.leaves(out["cpu"][1]), strict=True):
        # Leaves whose true gradient is ~0 (the attention's key bias) are round-off on both sides.
        err = float(jnp.linalg.norm(a - b))
        assert err <= 1e-3 * float(jnp.linalg.norm(b)) + 1e-6 * total, err


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _networks(kernels: Kernels):
    """(network, example inputs) for every network with CPU-kernel layers, under ``kernels``."""
    vqfr = vqfr_config.get_config("tiny")
    vqfr.model.kernels = kernels.mode
    art = art_config.get_config("tiny")
    art.model.kernels = kernels.mode
    tokenizer = factory.tokenizer(art.stage1.config.model.to_dict(), art.model.to_dict())
    x = jnp.zeros((2, 32, 32, 3))
    tokens = jnp.zeros((2, (32 // tokenizer.downsample_factor) ** 2), jnp.int32)
    return [
        (MODEL.clone(kernels=kernels), (jnp.zeros(X.shape),)),
        (factory.vqfr(vqfr), (x,)),
        (factory.tokenizer(vqfr.stage1.config.model.to_dict(), vqfr.model.to_dict()), (x,)),
        (factory.art(art, tokenizer), (x, tokens)),
        (PatchDiscriminator(base_features=8, num_layers=2, kernels=kernels), (x,)),
    ]


@pytest.mark.parametrize("mode", ["xla", "cpu"])
def test_every_layer_follows_the_networks_kernels(mode):
    for net, args in _networks(Kernels(mode)):
        params = jax.eval_shape(lambda n=net, a=args: n.init(jax.random.key(0), *a))
        text = str(jax.make_jaxpr(net.apply)(params, *args))
        found = [k for k in CPU_KERNELS if k in text]
        if mode == "xla":
            assert not found, (type(net).__name__, found)
        else:
            assert "name=_conv" in text, type(net).__name__
            norms = "name=group_norm" in text
            assert norms or isinstance(net, PatchDiscriminator), type(net).__name__


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match=r"config.model.kernels='gpu': expected one of"):
        Kernels("gpu")
    config = art_config.get_config("tiny")
    config.model.kernels = "fast"
    with pytest.raises(ValueError, match=r"config.model.kernels='fast'"):
        factory.policy(config.model)


def test_compiler_options_follow_the_devices():
    assert compiler_options(jax.devices()[:1]) == {"xla_disable_hlo_passes": "cse_barrier_expander"}
    tpu = [SimpleNamespace(platform="tpu")] * 4
    assert compiler_options(tpu) is None


def test_under_a_mesh_its_devices_decide_at_trace_time():
    """The training loop traces under ``jax.set_mesh``: 'auto' then takes the mesh's platform
    (only the chosen form is traced); without a mesh both forms wait for the lowering."""
    from artfr_jax.train import sharding
    from configs import vqgan as vqgan_config

    x = jnp.zeros(X.shape)

    def jaxpr(model):
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
        return str(jax.make_jaxpr(model.apply)(params, x))

    assert "platform_index" in jaxpr(MODEL)
    mesh = sharding.make_mesh(vqgan_config.get_config("tiny").mesh, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        text = jaxpr(MODEL)
    assert "platform_index" not in text and "name=group_norm" in text
