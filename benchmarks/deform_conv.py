"""Time ``deform_conv2d`` (DCNv2) against a plain ``lax.conv_general_dilated`` of the same shape.

  python benchmarks/deform_conv.py                          # smoke: 2 x 32x32x32, 4 groups
  python benchmarks/deform_conv.py --preset=paper64         # VQFR f8 TWM level: 64x64x256, 4 groups
  python benchmarks/deform_conv.py --preset=paper512        # VQFR f1 TWM level: 512x512x128 (GPU)
  python benchmarks/deform_conv.py --size=48 --channels=64 --groups=4 --dtype=bfloat16

For each of forward and forward+backward (gradients with respect to the input, offsets, mask and
kernel; the plain conv: input and kernel) it reports the compile time and the median (and min) of
``--repeats`` interleaved runs after ``--warmup`` runs, and the deformable/plain ratio (issue
target: <= 3x). Where ``torchvision.ops.deform_conv2d`` loads (a torchvision whose compiled ops
match the installed torch), it also times that on the same device and prints the max abs
difference from ours on the same input, offsets, mask and weight; otherwise it prints one line
saying so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from artfr_jax.models.deform_conv import deform_conv2d  # noqa: E402

PRESETS = {
    "smoke": dict(batch=2, size=32, channels=32, groups=4),
    "paper64": dict(batch=1, size=64, channels=256, groups=4),
    "paper512": dict(batch=1, size=512, channels=128, groups=4),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="H = W")
    p.add_argument("--channels", type=int, default=None, help="Cin = Cout")
    p.add_argument("--groups", type=int, default=None, help="offset groups")
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--offset_scale", type=float, default=2.0, help="std of the random offsets")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--skip_torch", action="store_true")
    args = p.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def timed(fns: dict, warmup: int, repeats: int) -> dict:
    """Run each function ``warmup`` times, then ``repeats`` rounds of all of them in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: {"median": statistics.median(v), "min": min(v)} for k, v in times.items()}


def compile_timed(fn, *args):
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t


def make_inputs(args):
    rng = np.random.default_rng(0)
    b, s, c, g, k = args.batch, args.size, args.channels, args.groups, args.kernel
    pad = k // 2
    x = rng.normal(size=(b, s, s, c)).astype(np.float32)
    offset = (args.offset_scale * rng.normal(size=(b, s, s, g * k * k * 2))).astype(np.float32)
    mask = (1.0 / (1.0 + np.exp(-rng.normal(size=(b, s, s, g * k * k))))).astype(np.float32)
    kernel = (rng.normal(size=(k, k, c, c)) / np.sqrt(k * k * c)).astype(np.float32)
    bias = rng.normal(size=(c,)).astype(np.float32)
    return dict(x=x, offset=offset, mask=mask, kernel=kernel, bias=bias, pad=pad)


def run_jax(args, data) -> dict:
    dtype = jnp.dtype(args.dtype)
    pad, g = data["pad"], args.groups
    x = jnp.asarray(data["x"], dtype)
    kernel = jnp.asarray(data["kernel"], dtype)
    offset, mask, bias = (jnp.asarray(data[n]) for n in ("offset", "mask", "bias"))
    ct = jnp.asarray(np.random.default_rng(1).normal(size=x.shape[:3] + (kernel.shape[-1],)))
    ct = ct.astype(jnp.float32)

    def dcn(x, offset, mask, kernel):
        return deform_conv2d(x, offset, mask, kernel, bias, padding=(pad, pad), offset_groups=g)

    def conv(x, kernel):
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            (1, 1),
            [(pad, pad)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32,
        )
        return (y + bias).astype(dtype)

    def dcn_grad(x, offset, mask, kernel):
        loss = lambda *a: jnp.sum(dcn(*a).astype(jnp.float32) * ct)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(x, offset, mask, kernel)

    def conv_grad(x, kernel):
        loss = lambda *a: jnp.sum(conv(*a).astype(jnp.float32) * ct)
        return jax.grad(loss, argnums=(0, 1))(x, kernel)

    dcn_args, conv_args = (x, offset, mask, kernel), (x, kernel)
    compiled, compile_s = {}, {}
    for name, fn, fargs in (
        ("dcn fwd", dcn, dcn_args),
        ("conv fwd", conv, conv_args),
        ("dcn fwd+bwd", dcn_grad, dcn_args),
        ("conv fwd+bwd", conv_grad, conv_args),
    ):
        exe, secs = compile_timed(fn, *fargs)
        compiled[name] = lambda exe=exe, fargs=fargs: jax.block_until_ready(exe(*fargs))
        compile_s[name] = secs
    stats = timed(compiled, args.warmup, args.repeats)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"{'function':<14} {'compile s':>10} {'median ms':>10} {'min ms':>10}")
    for name in compiled:
        st = stats[name]
        print(
            f"{name:<14} {compile_s[name]:>10.2f} {1e3 * st['median']:>10.3f} "
            f"{1e3 * st['min']:>10.3f}"
        )
    for what in ("fwd", "fwd+bwd"):
        ratio = stats[f"dcn {what}"]["median"] / stats[f"conv {what}"]["median"]
        print(f"ratio dcn/conv {what}: {ratio:.2f}x (target <= 3x)")
    return {"out": np.asarray(jax.device_get(dcn(*dcn_args)), np.float32)}


