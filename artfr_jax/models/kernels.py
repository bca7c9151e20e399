"""The one switch between the CPU kernels and plain XLA ops.

Every convolution, group norm, nearest x2 upsampling and spatial attention of the models goes
through this module, and a model holds one :class:`Kernels` (``config.model.kernels``):

* ``'auto'`` (default): the kernels of ``models/cpu_kernels`` where the program is for the CPU,
  plain XLA ops for every other platform. Traced under a mesh (``jax.set_mesh``, as the training
  loop and a sharded ahead-of-time compilation do), the mesh's devices decide; otherwise
  ``lax.platform_dependent`` decides when the program is lowered. Either way a TPU or GPU program
  lowered on a CPU host gets the XLA ops, whatever ``jax.default_backend()`` says;
* ``'xla'``: plain XLA ops everywhere;
* ``'cpu'``: the CPU kernels everywhere (valid XLA on any platform but tuned for none other), for
  tests and benchmarks.

The CPU kernels' sizes and switches are ``Kernels.cpu`` (:class:`~artfr_jax.models.cpu_kernels.
CpuKernels`). Multi-head attention over short sequences (the token transformer) asks for cuDNN's
fused kernel on GPUs in bfloat16 and for the Pallas flash kernel on TPUs
(:func:`dot_product_attention`), independent of the mode.
Compiler options that only the CPU needs: :func:`compiler_options`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from artfr_jax.models.cpu_kernels import CpuKernels
from artfr_jax.models.cpu_kernels import attention as cpu_attention
from artfr_jax.models.cpu_kernels import conv as cpu_conv
from artfr_jax.models.cpu_kernels import group_norm as cpu_group_norm
from artfr_jax.models.cpu_kernels import upsample as cpu_upsample

MODES = ("auto", "xla", "cpu")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """``mode``: 'auto' | 'xla' | 'cpu' (module docstring); ``cpu``: the CPU kernels' options."""

    mode: str = "auto"
    cpu: CpuKernels = CpuKernels()

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"config.model.kernels={self.mode!r}: expected one of {MODES}")


def _mesh_platform() -> str | None:
    """The platform of the mesh being traced under (``jax.set_mesh``), or None without one."""
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None)
    return None if mesh.empty or device is None else device.platform


def _select(kernels: Kernels, args: tuple, cpu_fn: Callable, xla_fn: Callable):
    mode = kernels.mode
    if mode == "auto":
        platform = _mesh_platform()
        if platform is None:  # decided when lowered: both forms are traced
            return lax.platform_dependent(*args, cpu=cpu_fn, default=xla_fn)
        mode = "cpu" if platform == "cpu" else "xla"
    return cpu_fn(*args) if mode == "cpu" else xla_fn(*args)


# --------------------------------------------------------------------------------- convolution


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    kernels: Kernels = Kernels(),
) -> jax.Array:
    """``lax.conv_general_dilated``; on the CPU with the weight gradients and Winograd forms of
    ``cpu_kernels.conv`` where they are quicker (same result up to float rounding)."""
    kw = dict(
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    xla = lambda lhs, rhs: lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kw)  # noqa: E731
    if kernels.mode == "xla":
        return xla(lhs, rhs)
    plan = cpu_conv.plan(
        lhs.shape, rhs.shape, lhs.dtype, window_strides, padding, kernels.cpu, **_plan_kw(kw)
    )
    if plan is None:  # nothing on the CPU beats XLA's own convolution here
        return xla(lhs, rhs)
    return _select(kernels, (lhs, rhs), lambda x, w: cpu_conv.conv(x, w, plan, precision), xla)


def _plan_kw(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k != "precision"}


def conv_fn(kernels: Kernels) -> Callable[..., jax.Array]:
    """The convolution for ``nn.Conv(conv_general_dilated=...)`` under ``kernels``."""
    return functools.partial(conv_general_dilated, kernels=kernels)


