r"""OSDFace (``configs/osdface.py``): one-step restoration latency and the compiled memory of the
stage-II train step, on random weights.

    python -m benchmarks.osdface                                  # both parts, paper model
    python -m benchmarks.osdface --parts=latency --batch=1,4,16 --dtype=bfloat16
    python -m benchmarks.osdface --parts=memory --train_batch=2 --remat
    python -m benchmarks.osdface --small --parts=latency,memory --size=32 --repeats=2   # a check

Parts (``--parts``, comma-separated):

  latency: the restorer of ``artfr_jax.inference.OSDFaceRestorer`` (what ``python -m
      artfr_jax.restore`` runs on an OSDFace workdir) on the paper model: SD-2.1-base's UNet
      (``UNet()``'s defaults) and VAE (``AutoencoderKL()``'s), the VRE's LQ branch
      (``VQGAN(**vre_autoencoder_kwargs())``, from ``configs/osdface_vre.py``), the prompt
      projection 512 -> 256 -> 1024 and a rank-16 LoRA on ``configs/osdface.LORA_TARGETS``, all
      drawn at random by the modules' jitted inits (``unsafe_rbg`` keys, whose generator
      compiles faster than threefry's; the init time is printed apart). ``--lora``: ``merged``
      into the UNet's kernels once, as the restorer does (the default), ``unmerged`` (applied
      at every call, the trainer's ``generate``; the restorer cannot do this) or ``none``.
      For each ``--batch`` (uint8 faces of ``--size`` px; the last row is the largest batch
      given) it reports:
        compile s: lowering and compiling the restorer's jitted function (its first call);
        ms/call:   median over ``--repeats`` (after ``--warmup``) of the compiled function on a
                   batch already on the device, output left there (``block_until_ready``);
        ms/face:   ms/call / batch (faces/s: its inverse);
        e2e ms:    median of the same executable called as ``restorer(lq, rng)`` calls it: a
                   host uint8 batch in, a host uint8 batch out (transfers included).
      The two timings are interleaved. The function is compiled without the CPU training
      options (``kernels.compiler_options``), as the restorer compiles it; it has no remat.
  memory: the stage-II train step of ``configs/osdface.py`` (``osdface_trainer.train_step``,
      bound with ``functools.partial`` as ``make_stage`` binds it: generator then
      discriminator update, AdamW) lowered and compiled, never run, by
      ``loop.jit_train_step`` (the training loop's jit: state donated, batch split over a
      ``data`` mesh of the local devices, ``kernels.compiler_options``). The frozen UNet, VAE
      and VRE params are ``jax.eval_shape`` shapes (no weight file is read, nothing is
      allocated); the trained state (LoRAs, projection, head, AdamW moments: small) is made by
      the trainer's ``init_state``, as the loop makes it, and only its shapes are passed on
      (``init_state`` jits under the mesh, which ``jax.eval_shape`` refuses). Global batch
      ``--train_batch`` (default 2, the paper's) of ``--train_size``-px faces (default: the
      config's, 512; 32 with ``--small``). ``--losses=all`` (the default; ``mse_gan`` with
      ``--small``) adds the frozen DISTS (EA-DISTS, Eq. 14) and ArcFace (Eq. 13) networks, as
      the trainer does when their weight files are named; ``mse_gan`` leaves them out, as it
      does without them (the GAN terms stay). Reports ``compiled.memory_analysis()`` per device
      in GiB -- arguments (state + batch + frozen params), outputs (new state + metrics),
      temporaries (activations, gradients, workspace), generated code, aliased (the donated
      state the outputs reuse) and peak ~= arguments + outputs + temporaries - aliased -- and
      ``cost_analysis()``'s flops of one step (per device, XLA's count).

``--dtype`` is the compute dtype (default: bfloat16 on accelerators and float32 on the CPU for
latency; the config's for memory: bfloat16 for the paper, float32 for ``--small``),
``--frozen_dtype`` the frozen UNet/VAE parameters' (default: the compute dtype, as the paper
config keeps them); LoRA, projection, heads and the VRE keep float32 parameters. ``--small``
takes the model sections of the ``tiny`` variants of ``configs/osdface.py`` and
``configs/osdface_vre.py`` (a 2-level UNet, VAE and VRE of width 8-32) instead of the paper's.
Each part ends with Markdown table rows (header first) and the command that produced them.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from artfr_jax import inference  # noqa: E402
from artfr_jax.evaluation import arcface  # noqa: E402
from artfr_jax.losses import dists as dists_lib  # noqa: E402
from artfr_jax.models import factory, layers, lora  # noqa: E402
from artfr_jax.models.unet import UNet  # noqa: E402
from artfr_jax.models.vae import AutoencoderKL  # noqa: E402
from artfr_jax.sampling import noise_schedule  # noqa: E402
from artfr_jax.train import loop, osdface_trainer, sharding  # noqa: E402
from artfr_jax.utils import images as image_utils  # noqa: E402
from benchmarks import results  # noqa: E402
from benchmarks.vqgan_vs_diffusers import timed  # noqa: E402
from configs import osdface as osdface_config  # noqa: E402

PARTS = ("latency", "memory")
GIB = 2**30


# ------------------------------------------------------------------------------ the networks


def _fields(section) -> dict:
    return {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in dict(section).items()}


def get_config(small: bool, dtype: str | None, frozen_dtype: str | None, remat: str = "none"):
    """``configs/osdface.py`` (``tiny`` with ``small``) with the benchmark's policy fields."""
    config = osdface_config.get_config("tiny" if small else None)
    dtype = dtype or config.model.dtype
    config.model.update(dtype=dtype, frozen_param_dtype=frozen_dtype or dtype, remat=remat)
    return config


