r"""One trained part of the ART-FR stage-II step under each remat mode, compiled ahead of time for
one TPU chip on this CPU host: FLOPs, bytes accessed and temporaries of forward + backward, from
XLA's own analyses (as ``benchmarks/aot_compile.py``, whose rows are whole steps).

    .tpu-venv/bin/python -m benchmarks.aot_remat --part=transformer [--batch=6] [--topology=v5e:1x1]
    .tpu-venv/bin/python -m benchmarks.aot_remat --part=lq_encoder --modes=none,matmuls

Parts, as ``factory.art`` builds them from ``configs/art.py`` (paper shapes, bfloat16):
  transformer  the masked token transformer on ``batch`` x (256 prefix + 256 target) tokens,
               dropout on, loss = mean log-sum-exp of its logits;
  lq_encoder   the LQ encoder ``E_l`` (the stage-I encoder's architecture) on ``batch`` 512-px
               faces, loss = mean square of its output.
The gradient is taken for all of ART-FR's parameters (the other part's are zeros written once;
estimated from their float32 sizes: under 1% of the bytes). Each mode
(``models/layers.REMAT_MODES``) is a separate program; the step's choice per part is
``config.model.remat`` (the LQ encoder) and ``config.model.transformer_remat``.
"""

from __future__ import annotations

import argparse
import os
import time

# As benchmarks/aot_compile.py: compile-only, no TPU probing on this host.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from artfr_jax.models import factory, kernels, layers  # noqa: E402
from artfr_jax.models.artfr import ARTFR  # noqa: E402
from benchmarks import aot_compile, hlo_traffic, results  # noqa: E402
from configs import art as art_config  # noqa: E402

GIB = 2**30
PARTS = ("transformer", "lq_encoder")


def part_program(part: str, mode: str, batch: int, variant: str | None = None):
    """``(loss(params, *inputs), abstract params, abstract inputs)`` of ``part`` under ``mode``,
    of ``configs/art.py:variant`` (the paper's by default)."""
    config = art_config.get_config(variant)
    # XLA's ops also for cpu:1 (the CPU kernels' convolutions are not one op the policy keeps)
    config.model.update(remat=mode, transformer_remat=mode, kernels="xla")
    tokenizer = factory.tokenizer(config.stage1.config.model.to_dict(), config.model)
    art = factory.art(config, tokenizer)
    size = config.data.image_size
    n = art.transformer.num_tokens
    lq = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch, n), jnp.int32)
    params = jax.eval_shape(lambda x, t: art.init(jax.random.key(0), x, t)["params"], lq, tokens)
    if part == "transformer":
        cond = jax.ShapeDtypeStruct((batch, n, art.transformer.width), art.transformer.dtype)

        def loss(p, tokens, cond):
            logits = art.apply(
                {"params": p},
                tokens,
                cond,
                train=True,
                rngs={"dropout": jax.random.key(1)},
                method=lambda m, t, c, train: m.transformer(t, c, train=train),
            )
            return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))

        return loss, params, (tokens, cond)

    def encoder_loss(p, lq):
        f_l = art.apply({"params": p}, lq, method=ARTFR.encode_condition)
        return jnp.mean(jnp.square(f_l.astype(jnp.float32)))

    return encoder_loss, params, (lq,)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", default="transformer", choices=PARTS)
    p.add_argument("--modes", default=",".join(layers.REMAT_MODES), help="comma-separated")
    p.add_argument("--batch", type=int, default=6, help="per chip (the paper's 24 on 4 chips: 6)")
    p.add_argument("--topology", default="v5e:1x1", help="one chip: v5e:1x1, v5p:1x1x1, cpu:1")
    p.add_argument("--variant", default=None, help="of configs/art.py (tiny: the test's)")
    args = p.parse_args(argv)
    topo = aot_compile.parse_topology(args.topology)
    mesh = Mesh(aot_compile.topology_devices(topo)[:1], ("d",))
    rep = NamedSharding(mesh, P())
    on_chip = lambda t: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), t
    )
    rows = []
    for mode in args.modes.split(","):
        mode = layers.remat_mode(mode, "--modes")
        loss, params, inputs = part_program(args.part, mode, args.batch, args.variant)
        t0 = time.perf_counter()
        lowered = jax.jit(jax.grad(loss)).lower(on_chip(params), *on_chip(inputs))
        # cpu:1: keep the remat barriers, as the trainers compile (models/kernels.py)
        compiled = lowered.compile(compiler_options=kernels.compiler_options(mesh.devices.flat))
        cost, mem = compiled.cost_analysis(), compiled.memory_analysis()
        # + the Pallas flash attention's backward kernels (TPU), which XLA counts as no FLOPs
        kernel_flops = hlo_traffic.kernel_extra(compiled.as_text())["flops"]
        row = dict(
            part=args.part,
            mode=mode,
            topology=topo.name,
            batch=args.batch,
            tflop=(cost.get("flops", 0.0) + kernel_flops) / 1e12,
            gb_accessed=cost.get("bytes accessed", 0.0) / 1e9,
            temp_gib=mem.temp_size_in_bytes / GIB,
            compile_s=time.perf_counter() - t0,
        )
        if topo.chip is not None:
            row["flops_ms"] = row["tflop"] * 1e15 / topo.chip.peak_flops
            row["hbm_ms"] = row["gb_accessed"] * 1e12 / topo.chip.hbm_bandwidth
        rows.append(row)
        results.record("aot_remat", **row)
        cells = (f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print("  ".join(cells), flush=True)
    return rows


if __name__ == "__main__":
    main()
