r"""Whole photos: photos per second of ``python -m artfr_jax.restore --mode=whole``'s pipeline
(``faces.pipeline.restore_photo``) per method, split into detection, alignment, restoration and
paste-back, and the peak memory of a 24-megapixel photo.

    python -m benchmarks.whole_photo                              # 1face, 6faces; paper models
    python -m benchmarks.whole_photo --methods=identity           # the pipeline alone
    python -m benchmarks.whole_photo --config=smoke --methods=identity,art,vqfr,osdface
    python -m benchmarks.whole_photo --large --methods=identity   # + the 24-MP photo, peak memory
    taskset -c 0,1 python -m benchmarks.whole_photo --photos=large --methods=identity  # 2 cores
    python -m benchmarks.whole_photo --photos=large --memory-methods=identity,art --upscale=2

JAX runs on its default backend (printed); ``JAX_PLATFORMS=cpu`` pins the CPU on a machine with
an accelerator.

Photos (``--photos``, comma-separated; ``--large`` adds ``large``), built from a real face so that
dlib's HOG finds it: the head of scikit-image's astronaut (``astronaut()[30:230, 120:320]``, eye
distance 43 px) scaled (Lanczos / area) and blended with a soft elliptic edge into a smooth
background, one head per cell of a grid with a fixed jitter:

  1face:  1024 x 1024, one face (eye distance 86 px);
  6faces: 2000 x 1333, six faces (eye distance 48-128 px);
  large:  6000 x 4000 (24 MP), ten faces (eye distance 94-146 px).

Detection must find the expected number of faces; a WARNING line says when it does not.

Methods (``--methods``): ``identity`` (returns its input at 512 px: the pipeline's own cost),
``art``, ``vqfr``, ``osdface`` on random weights (``benchmarks/restorers.py``: same compute as
trained ones), their models from ``--config``: ``paper`` (the papers' 512-px models), ``smoke`` or
``tiny`` (the configs' variants: small images, the whole pipeline still runs). ``--dtype``: the
compute dtype (float32, as on a CPU). Detector: the command's defaults (HOG, 5 landmarks,
``max_side`` 1600, upsample 1, ``min_score`` 0.25; flags of the same names). Options:
``pipeline.Options(upscale=--upscale, batch_size=--batch-size)``, the rest as the command's.

Timings per photo and method: the parts of ``pipeline.restore_photo`` (its ``times`` argument,
``time.perf_counter``):

  detect:  ``to_rgb8`` and ``detector.detect``;
  align:   ``select``, the similarity matrices and the ``align.warp_face`` crops;
  restore: ``pipeline.restore_crops`` (faces in chunks of ``--batch-size``, each padded to a power
           of two), after compiling: the compile is reported once per method and padded batch
           ("compile s" = first call - second call, "ms/call" the second);
  paste:   ``upscale_photo`` (the output canvas, a copy at ``--upscale=1``) and every face's paste;
  total:   the whole sequence; photos/s = 1 / total.

Each is the median of ``--repeats`` runs after ``--warmup`` runs of ``restore_photo`` itself, its
parts timed through its ``times`` argument.

Memory (photo ``large``, each of ``--memory-methods``, default identity): a fresh subprocess builds
the restorer, compiles it for the photo's padded batches and builds the photo, then resets the
kernel's peak-RSS mark (``/proc/self/clear_refs``; without it the process's high-water mark) and
runs ``restore_photo`` once: its peak RSS above the RSS just before (photo held), in MiB and in
copies of the photo (H * W * 3 bytes), and, in a second call, the peak of the memory Python and
NumPy (and OpenCV's output arrays) allocate (``tracemalloc``; dlib's own buffers are not in it).

Tables (Markdown) and the command that made them at the end; one record per measurement through
``benchmarks.results``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from artfr_jax.faces import detection, pipeline  # noqa: E402
from benchmarks import restorers, results  # noqa: E402

MIB = 2**20
HEAD = (slice(30, 230), slice(120, 320))  # the astronaut's head, without the glove HOG fires on
PARTS = ("detect", "align", "restore", "paste")
_CHILD_TAG = "WHOLE_PHOTO_MEMORY "


@dataclasses.dataclass(frozen=True)
class PhotoSpec:
    """``width`` x ``height`` with one astronaut head per entry of ``scales`` (1 = 200 px)."""

    width: int
    height: int
    scales: tuple[float, ...]
    seed: int = 0

    @property
    def faces(self) -> int:
        return len(self.scales)


def _linspace(a, b, n) -> tuple[float, ...]:
    return tuple(float(v) for v in np.linspace(a, b, n))


PHOTOS = {
    "1face": PhotoSpec(1024, 1024, (2.0,)),
    "6faces": PhotoSpec(2000, 1333, _linspace(1.1, 3.0, 6)),
    "large": PhotoSpec(6000, 4000, _linspace(2.2, 3.4, 10)),
}


# ------------------------------------------------------------------------------------ photos


def _background(height: int, width: int) -> np.ndarray:
    """A smooth uint8 RGB background: gradients and long waves drawn on a 32x coarser grid and
    interpolated up (only the uint8 output is full-sized)."""
    gh, gw = height // 32 + 2, width // 32 + 2
    v, u = np.mgrid[0:gh, 0:gw].astype(np.float32)
    u, v = u / gw, v / gh
    small = np.stack(
        [
            140 + 50 * u + 20 * np.sin(2 * np.pi * (1.5 * u + v)),
            120 + 40 * v + 20 * np.cos(2 * np.pi * (u - 2 * v)),
            110 + 30 * (1 - u) + 15 * np.sin(2 * np.pi * 2 * v),
        ],
        -1,
    )
    small = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def _head() -> tuple[np.ndarray, np.ndarray]:
    """(the astronaut's head uint8 [200, 200, 3], its soft elliptic alpha float32 [200, 200])."""
    import skimage.data  # noqa: PLC0415

    head = np.ascontiguousarray(skimage.data.astronaut()[HEAD])
    n = head.shape[0]
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    r = np.hypot((xx - (n - 1) / 2) / (0.48 * n), (yy - (n - 1) / 2) / (0.5 * n))
    return head, np.clip((1 - r) / 0.15, 0, 1).astype(np.float32)


def build_photo(spec: PhotoSpec) -> np.ndarray:
    """The photo of ``spec``: uint8 RGB [height, width, 3]; heads blended region by region."""
    img = _background(spec.height, spec.width)
    head, alpha = _head()
    n = spec.faces
    cols = max(1, round(math.sqrt(n * spec.width / spec.height)))
    rows = math.ceil(n / cols)
    cw, ch = spec.width / cols, spec.height / rows
    rng = np.random.default_rng(spec.seed)
    scales = rng.permutation(np.asarray(spec.scales))
    for i, scale in enumerate(scales):
        side = round(head.shape[0] * scale)
        if side > min(cw, ch):
            raise ValueError(f"a {side}-px head does not fit a {cw:.0f} x {ch:.0f} cell")
        jx, jy = rng.uniform(-0.25, 0.25, 2) * (np.array([cw, ch]) - side)
        x0 = round((i % cols + 0.5) * cw - side / 2 + jx)
        y0 = round((i // cols + 0.5) * ch - side / 2 + jy)
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LANCZOS4
        face = cv2.resize(head, (side, side), interpolation=interp).astype(np.float32)
        a = cv2.resize(alpha, (side, side), interpolation=cv2.INTER_LINEAR)[..., None]
        region = img[y0 : y0 + side, x0 : x0 + side]
        blend = region.astype(np.float32)
        blend += a * (face - blend)
        region[...] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return img


# ------------------------------------------------------------------------------------ timing


def staged(photo, detector, restorer, key, options: pipeline.Options):
    """``pipeline.restore_photo`` with its parts timed (its ``times`` argument).

    Returns (canvas, faces found, {part: s, ..., "total": s})."""
    t = dict.fromkeys(PARTS, 0.0)
    start = time.perf_counter()
    result = pipeline.restore_photo(photo, detector, restorer, key, options, times=t)
    t["total"] = time.perf_counter() - start
    return result.image, len(result.faces) + result.dropped, t


def padded_batches(faces: int, batch_size: int) -> list[int]:
    """The padded batch of each chunk ``restore_crops`` makes of ``faces`` faces."""
    return [
        pipeline.bucket(min(batch_size, faces - i), batch_size) for i in range(0, faces, batch_size)
    ]


def compile_batches(restorer, batches, key) -> list[tuple[int, float, float]]:
    """Calls ``restorer`` twice at each padded batch: [(batch, compile s, s/call)], compile =
    first call - second call."""
    out = []
    size = int(restorer.image_size)
    for b in sorted(set(batches)):
        lq = np.zeros((b, size, size, 3), np.uint8)
        t0 = time.perf_counter()
        np.asarray(restorer(lq, key))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        np.asarray(restorer(lq, key))
        second = time.perf_counter() - t0
        out.append((b, max(first - second, 0.0), second))
    return out


def time_photo(photo, detector, restorer, key, options, warmup: int, repeats: int):
    """(medians {part: s, "total": s}, faces found)."""
    found = 0
    for _ in range(warmup):
        staged(photo, detector, restorer, key, options)
    runs = []
    for _ in range(max(1, repeats)):
        _, found, t = staged(photo, detector, restorer, key, options)
        runs.append(t)
    medians = {k: statistics.median(r[k] for r in runs) for k in (*PARTS, "total")}
    return medians, found


# ------------------------------------------------------------------------------------ memory


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def memory_child(args) -> dict:
    """The memory measurement of the large photo for ``args.memory_child`` (module docstring)."""
    spec = PHOTOS["large"]
    options = pipeline.Options(upscale=args.upscale, batch_size=args.batch_size)
    key = jax.random.key(0)
    restorer, _ = restorers.make(args.memory_child, args.config, args.dtype)
    detector = _detector(args)
    compile_batches(restorer, padded_batches(spec.faces, args.batch_size), key)
    photo = build_photo(spec)
    gc.collect()
    reset = _reset_peak()
    before_kib = (
        _status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    t0 = time.perf_counter()
    result = pipeline.restore_photo(photo, detector, restorer, key, options)
    seconds = time.perf_counter() - t0
    peak_kib = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    found = len(result.faces) + result.dropped
    del result
    gc.collect()
    tracemalloc.start()
    try:
        pipeline.restore_photo(photo, detector, restorer, key, options)
        traced_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return dict(
        method=args.memory_child,
        faces=found,
        expected=spec.faces,
        photo_mib=photo.nbytes / MIB,
        rss_before_mib=before_kib / 1024,
        rss_peak_mib=peak_kib / 1024,
        added_mib=(peak_kib - before_kib) / 1024,
        traced_peak_mib=traced_peak / MIB,
        seconds=seconds,
        peak_reset=reset,
    )


def run_memory_child(method: str, args) -> dict:
    """``memory_child`` in a fresh Python process (its own peak RSS)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.whole_photo",
        f"--memory-child={method}",
        f"--config={args.config}",
        f"--dtype={args.dtype}",
        f"--upscale={args.upscale}",
        f"--batch-size={args.batch_size}",
        f"--detector={args.detector}",
        f"--landmarks={args.landmarks}",
        f"--max-side={args.max_side}",
        f"--upsample={args.upsample}",
        f"--min-score={args.min_score}",
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_CHILD_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"memory subprocess for {method} failed (exit {proc.returncode}):\n"
            + proc.stderr[-4000:]
        )
    return json.loads(lines[-1][len(_CHILD_TAG) :])


# -------------------------------------------------------------------------------------- main


def _detector(args) -> detection.Detector:
    return detection.make_detector(
        args.detector,
        args.landmarks,
        max_side=args.max_side,
        upsample=args.upsample,
        min_score=args.min_score,
    )


def _table(header: list[str], rows: list[list[str]]) -> None:
    print()
    print(results.markdown_table(header, rows))


def _list(value: str, choices, what: str, parser) -> list[str]:
    items = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in items if s not in choices]
    if unknown or not items:
        parser.error(f"{what}={value!r}: expected a comma-separated subset of {list(choices)}")
    return list(dict.fromkeys(items))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--photos", default="1face,6faces", help=f"comma-separated: {list(PHOTOS)}")
    p.add_argument("--large", action="store_true", help="add the 24-MP photo (and its memory)")
    p.add_argument(
        "--methods", default="identity,art,vqfr,osdface", help=f"of {list(restorers.METHODS)}"
    )
    p.add_argument("--memory-methods", default="identity", help="large photo's memory: methods")
    p.add_argument("--config", choices=restorers.VARIANTS, default="paper")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--upscale", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="faces per restorer call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--detector", choices=("hog", "cnn"), default="hog")
    p.add_argument("--landmarks", choices=("5", "68"), default="5")
    p.add_argument("--max-side", type=int, default=1600)
    p.add_argument("--upsample", type=int, default=1)
    p.add_argument("--min-score", type=float, default=0.25)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.photo_list = _list(args.photos, PHOTOS, "--photos", p)
    if args.large and "large" not in args.photo_list:
        args.photo_list.append("large")
    args.method_list = _list(args.methods, restorers.METHODS, "--methods", p)
    args.memory_list = _list(args.memory_methods, restorers.METHODS, "--memory-methods", p)
    if args.upscale < 1 or args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--upscale, --batch-size and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> dict:
    """Runs the benchmark; returns {"rows": [...], "compile": [...], "memory": [...]} (dicts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_child:
        print(_CHILD_TAG + json.dumps(memory_child(args)), flush=True)
        return {}
    device = jax.devices()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"backend={jax.default_backend()} device={device.device_kind} cpu_cores={cores} "
        f"config={args.config} dtype={args.dtype} upscale={args.upscale} "
        f"batch_size={args.batch_size} detector={args.detector}/{args.landmarks} "
        f"max_side={args.max_side} upsample={args.upsample} min_score={args.min_score}"
    )
    options = pipeline.Options(upscale=args.upscale, batch_size=args.batch_size)
    key = jax.random.key(0)
    detector = _detector(args)
    photos, found = {}, {}
    for name in args.photo_list:
        spec = PHOTOS[name]
        t0 = time.perf_counter()
        photos[name] = build_photo(spec)
        built = time.perf_counter() - t0
        faces = detector.detect(photos[name])
        found[name] = len(faces)
        eyes = sorted(detection.eye_distance(f) for f in faces)
        eye_text = f"{eyes[0]:.0f}-{eyes[-1]:.0f} px" if eyes else "-"
        print(
            f"photo {name}: {spec.width}x{spec.height} ({photos[name].nbytes / MIB:.1f} MiB, "
            f"built in {built:.1f} s), {len(faces)} of {spec.faces} faces found, eye distance "
            f"{eye_text}, padded batches {padded_batches(len(faces), args.batch_size)}"
        )
        if len(faces) != spec.faces:
            print(f"WARNING: {name}: detection found {len(faces)} faces, expected {spec.faces}")
    common = dict(config=args.config, dtype=args.dtype, upscale=args.upscale)
    rows, compiles = [], []
    for method in args.method_list:
        restorer, build_s = restorers.make(method, args.config, args.dtype)
        size = int(restorer.image_size)
        batches = [b for n in found.values() for b in padded_batches(n, args.batch_size)]
        compiled = compile_batches(restorer, batches, key)
        print(f"method {method}: {size} px, built in {build_s:.1f} s (random init)")
        for b, comp, call in compiled:
            print(f"  batch {b}: compile {comp:.2f} s, {call * 1e3:.1f} ms/call")
            compiles.append(dict(method=method, size=size, batch=b, compile_s=comp, call_s=call))
            results.record(
                "whole_photo",
                kind="compile",
                method=method,
                batch=b,
                size=size,
                compile_s=comp,
                call_ms=call * 1e3,
                **common,
            )
        for name in args.photo_list:
            med, n = time_photo(
                photos[name], detector, restorer, key, options, args.warmup, args.repeats
            )
            row = dict(
                photo=name,
                width=PHOTOS[name].width,
                height=PHOTOS[name].height,
                faces=n,
                expected=PHOTOS[name].faces,
                method=method,
                size=size,
                **{f"{k}_s": v for k, v in med.items()},
                photos_per_s=1.0 / med["total"],
            )
            rows.append(row)
            results.record("whole_photo", kind="photo", **row, **common)
            print(
                f"  {name}: "
                + "  ".join(f"{k} {med[k] * 1e3:.1f} ms" for k in (*PARTS, "total"))
                + f"  {row['photos_per_s']:.3f} photos/s"
            )
        del restorer
        gc.collect()
    memory = []
    if "large" in args.photo_list:
        for method in args.memory_list:
            m = run_memory_child(method, args)
            memory.append(m)
            results.record("whole_photo", kind="memory", **m, **common)
            print(
                f"memory large / {method}: photo {m['photo_mib']:.1f} MiB, RSS before "
                f"{m['rss_before_mib']:.0f} MiB, peak {m['rss_peak_mib']:.0f} MiB (+"
                f"{m['added_mib']:.0f} MiB = {m['added_mib'] / m['photo_mib']:.2f} photos), "
                f"traced peak {m['traced_peak_mib']:.0f} MiB, {m['seconds']:.1f} s"
            )
            if m["faces"] != m["expected"]:
                print(f"WARNING: large / {method}: {m['faces']} faces, expected {m['expected']}")

    order = {name: i for i, name in enumerate(args.photo_list)}
    rows.sort(key=lambda r: (order[r["photo"]], args.method_list.index(r["method"])))
    _table(
        [
            "photo",
            "pixels",
            "faces",
            "method",
            "config",
            "S",
            "detect ms",
            "align ms",
            "restore ms",
            "paste ms",
            "total ms",
            "photos/s",
        ],
        [
            [
                r["photo"],
                f"{r['width']}x{r['height']}",
                f"{r['faces']}/{r['expected']}",
                r["method"],
                args.config,
                str(r["size"]),
                *(f"{r[f'{k}_s'] * 1e3:.1f}" for k in (*PARTS, "total")),
                f"{r['photos_per_s']:.3f}",
            ]
            for r in rows
        ],
    )
    if compiles:
        _table(
            ["method", "config", "S", "batch", "compile s", "ms/call"],
            [
                [
                    c["method"],
                    args.config,
                    str(c["size"]),
                    str(c["batch"]),
                    f"{c['compile_s']:.2f}",
                    f"{c['call_s'] * 1e3:.1f}",
                ]
                for c in compiles
            ],
        )
    if memory:
        _table(
            [
                "photo",
                "method",
                "upscale",
                "photo MiB",
                "RSS before MiB",
                "peak RSS MiB",
                "added MiB",
                "added / photo",
                "traced peak MiB",
                "traced / photo",
                "s",
            ],
            [
                [
                    "large",
                    m["method"],
                    str(args.upscale),
                    f"{m['photo_mib']:.1f}",
                    f"{m['rss_before_mib']:.0f}",
                    f"{m['rss_peak_mib']:.0f}",
                    f"{m['added_mib']:.0f}",
                    f"{m['added_mib'] / m['photo_mib']:.2f}",
                    f"{m['traced_peak_mib']:.0f}",
                    f"{m['traced_peak_mib'] / m['photo_mib']:.2f}",
                    f"{m['seconds']:.1f}",
                ]
                for m in memory
            ],
        )
    print()
    print("command: python -m benchmarks.whole_photo " + " ".join(argv))
    return {"rows": rows, "compile": compiles, "memory": memory}


if __name__ == "__main__":
    main()
