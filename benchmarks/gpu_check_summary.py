r"""The summary table of ``benchmarks/gpu_check.sh``: one row per part with its status, wall time
and numbers.

    python -m benchmarks.gpu_check_summary --work=DIR

``DIR`` holds what the check wrote: ``status.tsv`` (part, exit status, seconds, time limit),
``results.jsonl`` (``benchmarks/results.py`` records) and ``<part>.log`` (each part's output; the
data pipeline's numbers are read from its log, since that benchmark writes no records). Prints a
Markdown table and exits 1 if a part did not finish with status 0.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from benchmarks import results

# Exit statuses of the parts (timeout(1): 124 after SIGTERM, 137 after SIGKILL).
STATUS_TEXT = {0: "ok", 2: "not ready", 3: "does not fit", 124: "timed out", 137: "timed out"}


def _last(records, name, part):
    found = [r for r in records if r["name"] == name and r.get("part") == part]
    return found[-1] if found else None


def _step(r) -> str:
    if r is None:
        return "no result recorded"
    if not r.get("fits", True):
        return f"batch {r['batch']} does not fit (remat={r['remat']})"
    text = (
        f"batch {r['batch']} at {r['image_size']} px, {r['dtype']}, remat={r['remat']}: "
        f"{r['step_s'] * 1e3:.1f} ms/step, {r['images_per_s']:.2f} images/s, "
        f"compile {r['compile_s']:.0f} s"
    )
    if "gflops" in r:
        text += f"; XLA's FLOPs {r['gflops'] / 1e3:.3g} TFLOP/step, {r['tflops_per_s']:.3g} TFLOP/s"
    if "peak_percent" in r:
        text += f" = {r['peak_percent']:.1f}% of {r['peak_tflops']:.0f} (MFU)"
    return text


def _restoration(records, part) -> str:
    rows = [r for r in records if r["name"] == "restoration" and r.get("part") == part]
    latency = [r for r in rows if r.get("kind") == "latency"]
    if not latency:
        return "no result recorded"
    r, lat = latency[-1], latency[-1]["latency_ms"]
    text = (
        f"{r['image_size']} px, T={r['steps']}, {r['dtype']}: batch 1 "
        f"{lat.get('restore one-jit', float('nan')):.1f} ms one-jit, "
        f"{lat.get('restore loop', float('nan')):.1f} ms loop"
    )
    runs = [t for t in rows if t.get("kind") == "throughput"]
    if runs:
        best = max(runs, key=lambda t: t["images_per_s"])
        text += (
            f"; best {best['images_per_s']:.2f} images/s at batch {best['batch']} "
            f"(largest run {max(t['batch'] for t in runs)}"
        )
        oom = [t["batch"] for t in rows if t.get("kind") == "out_of_memory"]
        text += f", out of memory at {oom[-1]})" if oom else ")"
    if r.get("loop_pixels_differ"):
        text += f"; one-jit and loop differ in {r['loop_pixels_differ']} pixels"
    return text


def _attention(records, part) -> str:
    rows = [r for r in records if r["name"] == "attention" and r.get("part") == part]
    if not rows:
        return "no result recorded"
    parts = []
    keys = sorted(
        {(r["batch"], r["what"]) for r in rows}, key=lambda k: (-k[0], k[1] != "forward+backward")
    )
    for batch, what in keys:
        by_impl = {r["impl"]: r for r in rows if (r["batch"], r["what"]) == (batch, what)}
        cells = []
        for impl in ("xla", "cudnn", "model"):
            r = by_impl.get(impl)
            if r is None:
                continue
            cells.append(f"{impl} {r['ms']:.3f} ms" if r["available"] else f"{impl} n/a")
        xla, cudnn = by_impl.get("xla"), by_impl.get("cudnn")
        if xla and cudnn and xla["available"] and cudnn["available"]:
            cells.append(f"cudnn {xla['ms'] / cudnn['ms']:.2f}x xla")
        seq = rows[0]["seq"]
        parts.append(f"[{batch},{seq}] {what}: " + ", ".join(cells))
    return "; ".join(parts)


def _data(log_text: str) -> str:
    rates = re.findall(r"pipeline num_workers=(\d+) \(pairs/s, median\)\s+([\d.]+)", log_text)
    if not rates:
        return "no pairs/s line found in its log"
    workers, rate = max(((int(w), float(r)) for w, r in rates), key=lambda t: t[0])
    text = f"{rate:.1f} pairs/s with {workers} workers"
    if workers:
        text += f" ({rate / workers:.1f} per worker)"
    cpus = re.search(r"(\d+) CPUs", log_text)
    return text + (f" on {cpus.group(1)} CPUs" if cpus else "")


def _osdface(log_text: str) -> str:
    rows = re.findall(
        r"latency batch\s+(\d+): compile\s+([\d.]+) s\s+ms/call\s+([\d.]+).*?ms/face\s+([\d.]+)",
        log_text,
    )
    if not rows:
        return "no latency line found in its log"
    return "; ".join(f"batch {b}: {float(f):.1f} ms/face (compile {c} s)" for b, c, _, f in rows)


def _preflight(r) -> str:
    if r is None:
        return "no result recorded"
    v = r.get("versions", {})
    peak = f", bf16 peak {r['peak_tflops']:.0f} TFLOP/s" if r.get("peak_tflops") else ""
    return f"{r['platform']}: {r['device']}{peak}; jax {v.get('jax', '?')}"


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def summarise(work: str) -> tuple[list[tuple[str, str, str, str]], bool]:
    """Rows (part, status, time, result) and whether every part that ran finished with 0."""
    records = results.read(os.path.join(work, "results.jsonl"))
    rows, all_ok = [], True
    for line in _read(os.path.join(work, "status.tsv")).splitlines():
        fields = line.split("\t")
        if len(fields) < 4:
            continue
        part, rc, seconds, limit = fields[0], int(fields[1]), fields[2], fields[3]
        status = STATUS_TEXT.get(rc, f"failed (exit {rc})") if rc >= 0 else "skipped"
        if rc in (124, 137):
            status += f" ({limit} s)"
        all_ok &= rc == 0
        if rc < 0:
            result = "not run: the check's time budget was spent"
        elif part == "preflight":
            result = _preflight(_last(records, "preflight", part))
        elif part.startswith("stage1"):
            result = _step(_last(records, "train_step", part))
        elif part.startswith("stage2"):
            result = _step(_last(records, "art_train_step", part))
        elif part == "restoration":
            result = _restoration(records, part)
        elif part == "attention":
            result = _attention(records, part)
        elif part == "data":
            result = _data(_read(os.path.join(work, "data.log")))
        elif part == "osdface":
            result = _osdface(_read(os.path.join(work, "osdface.log")))
        else:
            result = ""
        if rc != 0 and result == "no result recorded":
            result = f"see the {part} section of the log"
        rows.append((part, status, f"{seconds} s" if rc >= 0 else "", result))
    return rows, all_ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True)
    args = parser.parse_args()
    rows, all_ok = summarise(args.work)
    print("| part | status | time | result |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.exit(0 if all_ok and rows else 1)


if __name__ == "__main__":
    main()
