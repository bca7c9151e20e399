r"""Ahead-of-time compilation of every paper configuration for real TPU topologies, on a CPU host.

libtpu (the ``tpu`` extra) compiles TPU programs without a TPU. Keep it out of the main
environment (once installed, an unqualified ``import jax`` probes for TPUs and prints warnings):

    python -m venv --system-site-packages .tpu-venv
    .tpu-venv/bin/pip install -e '.[tpu]' -c constraints.txt
    .tpu-venv/bin/python -m benchmarks.aot_compile --topology=v5e:2x2              # all configs
    .tpu-venv/bin/python -m benchmarks.aot_compile --topology=v5e:2x2 --config=art --remat=both
    .tpu-venv/bin/python -m benchmarks.aot_compile --topology=v5p:2x2x1 --config=vqgan --mesh=2,2
    .tpu-venv/bin/python -m benchmarks.aot_compile --fit --topology=v5e:2x4 --config=vqfr
    .tpu-venv/bin/python -m benchmarks.aot_compile --config=art_tiny --lower_only \
        --topology=v5e:2x2 --topology=cpu:4 --dump_lowered=/tmp/lowered     # what the test runs

Programs (``--config``, repeatable; default: the five paper ones), each built as training or
restoration builds it, from shapes only (no weight file is read, nothing paper-sized is allocated):

  vqgan        stage I, ``configs/vqgan.py`` (global batch 24): ``vqgan_trainer.make_stage``;
  art          ART-FR stage II, ``configs/art.py`` (batch 24): ``art_trainer.make_stage``;
  vqfr         VQFR stage II, ``configs/vqfr.py`` (batch 16): ``vqfr_trainer.make_stage``;
  osdface      OSDFace stage 2, ``configs/osdface.py`` (batch 2; SD-2.1 UNet + LoRA, with the
               EA-DISTS and ArcFace networks): the networks of ``benchmarks/osdface.py``;
  art_restore  the 512-px ART-FR restorer (``inference.Restorer``, T = 8 decoding steps) on
               ``--restore_batch`` faces (default 8, ``artfr_jax.restore``'s batch);
  NAME_tiny    the same on the configs' ``tiny`` variants (tests, quick checks).

A train step is the trainer's own ``train_step`` bound by its ``make_stage`` and jitted by
``loop.jit_train_step`` (state sharded by the fsdp rule and donated, batch split over
('data', 'fsdp'), rng and frozen params replicated). ``make_stage`` reads frozen stage-I and LPIPS
weights from files; here those readers return ``jax.eval_shape`` shapes (:func:`abstract_weights`).
The state's shapes and shardings come from the trainer's ``init_state`` traced by
``jax.eval_shape`` under the mesh. The mesh's devices are the topology's TPU devices, so the
models' kernel switch (``models/kernels.py``) takes the XLA ops, never the CPU kernels.

For each (program, topology, mesh, remat) the table gives per device: argument, output, temporary
bytes and peak ~= arguments + outputs + temporaries - aliased (the donated state) against the
chip's HBM; FLOPs and bytes accessed from ``compiled.cost_analysis()`` (XLA's count for the
partitioned program of one device, i.e. per device; it counts a loop body once, so the loops'
further iterations are added, see ``loop_cost``, and so are the FLOPs of the Pallas flash
attention's backward kernels, which carry no cost estimate); the roofline step time
``max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)`` and which term bounds it. A program that XLA
refuses for lack of HBM is reported as not fitting, with XLA's own figure. ``--fit`` searches the
smallest topology of the first ``--topology``'s chip (<= 8 chips) and mesh (data x fsdp, remat)
on which each program fits. ``--out=PREFIX`` writes PREFIX.json and PREFIX.md.

Mesh (``--mesh=data,fsdp``, repeatable; -1 takes the remaining chips): default ``auto``, all
chips on ``data`` or, where the global batch has fewer examples than chips, as many chips as it
has (OSDFace's batch 2 uses 2 chips of a 4-chip slice). ``--remat`` sets ``config.model.remat``:
``off`` (``none``), ``on`` (``full``), ``matmuls`` (only norms and activations recomputed), ``both``
(``none`` and ``full``) or ``all``; ``--set=KEY=VALUE`` any other field (ART-FR's
``model.transformer_remat=full``). ``--lower_only`` stops after lowering (no memory or cost
numbers). ``--traffic=DEPTH`` prints the bytes accessed per model scope
(``benchmarks/hlo_traffic.py``; where an HBM-bound step's traffic goes), ``--dump_compiled=DIR``
writes the compiled programs' HLO text.
``cpu:N`` as a topology lowers for N of this host's CPU devices instead (for comparison).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

# The host has no TPU: without this an ``import jax`` next to libtpu probes for one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Compile-only use: several processes (a test beside a long compile) may load libtpu at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import traverse_util  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from artfr_jax import hyper, inference  # noqa: E402
from artfr_jax.evaluation import arcface  # noqa: E402
from artfr_jax.losses import dists as dists_lib  # noqa: E402
from artfr_jax.losses import perceptual as perceptual_lib  # noqa: E402
from artfr_jax.models import factory  # noqa: E402
from artfr_jax.sampling import noise_schedule  # noqa: E402
from artfr_jax.train import (  # noqa: E402
    art_trainer,
    loop,
    osdface_trainer,
    sharding,
    stage1,
    vqfr_trainer,
    vqgan_trainer,
)
from benchmarks import hlo_traffic  # noqa: E402
from benchmarks import osdface as osdface_bench  # noqa: E402
from configs import art as art_config  # noqa: E402
from configs import vqfr as vqfr_config  # noqa: E402
from configs import vqgan as vqgan_config  # noqa: E402

GIB = 2**30
PAPER = ("vqgan", "art", "vqfr", "osdface", "art_restore")
ABSTRACT_FILE = "(abstract: shapes only)"
# --remat: config.model.remat values (models/layers.REMAT_MODES) compiled
REMATS = {
    "off": ["none"],
    "on": ["full"],
    "matmuls": ["matmuls"],
    "both": ["none", "full"],
    "all": ["none", "matmuls", "full"],
}


# ------------------------------------------------------------------------------------- chips


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: how libtpu names its topologies and what one chip has."""

    name: str
    topology_prefix: str  # libtpu's name: 'v5e:2x2', 'v5:2x2x1'
    chip_config: str  # 'default' (one TensorCore) or 'megacore' (two as one device)
    max_host_bounds: tuple[int, int, int]  # chips of one host, per dimension
    hbm_bytes: int
    peak_flops: float  # dense bfloat16 FLOP/s
    hbm_bandwidth: float  # bytes/s


