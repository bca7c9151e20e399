r"""ART-FR restoration speed: latency at batch 1, throughput at the largest batch that fits, and the
one-jit decode against a Python loop of T jitted steps, side by side in one run.

    python -m benchmarks.restoration                       # paper model, 512 px, T = 8
    python -m benchmarks.restoration --config=smoke --max-batch=64
    python -m benchmarks.restoration --dtype=bfloat16      # on a GPU
    python -m benchmarks.restoration --dtype=bfloat16 --batches=1,16,64,128,256

Random weights (same compute as trained ones). "one-jit" is what ``python -m artfr_jax.restore``
runs: LQ encoder, T decoding steps in one ``lax.scan`` and the HQ decoder, compiled as one program.
"loop" runs the same work as a jitted encoder, T dispatches of a jitted decoding step and a jitted
decoder. Times: median of ``--repeats`` runs after ``--warmup``; compile time reported separately.
Throughput: the one-jit restore at each of ``--batches`` (default 1, 2, 4, ... up to
``--max-batch``), stopping at the first that runs out of memory.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from artfr_jax import inference  # noqa: E402
from artfr_jax.models import factory  # noqa: E402
from artfr_jax.models.artfr import ARTFR  # noqa: E402
from artfr_jax.sampling import artfr as artfr_sampling  # noqa: E402
from artfr_jax.sampling import maskgit  # noqa: E402
from artfr_jax.utils import images as image_utils  # noqa: E402
from benchmarks import results  # noqa: E402
from configs import art as art_config  # noqa: E402


def _median_time(fn, warmup: int, repeats: int) -> tuple[float, float]:
    """(first call incl. compile, median of later calls), seconds."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def _logits(art_params, f_l, tokens, *, art):
    return art.apply({"params": art_params}, tokens, f_l, method=ARTFR.token_logits)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=["paper", "smoke", "tiny"], default="paper")
    parser.add_argument("--steps", type=int, default=8, help="decoding steps T")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--max-batch", type=int, default=None, help="default: 8 on CPU, 256 else")
    parser.add_argument(
        "--batches",
        default=None,
        help="throughput batch sizes, e.g. 1,16,64 (overrides --max-batch)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    # Traced under the restorer's one-device mesh, as `python -m artfr_jax.restore` traces it.
    with jax.set_mesh(inference.device_mesh()):
        benchmark(args)


def benchmark(args):
    config = art_config.get_config(None if args.config == "paper" else args.config)
    config.model.dtype = args.dtype
    config.sampling.steps = args.steps
    # The frozen tokenizer computes in the stage's dtype, as a trained workdir's does.
    tokenizer = factory.tokenizer(config.stage1.config.model.to_dict(), config.model.to_dict())
    art = factory.art(config, tokenizer)
    size = config.data.image_size
    x = jnp.zeros((1, size, size, 3))
    n_tok = art.transformer.num_tokens
    tok_params = jax.jit(lambda k: tokenizer.init(k, x, train=False)["params"])(jax.random.key(1))
    art_params = jax.jit(lambda k: art.init(k, x, jnp.zeros((1, n_tok), jnp.int32))["params"])(
        jax.random.key(2)
    )
    restorer = inference.Restorer(
        art=art,
        tokenizer=tokenizer,
        art_params=art_params,
        tokenizer_params=tok_params,
        sampling=config.sampling,
        image_size=size,
    )
    print(
        f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} config="
        f"{args.config} image={size}px tokens={n_tok} T={args.steps} dtype={args.dtype} "
        f"width={config.model.width} depth={config.model.depth}"
    )

    encode = jax.jit(lambda p, lq: art.apply({"params": p}, lq, method=ARTFR.encode_condition))
    decode_img = jax.jit(
        lambda tp, t: image_utils.to_uint8_image(
            artfr_sampling.decode_tokens(tp, t, tokenizer=tokenizer)
        )
    )
    logits = functools.partial(_logits, art=art)
    decode_kw = dict(
        seq_len=n_tok, mask_token_id=art.transformer.mask_token_id, num_steps=args.steps
    )

    def looped(lq_u8, rng):
        f_l = encode(art_params, image_utils.to_float_image(lq_u8))
        fn = jax.tree_util.Partial(logits, art_params, f_l)
        tokens = maskgit.decode_python_loop(fn, rng, batch_size=lq_u8.shape[0], **decode_kw)
        return decode_img(tok_params, tokens)

    one_jit_decode = jax.jit(
        lambda p, f_l, rng: maskgit.decode(
            functools.partial(logits, p, f_l), rng, batch_size=f_l.shape[0], **decode_kw
        )
    )

    rng = jax.random.key(0)
    lq1 = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    f_l1 = encode(art_params, image_utils.to_float_image(lq1))

    rows = [
        ("restore one-jit", lambda: restorer._run(art_params, tok_params, lq1, rng)),
        ("restore loop", lambda: looped(lq1, rng)),
        ("decode-only one-jit", lambda: one_jit_decode(art_params, f_l1, rng)),
        (
            "decode-only loop",
            lambda: maskgit.decode_python_loop(
                jax.tree_util.Partial(logits, art_params, f_l1), rng, batch_size=1, **decode_kw
            ),
        ),
    ]
    print("batch 1 latency (first call incl. compile | median):")
    medians = {}
    for name, fn in rows:
        first, med = _median_time(fn, args.warmup, args.repeats)
        medians[name] = med
        print(f"  {name:20s} first {first:8.2f} s | median {med * 1e3:9.2f} ms")
    # The two ways run the same computation: same tokens, same pixels on the CPU. Compiled
    # separately, a GPU program may round bfloat16 differently, so a difference is reported here
    # rather than stopping the timings.
    a, b = np.asarray(restorer(lq1, rng)), np.asarray(looped(lq1, rng))
    differ = int(np.count_nonzero(a != b))
    print(
        f"  one-jit vs loop pixels: {'identical' if not differ else f'{differ} of {a.size} differ'}"
    )
    for what in ("restore", "decode-only"):
        ratio = medians[f"{what} loop"] / medians[f"{what} one-jit"]
        print(f"  {what}: loop / one-jit = {ratio:.2f}x")
    # One record per measurement as it is made, so a run stopped by a time limit keeps its numbers.
    common = dict(config=args.config, image_size=size, dtype=args.dtype, steps=args.steps)
    results.record(
        "restoration",
        kind="latency",
        device=jax.devices()[0].device_kind,
        latency_ms={k: v * 1e3 for k, v in medians.items()},
        loop_pixels_differ=differ,
        **common,
    )

    if args.batches:
        batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    else:
        max_batch = args.max_batch or (8 if jax.default_backend() == "cpu" else 256)
        batches = [2**i for i in range(max_batch.bit_length()) if 2**i <= max_batch]
    print("throughput (one-jit restore):")
    best = (0.0, 0)
    for b in batches:
        lq = np.random.default_rng(b).integers(0, 256, (b, size, size, 3), dtype=np.uint8)
        try:
            first, med = _median_time(
                lambda lq=lq: restorer._run(art_params, tok_params, lq, rng),
                args.warmup,
                max(2, args.repeats // 2),
            )
        except Exception as e:  # noqa: BLE001  (XLA reports OOM as several error types)
            if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
                print(f"  batch {b}: out of memory; stopping")
                results.record("restoration", kind="out_of_memory", batch=b, **common)
                break
            raise
        print(
            f"  batch {b:4d}: {med * 1e3:9.1f} ms  {b / med:8.2f} images/s (compile {first:.1f} s)"
        )
        results.record(
            "restoration", kind="throughput", batch=b, ms=med * 1e3, images_per_s=b / med, **common
        )
        best = max(best, (b / med, b))
    print(f"best throughput: {best[0]:.2f} images/s at batch {best[1]}")


if __name__ == "__main__":
    main()
