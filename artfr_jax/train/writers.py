"""Metric writers: clu's TensorBoard + logging writers, plus ``metrics.jsonl`` for scripts."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from clu import metric_writers
from etils import epath


class JsonlWriter(metric_writers.MetricWriter):
    """Appends one JSON object per ``write_scalars`` call: ``{"step": N, "name": value, ...}``."""

    def __init__(self, path: str):
        self._path = epath.Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        if "://" in path:  # object stores do not append: keep the rows, rewrite on flush
            self._rows = self._path.read_text().splitlines() if self._path.exists() else []
            self._file = None
        else:
            self._file = open(path, "a", encoding="utf-8", buffering=1)  # line-buffered, tail -f

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        row = {"step": int(step)}
        row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
        if self._file is None:
            self._rows.append(json.dumps(row))
        else:
            self._file.write(json.dumps(row) + "\n")

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        if self._file is None:
            self._path.write_text("".join(r + "\n" for r in self._rows))
        else:
            self._file.flush()

    def close(self):
        if self._file is None:
            self.flush()
        elif not self._file.closed:
            self._file.close()


def create_writer(workdir: str, *, is_main_process: bool) -> metric_writers.MetricWriter:
    """TensorBoard events + stdout on the main process, stdout only elsewhere."""
    if not is_main_process:
        return metric_writers.create_default_writer(workdir, just_logging=True)
    default = metric_writers.create_default_writer(workdir, asynchronous=False)
    return metric_writers.MultiWriter(
        [default, JsonlWriter(os.fspath(epath.Path(workdir) / "metrics.jsonl"))]
    )


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
