"""Scores restored faces with the papers' metrics, or builds a degraded test split.

    python -m artfr_jax.evaluate --restored=DIR [--restored=DIR2 ...] [--gt=DIR] \\
        [--metrics=psnr,ssim,lpips,dists,fid,niqe,deg,lmd] [--fid_ref=STATS.npz|DIR] \\
        [--weights_dir=DIR] --out=REPORT

    python -m artfr_jax.evaluate --make_testset (--gt=DIR | --synthetic=N) --out=DIR \\
        [--size=512] [--preset=vqfr] [--seed=0]

Flags may be spelt with dashes too (``--fid-ref``, ``--make-testset``).

* Restored and GT images are paired by file stem (``a.png`` with ``a.jpg``) at the folders' top level;
  restored files without GT, GT files without a restored file and unreadable or size-mismatched
  files are listed in the report, and the rest is scored.
* Network metrics need converted weights in ``--weights_dir``: ``lpips_vgg.msgpack``,
  ``dists.msgpack``, ``inception_fid.msgpack`` and ``arcface_*.msgpack`` (see the README). A metric
  whose weights are missing is skipped with the reason in the report, never estimated.
* FID's reference is ``--fid_ref`` (a statistics .npz, e.g. from ``python -m pytorch_fid
  --save-stats``, or an image folder such as all of FFHQ at 512 as VQFR/GFPGAN use), else the GT
  folder (the test set's GT, as other papers use); the report says which. Folder statistics are
  cached under ``--fid_cache_dir`` (default ``~/.cache/artfr_jax/fid_stats``).
* Deg. uses the first embedder whose weights are present: the arcface-pytorch ResNet-18 (the
  VQFR/GFPGAN protocol), insightface IResNet-100, IResNet-50, else dlib's face descriptor, which
  works offline (``--deg_embedder`` picks one). LMD uses dlib's 68 landmarks.
* The report is ``REPORT.json`` and ``REPORT.md`` (a table laid out like ART-FR Table 1 (a), one row
  per ``--restored`` folder). Existing reports are kept unless ``--overwrite``.

Exit status: 0 all scored, 1 some files could not be scored, 2 usage error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

from artfr_jax.data import degradations  # noqa: E402
from artfr_jax.evaluation import report as report_lib  # noqa: E402
from artfr_jax.evaluation import (
    suite,  # noqa: E402
    testset,  # noqa: E402
)
from artfr_jax.utils import cli as cli_lib  # noqa: E402
from artfr_jax.utils import compile_cache  # noqa: E402


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = flag_values
    flags.DEFINE_multi_string(
        "restored", [], "Folder of restored images (repeat for several rows).", flag_values=fv
    )
    flags.DEFINE_multi_string(
        "name", [], "Row label per --restored, in order (default: the folder name).", flag_values=fv
    )
    flags.DEFINE_string(
        "gt",
        None,
        "Folder of ground-truth images (or the source for --make_testset).",
        flag_values=fv,
    )
    flags.DEFINE_list("metrics", list(suite.METRICS), "Metrics to compute.", flag_values=fv)
    flags.DEFINE_string(
        "fid_ref",
        None,
        "FID reference: statistics .npz or image folder (default: --gt).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "fid_cache_dir", None, "Where folder FID statistics are cached.", flag_values=fv
    )
    flags.DEFINE_string("weights_dir", None, "Folder of converted network weights.", flag_values=fv)
    flags.DEFINE_string(
        "out", None, "Report path (writes .json and .md), or the test-set folder.", flag_values=fv
    )
    flags.DEFINE_integer(
        "batch_size", 16, "Images per network call.", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_integer(
        "crop_border",
        0,
        "Pixels cropped at each edge for PSNR/SSIM/NIQE.",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "deg_embedder", "auto", suite.DEG_EMBEDDERS, "Identity embedder for Deg.", flag_values=fv
    )
    flags.DEFINE_boolean(
        "overwrite", False, "Replace an existing report or test set.", flag_values=fv
    )
    flags.DEFINE_boolean(
        "make_testset", False, "Build a degraded test split instead.", flag_values=fv
    )
    flags.DEFINE_integer(
        "synthetic", 0, "--make_testset from N synthetic faces.", lower_bound=0, flag_values=fv
    )
    flags.DEFINE_integer("size", 512, "--make_testset image size.", lower_bound=8, flag_values=fv)
    flags.DEFINE_enum(
        "preset",
        testset.DEFAULT_PRESET,
        degradations.PRESETS,
        "--make_testset degradation.",
        flag_values=fv,
    )
    flags.DEFINE_integer("seed", 0, "--make_testset seed.", flag_values=fv)
    flags.DEFINE_boolean("progress", True, "Show progress bars.", flag_values=fv)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _row_names(folders: Sequence[str], names: Sequence[str]) -> list[str]:
    if names and len(names) != len(folders):
        raise ValueError(f"--name given {len(names)} times for {len(folders)} --restored folders")
    if names:
        return list(names)
    base = [os.path.basename(os.path.normpath(f)) for f in folders]
    return [
        b if base.count(b) == 1 else os.path.normpath(f) for b, f in zip(base, folders, strict=True)
    ]


def run_evaluation(fv) -> int:
    if not fv.restored:
        return cli_lib.usage_error("--restored is required (a folder of restored images)")
    if not fv.out:
        return cli_lib.usage_error("--out is required (the report path; .json and .md are written)")
    requested = [m.strip().lower() for m in fv.metrics if m.strip()]
    unknown = [m for m in requested if m not in suite.METRICS]
    if unknown:
        return cli_lib.usage_error(
            f"--metrics: unknown {unknown} (expected some of {','.join(suite.METRICS)})"
        )
    try:
        names = _row_names(fv.restored, fv.name)
        for folder in fv.restored:
            suite.pairs_lib.list_image_files(folder, "--restored")
        if fv.gt:
            suite.pairs_lib.list_image_files(fv.gt, "--gt")
    except ValueError as e:
        return cli_lib.usage_error(str(e))
    existing = [p for p in report_lib.report_paths(fv.out) if os.path.exists(p)]
    if existing and not fv.overwrite:
        return cli_lib.usage_error(f"{existing[0]} exists; pass --overwrite to replace the report")

    opts = suite.Options(
        weights_dir=fv.weights_dir,
        batch_size=fv.batch_size,
        crop_border=fv.crop_border,
        deg_embedder=fv.deg_embedder,
        fid_ref=fv.fid_ref,
        fid_cache_dir=fv.fid_cache_dir,
        progress=fv.progress,
    )
    batch_metrics, skipped = suite.build_metrics(requested, opts, has_gt=bool(fv.gt))
    conventions = {k: m.convention for k, m in batch_metrics.items()}
    fid_setup = None
    if "fid" in requested:
        try:
            fid_setup = suite.build_fid(opts, fv.gt)
            conventions["fid"] = (
                "FID: pool-3 features of the pytorch-fid InceptionV3 (bilinear resize to 299), "
                f"reference: {fid_setup[2].description}"
            )
        except (suite.Skip, ValueError) as e:
            skipped["fid"] = str(e)
    for k, reason in skipped.items():
        _log(f"{k}: skipped ({reason})")

    results = []
    for name, folder in zip(names, fv.restored, strict=True):
        result = suite.evaluate_folder(
            name, folder, fv.gt, batch_metrics, opts, fid_setup=fid_setup, log=_log
        )
        for note in result.notes:
            _log(f"{name}: {note}")
        results.append(result)
    report = report_lib.build(
        results,
        requested=requested,
        conventions={k: conventions[k] for k in requested if k in conventions},
        skipped=skipped,
    )
    json_path, md_path = report_lib.write(report, fv.out)
    print(report_lib.markdown(report).split("\n\n")[1], flush=True)  # the table
    print(f"wrote {json_path} and {md_path}", flush=True)
    return 1 if any(r.failed for r in results) else 0


def main(argv: Sequence[str], flag_values: flags.FlagValues | None = None) -> int:
    fv = flags.FLAGS if flag_values is None else flag_values
    if len(argv) > 1:
        return cli_lib.usage_error(
            f"unexpected arguments {list(argv[1:])}; all options are --flags"
        )
    if not fv.make_testset:
        return run_evaluation(fv)
    if not fv.out:
        return cli_lib.usage_error("--out is required (the folder for gt/, lq/ and testset.json)")
    try:
        meta = testset.make_testset(
            fv.out,
            gt_folder=fv.gt,
            synthetic=fv.synthetic,
            size=fv.size,
            preset=fv.preset,
            seed=fv.seed,
            overwrite=fv.overwrite,
            progress=fv.progress,
            log=_log,
        )
    except ValueError as e:
        return cli_lib.usage_error(str(e))
    return 1 if meta["failed"] else 0


def cli(argv: list[str] | None = None) -> None:
    """``python -m artfr_jax.evaluate``."""
    define_flags()
    compile_cache.enable_persistent_cache()
    app.run(main, argv=argv, flags_parser=cli_lib.parse_flags)


if __name__ == "__main__":
    cli()
