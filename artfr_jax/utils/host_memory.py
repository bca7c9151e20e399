"""Keep freed host memory in the process so that XLA:CPU does not page-fault its buffers in every step.

XLA:CPU allocates an executable's temporary buffer with ``malloc`` at each run and frees it after
(5.4 GB for a 512-px VQGAN training step, 1.3 GB at 256 px). glibc serves blocks that large from
``mmap`` -- always, for the worker threads' arenas -- and unmaps them on ``free``, so every step
faults every page in again and the kernel zeroes it. At 512 px that was 1.4 million page faults
and 11-13 s of system time per step: about 25 s of wall time on 2 cores instead of 15-18 s
(``benchmarks/vqgan_vs_diffusers.py``, run with and without ``ARTFR_JAX_HOST_MALLOC=system``).

``retain_freed_memory`` switches glibc to one arena grown with ``brk``, no ``mmap`` and no
trimming: a freed block stays mapped and the next step reuses it. It has two costs. The process
keeps its peak heap until it exits. And XLA compiles more slowly with every thread allocating
from one arena: a paper-VQGAN gradient at 128 px took 10-14 s to compile instead of 7 s. So the
long-running commands (``python -m artfr_jax.main``, ``python -m artfr_jax.restore``) and the
benchmarks turn it on when the process runs on the CPU (:func:`retain_freed_memory_on_cpu`; a
GPU or TPU process keeps glibc's defaults), and importing the package does not. It must come
before JAX starts its backend, whose threads pick their arena then: applied after
``jax.devices()``, a step still faulted in 3.5x the pages. In a notebook, call it first.
``ARTFR_JAX_HOST_MALLOC=system`` in the environment leaves glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys

ENV = "ARTFR_JAX_HOST_MALLOC"
# mallopt(3) parameter numbers (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied: bool | None = None


def _setting() -> str:
    setting = os.environ.get(ENV, "retain").strip().lower()
    if setting not in ("retain", "system"):
        raise ValueError(f"{ENV}={setting!r}: expected 'retain' or 'system'")
    return setting


def runs_on_cpu() -> bool:
    """Whether JAX in this process computes on the CPU, told without starting a backend:
    ``JAX_PLATFORMS`` (``jax_platforms``) when set, else whether no accelerator plugin (a JAX CUDA
    or ROCm plugin, libtpu) is installed."""
    import jax  # noqa: PLC0415  (importing jax starts no backend)

    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return False
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    return importlib.util.find_spec("jax_plugins") is None


def retain_freed_memory_on_cpu() -> bool:
    """:func:`retain_freed_memory` when :func:`runs_on_cpu`; True if it was applied. A bad
    ``ARTFR_JAX_HOST_MALLOC`` is an error either way."""
    if _setting() == "system" or not runs_on_cpu():
        return False
    return retain_freed_memory()


def retain_freed_memory() -> bool:
    """Sets glibc's malloc to keep freed memory (module docstring); True if it was applied.

    Does nothing (returns False) off Linux, on a C library other than glibc, or when
    ``ARTFR_JAX_HOST_MALLOC=system``. Idempotent.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if _setting() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # -1 as size_t is the largest threshold: never give the top of the heap back.
    _applied = all(
        mallopt(param, value) == 1
        for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    )
    return _applied
