"""Evaluation reports: JSON for scripts and a Markdown table laid out like ART-FR Table 1 (a)."""

from __future__ import annotations

import datetime
import json
import math
import os

from artfr_jax.evaluation.suite import TABLE_COLUMNS, FolderResult

# Decimals as the papers print them (FID 2, NIQE 3, LPIPS 3, Deg 2, LMD 2, PSNR 2, SSIM 4).
DECIMALS = {"fid": 2, "niqe": 3, "lpips": 3, "deg": 2, "lmd": 2, "psnr": 2, "ssim": 4, "dists": 4}


def build(
    results: list[FolderResult],
    *,
    requested: list[str],
    conventions: dict[str, str],
    skipped: dict[str, str],
) -> dict:
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "metrics": requested,
        "conventions": conventions,
        "skipped": skipped,
        "rows": [
            {
                "name": r.name,
                "restored": os.path.abspath(r.restored),
                "gt": os.path.abspath(r.gt) if r.gt else None,
                "num_pairs": len(r.pairing.pairs),
                "num_scored": len(r.per_image),
                "values": r.values,
                "notes": r.notes,
                "unpaired": r.pairing.unpaired,
                "missing": r.pairing.missing,
                "ambiguous": r.pairing.ambiguous,
                "failed": r.failed,
                "per_image": r.per_image,
            }
            for r in results
        ],
    }


def _json_safe(x):
    """Strict JSON: +-inf (PSNR of identical images) as the strings "inf"/"-inf", NaN as null."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _fmt(name: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, str) or math.isinf(value):
        return str(value).replace("Infinity", "inf")
    return f"{value:.{DECIMALS.get(name, 4)}f}"


def markdown(report: dict) -> str:
    """One row per restored folder; columns the metrics asked for, in Table 1's order."""
    cols = [(k, label) for k, label in TABLE_COLUMNS if k in report["metrics"]]
    lines = [
        "| Method | " + " | ".join(label for _, label in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for row in report["rows"]:
        cells = [_fmt(k, row["values"].get(k)) for k, _ in cols]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    out = ["# Evaluation", "", *lines, ""]
    if report["skipped"]:
        out += ["Skipped (–):", ""]
        out += [f"- **{k}**: {v}" for k, v in report["skipped"].items()]
        out.append("")
    if report["conventions"]:
        out += ["How each number was computed:", ""]
        out += [f"- **{k}**: {v}" for k, v in report["conventions"].items()]
        out.append("")
    for row in report["rows"]:
        out.append(
            f"**{row['name']}**: `{row['restored']}`"
            + (f" against `{row['gt']}`" if row["gt"] else "")
            + f", {row['num_scored']} of {row['num_pairs']} pairs scored."
        )
        out += [f"- {n}" for n in row["notes"]]
        out.append("")
    return "\n".join(out)


def report_paths(out: str) -> tuple[str, str]:
    """``REPORT`` -> (``REPORT.json``, ``REPORT.md``); a .json or .md suffix is dropped first."""
    base, ext = os.path.splitext(out)
    if ext.lower() not in (".json", ".md"):
        base = out
    return base + ".json", base + ".md"


def write(report: dict, out: str) -> tuple[str, str]:
    json_path, md_path = report_paths(out)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    for path, text in (
        (json_path, json.dumps(_json_safe(report), indent=1, allow_nan=False)),
        (md_path, markdown(report)),
    ):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    return json_path, md_path