def build_networks(config: ml_collections.ConfigDict, with_arcface: bool = False):
    """The trainer's :class:`osdface_trainer.Networks` as ``make_stage`` builds them, from the
    config's model sections instead of weight files: the UNet and VAE under
    ``inference.sd_policy`` (``model.unet`` / ``model.vae`` fields; empty = SD-2.1-base), the
    VRE's LQ branch from ``config.stage1.config.model`` under ``config.model``'s policy."""
    m = config.model
    sd_pol = factory.policy(inference.sd_policy(m))
    remat = layers.remat_mode(m.remat)
    unet = UNet(**_fields(m.unet), remat=remat, **sd_pol)
    vae = AutoencoderKL(**_fields(m.vae), remat=remat, **sd_pol)
    vre = factory.tokenizer(config.stage1.config.model.to_dict(), policy_from=m.to_dict())
    arc = None
    if with_arcface:
        arc = arcface.arcface_module(config.loss.arcface_arch, dtype=factory.policy(m)["dtype"])
    return osdface_trainer.make_networks(config, unet, vae, vre, arc)


def frozen_init_fns(nets) -> dict:
    """``{name: key -> params}`` of the frozen networks, each at its smallest input (the params
    do not depend on the image size): for ``jax.eval_shape`` or a jitted init."""
    unet, vae, vre = nets.unet, nets.vae, nets.vre
    fz = unet.downsample_factor
    z = jnp.zeros((1, fz, fz, unet.in_channels), jnp.float32)
    ctx = jnp.zeros((1, 1, unet.cross_attention_dim), jnp.float32)
    fv, fr = vae.downsample_factor, vre.downsample_factor
    return {
        "unet": lambda k: unet.init(k, z, 0, ctx)["params"],
        "vae": lambda k: vae.init(k, jnp.zeros((1, fv, fv, 3), jnp.float32))["params"],
        "vre": lambda k: vre.init(k, jnp.zeros((1, fr, fr, 3), jnp.float32), train=False)["params"],
    }


def image_multiple(nets) -> int:
    """The image sides every network accepts are the multiples of this."""
    f = nets.vae.downsample_factor * nets.unet.downsample_factor
    return math.lcm(f, nets.vre.downsample_factor)