def upsample2x_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int] = (1, 1),
    padding: str | Sequence[tuple[int, int]] = "SAME",
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = ("NHWC", "HWIO", "NHWC"),
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    kernels: Kernels = Kernels(),
) -> jax.Array:
    """``conv(upsample_nearest2x(lhs), rhs)`` for a 3x3 NHWC/HWIO kernel, stride 1, 'SAME':
    ``[B, H, W, C] -> [B, 2H, 2W, O]``. The signature of ``lax.conv_general_dilated``, so
    ``nn.Conv`` takes it (:func:`upsample_conv_fn`) and keeps its parameters. On the CPU it runs as
    four 2x2 phase convolutions of ``lhs`` (``cpu_kernels.upsample``)."""
    pads_ok = padding == "SAME" or tuple(map(tuple, padding)) == ((1, 1), (1, 1))
    if (
        rhs.shape[:2] != (3, 3)
        or tuple(window_strides) != (1, 1)
        or not pads_ok
        or any(d != 1 for d in (lhs_dilation or ()))
        or any(d != 1 for d in (rhs_dilation or ()))
        or not cpu_conv.is_nhwc_hwio(dimension_numbers, lhs.ndim)
        or feature_group_count != 1
        or batch_group_count != 1
    ):
        raise ValueError(
            "upsample2x_conv: expected a 3x3 NHWC/HWIO kernel, stride 1, SAME padding, no dilation"
            f" or groups; got kernel {rhs.shape}, strides {window_strides}, padding {padding}"
        )

    def xla(x, w):
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return lax.conv_general_dilated(
            up,
            w,
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=precision,
            preferred_element_type=preferred_element_type,
        )

    def cpu(x, w):
        return cpu_upsample.upsample2x_conv(x, w, kernels.cpu, precision, preferred_element_type)

    return _select(kernels, (lhs, rhs), cpu, xla)


def upsample_conv_fn(kernels: Kernels) -> Callable[..., jax.Array]:
    """:func:`upsample2x_conv` for ``nn.Conv(conv_general_dilated=...)`` under ``kernels``."""
    return functools.partial(upsample2x_conv, kernels=kernels)


# ------------------------------------------------------------------------------ normalisation


def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    num_groups: int,
    epsilon: float,
    kernels: Kernels = Kernels(),
) -> jax.Array:
    """Group norm of ``x [B, ..., C]`` with affine ``scale, bias [C]``; statistics and result in
    float32 (two-pass variance). On the CPU with ``cpu_kernels.group_norm``'s backward."""

    def cpu(x, scale, bias):
        return cpu_group_norm.group_norm(x, scale, bias, num_groups, epsilon)

    def xla(x, scale, bias):
        return _group_norm_xla(x, scale, bias, num_groups, epsilon)

    return _select(kernels, (x, scale, bias), cpu, xla)


def _group_norm_xla(x, scale, bias, num_groups, epsilon):
    b, c = x.shape[0], x.shape[-1]
    xf = x.astype(jnp.float32).reshape(b, -1, num_groups, c // num_groups)
    mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
    centred = xf - mean
    var = jnp.mean(jnp.square(centred), axis=(1, 3), keepdims=True)
    y = (centred * lax.rsqrt(var + epsilon)).reshape(x.shape)
    return y * scale.astype(jnp.float32) + bias.astype(jnp.float32)


# ---------------------------------------------------------------------------------- attention


def reference_attention(q, k, v, *, precision: Any = None) -> jax.Array:
    """``softmax(q k^T / sqrt(d)) v`` on ``[B, N, H, D]`` (Vaswani et al., 2017, Eq. 1); the
    softmax in float32, the result in ``v``'s dtype."""
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k, precision=precision)
    weights = jax.nn.softmax(logits.astype(jnp.float32) * (q.shape[-1] ** -0.5), axis=-1)
    return jnp.einsum("bnqk,bknd->bqnd", weights.astype(v.dtype), v, precision=precision)


def spatial_attention(q, k, v, kernels: Kernels = Kernels(), *, precision: Any = None):
    """Self-attention over image positions, ``[B, N, H, D]``: on the CPU in query blocks
    (``cpu_kernels.attention``) where ``N`` is a multiple of the block size larger than it."""
    block = kernels.cpu.attention_block
    xla = lambda q, k, v: reference_attention(q, k, v, precision=precision)  # noqa: E731
    if kernels.mode == "xla" or not cpu_attention.applies(q, k, v, block):
        return xla(q, k, v)

    def cpu(q, k, v):
        return cpu_attention.blocked_attention(q, k, v, block)

    return _select(kernels, (q, k, v), cpu, xla)