# Per-chip figures from Google Cloud's TPU documentation ("TPU v5e" and "TPU v5p" pages, system
# architecture tables): v5e 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s; v5p 459 TFLOP/s bf16,
# 95 GiB HBM2e at 2765 GB/s. Host bounds as in MaxText's accelerator_to_spec_map (a v5e host
# holds up to 2x4 chips, a v5p host 2x2x1).
CHIPS = {
    "v5e": Chip("v5e", "v5e", "default", (2, 4, 1), 16 * GIB, 197e12, 819e9),
    "v5p": Chip("v5p", "v5", "megacore", (2, 2, 1), 95 * GIB, 459e12, 2765e9),
}
# --fit tries these slices, smallest first (v5e and v5p slices of <= 8 chips that exist).
FIT_TOPOLOGIES = {"v5e": ("1x1", "2x2", "2x4"), "v5p": ("2x2x1", "2x2x2")}


@dataclasses.dataclass(frozen=True)
class Topology:
    """``v5e:2x2`` / ``v5p:2x2x1`` (TPU slices) or ``cpu:N`` (this host's CPU devices)."""

    name: str
    chip: Chip | None
    dims: tuple[int, ...]

    @property
    def num_chips(self) -> int:
        return math.prod(self.dims)


def parse_topology(name: str) -> Topology:
    """``'v5e:2x2'`` -> Topology; a one-line ValueError for anything else."""
    kind, _, shape = name.partition(":")
    try:
        dims = tuple(int(d) for d in shape.split("x"))
    except ValueError:
        dims = ()
    if kind == "cpu" and len(dims) == 1 and dims[0] >= 1:
        return Topology(name, None, dims)
    chip = CHIPS.get(kind)
    rank = 2 if kind == "v5e" else 3
    if chip is None or len(dims) != rank or min(dims) < 1:
        raise ValueError(
            f"--topology={name!r}: expected v5e:AxB, v5p:AxBxC or cpu:N (e.g. v5e:2x2, v5p:2x2x1)"
        )
    return Topology(name, chip, dims)