def count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def nbytes(tree) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def _device_kind() -> str:
    d = jax.devices()[0]
    return getattr(d, "device_kind", d.platform)


def _print_rows(header: list[str], rows: list[list[str]]) -> None:
    print()
    print(results.markdown_table(header, rows))
    print()
    print("command: python -m benchmarks.osdface " + " ".join(sys.argv[1:]))


# ---------------------------------------------------------------------------------- latency


def random_lora(rng, unet_params, cfg: lora.LoraConfig):
    """A LoRA of ``cfg`` with random ``A`` (PEFT's init) and random ``B`` (PEFT's is zero, which
    would make merging a no-op): one jitted draw for all the ``B`` factors."""
    k_a, k_b = jax.random.split(rng)
    flat = traverse_util.flatten_dict(lora.init(k_a, unet_params, cfg))
    paths = [p for p in flat if p[-1] == "lora_B"]
    shapes = tuple(tuple(flat[p].shape) for p in paths)

    @functools.partial(jax.jit, static_argnums=1)
    def draw(key, shapes):
        u = 0.01 * jax.random.normal(key, (sum(math.prod(s) for s in shapes),), jnp.float32)
        offsets = np.cumsum([0] + [math.prod(s) for s in shapes])
        return [u[a:b].reshape(s) for a, b, s in zip(offsets, offsets[1:], shapes, strict=False)]

    flat.update(zip(paths, draw(k_b, shapes), strict=True))
    return traverse_util.unflatten_dict(flat)


def _unmerged_run(nets, config, schedule):
    """The restorer's function with the LoRA applied at call time (the trainer's ``generate``,
    posterior sampled as the restorer samples it)."""

    def run(params, lq_u8, rng):
        frozen = {k: params[k] for k in ("unet", "vae", "vre")}
        g_params = {"lora": params["lora"], "projection": params["projection"]}
        lq = image_utils.to_float_image(lq_u8)
        restored, _, _ = osdface_trainer.generate(
            nets, frozen, g_params, lq, rng, config.model.timestep, schedule
        )
        return image_utils.to_uint8_image(restored)

    return jax.jit(run)


def make_restorer(nets, params, proj_params, lora_tree, size: int, timestep: int):
    """``inference.OSDFaceRestorer`` (what ``restore`` runs) on ``build_networks``'s networks and
    the given parameters (``params``: unet, vae, vre); ``lora_tree`` None for no LoRA."""
    return inference.OSDFaceRestorer(
        unet=nets.unet,
        unet_params=params["unet"],
        vae=nets.vae,
        vae_params=params["vae"],
        vre=nets.vre,
        vre_params=params["vre"],
        projection=nets.projection,
        projection_params=proj_params,
        schedule=noise_schedule.make_schedule(),
        image_size=size,
        lora=lora_tree,
        lora_scale=nets.g_lora.scale,
        timestep=timestep,
    )


