"""benchmarks/gpu_check.sh --dry-run: every part of the prepared GPU check starts and reports.

The GPU is rare and lent for minutes, so its script must run there the first time: the dry run
imports and runs each Python entry point of the check once on the CPU with the tiny configs, and
the summary table must show every part finished with numbers.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("preflight", "stage1", "stage2", "restoration", "attention", "data")


def _dry_run_env(tmp_path):
    env = dict(os.environ)
    # conftest's 8 simulated devices would multiply the per-device batches; keep its fast
    # compile flag only.
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()
    env["PYTHON"] = sys.executable
    env["OUT"] = str(tmp_path / "out")
    env.pop("ARTFR_BENCH_RESULTS", None)
    return env


@pytest.mark.gpu_dry_run
def test_dry_run_runs_every_part_and_prints_the_summary(tmp_path):
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run"],
        cwd=tmp_path,  # the script finds the repository itself
        env=_dry_run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = out[out.index("== gpu_check summary") :]
    for part in PARTS:
        assert re.search(rf"^\| {part} \| ok \| \d+ s \| \S", summary, re.M), summary
    assert re.search(r"\| stage1 \| ok .*ms/step, [\d.]+ images/s", summary), summary
    assert re.search(r"\| stage2 \| ok .*TFLOP/step", summary), summary
    assert re.search(r"\| restoration \| ok .*best [\d.]+ images/s at batch \d", summary), summary
    assert re.search(r"\| attention \| ok .*xla [\d.]+ ms, cudnn n/a", summary), summary
    assert re.search(r"\| data \| ok \| \d+ s \| [\d.]+ pairs/s with 1 workers", summary), summary
    # Everything printed is also in $OUT/gpu_check.log, with the records beside it.
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "== gpu_check summary" in log and "| data | ok |" in log
    assert (tmp_path / "out" / "gpu_check_results.jsonl").stat().st_size > 0


def test_summary_reports_failures_timeouts_and_skips(tmp_path):
    (tmp_path / "status.tsv").write_text(
        "preflight\t0\t5\t60\nstage1\t3\t50\t120\nstage1_b12\t0\t70\t120\n"
        "stage2\t124\t80\t80\nstage2_remat\t-1\t0\t0\nrestoration\t124\t150\t150\n"
        "attention\t1\t9\t35\ndata\t0\t20\t60\n"
    )
    step = (
        '"batch": 12, "image_size": 512, "dtype": "bfloat16", "remat": true, "step_s": 0.5, '
        '"images_per_s": 24.0, "compile_s": 61.0, "gflops": 100000.0, "tflops_per_s": 200.0, '
        '"peak_tflops": 989.0, "peak_percent": 20.2'
    )
    restoration = '"image_size": 512, "steps": 8, "dtype": "bfloat16"'
    (tmp_path / "results.jsonl").write_text(
        '{"name": "preflight", "part": "preflight", "platform": "gpu", '
        '"device": "NVIDIA H100 80GB HBM3", "peak_tflops": 989.0, "versions": {"jax": "0.10.2"}}\n'
        '{"name": "train_step", "part": "stage1", "fits": false, "batch": 24, "remat": true}\n'
        f'{{"name": "train_step", "part": "stage1_b12", "fits": true, {step}}}\n'
        f'{{"name": "restoration", "part": "restoration", "kind": "latency", {restoration}, '
        '"latency_ms": {"restore one-jit": 80.0, "restore loop": 95.5}}\n'
        f'{{"name": "restoration", "part": "restoration", "kind": "throughput", {restoration}, '
        '"batch": 32, "images_per_s": 150.0}\n'
        "not json\n"
    )
    (tmp_path / "data.log").write_text(
        "Data pipeline: synthetic faces, 512px, preset 'artfr', 16 CPUs\n"
        "pipeline num_workers=0 (pairs/s, median)          70.0\n"
        "pipeline num_workers=16 (pairs/s, median)       1100.0\n"
    )
    # In a subprocess: importing `benchmarks` switches this process's compilation cache off.
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check_summary", f"--work={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # not every part finished with 0
    table = {}
    for line in proc.stdout.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = cells[1:]
    assert table["preflight"] == [
        "ok",
        "5 s",
        "gpu: NVIDIA H100 80GB HBM3, bf16 peak 989 TFLOP/s; jax 0.10.2",
    ]
    assert table["stage1"] == ["does not fit", "50 s", "batch 24 does not fit (remat=True)"]
    assert table["stage1_b12"][:2] == ["ok", "70 s"]
    assert table["stage1_b12"][2] == (
        "batch 12 at 512 px, bfloat16, remat=True: 500.0 ms/step, 24.00 images/s, compile 61 s; "
        "XLA's FLOPs 100 TFLOP/step, 200 TFLOP/s = 20.2% of 989 (MFU)"
    )
    assert table["stage2"] == ["timed out (80 s)", "80 s", "see the stage2 section of the log"]
    assert table["stage2_remat"] == ["skipped", "", "not run: the check's time budget was spent"]
    # A part stopped by its time limit keeps what it recorded.
    assert table["restoration"] == [
        "timed out (150 s)",
        "150 s",
        "512 px, T=8, bfloat16: batch 1 80.0 ms one-jit, 95.5 ms loop; "
        "best 150.00 images/s at batch 32 (largest run 32)",
    ]
    assert table["attention"][0] == "failed (exit 1)"
    assert table["data"][2] == "1100.0 pairs/s with 16 workers (68.8 per worker) on 16 CPUs"