def topology_devices(topo: Topology) -> list:
    """The devices of ``topo``: libtpu's description of the slice (compile-only devices), or the
    first N CPU devices of this process."""
    if topo.chip is None:
        devices = jax.devices("cpu")
        if len(devices) < topo.num_chips:
            raise ValueError(
                f"--topology={topo.name}: this process has {len(devices)} CPU devices "
                "(start it with --xla_force_host_platform_device_count)"
            )
        return devices[: topo.num_chips]
    from jax.experimental import topologies  # noqa: PLC0415  (loads libtpu)

    dims3 = tuple(topo.dims) + (1,) * (3 - len(topo.dims))
    bounds = tuple(min(d, m) for d, m in zip(dims3, topo.chip.max_host_bounds, strict=True))
    desc = topologies.get_topology_desc(
        topology_name=f"{topo.chip.topology_prefix}:{'x'.join(map(str, topo.dims))}",
        platform="tpu",
        chip_config_name=topo.chip.chip_config,
        chips_per_host_bounds=bounds,
        num_slices=1,
        wrap=(False, False, False),
    )
    return list(desc.devices)


# ---------------------------------------------------------------------------------- programs


@dataclasses.dataclass
class Program:
    """A jitted function and the abstract arguments to lower it with."""

    fn: Any
    args: tuple
    batch: int
    dtype: str
    note: str = ""


def _key() -> jax.ShapeDtypeStruct:
    # Abstract: a concrete array cannot be made under a mesh of compile-only devices.
    return jax.eval_shape(lambda: jax.random.key(0))


def _is_abstract_tree(tree) -> bool:
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def _abstract(shapes: dict, dtype=jnp.float32) -> dict:
    """``{flat path: shape}`` -> a nested tree of ShapeDtypeStructs."""
    return traverse_util.unflatten_dict(
        {k: jax.ShapeDtypeStruct(v, dtype) for k, v in shapes.items()}
    )


def abstract_tokenizer(config: ml_collections.ConfigDict):
    """``stage1.load_stage1`` without a workdir: the tokenizer ``config.stage1.config`` declares,
    under this stage's policy, and the shapes of its params (``inference.load_tokenizer`` builds
    the same module and restores into these shapes)."""
    tokenizer = factory.tokenizer(config.stage1.config.model.to_dict(), config.model)
    size = config.data.image_size
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    params = jax.eval_shape(lambda: tokenizer.init(jax.random.key(0), x, train=False)["params"])
    return tokenizer, params


@contextlib.contextmanager
def abstract_weights(config: ml_collections.ConfigDict) -> Iterator[None]:
    """While a trainer's ``make_stage`` runs: the stage-I workdir and the LPIPS file read as
    shapes. A perceptual loss the config requires is kept (named by a placeholder file)."""
    loss = config.get("loss")
    if loss is not None and loss.get("perceptual") == "required" and not loss.lpips_weights:
        loss.lpips_weights = ABSTRACT_FILE
    lpips = _abstract(perceptual_lib.lpips_param_shapes())
    with (
        mock.patch.object(stage1, "load_stage1", lambda cfg, _: abstract_tokenizer(cfg)),
        mock.patch.object(perceptual_lib, "load_lpips_params", lambda _: lpips),
    ):
        yield


def abstract_state(init_state: Callable, mesh: Mesh):
    """``(state shapes, state shardings)`` of a trainer's ``init_state`` traced by
    ``jax.eval_shape`` under ``mesh``; abstract keyword arguments bound into it (stage-I params)
    are passed traced."""
    bound = getattr(init_state, "keywords", {})
    traced = {k: v for k, v in bound.items() if _is_abstract_tree(v)}
    found = {}

    def state_only(rng, kw):
        state, shardings = init_state(rng, mesh, **kw)
        found["shardings"] = shardings
        return state

    with jax.set_mesh(mesh):
        state = jax.eval_shape(state_only, _key(), traced)
    return state, found["shardings"]


def _batch(n: int, size: int) -> dict:
    """The pipeline's host batch: uint8 'hq' and 'lq' ``[n, size, size, 3]``."""
    return {k: jax.ShapeDtypeStruct((n, size, size, 3), jnp.uint8) for k in ("hq", "lq")}


def train_program(init_state, train_step, frozen, config, mesh: Mesh, note: str = "") -> Program:
    """The training loop's jitted step (``loop.jit_train_step``) and its abstract arguments."""
    state, shardings = abstract_state(init_state, mesh)
    fn = loop.jit_train_step(train_step, shardings, mesh)
    batch = _batch(config.batch_size, config.data.image_size)
    return Program(fn, (state, batch, _key(), frozen), config.batch_size, config.model.dtype, note)


