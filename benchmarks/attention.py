r"""Attention of the ART-FR token transformer: XLA's against cuDNN's fused kernel, at its shapes.

    python -m benchmarks.attention                          # paper: [24, 512, 12, 64] and batch 1
    python -m benchmarks.attention --config=tiny --batches=2 --repeats=2   # CPU check

``jax.nn.dot_product_attention(q, k, v, implementation=...)`` with ``"xla"``, ``"cudnn"`` and the
model's own choice (``artfr_jax.models.kernels.dot_product_attention``: cuDNN on a GPU in
bfloat16, XLA otherwise), forward and forward+backward, on ``[B, M + N, heads, width / heads]``
(the LQ prefix and the HQ tokens of ``configs/art.py``), random inputs in ``--dtype``. An
implementation that cannot run here (cuDNN on a CPU) is reported as unavailable. Times: median of
``--repeats`` timings of ``--inner`` back-to-back calls after a warm-up. FLOPs: XLA's cost analysis
of the compiled program (it does not count inside cuDNN's custom call) and the matmuls' count
``4 B H S^2 D`` forward, 3x that forward+backward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from artfr_jax.models import factory  # noqa: E402
from artfr_jax.models import kernels as kernels_lib  # noqa: E402
from benchmarks import results  # noqa: E402
from benchmarks.art_train_step import compiled_flops  # noqa: E402
from configs import art as art_config  # noqa: E402


def transformer_shape(config_name: str) -> tuple[int, int, int, int]:
    """(default batch, sequence length, heads, head width) of the config's token transformer."""
    config = art_config.get_config(None if config_name == "paper" else config_name)
    tokenizer = factory.tokenizer(config.stage1.config.model.to_dict(), config.model.to_dict())
    t = factory.art(config, tokenizer).transformer
    seq = t.num_tokens + (t.num_condition_tokens if t.condition_mode == "prefix" else 0)
    return config.batch_size, seq, t.num_heads, t.width // t.num_heads


IMPLEMENTATIONS = {
    "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
    "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
    "model": kernels_lib.dot_product_attention,
}


def _programs(attend):
    def fwd(q, k, v):
        return attend(q, k, v)

    def fwd_bwd(q, k, v, g):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(g)

    return {"forward": (jax.jit(fwd), 3), "forward+backward": (jax.jit(fwd_bwd), 4)}


def _time(compiled, args, inner: int, repeats: int) -> float:
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = compiled(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def benchmark(batch, seq, heads, dim, dtype, inner, repeats):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, g = (jax.random.normal(key, (batch, seq, heads, dim), dtype) for key in keys)
    matmul_flops = 4.0 * batch * heads * seq * seq * dim
    outputs = {}
    for impl, attend in IMPLEMENTATIONS.items():
        for what, (jitted, n_args) in _programs(attend).items():
            args = (q, k, v, g)[:n_args]
            row = dict(batch=batch, seq=seq, heads=heads, head_dim=dim, impl=impl, what=what)
            try:
                compiled = jitted.lower(*args).compile()
                seconds = _time(compiled, args, inner, repeats)
            except Exception as e:  # noqa: BLE001  (no cuDNN here: several error types)
                reason = (
                    str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                )
                print(f"  B={batch:3d} {what:17s} {impl:6s} unavailable: {reason}")
                results.record("attention", available=False, reason=reason, **row)
                continue
            flops = matmul_flops * (3 if what == "forward+backward" else 1)
            xla_gflops = compiled_flops(compiled) / 1e9
            if what == "forward":
                outputs[impl] = np.asarray(compiled(*args), np.float32)
            print(
                f"  B={batch:3d} {what:17s} {impl:6s} {seconds * 1e3:9.3f} ms  "
                f"{flops / seconds / 1e12:8.3g} TFLOP/s (matmuls {flops / 1e9:.3g} GFLOP; "
                f"XLA counts {xla_gflops:.3g})"
            )
            results.record(
                "attention",
                available=True,
                ms=seconds * 1e3,
                tflops_per_s=flops / seconds / 1e12,
                matmul_gflops=flops / 1e9,
                xla_gflops=xla_gflops,
                **row,
            )
    for impl in ("cudnn", "model"):
        if impl in outputs and "xla" in outputs:
            diff = float(np.max(np.abs(outputs[impl] - outputs["xla"])))
            print(f"  B={batch:3d} forward max |{impl} - xla| = {diff:.3g}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=["paper", "smoke", "demo", "tiny"], default="paper")
    parser.add_argument(
        "--batches", default=None, help="comma-separated; default: the config's batch and 1"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--inner", type=int, default=10, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    default_batch, seq, heads, dim = transformer_shape(args.config)
    batches = [int(b) for b in (args.batches or f"{default_batch},1").split(",") if b.strip()]
    print(
        f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"config={args.config} q/k/v=[B, {seq}, {heads}, {dim}] dtype={args.dtype} "
        f"batches={batches}"
    )
    for batch in batches:
        benchmark(batch, seq, heads, dim, jnp.dtype(args.dtype), args.inner, args.repeats)


if __name__ == "__main__":
    main()
