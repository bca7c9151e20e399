r"""ART-FR's ablations (Tables 2 and 3) at the demo's scale, as a sweep of the launcher.

Rows: Table 2 (d) the full model, (a) AR module off (the LQ features' nearest codes, no
transformer), (b) long skips off, (c) feature loss off; Table 3 the LQ condition as prefix tokens
(= (d)), concatenated to the masked token embeddings, or through cross-attention. Every row
trains ``configs/art.py:demo``'s stage II (32 px, 600 steps) once per seed on one stage-I
tokenizer shared by all trials (``ROOT/stage1``, trained by the first trial).

    python -m experiments.artfr_ablations --root=runs/ablations [--seeds=0,1] \
        [--test_images=256] [--lpips_weights=weights/lpips_vgg.msgpack] [--parallel=1]

or only the training, through the launcher:

    python -m artfr_jax.launch --config=configs/art.py:demo --sweep=experiments/artfr_ablations.py \
        --root=runs/ablations --set=config.stage1.workdir=runs/ablations/stage1

Scoring: a fixed synthetic test split (``ROOT/testset``: ``--test_images`` faces from a seed that
training never draws, degraded by the demo's degradation model) is restored by each trial with the
restore command (T = 8, greedy) and scored by the evaluate command (PSNR, SSIM; LPIPS when
``--lpips_weights`` is given); token accuracy is the trainer's final eval (``eval/token_acc``: the
decoded tokens against the tokenizer's HQ tokens, ``eval/lookup_acc`` for the plain lookup) on
``--eval_images`` held-out faces. Writes ``ROOT/ablations.md`` (per trial and per row, mean and
range over seeds, the paper's numbers beside them) and ``ROOT/ablations.json``. Re-running skips
finished work; ``--score_only`` scores the trials finished so far without training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from artfr_jax import hyper, launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "art.py") + ":demo"
SEEDS = (0, 1)
TEST_SEED = 9_001  # the synthetic generator's seed for the test split (training draws 0..)

# Row label, its overrides (as sweeps), the paper's numbers on CelebA-Test.
ROWS = (
    ("(d) full: skips, AR module, feature loss", {}, "Tab. 2 (d): LPIPS 0.3943, LMD 4.7256, Deg 57.746"),
    ("(a) AR module off (nearest code)", {"config.model.use_transformer": False},
     "Tab. 2 (a): LPIPS 0.4185, LMD 5.1325, Deg 59.9775"),
    ("(b) long skips off", {"config.model.long_skips": False},
     "Tab. 2 (b): LPIPS 0.3965, LMD 4.9041, Deg 58.1013"),
    ("(c) feature loss off", {"config.loss.feature_weight": 0.0},
     "Tab. 2 (c): LPIPS 0.4050, LMD 5.2700, Deg 59.7662"),
    ("LQ condition: concatenation", {"config.model.condition_mode": "concat"},
     "Tab. 3: LPIPS 0.3974, LMD 4.8648, Deg 58.7128, PSNR 21.6129"),
    ("LQ condition: cross-attention", {"config.model.condition_mode": "cross_attention"},
     "Tab. 3: LPIPS 0.3949, LMD 4.7667, Deg 57.9144, PSNR 21.7019"),
)  # fmt: skip
PREFIX_PAPER = "Tab. 3 prefix (= (d)): LPIPS 0.3943, LMD 4.7256, Deg 57.7465, PSNR 21.7309"


def rows(h) -> list[dict]:
    """One trial per row of the tables (no seed)."""
    return h.chainit(
        [
            h.product([h.fixed(k, v) for k, v in o.items()]) if o else h.identity()
            for _, o, _ in ROWS
        ]
    )


def get_hyper(h, seeds=SEEDS) -> list[dict]:
    """Every row once per seed (rows vary fastest)."""
    return h.product([h.sweep("config.seed", list(seeds)), rows(h)])


def row_of(overrides: dict) -> str:
    rest = {k: v for k, v in overrides.items() if k != "config.seed"}
    for label, o, _ in ROWS:
        if o == rest:
            return label
    raise ValueError(f"no table row for {overrides}")


# ------------------------------------------------------------------------------------ scoring


def _run(argv: list[str], log: str) -> None:
    with open(log, "a", encoding="utf-8") as f:
        f.write("\n$ " + " ".join(argv) + "\n")
        f.flush()
        rc = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"{argv[2]} failed (exit {rc}); see {log}")


def make_testset(root: str, n: int) -> str:
    from artfr_jax.evaluation import testset  # noqa: PLC0415

    out = os.path.join(root, "testset")
    if not os.path.exists(os.path.join(out, "testset.json")):
        config = launch.load_config(CONFIG)
        testset.make_testset(
            out,
            synthetic=n,
            size=config.data.image_size,
            seed=TEST_SEED,
            degradation=config.data.degradation,
            progress=False,
        )
    return out


def restore_trial(workdir: str, test_dir: str) -> str:
    """The trial's restorations of the test split (the restore command; resumes)."""
    out = os.path.join(workdir, "test_restored")
    want = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(test_dir, "lq"))}
    have = {os.path.splitext(f)[0] for f in os.listdir(out)} if os.path.isdir(out) else set()
    if not want <= have:
        _run(
            [sys.executable, "-m", "artfr_jax.restore", f"--workdir={workdir}",
             f"--input={os.path.join(test_dir, 'lq')}", f"--output={out}", "--mode=aligned",
             "--steps=8", "--temperature=0"],
            os.path.join(workdir, "score.log"),
        )  # fmt: skip
    return out