def build_stage_program(config, mesh: Mesh, make_stage: Callable) -> Program:
    """vqgan / art / vqfr: the trainer's own ``make_stage`` with abstract weights."""
    with abstract_weights(config):
        stage = make_stage(config)
    return train_program(stage.init_state, stage.train_step, stage.frozen, config, mesh)


def build_osdface(config, mesh: Mesh, small: bool) -> Program:
    """OSDFace stage 2 as ``osdface_trainer.make_stage`` binds it, the frozen UNet/VAE/VRE (and,
    for the paper, DISTS and ArcFace) as shapes (``benchmarks/osdface.py``'s networks)."""
    with_losses = not small
    nets = osdface_bench.build_networks(config, with_arcface=with_losses)
    key = jax.random.key(0)
    frozen = {n: jax.eval_shape(fn, key) for n, fn in osdface_bench.frozen_init_fns(nets).items()}
    if with_losses:
        frozen["dists"] = _abstract(dists_lib.dists_param_shapes())
        frozen["arcface"] = _abstract(arcface.arcface_variable_shapes(config.loss.arcface_arch))
    tx = osdface_trainer.make_optimizer(config)
    init = functools.partial(
        osdface_trainer.init_state, config=config, nets=nets, unet_shapes=frozen["unet"], tx=tx
    )
    step = functools.partial(
        osdface_trainer.train_step,
        config=config,
        nets=nets,
        schedule=noise_schedule.make_schedule(),
        tx=tx,
    )
    note = "EA-DISTS + ArcFace" if with_losses else "MSE + GAN"
    return train_program(init, step, frozen, config, mesh, note)


def build_restore(config, mesh: Mesh, batch: int) -> Program:
    """The ART-FR restorer's one jitted function (``inference.Restorer``), as ``load_restorer``
    builds it, on ``batch`` uint8 faces split over the mesh; params replicated."""
    tokenizer, tok_params = abstract_tokenizer(config)
    art = factory.art(config, tokenizer)
    size = config.data.image_size
    art_params = inference.abstract_art_params(art, size)
    restorer = inference.Restorer(
        art=art,
        tokenizer=tokenizer,
        art_params=art_params,
        tokenizer_params=tok_params,
        sampling=config.sampling,
        image_size=size,
    )
    repl = sharding.replicated(mesh)
    placed = lambda tree, s: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree
    )
    lq = jax.ShapeDtypeStruct(
        (batch, size, size, 3), jnp.uint8, sharding=sharding.batch_sharding(mesh)
    )
    args = (placed(art_params, repl), placed(tok_params, repl), lq, placed(_key(), repl))
    note = f"T={config.sampling.steps} steps"
    return Program(restorer._run, args, batch, config.model.dtype, note)


def program_config(
    name: str, remat: str, image_size: int | None, sets=()
) -> ml_collections.ConfigDict:
    """The config of program ``name`` (``art``, ``art_tiny``, ...) with ``model.remat`` and the
    ``--set`` assignments (``model.transformer_remat=full``)."""
    variant = "tiny" if name.endswith("_tiny") else None
    base = name.removesuffix("_tiny")
    if base == "osdface":
        config = osdface_bench.get_config(variant == "tiny", None, None, remat=remat)
    else:
        module = {"vqgan": vqgan_config, "vqfr": vqfr_config}.get(base, art_config)
        config = module.get_config(variant)
        config.model.remat = remat
    for assignment in sets:
        hyper.apply_assignment(config, assignment)
    if image_size:
        config.data.image_size = image_size
        for section in config.values():  # discriminators built for one input size (SWAGAN)
            if isinstance(section, ml_collections.ConfigDict) and "out_size" in section:
                section.out_size = image_size
    return config


def build_program(name: str, config, mesh: Mesh, restore_batch: int) -> Program:
    """Program ``name`` for ``mesh``."""
    base = name.removesuffix("_tiny")
    if base == "vqgan":
        return build_stage_program(config, mesh, vqgan_trainer.make_stage)
    if base == "art":
        return build_stage_program(config, mesh, lambda c: art_trainer.make_stage(c, "."))
    if base == "vqfr":
        return build_stage_program(config, mesh, lambda c: vqfr_trainer.make_stage(c, "."))
    if base == "osdface":
        return build_osdface(config, mesh, small=name.endswith("_tiny"))
    if base == "art_restore":
        return build_restore(config, mesh, restore_batch)
    raise ValueError(f"--config={name!r}: expected one of {program_names()}")