def bench_latency(args, batches: list[int]) -> None:
    backend = jax.default_backend()
    dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    config = get_config(args.small, dtype, args.frozen_dtype)
    nets = build_networks(config)
    multiple = image_multiple(nets)
    if args.size % multiple:
        raise SystemExit(f"--size={args.size}: must be a multiple of {multiple} for this model")
    # XLA's RngBitGenerator compiles in a fraction of the time of the default threefry key's
    # hash (seconds instead of half a minute for the tiny models' inits on a CPU); the weights
    # are random either way.
    root = jax.random.key(0, impl="unsafe_rbg")
    k_unet, k_vae, k_vre, k_proj, k_lora = jax.random.split(root, 5)
    t0 = time.perf_counter()
    fns = frozen_init_fns(nets)
    with jax.set_mesh(inference.device_mesh()):  # the models' kernel switch decides once
        params = {
            name: jax.block_until_ready(jax.jit(fns[name])(k))
            for name, k in zip(("unet", "vae", "vre"), (k_unet, k_vae, k_vre), strict=True)
        }
    p0 = jnp.zeros((1, 1, nets.vre.embedding_dim), jnp.float32)
    proj_params = jax.jit(lambda k: nets.projection.init(k, p0)["params"])(k_proj)
    lora_tree = None
    if args.lora != "none":
        lora_tree = jax.block_until_ready(random_lora(k_lora, params["unet"], nets.g_lora))
    init_s = time.perf_counter() - t0
    m = config.model
    model_name = "small" if args.small else "paper"
    print(
        f"latency: backend={backend} device={_device_kind()} model={model_name} "
        f"size={args.size} compute={dtype} frozen_params={m.frozen_param_dtype} lora={args.lora}"
    )
    unet_gib = nbytes(params["unet"]) / GIB
    print(
        f"latency: params unet {count(params['unet']) / 1e6:.1f}M ({unet_gib:.2f} GiB), "
        f"vae {count(params['vae']) / 1e6:.1f}M, vre (LQ branch) "
        f"{count(params['vre']) / 1e6:.1f}M, projection {count(proj_params) / 1e6:.2f}M"
        + (
            f", LoRA rank {nets.g_lora.rank} on {len(lora.module_paths(lora_tree))} layers "
            f"{count(lora_tree) / 1e6:.2f}M"
            if lora_tree is not None
            else ""
        )
        + f"; random init {init_s:.1f} s"
    )
    schedule = noise_schedule.make_schedule()
    mesh = inference.device_mesh()
    t0 = time.perf_counter()
    if args.lora == "unmerged":
        run = _unmerged_run(nets, config, schedule)
        fn_params = {**params, "projection": proj_params, "lora": lora_tree}
    else:
        restorer = make_restorer(nets, params, proj_params, lora_tree, args.size, int(m.timestep))
        fn_params = jax.block_until_ready(restorer.params)
        # The restorer's one jitted function; compiled ahead of time here so that the compile
        # time is apart from the calls (``restorer(lq, rng)`` compiles it at its first call).
        run = restorer._run
    if args.lora == "merged":
        print(f"latency: merging the LoRA (restorer construction) {time.perf_counter() - t0:.2f} s")
    del params
    header = [
        "backend",
        "device",
        "model",
        "size",
        "batch",
        "dtype",
        "LoRA",
        "compile s",
        "ms/call",
        "ms/face",
        "e2e ms/call",
        "faces/s",
    ]
    rows = []
    host_rng = np.random.default_rng(0)
    for b in batches:
        lq_host = host_rng.integers(0, 256, (b, args.size, args.size, 3), dtype=np.uint8)
        lq_dev = jax.device_put(lq_host)
        rng = jax.random.key(1)
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = run.lower(fn_params, lq_dev, rng).compile()
        compile_s = time.perf_counter() - t0

        def on_device(compiled=compiled, lq_dev=lq_dev, rng=rng):
            return jax.block_until_ready(compiled(fn_params, lq_dev, rng))

        def end_to_end(compiled=compiled, lq_host=lq_host, rng=rng):
            return np.asarray(jax.device_get(compiled(fn_params, lq_host, rng)))

        out = end_to_end()
        assert out.shape == lq_host.shape and out.dtype == np.uint8, (out.shape, out.dtype)
        t = timed({"device": on_device, "e2e": end_to_end}, args.warmup, args.repeats)
        ms, e2e = t["device"]["median"] * 1e3, t["e2e"]["median"] * 1e3
        print(
            f"latency batch {b:3d}: compile {compile_s:7.1f} s  ms/call {ms:9.2f} "
            f"(min {t['device']['min'] * 1e3:.2f})  ms/face {ms / b:8.2f}  e2e ms/call {e2e:9.2f}  "
            f"{1e3 * b / ms:.2f} faces/s"
        )
        rows.append(
            [
                backend,
                _device_kind(),
                model_name,
                str(args.size),
                str(b),
                dtype,
                args.lora,
                f"{compile_s:.1f}",
                f"{ms:.2f}",
                f"{ms / b:.2f}",
                f"{e2e:.2f}",
                f"{1e3 * b / ms:.2f}",
            ]
        )
        del compiled
    if len(batches) > 1:
        first, last = rows[0], rows[-1]
        print(
            f"latency: ms/face at batch {first[4]} {first[9]}, at the largest batch {last[4]} "
            f"{last[9]} (faces/s {float(first[9]) / float(last[9]):.2f}x batch {first[4]}'s)"
        )
    _print_rows(header, rows)