@functools.cache
def _cudnn_available() -> bool:
    """Whether this process can trace cuDNN attention: a CUDA device and cuDNN are present."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415

        cudnn.check_cudnn_version()
        return bool(jax.devices("cuda"))
    except Exception:  # no CUDA plugin, no cuDNN or no GPU: nothing to lower for CUDA here
        return False


def cudnn_applies(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """cuDNN's fused attention takes bfloat16/float16 inputs of one dtype whose head width is a
    multiple of 8 up to 128 (every GPU generation it supports)."""
    d = q.shape[-1]
    return (
        q.dtype in (jnp.bfloat16, jnp.float16)
        and q.dtype == k.dtype == v.dtype
        and d % 8 == 0
        and d <= 128
        and k.shape[-1] == v.shape[-1] == d
    )


def flash_applies(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """The Pallas TPU flash attention kernel (``jax.experimental.pallas.ops.tpu``) takes float32
    or bfloat16 inputs of one dtype and shape whose sequence lengths are multiples of its 128-wide
    blocks and whose head width is at most 128 or a multiple of 128."""
    t, s, d = q.shape[1], k.shape[1], q.shape[-1]
    return (
        q.dtype in (jnp.bfloat16, jnp.float32)
        and q.dtype == k.dtype == v.dtype
        and k.shape == v.shape
        and (q.shape[0], q.shape[2], d) == (k.shape[0], k.shape[2], k.shape[-1])
        and t % 128 == 0
        and s % 128 == 0
        and (d <= 128 or d % 128 == 0)
    )


def tpu_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``[B, T, H, D]`` attention by the Pallas TPU flash kernel (Dao et al. 2022: the scores stay
    in on-chip memory, forward and backward), softmax in float32. Traced under a mesh, each device
    runs the kernel on its rows of the batch (``shard_map`` over every mesh axis; replicated where
    the batch does not divide), since XLA's partitioner cannot split a custom kernel."""
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash  # noqa: PLC0415

    def run(q, k, v):
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  the kernel's [B, H, T, D]
        out = pallas_flash.flash_attention(
            heads_first(q), heads_first(k), heads_first(v), sm_scale=q.shape[-1] ** -0.5
        )
        return heads_first(out)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(q, k, v)
    spec = P(mesh.axis_names) if q.shape[0] % mesh.size == 0 else P()
    sharded = jax.shard_map(
        run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False
    )
    return sharded(q, k, v)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Multi-head attention ``[B, T, H, D] x [B, S, H, D] -> [B, T, H, D]`` with the softmax in
    float32: cuDNN's fused kernel where the program is lowered for a GPU and
    :func:`cudnn_applies`, the Pallas flash kernel where it is lowered for a TPU and
    :func:`flash_applies`, XLA's otherwise (``jax.nn.dot_product_attention`` left to itself picks
    XLA's, which writes the [B, H, T, S] scores to memory)."""

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")

    branches = {}
    if flash_applies(q, k, v):
        branches["tpu"] = tpu_flash_attention
    if cudnn_applies(q, k, v) and _cudnn_available():
        branches["cuda"] = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
    platform = _mesh_platform()  # known under a mesh: trace only its form
    if platform == "tpu":
        return branches.get("tpu", xla)(q, k, v)
    if platform == "cpu" or not branches:
        return xla(q, k, v)
    return lax.platform_dependent(q, k, v, default=xla, **branches)


def attention(q, k, v, kernels: Kernels = Kernels(), *, precision: Any = None) -> jax.Array:
    """Self- or cross-attention ``[B, T, H, D] x [B, S, H, D] -> [B, T, H, D]`` (the UNet's):
    on the CPU the query-blocked kernel where it applies (as :func:`spatial_attention`), else
    :func:`dot_product_attention` (cuDNN on GPUs in bfloat16); with an explicit ``precision`` and
    no cuDNN, :func:`reference_attention` at that precision."""

    def other(q, k, v):
        if precision is None or cudnn_applies(q, k, v):
            return dot_product_attention(q, k, v)
        return reference_attention(q, k, v, precision=precision)

    block = kernels.cpu.attention_block
    if kernels.mode == "xla" or not cpu_attention.applies(q, k, v, block):
        return other(q, k, v)

    def cpu(q, k, v):
        return cpu_attention.blocked_attention(q, k, v, block)

    return _select(kernels, (q, k, v), cpu, other)


# ---------------------------------------------------------------------------------- compiling

# XLA's CPU pipeline erases optimisation barriers (pass ``cse_barrier_expander``) before its last
# CSE pass, which then merges every ``jax.checkpoint`` recomputation back into the forward pass, so
# remat would save no memory. GPU/TPU pipelines keep the barriers until after CSE by default.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def compiler_options(devices: Sequence[Any]) -> dict[str, str] | None:
    """Options for compiling a program for ``devices`` (e.g. a mesh's): ``CPU_COMPILER_OPTIONS``
    for CPU devices, so that ``config.model.remat`` lowers memory there too; None elsewhere."""
    platforms = {d.platform for d in devices}
    return dict(CPU_COMPILER_OPTIONS) if platforms == {"cpu"} else None