def program_names() -> list[str]:
    return [*PAPER, *(f"{p}_tiny" for p in PAPER)]


def global_batch(name: str, config, restore_batch: int) -> int:
    return restore_batch if name.startswith("art_restore") else int(config.batch_size)


# -------------------------------------------------------------------------------------- mesh


def resolve_mesh(spec: str, num_devices: int, batch: int) -> tuple[int, int]:
    """``(data, fsdp)`` of ``--mesh``: 'auto' (every chip on data, at most ``batch``) or 'D,F'
    with -1 for the remaining chips."""
    if spec == "auto":
        return math.gcd(batch, num_devices), 1
    try:
        data, fsdp = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--mesh={spec!r}: expected 'auto' or 'data,fsdp'") from None
    if data == -1:
        data = num_devices // fsdp
    if fsdp == -1:
        fsdp = num_devices // data
    return data, fsdp


def make_mesh(devices: list, data: int, fsdp: int, min_shard_size: int) -> Mesh:
    config = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, min_shard_size=min_shard_size))
    return sharding.make_mesh(config, devices=devices)


# ---------------------------------------------------------------------------------- analysis


@dataclasses.dataclass
class Result:
    """One row of the table (bytes and FLOPs per device)."""

    program: str
    topology: str
    chips: int
    mesh: str
    remat: str  # models/layers.REMAT_MODES
    batch: int
    dtype: str
    note: str = ""
    lower_s: float = 0.0
    compile_s: float | None = None
    argument_bytes: int | None = None
    output_bytes: int | None = None
    temp_bytes: int | None = None
    alias_bytes: int | None = None
    code_bytes: int | None = None
    peak_bytes: int | None = None
    hbm_bytes: int | None = None
    fits: bool | None = None
    flops: float | None = None
    bytes_accessed: float | None = None
    flops_s: float | None = None
    memory_s: float | None = None
    roofline_s: float | None = None
    bound: str = ""
    error: str = ""
    traffic: dict | None = None  # --traffic: bytes per model scope
    loop_flops: float = 0.0  # of loop iterations cost_analysis leaves out (in flops above)
    loop_bytes: float = 0.0
    kernel_flops: float = 0.0  # of Pallas kernels without a cost estimate (in flops above)


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit])


def oom_bytes(message: str) -> tuple[str, int] | None:
    """What XLA said a program needs when it ran out of HBM: ``('peak', bytes)`` from 'Used 21.5G
    of 15.75G hbm', ``('temp', bytes)`` from 'memory required for HLO temporaries (45.86G)'."""
    m = re.search(r"Used ([\d.]+)([KMGT]?)i?B? of [\d.]+[KMGT]?i?B? hbm", message)
    if m:
        return "peak", _bytes(m.group(1), m.group(2))
    m = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT]?)i?B?\)", message)
    return ("temp", _bytes(m.group(1), m.group(2))) if m else None


def add_oom(result: Result, message: str, chip: Chip | None) -> bool:
    """Records an out-of-HBM compile error as a program that does not fit; False for others."""
    if "RESOURCE_EXHAUSTED" not in message:
        return False
    result.error = message.splitlines()[0][:300]
    result.fits = False
    result.hbm_bytes = chip.hbm_bytes if chip else None
    needed = oom_bytes(message)
    if needed is not None:
        kind, value = needed
        if kind == "peak":
            result.peak_bytes = value
        else:
            result.temp_bytes = value
    return True


def add_memory(result: Result, compiled, chip: Chip | None) -> None:
    """Per-device bytes of ``compiled.memory_analysis()`` and whether they fit the chip's HBM."""
    mem = compiled.memory_analysis()
    if mem is None:
        return
    result.argument_bytes = int(mem.argument_size_in_bytes)
    result.output_bytes = int(mem.output_size_in_bytes)
    result.temp_bytes = int(mem.temp_size_in_bytes)
    result.alias_bytes = int(mem.alias_size_in_bytes)
    result.code_bytes = int(mem.generated_code_size_in_bytes)
    result.peak_bytes = (
        result.argument_bytes + result.output_bytes + result.temp_bytes - result.alias_bytes
    )
    if chip is not None:
        result.hbm_bytes = chip.hbm_bytes
        result.fits = result.peak_bytes <= chip.hbm_bytes


