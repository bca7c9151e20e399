r"""ART-FR Fig. 6 at small scale: HQ-token prediction accuracy against degradation level.

For each level s in ``--levels`` every held-out HQ face is degraded with the *fixed* parameters
s * (the maxima of the run's degradation ranges): blur sigma = s * sigma_max, downscale
r = 1 + s * (r_max - 1), noise = s * delta_max, JPEG quality = q_max - s * (q_max - q_min)
(s = 0: no degradation). The accuracy against the frozen tokenizer's HQ tokens is measured for
  (a) ``lookup``: nearest codebook entry of the LQ features (a plain VQGAN / "AR module off"),
  (b) ``T=1``: one-step prediction of the transformer,
  (c) ``T=<steps>``: iterative decoding (default 8),
together with the PSNR of (c)'s restoration and of the degraded input.

    python -m experiments.token_accuracy --workdir=runs/demo --output=runs/demo/token_accuracy

Writes ``token_accuracy.csv`` and ``token_accuracy.png`` into ``--output``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from artfr_jax import inference, workdirs  # noqa: E402
from artfr_jax.data import degradations, pipeline  # noqa: E402
from artfr_jax.evaluation import metrics as metrics_lib  # noqa: E402
from artfr_jax.models import factory  # noqa: E402
from artfr_jax.models.artfr import hq_targets, nearest_tokens  # noqa: E402
from artfr_jax.sampling import artfr as artfr_sampling  # noqa: E402
from artfr_jax.utils import compile_cache  # noqa: E402
from artfr_jax.utils import images as image_utils  # noqa: E402


def level_params(cfg: ml_collections.ConfigDict, s: float) -> degradations.DegradationParams:
    """Fixed Eq. 8 parameters at strength ``s`` in [0, 1] of the config's ranges."""
    sigma = s * float(cfg.blur_sigma[1])
    q_lo, q_hi = (int(v) for v in cfg.jpeg_range)
    return degradations.DegradationParams(
        sigma_x=sigma,
        sigma_y=sigma,
        scale=1.0 + s * (float(cfg.downscale_range[1]) - 1.0),
        noise_std=s * float(cfg.noise_range[1]),
        noise_seed=1234,
        jpeg_quality=round(q_hi - s * (q_hi - q_lo)) if s > 0 else 0,
    )


def run(
    workdir: str,
    output: str,
    *,
    levels: list[float],
    num_images: int = 64,
    batch_size: int = 16,
    steps: int | None = None,
) -> list[dict]:
    workdir = os.path.abspath(workdir)
    _, saved, _ = workdirs.trained_config(workdir, "art", "--workdir")
    config = ml_collections.ConfigDict(saved)
    tokenizer, tok, _ = inference.load_tokenizer(
        inference.stage1_workdir(saved, workdir), policy_from=saved["model"]
    )
    art = factory.art(config, tokenizer)
    params = inference.load_art_params(workdir, art, config.data.image_size)
    steps = steps or int(config.sampling.steps)
    if art.transformer is None:
        raise ValueError(f"{workdir}: trained without the AR module; nothing to compare")

    rng = jax.random.key(int(config.seed))  # greedy at temperature 0: the key matters only above

    def sampling(t):
        return ml_collections.ConfigDict({**config.sampling.to_dict(), "steps": t})

    @functools.partial(jax.jit, static_argnums=0)
    def predict(t, lq_u8, hq_u8):
        targets, _ = hq_targets(tokenizer, tok, image_utils.to_float_image(hq_u8))
        lq = image_utils.to_float_image(lq_u8)
        tokens, f_l = artfr_sampling.restore_tokens(
            params, tok, lq, rng, art=art, tokenizer=tokenizer, sampling=sampling(t)
        )
        lookup = nearest_tokens(tokenizer, tok, f_l)
        restored = artfr_sampling.decode_tokens(tok, tokens, tokenizer=tokenizer)
        restored = image_utils.to_uint8_image(restored)
        acc = lambda p: jnp.mean((p == targets).astype(jnp.float32), axis=1)
        return acc(lookup), acc(tokens), restored

    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.degradation = degradations.degradation_preset("none")
    batches = pipeline.make_eval_batches(
        data_cfg, num_images=num_images, batch_size=batch_size, seed=int(config.seed) + 7
    )
    deg = config.data.degradation
    rows = []
    for s in levels:
        p = level_params(deg, s)
        res = {"lookup": [], "T=1": [], f"T={steps}": [], "psnr_input": [], "psnr_restored": []}
        for batch in batches:
            hq = batch["hq"]
            lq = np.stack(
                [
                    degradations.apply_degradation(
                        im,
                        p,
                        kernel_max_size=int(deg.kernel_max_size),
                        downscale_interp=deg.downscale_interp,
                        upscale_interp=deg.upscale_interp,
                    )
                    for im in hq
                ]
            )
            a_lookup, a1, _ = predict(1, lq, hq)
            _, a_t, restored = predict(steps, lq, hq)
            res["lookup"] += list(np.asarray(a_lookup))
            res["T=1"] += list(np.asarray(a1))
            res[f"T={steps}"] += list(np.asarray(a_t))
            x = hq.astype(np.float32)
            res["psnr_input"] += list(np.asarray(metrics_lib.psnr(lq.astype(np.float32), x)))
            res["psnr_restored"] += list(
                np.asarray(metrics_lib.psnr(np.asarray(restored, np.float32), x))
            )
        row = {
            "level": s,
            "blur_sigma": p.sigma_x,
            "downscale": p.scale,
            "noise": p.noise_std,
            "jpeg": p.jpeg_quality,
            **{f"acc_{k}": float(np.mean(v)) for k, v in res.items() if not k.startswith("psnr")},
            "psnr_input": float(np.mean(res["psnr_input"])),
            "psnr_restored": float(np.mean(res["psnr_restored"])),
        }
        rows.append(row)
        print(
            f"level {s:.2f}: lookup {row['acc_lookup']:.3f}  T=1 {row['acc_T=1']:.3f}  "
            f"T={steps} {row[f'acc_T={steps}']:.3f}  PSNR input {row['psnr_input']:.2f} -> "
            f"restored {row['psnr_restored']:.2f}",
            flush=True,
        )
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "token_accuracy.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, steps, os.path.join(output, "token_accuracy.png"))
    return rows


def _plot(rows: list[dict], steps: int, path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    x = [r["level"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for key, label in (
        ("acc_lookup", "nearest-code lookup (VQGAN)"),
        ("acc_T=1", "ART-FR, T = 1"),
        (f"acc_T={steps}", f"ART-FR, T = {steps}"),
    ):
        ax.plot(x, [r[key] for r in rows], marker="o", label=label)
    ax.set_xlabel("degradation level s")
    ax.set_ylabel("HQ-token accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a stage-II (configs/art.py) workdir")
    parser.add_argument("--output", required=True)
    parser.add_argument("--levels", default="0,0.1,0.2,0.3,0.5,0.7,1.0")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="default: the run's T")
    args = parser.parse_args()
    compile_cache.enable_persistent_cache()
    levels = [float(v) for v in args.levels.split(",")]
    run(
        args.workdir,
        args.output,
        levels=levels,
        num_images=args.num_images,
        batch_size=args.batch_size,
        steps=args.steps,
    )


if __name__ == "__main__":
    main()
