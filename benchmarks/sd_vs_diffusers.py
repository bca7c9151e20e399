"""Stable Diffusion 2.1-base UNet and VAE against diffusers on the same weights, and the compiled
memory of a LoRA train step against full fine-tuning.

  python -m benchmarks.sd_vs_diffusers                    # all three parts
  python -m benchmarks.sd_vs_diffusers --parts=unet,vae --repeats=5

Random weights (torch's default initialisation, seed 0) in diffusers' SD-2.1-base configuration,
copied into ours with the converter; every timing part first prints the relative difference of the
outputs. Parts:

  unet:   UNet forward, ``--latent``-px latents (64 = 512-px images), batch ``--batch``, text
          context 77 x 1024, t = 399;
  vae:    VAE encode (posterior mean) + decode at ``--image`` px;
  memory: ``memory_analysis()`` of one compiled train step (MSE of the UNet's output to a
          target, AdamW, the trained state donated) training every parameter, and training a
          rank-``--rank`` LoRA of the attention, feed-forward, projection and ResNet layers (the
          base a frozen argument, stored in ``--frozen_dtype``); ``--dtype``, ``--remat``.

Times are the median (and min) over ``--repeats`` interleaved runs after ``--warmup`` runs; JAX
compile times apart. JAX traces under a one-device mesh as the framework's commands do, so the
kernel switch's 'auto' takes the CPU kernels on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from artfr_jax.convert import diffusers_sd  # noqa: E402
from artfr_jax.models import kernels, lora  # noqa: E402
from artfr_jax.models.unet import UNet  # noqa: E402
from artfr_jax.models.vae import AutoencoderKL  # noqa: E402
from artfr_jax.utils import compile_cache, host_memory  # noqa: E402
from benchmarks.vqgan_vs_diffusers import timed  # noqa: E402

# diffusers' config.json of stabilityai/stable-diffusion-2-1-base, unet/ and vae/.
SD21_BASE_UNET = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "sample_size": 64,
    "use_linear_projection": True,
}
SD21_BASE_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}
# The LoRA targets of OSDFace / diffusers' SD LoRA training scripts.
LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _nchw(x: np.ndarray):
    import torch  # noqa: PLC0415

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(
        np.asarray(jax.devices()[:1]), ("batch",), axis_types=(jax.sharding.AxisType.Auto,)
    )


def _compile(fn, *args, donate_argnums=()):
    t = time.perf_counter()
    mesh = _mesh()
    # On the CPU, remat needs the compiler options the trainers compile with (models/kernels.py).
    options = kernels.compiler_options(mesh.devices.flat)
    with jax.set_mesh(mesh):
        lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*args)
        compiled = lowered.compile(compiler_options=options)
    return compiled, time.perf_counter() - t


def _report(name: str, t: dict, ours: str, theirs: str) -> None:
    for stat in ("median", "min"):
        a, b = t[ours][stat], t[theirs][stat]
        print(
            f"{name} {stat:6s}: jax {a * 1e3:9.1f} ms  diffusers {b * 1e3:9.1f} ms  "
            f"ratio jax/diffusers {a / b:.2f}"
        )


def _inputs(args):
    rng = np.random.default_rng(0)
    b, s = args.batch, args.latent
    latents = rng.standard_normal((b, s, s, 4)).astype(np.float32)
    context = rng.standard_normal((b, 77, 1024)).astype(np.float32)
    t = np.full((b,), 399, np.int32)
    return latents, context, t


def _torch_unet():
    import torch  # noqa: PLC0415
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    torch.manual_seed(0)
    tm = UNet2DConditionModel(**SD21_BASE_UNET).eval()
    kwargs = diffusers_sd.unet_kwargs_from_diffusers_config(SD21_BASE_UNET)
    params = diffusers_sd.convert_unet_state_dict(tm.state_dict(), kwargs)
    return tm, kwargs, params


def bench_unet(args, tm, kwargs, params) -> None:
    import torch  # noqa: PLC0415

    model = UNet(**kwargs)
    params = jax.device_put(params)
    latents, context, t = _inputs(args)
    n = sum(p.numel() for p in tm.parameters())
    print(f"unet: {n / 1e6:.1f}M params, latents {latents.shape} (NHWC), context {context.shape}")
    fwd = lambda p, x, t, c: model.apply({"params": p}, x, t, c)  # noqa: E731
    compiled, seconds = _compile(fwd, params, latents, t, context)
    print(f"unet: jax compile {seconds:.1f} s")
    run_jax = lambda: jax.block_until_ready(compiled(params, latents, t, context))  # noqa: E731
    xt, ct, tt = _nchw(latents), torch.from_numpy(context), torch.from_numpy(t)

    def run_torch():
        with torch.no_grad():
            return tm(xt, tt, encoder_hidden_states=ct).sample

    ref = run_torch().numpy().transpose(0, 2, 3, 1)
    print(f"unet: rel. difference of the outputs {_rel(run_jax(), ref):.2e}")
    times = timed({"jax": run_jax, "torch": run_torch}, args.warmup, args.repeats)
    _report("unet forward", times, "jax", "torch")


def bench_vae(args) -> None:
    import torch  # noqa: PLC0415
    from diffusers import AutoencoderKL as TorchVAE  # noqa: PLC0415

    torch.manual_seed(0)
    tm = TorchVAE(**SD21_BASE_VAE).eval()
    kwargs = diffusers_sd.vae_kwargs_from_diffusers_config(SD21_BASE_VAE)
    params = jax.device_put(diffusers_sd.convert_vae_state_dict(tm.state_dict(), kwargs))
    model = AutoencoderKL(**kwargs)
    x = np.random.default_rng(1).uniform(-1, 1, (args.batch, args.image, args.image, 3))
    x = x.astype(np.float32)

    def fwd(p, x):
        mean, _ = model.apply({"params": p}, x, method="encode")
        return model.apply({"params": p}, mean, method="decode")

    compiled, seconds = _compile(fwd, params, x)
    print(f"vae: {x.shape} (NHWC); jax compile {seconds:.1f} s")
    run_jax = lambda: jax.block_until_ready(compiled(params, x))  # noqa: E731
    xt = _nchw(x)

    def run_torch():
        with torch.no_grad():
            return tm.decode(tm.encode(xt).latent_dist.mean).sample

    ref = run_torch().numpy().transpose(0, 2, 3, 1)
    print(f"vae: rel. difference of the outputs {_rel(run_jax(), ref):.2e}")
    times = timed({"jax": run_jax, "torch": run_torch}, args.warmup, args.repeats)
    _report("vae encode+decode", times, "jax", "torch")


def bench_memory(args, kwargs) -> None:
    import optax  # noqa: PLC0415

    model = UNet(**kwargs, remat=args.remat, dtype=jnp.dtype(args.dtype))
    latents, context, t = _inputs(args)
    target = np.zeros_like(latents)
    x = jax.ShapeDtypeStruct(latents.shape, jnp.float32)
    # Shapes only: nothing is allocated.
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, t, context)["params"], x)
    # The frozen base of a LoRA step may be stored in the compute dtype (it is never updated).
    frozen = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(args.frozen_dtype)), params
    )
    tx = optax.adamw(1e-4)

    def full_step(params, opt_state, x, t, c, y):
        def loss(p):
            return jnp.mean((model.apply({"params": p}, x, t, c) - y) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    cfg = lora.LoraConfig(rank=args.rank, alpha=args.rank, target_modules=LORA_TARGETS)
    lora_params = jax.eval_shape(lambda p: lora.init(jax.random.key(1), p, cfg), params)

    def lora_step(lora_params, opt_state, params, x, t, c, y):
        def loss(lp):
            out = lora.apply(model, {"params": params, "lora": lp}, x, t, c, scale=cfg.scale)
            return jnp.mean((out - y) ** 2)

        value, grads = jax.value_and_grad(loss)(lora_params)
        updates, opt_state = tx.update(grads, opt_state, lora_params)
        return optax.apply_updates(lora_params, updates), opt_state, value

    def count(tree):
        return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))

    print(
        f"memory: unet {count(params) / 1e6:.1f}M params, LoRA rank {args.rank} on "
        f"{len(lora.module_paths(lora_params))} layers: {count(lora_params) / 1e6:.2f}M params; "
        f"batch {args.batch}, latents {args.latent}, remat={args.remat}, compute {args.dtype}, "
        f"params float32, LoRA's frozen base {args.frozen_dtype}"
    )
    rows = {}
    for name, step, state in (
        ("full", full_step, (params, jax.eval_shape(tx.init, params), params)),
        ("lora", lora_step, (lora_params, jax.eval_shape(tx.init, lora_params), frozen)),
    ):
        fn_args = state[:2] + ((state[2],) if name == "lora" else ()) + (x, t, context, target)
        # The trained state is donated, as the trainers' steps donate it.
        compiled, seconds = _compile(step, *fn_args, donate_argnums=(0, 1))
        m = compiled.memory_analysis()
        rows[name] = (
            m.argument_size_in_bytes,
            m.output_size_in_bytes,
            m.temp_size_in_bytes,
            m.alias_size_in_bytes,
        )
        gib = [v / 2**30 for v in rows[name]]
        total = (rows[name][0] + rows[name][1] + rows[name][2] - rows[name][3]) / 2**30
        print(
            f"memory {name:4s}: arguments {gib[0]:6.2f} GiB  outputs {gib[1]:6.2f}  "
            f"temporaries {gib[2]:6.2f}  aliased {gib[3]:6.2f}  total {total:6.2f} GiB  "
            f"(compile {seconds:.0f} s)"
        )
    totals = {k: v[0] + v[1] + v[2] - v[3] for k, v in rows.items()}
    print(f"memory: lora / full = {totals['lora'] / totals['full']:.2f} (target <= 0.5)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="unet,vae,memory", help="comma-separated: unet,vae,memory")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512-px images)")
    p.add_argument("--image", type=int, default=512, help="VAE image side")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    p.add_argument("--remat", action="store_true", help="memory: rematerialise the UNet's blocks")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="memory")
    p.add_argument(
        "--frozen_dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="memory: dtype of the LoRA step's frozen base parameters",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    unknown = parts - {"unet", "vae", "memory"}
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; expected unet, vae, memory")
    host_malloc = "retain" if host_memory.retain_freed_memory_on_cpu() else "system"
    compile_cache.disable_persistent_cache()
    from tests.torch_compat import register_torchvision_schemas  # noqa: PLC0415

    register_torchvision_schemas()
    import torch  # noqa: PLC0415

    print(
        f"devices={jax.devices()} torch_threads={torch.get_num_threads()} "
        f"host_malloc={host_malloc} (both frameworks)"
    )
    kwargs = diffusers_sd.unet_kwargs_from_diffusers_config(SD21_BASE_UNET)
    if "unet" in parts:
        tm, kwargs, params = _torch_unet()
        bench_unet(args, tm, kwargs, params)
        del tm, params
    if "vae" in parts:
        bench_vae(args)
    if "memory" in parts:
        bench_memory(args, kwargs)


if __name__ == "__main__":
    main()