def add_cost(
    result: Result, compiled, chip: Chip | None, loops=(0.0, 0.0), kernel_flops: float = 0.0
) -> None:
    """FLOPs and bytes accessed per device (``cost_analysis()``, plus ``loops``: the FLOPs and
    bytes of loop iterations it leaves out, see :func:`loop_cost`, and ``kernel_flops``: those of
    Pallas kernels it counts as none, ``hlo_traffic.kernel_extra``) and the roofline step time."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if not cost:
        return
    result.loop_flops, result.loop_bytes = (float(v) for v in loops)
    result.kernel_flops = float(kernel_flops)
    result.flops = float(cost.get("flops", 0.0)) + result.loop_flops + result.kernel_flops
    result.bytes_accessed = float(cost.get("bytes accessed", 0.0)) + result.loop_bytes
    if chip is None:
        return
    result.flops_s = result.flops / chip.peak_flops
    result.memory_s = result.bytes_accessed / chip.hbm_bandwidth
    result.roofline_s = max(result.flops_s, result.memory_s)
    result.bound = "FLOPs" if result.flops_s >= result.memory_s else "HBM"


def loop_cost(lowered, compiled_text: str, devices: int) -> tuple[float, float]:
    """FLOPs and bytes per device of the loop iterations XLA's ``cost_analysis()`` leaves out (it
    counts a ``while`` body once: MaskGIT's T decoding steps, the chunks of a deformable
    convolution). FLOPs: the dots and convolutions of the loop bodies in the program before
    optimisation (after it, TPU dots are rewritten as windowed convolutions), global, divided by
    ``devices`` (the loops here run data-parallel); bytes: the optimised per-device program's
    loop-body instructions (``benchmarks/hlo_traffic.py``)."""
    flops = hlo_traffic.loop_extra(lowered.compiler_ir("hlo").as_hlo_text())["flops"] / devices
    return flops, hlo_traffic.loop_extra(compiled_text)["bytes"]


def lowered_text(lowered) -> str:
    """The lowered StableHLO with source locations and name scopes (the CPU kernels' marks)."""
    return lowered.as_text(debug_info=True)


def run_one(name, topo: Topology, devices, mesh_spec, remat, args) -> Result:
    """Builds, lowers and (unless ``--lower_only``) compiles one program; a program that does not
    fit the chip's HBM is a result (``fits=False``, XLA's message in ``error``), not an error."""
    config = program_config(name, remat, args.image_size, args.set)
    batch = global_batch(name, config, args.restore_batch)
    data, fsdp = resolve_mesh(mesh_spec, len(devices), batch)
    result = Result(name, topo.name, data * fsdp, f"{data}x{fsdp}", remat, batch, "")
    mesh = make_mesh(devices, data, fsdp, config.mesh.min_shard_size)
    sharding.check_batch_size(batch, mesh)
    t0 = time.perf_counter()
    program = build_program(name, config, mesh, args.restore_batch)
    result.dtype = str(program.dtype)
    result.note = ", ".join(filter(None, [program.note, *args.set]))
    with jax.set_mesh(mesh):
        lowered = program.fn.lower(*program.args)
    result.lower_s = time.perf_counter() - t0
    if args.dump_lowered:
        dump(args.dump_lowered, result, lowered)
    if args.lower_only:
        return result
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # a program that does not fit is a result, not a crash
        result.compile_s = time.perf_counter() - t0
        if not add_oom(result, f"{type(e).__name__}: {e}", topo.chip):
            raise
        return result
    result.compile_s = time.perf_counter() - t0
    add_memory(result, compiled, topo.chip)
    text = compiled.as_text()
    pallas = hlo_traffic.kernel_extra(text)
    if pallas["unknown"]:
        result.note = ", ".join(
            filter(None, [result.note, f"{pallas['unknown']} Pallas kernel calls without FLOPs"])
        )
    add_cost(result, compiled, topo.chip, loop_cost(lowered, text, data * fsdp), pallas["flops"])
    if args.dump_compiled or args.traffic:
        if args.dump_compiled:
            os.makedirs(args.dump_compiled, exist_ok=True)
            with open(os.path.join(args.dump_compiled, _stem(result) + ".hlo.txt"), "w") as f:
                f.write(text)
        if args.traffic:  # bytes per model scope (benchmarks/hlo_traffic.py)
            by_scope, total = hlo_traffic.traffic_by_scope(text, args.traffic)
            result.traffic = dict(sorted(by_scope.items(), key=lambda kv: -kv[1])[:40])
            print(hlo_traffic.table(by_scope, total), flush=True)
    return result


def _stem(result: Result) -> str:
    return f"{result.program}.{result.topology.replace(':', '_')}.{result.mesh}"


def dump(directory: str, result: Result, lowered) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, _stem(result) + ".mlir"), "w") as f:
        f.write(lowered_text(lowered))