# ----------------------------------------------------------------------------------- memory


def _abstract(shapes: dict, dtype=jnp.float32) -> dict:
    """``{flat path: shape}`` -> a nested tree of ShapeDtypeStructs."""
    return traverse_util.unflatten_dict(
        {k: jax.ShapeDtypeStruct(v, dtype) for k, v in shapes.items()}
    )


def bench_memory(args) -> None:
    config = get_config(args.small, args.dtype, args.frozen_dtype, remat=args.remat)
    config.batch_size = args.train_batch
    config.mesh.update(data=-1, fsdp=1)
    mesh = sharding.make_mesh(config.mesh, jax.local_devices())
    sharding.check_batch_size(config.batch_size, mesh)
    with_losses = args.losses == "all"
    nets = build_networks(config, with_arcface=with_losses)
    size = args.train_size or config.data.image_size
    multiple = image_multiple(nets)
    if size % multiple:
        raise SystemExit(f"--train_size={size}: must be a multiple of {multiple} for this model")
    config.data.image_size = size
    key = jax.random.key(0)
    fns = frozen_init_fns(nets)
    # Shapes only (the trainer reads these from weight files): nothing is computed or allocated.
    frozen = {name: jax.eval_shape(fn, key) for name, fn in fns.items()}
    if with_losses:
        frozen["dists"] = _abstract(dists_lib.dists_param_shapes())
        frozen["arcface"] = _abstract(arcface.arcface_variable_shapes(config.loss.arcface_arch))
    unet_shapes = frozen["unet"]
    tx = osdface_trainer.make_optimizer(config)
    schedule = noise_schedule.make_schedule()
    init = functools.partial(
        osdface_trainer.init_state, config=config, nets=nets, unet_shapes=unet_shapes, tx=tx
    )
    # The trainer's init_state jits its own init under the mesh, so it cannot run under
    # jax.eval_shape: the trained state (LoRAs, projection, head, AdamW moments: small) is made
    # for real, as the training loop makes it, and only its shapes are kept.
    t0 = time.perf_counter()
    state, shardings = init(key, mesh)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    init_s = time.perf_counter() - t0
    step_fn = functools.partial(
        osdface_trainer.train_step, config=config, nets=nets, schedule=schedule, tx=tx
    )
    n = config.batch_size
    batch = {k: jax.ShapeDtypeStruct((n, size, size, 3), jnp.uint8) for k in ("hq", "lq")}
    m = config.model
    model_name = "small" if args.small else "paper"
    trained = {k: count(state.params[k]) for k in state.params}
    print(
        f"memory: backend={jax.default_backend()} device={_device_kind()} devices={mesh.size} "
        f"model={model_name} image={size}px global_batch={n} "
        f"compute={m.dtype} frozen_params={m.frozen_param_dtype} remat={m.remat} "
        f"losses={args.losses}"
    )
    print(
        "memory: frozen "
        + ", ".join(f"{k} {count(v) / 1e6:.1f}M" for k, v in frozen.items())
        + f" ({nbytes(frozen) / GIB:.2f} GiB); trained "
        + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in trained.items())
        + f"; state {nbytes(state) / GIB:.3f} GiB (params + AdamW moments)"
    )
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        jitted = loop.jit_train_step(step_fn, shardings, mesh)  # as the training loop compiles it
        lowered = jitted.lower(state, batch, key, frozen)
        lower_s = time.perf_counter() - t0
        compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    print(
        f"memory: state init {init_s:.1f} s; step compile {compile_s:.1f} s (trace and lower "
        f"{lower_s:.1f} s); not run"
    )
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    header = [
        "backend",
        "device",
        "model",
        "image",
        "batch",
        "dtype",
        "frozen",
        "remat",
        "losses",
        "arguments GiB",
        "outputs GiB",
        "temp GiB",
        "code GiB",
        "aliased GiB",
        "peak GiB",
        "TFLOP/step",
    ]
    if mem is None:
        print("memory_analysis: not reported by this backend")
        cells = ["-"] * 6
    else:
        a, o, t, g, al = (
            mem.argument_size_in_bytes,
            mem.output_size_in_bytes,
            mem.temp_size_in_bytes,
            mem.generated_code_size_in_bytes,
            mem.alias_size_in_bytes,
        )
        peak = a + o + t - al
        print(
            f"memory_analysis (per device, GiB): arguments={a / GIB:.3f} outputs={o / GIB:.3f} "
            f"temp={t / GIB:.3f} generated_code={g / GIB:.4f} alias={al / GIB:.3f} "
            f"peak~={peak / GIB:.3f}"
        )
        cells = [f"{v / GIB:.3f}" for v in (a, o, t)] + [f"{g / GIB:.4f}", f"{al / GIB:.3f}"]
        cells.append(f"{peak / GIB:.3f}")
    print(f"cost_analysis: {flops / 1e12:.4f} TFLOP per step (per device, XLA's count)")
    row = [
        jax.default_backend(),
        _device_kind(),
        model_name,
        str(size),
        str(n),
        str(m.dtype),
        str(m.frozen_param_dtype),
        str(m.remat),
        args.losses,
        *cells,
        f"{flops / 1e12:.4f}",
    ]
    _print_rows(header, [row])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="latency,memory", help="comma-separated: latency,memory")
    p.add_argument("--small", action="store_true", help="the tiny config's models (a quick check)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument(
        "--frozen_dtype",
        default=None,
        choices=("float32", "bfloat16"),
        help="dtype of the frozen UNet/VAE params (default: the compute dtype)",
    )
    p.add_argument("--size", type=int, default=512, help="latency: image side")
    p.add_argument("--batch", default="1,4", help="latency: comma-separated batch sizes")
    p.add_argument("--lora", default="merged", choices=("merged", "unmerged", "none"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--train_batch", type=int, default=2, help="memory: global batch size")
    p.add_argument(
        "--train_size", type=int, default=None, help="memory: image side (default: the config's)"
    )
    p.add_argument(
        "--remat",
        nargs="?",
        const="full",
        default="none",
        choices=layers.REMAT_MODES,
        help="memory: rematerialise UNet/VAE blocks (alone: full)",
    )
    p.add_argument(
        "--losses",
        default=None,
        choices=("all", "mse_gan"),
        help="memory: with the frozen EA-DISTS and ArcFace networks (all; the paper's default) or "
        "without (mse_gan; --small's default, as the tiny config trains without their files)",
    )
    args = p.parse_args(argv)
    parts = [s for s in args.parts.split(",") if s]
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        p.error(f"--parts: unknown {sorted(unknown)}; expected latency, memory")
    try:
        batches = sorted({int(b) for b in args.batch.split(",") if b.strip()})
    except ValueError:
        p.error(f"--batch={args.batch!r}: expected comma-separated ints")
    if not batches or min(batches) < 1:
        p.error(f"--batch={args.batch!r}: expected positive batch sizes")
    if args.size < 1:
        p.error("--size: expected a positive int")
    if args.losses is None:
        args.losses = "mse_gan" if args.small else "all"
    print(f"devices={jax.devices()}")
    if "latency" in parts:
        bench_latency(args, batches)
    if "memory" in parts:
        bench_memory(args)


if __name__ == "__main__":
    main()