def final_eval(workdir: str) -> dict:
    summary = launch.summarize_trial(workdir)
    return {k: summary.get(k) for k in ("eval/token_acc", "eval/lookup_acc", "eval/psnr")}


def _mean_range(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def write_tables(
    root: str, results: list[dict], metrics: list[str], command: str, degraded: dict
) -> str:
    per_trial = ["| trial | row | seed | " + " | ".join(metrics) + " | token acc | lookup acc |",
                 "|---|---|---|" + "---|" * (len(metrics) + 2)]  # fmt: skip
    for r in results:
        cells = [f"{r['scores'].get(m, float('nan')):.4f}" for m in metrics]
        cells += [
            f"{r['eval'].get(k) or float('nan'):.4f}" for k in ("eval/token_acc", "eval/lookup_acc")
        ]
        per_trial.append(f"| {r['trial']} | {r['row']} | {r['seed']} | " + " | ".join(cells) + " |")
    per_row = ["| row | seeds | " + " | ".join(metrics) + " | token acc | paper |",
               "|---|---|" + "---|" * (len(metrics) + 2)]  # fmt: skip
    per_row.append(
        "| degraded input | - | "
        + " | ".join(f"{degraded.get(m, float('nan')):.4f}" for m in metrics)
        + " | - | - |"
    )
    for label, _, paper in ROWS:
        mine = [r for r in results if r["row"] == label]
        if not mine:
            continue
        cells = [_mean_range([r["scores"].get(m) for r in mine]) for m in metrics]
        cells.append(_mean_range([r["eval"].get("eval/token_acc") for r in mine]))
        if label.startswith("(d)"):
            paper += "; " + PREFIX_PAPER
        per_row.append(f"| {label} | {len(mine)} | " + " | ".join(cells) + f" | {paper} |")
    text = "\n".join(
        [
            "Per row: mean over seeds (min-max). Test split: see testset/testset.json.",
            "",
            *per_row,
            "",
            "Per trial:",
            "",
            *per_trial,
            "",
            f"command: `{command}`",
            "",
        ]
    )
    path = os.path.join(root, "ablations.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(root, "ablations.json"), "w", encoding="utf-8") as f:
        json.dump({"command": command, "results": results}, f, indent=1)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="sweep root (trials in ROOT/artfr_ablations/<i>)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds")
    p.add_argument("--test_images", type=int, default=256, help="faces of the test split")
    p.add_argument("--eval_images", type=int, default=128, help="held-out faces of the eval")
    p.add_argument("--lpips_weights", default="", help="converted LPIPS weights (adds LPIPS)")
    p.add_argument("--parallel", type=int, default=1, help="trials at a time")
    p.add_argument("--only", default="", help="trial indices (launcher syntax)")
    p.add_argument("--set", action="append", default=[], help="extra config.a.b=v for all trials")
    p.add_argument(
        "--score_only", action="store_true", help="score the finished trials, train nothing"
    )
    args = p.parse_args(argv)
    command = "python -m experiments.artfr_ablations " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    root = os.path.abspath(args.root)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    trials = get_hyper(hyper, seeds)
    fixed = [
        f"config.stage1.workdir={os.path.join(root, 'stage1')}",
        f"config.eval.num_images={args.eval_images}",
        "config.final_restore.num_images=0",
        *args.set,
    ]
    sweep_dir = os.path.join(root, "artfr_ablations")
    if not args.score_only:
        try:
            launch.launch(
                CONFIG, root, trials=trials, name="artfr_ablations", fixed=fixed,
                parallel=args.parallel, only=args.only,
            )  # fmt: skip
        except RuntimeError as e:  # failed trials: score the rest
            print(f"artfr_ablations: {e}", file=sys.stderr)
    test_dir = make_testset(root, args.test_images)
    record = json.load(open(os.path.join(sweep_dir, "sweep.json"), encoding="utf-8"))
    done = [
        t for t in record["trials"] if launch.trial_status(t["workdir"])["status"] == "finished"
    ]
    if not done:
        print("artfr_ablations: no finished trial to score", file=sys.stderr)
        return 1
    names, folders = ["input"], [os.path.join(test_dir, "lq")]  # the degraded faces themselves
    for t in done:
        names.append(f"trial{t['index']}")
        folders.append(restore_trial(t["workdir"], test_dir))
        print(f"restored the test split with trial {t['index']}", flush=True)
    metrics = ["psnr", "ssim"] + (["lpips"] if args.lpips_weights else [])
    report = os.path.join(root, "test_report")
    cmd = [sys.executable, "-m", "artfr_jax.evaluate", f"--gt={os.path.join(test_dir, 'gt')}",
           f"--metrics={','.join(metrics)}", f"--out={report}", "--overwrite"]  # fmt: skip
    cmd += [f"--restored={f}" for f in folders] + [f"--name={n}" for n in names]
    if args.lpips_weights:
        cmd.append(f"--weights_dir={os.path.dirname(os.path.abspath(args.lpips_weights))}")
    _run(cmd, os.path.join(root, "score.log"))
    scored = {row["name"]: row["values"] for row in json.load(open(report + ".json"))["rows"]}
    results = [
        {
            "trial": t["index"],
            "row": row_of(t["overrides"]),
            "seed": t["overrides"].get("config.seed"),
            "scores": {m: scored[n].get(m) for m in metrics},
            "eval": final_eval(t["workdir"]),
        }
        for t, n in zip(done, names[1:], strict=True)
    ]
    path = write_tables(root, results, metrics, command, scored["input"])
    print(open(path, encoding="utf-8").read())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
