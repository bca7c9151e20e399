"""Machine-readable benchmark results: one JSON object per line in the file that
``ARTFR_BENCH_RESULTS`` names (nothing is written when it is unset).

``benchmarks/gpu_check.sh`` sets it and builds its summary table from the lines
(``benchmarks/gpu_check_summary.py``), so that table does not depend on the wording of the
human-readable output.
"""

from __future__ import annotations

import json
import os

ENV = "ARTFR_BENCH_RESULTS"
PART_ENV = "ARTFR_BENCH_PART"  # the check's part that runs this benchmark, kept in each record


def record(name: str, **fields) -> None:
    """Appends ``{"name": name, "part": $ARTFR_BENCH_PART, **fields}`` to ``$ARTFR_BENCH_RESULTS``
    if it is set."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = {"name": name, "part": os.environ.get(PART_ENV, ""), **fields}
    with open(path, "a") as f:
        f.write(json.dumps(line, default=float) + "\n")


def read(path: str) -> list[dict]:
    """The records of a results file, in order; a missing file or unreadable line is skipped."""
    out = []
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table: the header, the rule, one line per row (cells formatted with str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