def torch_deform_conv():
    """``torchvision.ops.deform_conv2d`` if its compiled op runs here, else an error string."""
    try:
        from tests.torch_compat import register_torchvision_schemas

        register_torchvision_schemas()
        import torch
        import torchvision

        op = torchvision.ops.deform_conv2d
        op(
            torch.zeros(1, 1, 3, 3),
            torch.zeros(1, 18, 3, 3),
            torch.zeros(1, 1, 3, 3),
            padding=1,
            mask=torch.ones(1, 9, 3, 3),
        )
        return torch, op
    except Exception as e:  # noqa: BLE001 - any failure means "no usable reference"
        first = str(e).split(". ")[0].splitlines()[0] if str(e) else ""
        return None, f"{type(e).__name__}: {first}"


def run_torch(args, data, ours: np.ndarray) -> None:
    torch, op = torch_deform_conv()
    if torch is None:
        print(f"torchvision.ops.deform_conv2d unavailable here ({op}); skipping its timing")
        return
    try:
        _time_torch(torch, op, args, data, ours)
    except Exception as e:  # noqa: BLE001 - e.g. a dtype the compiled kernel does not support
        print(f"torchvision.ops.deform_conv2d failed at this setting: {type(e).__name__}: {e}")


def _time_torch(torch, op, args, data, ours: np.ndarray) -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    to = lambda a, dt=torch.float32: torch.as_tensor(a).to(dev, dt)
    x = to(data["x"].transpose(0, 3, 1, 2), tdtype).requires_grad_()
    offset = to(data["offset"].transpose(0, 3, 1, 2)).requires_grad_()
    mask = to(data["mask"].transpose(0, 3, 1, 2)).requires_grad_()
    weight = to(data["kernel"].transpose(3, 2, 0, 1), tdtype).requires_grad_()
    bias = to(data["bias"], tdtype)
    pad = data["pad"]
    if tdtype != torch.float32:  # torchvision's kernel wants one dtype throughout
        offset, mask = offset.detach().to(tdtype), mask.detach().to(tdtype)
    fwd = lambda: op(x, offset, weight, bias, padding=pad, mask=mask)
    ct = torch.randn(fwd().shape, device=dev, dtype=tdtype)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def f():
        with torch.no_grad():
            fwd()
        sync()

    def fb():
        fwd().backward(ct)
        sync()

    stats = timed({"torchvision fwd": f, "torchvision fwd+bwd": fb}, args.warmup, args.repeats)
    for name, st in stats.items():
        print(
            f"{name:<20} median {1e3 * st['median']:.3f} ms  min {1e3 * st['min']:.3f} ms ({dev})"
        )
    with torch.no_grad():
        ref = fwd().float().permute(0, 2, 3, 1).cpu().numpy()
    err = np.abs(ref - ours).max()
    print(f"max |ours - torchvision| = {err:.3e} (max |y| = {np.abs(ref).max():.3e})")


def main() -> None:
    args = parse_args()
    if args.channels % args.groups:
        raise SystemExit(f"--channels={args.channels} must be divisible by --groups={args.groups}")
    print(
        f"deform_conv2d: batch={args.batch} size={args.size} channels={args.channels} "
        f"groups={args.groups} kernel={args.kernel} dtype={args.dtype}"
    )
    data = make_inputs(args)
    res = run_jax(args, data)
    if not args.skip_torch:
        run_torch(args, data, res["out"])


if __name__ == "__main__":
    main()
