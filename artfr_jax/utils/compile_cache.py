"""A persistent XLA compilation cache for the commands, so that a re-run does not compile again.

Re-running a command (resuming a preempted or killed run, restoring another folder, evaluating
another checkpoint) compiles the same programs as the first run: on 2 CPU cores the tiny VQGAN
training command spends most of its first minute compiling. JAX can keep compiled executables on
disk, keyed by the program, its compile options, the XLA flags, the backend and the JAX version; a
later process with the same key loads the executable instead of compiling it.

The commands (``artfr_jax.main``, ``artfr_jax.restore``, ``artfr_jax.evaluate``,
``experiments/token_accuracy.py``) call :func:`enable_persistent_cache` at start-up; importing the
package does not, and the benchmarks switch the cache off so that the compile times they print are
real. Where the cache lives:

* ``JAX_COMPILATION_CACHE_DIR`` (or ``jax.config.update("jax_compilation_cache_dir", ...)`` in a
  notebook) set by the user: used as is;
* otherwise ``ARTFR_JAX_COMPILATION_CACHE=DIR``, a local path or one JAX's file layer writes to
  (``gs://...``);
* otherwise ``$XDG_CACHE_HOME/artfr_jax/xla`` (``~/.cache/artfr_jax/xla``).

``ARTFR_JAX_COMPILATION_CACHE=off`` switches it off. Programs that compile in under a second are not
stored (JAX's ``jax_persistent_cache_min_compile_time_secs``), and the least recently used entries
are evicted beyond :data:`MAX_BYTES` unless ``JAX_COMPILATION_CACHE_MAX_SIZE`` says otherwise (no
limit in a directory that a process without one has written to: JAX's size-limited cache cannot
write there).
"""

from __future__ import annotations

import os

import jax
from absl import logging

ENV = "ARTFR_JAX_COMPILATION_CACHE"
MAX_BYTES = 4 << 30
_OFF = ("off", "none", "false", "0")


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "artfr_jax", "xla")


def enable_persistent_cache() -> str | None:
    """Points JAX's persistent compilation cache at a directory (module docstring).

    Returns the directory in use, or None when the cache is off. Call it before the first JAX
    computation: JAX reads the setting once, at its first compilation. A directory that cannot be
    created is a one-line warning and the command goes on without the cache.
    """
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in _OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if not jax.config.jax_enable_compilation_cache:
        return None
    user_dir = jax.config.jax_compilation_cache_dir
    if user_dir:
        return user_dir
    path = setting or default_dir()
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            logging.warning(
                "compilation cache %s: cannot create it (%s); compiling without a cache (set %s)",
                path,
                e.strerror or e,
                ENV,
            )
            return None
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and not _unsized_entries(path):
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path


def _unsized_entries(path: str) -> bool:
    """Whether ``path`` holds entries written without a size limit (no ``-atime`` file beside
    them: a process with JAX's default unlimited cache wrote them). JAX's size-limited cache reads
    the access time of every entry before it writes one, so on such a directory every write would
    fail and each run would compile everything again; the limit is left off there instead."""
    if "://" in path:
        return False
    try:
        names = set(os.listdir(path))
    except OSError:
        return False
    unsized = [n for n in names if n.endswith("-cache") and f"{n[:-6]}-atime" not in names]
    if unsized:
        logging.info(
            "compilation cache %s: %d entries written without a size limit; no limit set",
            path,
            len(unsized),
        )
    return bool(unsized)


def disable_persistent_cache() -> None:
    """Switches the cache off in this process (benchmarks: compile times must be real)."""
    jax.config.update("jax_enable_compilation_cache", False)