# ------------------------------------------------------------------------------------ tables

HEADER = [
    "program",
    "topology",
    "chips",
    "mesh",
    "remat",
    "batch",
    "dtype",
    "args GiB",
    "out GiB",
    "temp GiB",
    "alias GiB",
    "peak GiB",
    "HBM GiB",
    "fits",
    "TFLOP/dev",
    "GB acc/dev",
    "FLOP ms",
    "HBM ms",
    "roofline ms",
    "bound",
    "lower s",
    "compile s",
]


def _gib(v) -> str:
    return "-" if v is None else f"{v / GIB:.2f}"


def _num(v, scale: float, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v * scale, fmt)


def row(r: Result) -> list[str]:
    fits = "-" if r.fits is None else ("yes" if r.fits else "NO")
    return [
        r.program + (f" ({r.note})" if r.note else ""),
        r.topology,
        str(r.chips),
        r.mesh,
        r.remat,
        str(r.batch),
        r.dtype,
        _gib(r.argument_bytes),
        _gib(r.output_bytes),
        _gib(r.temp_bytes),
        _gib(r.alias_bytes),
        _gib(r.peak_bytes),
        _gib(r.hbm_bytes),
        fits,
        _num(r.flops, 1e-12, ".3f"),
        _num(r.bytes_accessed, 1e-9, ".1f"),
        _num(r.flops_s, 1e3, ".1f"),
        _num(r.memory_s, 1e3, ".1f"),
        _num(r.roofline_s, 1e3, ".1f"),
        r.bound or "-",
        f"{r.lower_s:.1f}",
        _num(r.compile_s, 1.0, ".1f"),
    ]


def markdown(results: list[Result], command: str) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    errors = [f"- {r.program} on {r.topology} {r.mesh}: {r.error}" for r in results if r.error]
    notes = [
        "",
        "Bytes per device (memory_analysis; peak = args + out + temp - alias); FLOPs and bytes "
        "accessed per device (cost_analysis of the partitioned program, which counts a loop body "
        "once, plus the loops' further iterations: loop_cost, and the FLOPs of Pallas kernels "
        "without a cost estimate: hlo_traffic.kernel_extra); roofline = max(FLOPs / "
        "peak bf16 FLOP/s, bytes / HBM bandwidth) of one chip.",
        *errors,
        "",
        f"command: {command}",
    ]
    return "\n".join(lines + notes) + "\n"


def write_outputs(prefix: str, results: list[Result], command: str) -> None:
    directory = os.path.dirname(prefix)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(
            {"command": command, "results": [dataclasses.asdict(r) for r in results]}, f, indent=1
        )
    with open(prefix + ".md", "w") as f:
        f.write(markdown(results, command))


# ------------------------------------------------------------------------------------ search


def fit_candidates(chips: int, batch: int) -> list[tuple[int, int, str]]:
    """``(data, fsdp, remat)`` on ``chips`` chips (at most ``batch`` of them), the least memory
    expected first, the cheapest last: all fsdp recomputing whole blocks, all fsdp recomputing
    norms and activations (``matmuls``), all data with ``matmuls``. ``none`` is left out: on TPU
    it keeps more and moves more bytes than ``matmuls`` for the same FLOPs (docs/performance.md,
    "Remat per part"); ``--remat`` compiles it where wanted."""
    n = math.gcd(chips, batch)
    return list(dict.fromkeys([(1, n, "full"), (1, n, "matmuls"), (n, 1, "matmuls")]))


def search_fit(name: str, chip: Chip, args, report: Callable[[Result], None]) -> Result | None:
    """The smallest slice of ``chip`` (<= 8 chips) on which program ``name`` fits, and there the
    cheapest mesh and remat that fits. A slice is tried candidate by candidate, least memory
    first, until one fits (``full`` does not always keep least: stage I keeps more with it than
    with ``matmuls``); then the candidates after it, cheapest first."""
    for shape in FIT_TOPOLOGIES[chip.name]:
        topo = parse_topology(f"{chip.name}:{shape}")
        devices = topology_devices(topo)
        config = program_config(name, "none", args.image_size, args.set)
        batch = global_batch(name, config, args.restore_batch)
        candidates = fit_candidates(topo.num_chips, batch)
        fitting = None
        while candidates and fitting is None:
            data, fsdp, remat = candidates.pop(0)
            r = run_one(name, topo, devices, f"{data},{fsdp}", remat, args)
            report(r)
            fitting = r if r.fits else None
        if fitting is None:
            continue
        for data, fsdp, remat in reversed(candidates):  # the cheaper ones, cheapest first
            r = run_one(name, topo, devices, f"{data},{fsdp}", remat, args)
            report(r)
            if r.fits:
                return r
        return fitting
    return None


# -------------------------------------------------------------------------------------- main


def print_result(r: Result) -> None:
    cells = dict(zip(HEADER, row(r), strict=True))
    print("  " + "  ".join(f"{k}={v}" for k, v in cells.items()), flush=True)
    if r.error:
        print(f"  error: {r.error}", flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", action="append", help="v5e:2x2 (default), v5p:2x2x1, cpu:4 ...")
    p.add_argument("--config", action="append", help=f"one of {program_names()} (repeatable)")
    p.add_argument("--mesh", action="append", help="'auto' (default) or 'data,fsdp'")
    p.add_argument("--remat", default="off", choices=tuple(REMATS))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config field, after --remat: model.transformer_remat=full (repeatable)",
    )
    p.add_argument("--lower_only", action="store_true", help="lower, do not compile")
    p.add_argument("--fit", action="store_true", help="smallest slice/mesh that fits (<= 8 chips)")
    p.add_argument("--restore_batch", type=int, default=8, help="art_restore: faces per call")
    p.add_argument("--image_size", type=int, default=None, help="override config.data.image_size")
    p.add_argument("--dump_lowered", default="", help="write each lowered program here (.mlir)")
    p.add_argument("--dump_compiled", default="", help="write each compiled program's HLO here")
    p.add_argument(
        "--traffic", type=int, default=0, help="print bytes accessed per model scope (depth N)"
    )
    p.add_argument("--out", default="", help="write PREFIX.json and PREFIX.md")
    args = p.parse_args(argv)
    args.topology = args.topology or ["v5e:2x2"]
    args.config = [c for v in (args.config or PAPER) for c in v.split(",") if c]
    args.mesh = args.mesh or ["auto"]
    unknown = sorted(set(args.config) - set(program_names()))
    if unknown:
        p.error(f"--config: unknown {unknown}; expected some of {program_names()}")
    try:
        args.topos = [parse_topology(t) for t in args.topology]
    except ValueError as e:
        p.error(str(e))
    cpus = max((t.num_chips for t in args.topos if t.chip is None), default=0)
    if cpus:
        jax.config.update("jax_num_cpu_devices", max(cpus, jax.config.jax_num_cpu_devices))
    return args


def main(argv=None) -> list[Result]:
    args = parse_args(argv)
    command = "python -m benchmarks.aot_compile " + " ".join(sys.argv[1:] if argv is None else argv)
    remats = REMATS[args.remat]
    results: list[Result] = []

    def report(r: Result) -> None:
        results.append(r)
        print_result(r)

    for name in args.config:
        if args.fit:
            chip = next((t.chip for t in args.topos if t.chip is not None), CHIPS["v5e"])
            print(f"{name}: searching the smallest {chip.name} slice that fits", flush=True)
            best = search_fit(name, chip, args, report)
            verdict = "does not fit on <= 8 chips" if best is None else f"fits: {row(best)[1:5]}"
            print(f"{name}: {verdict}", flush=True)
            continue
        for topo in args.topos:
            devices = topology_devices(topo)
            for mesh_spec in args.mesh:
                for remat in remats:
                    print(f"{name} on {topo.name} mesh={mesh_spec} remat={remat}", flush=True)
                    report(run_one(name, topo, devices, mesh_spec, remat, args))
    print()
    print(markdown(results, command))
    if args.out:
        write_outputs(args.out, results, command)
    return results


if __name__ == "__main__":
    main()
