"""The host allocator setting that keeps XLA:CPU's per-run buffers mapped (utils/host_memory.py).

Each case runs in a fresh interpreter: the setting only takes effect before JAX's first computation.
The main command applies it; importing the package does not.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

# A jitted function with 128 MiB of temporary buffers (the loop's carry); prints the minor page faults
# of each of its runs. XLA may free a run's buffer after the next run has allocated its own, so
# the retained heap settles only after a few runs.
_PROBE = textwrap.dedent(
    """
    import json, resource
    from artfr_jax.utils import host_memory
    applied = host_memory.retain_freed_memory()
    import jax, jax.numpy as jnp

    f = jax.jit(lambda x: jnp.sum(jax.lax.fori_loop(0, 2, lambda i, y: jnp.sin(y)[::-1], x)))
    x = jnp.ones((4096, 4096), jnp.float32)
    faults = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "faults": faults}))
    """
)
_TEMP_PAGES = 4096 * 4096 * 4 // 4096


def _probe(setting: str) -> dict:
    env = dict(os.environ, ARTFR_JAX_HOST_MALLOC=setting, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = ""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


linux_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="the setting applies to glibc on Linux",
)


@linux_glibc
def test_retained_memory_is_not_faulted_in_again():
    retained, system = _probe("retain"), _probe("system")
    assert retained["applied"] and not system["applied"]
    # glibc's defaults map the buffers afresh at each run: every page faults again.
    assert min(system["faults"][-6:]) >= _TEMP_PAGES // 2, system
    assert min(retained["faults"][-6:]) < _TEMP_PAGES // 20, retained


def test_unknown_setting_is_a_clear_error():
    env = dict(os.environ, ARTFR_JAX_HOST_MALLOC="jemalloc")
    out = subprocess.run(
        [sys.executable, "-m", "artfr_jax.main", "--help"], env=env, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "ARTFR_JAX_HOST_MALLOC='jemalloc': expected 'retain' or 'system'" in out.stderr


def test_importing_the_package_leaves_the_allocator_alone():
    code = (
        "import artfr_jax.train.loop, artfr_jax.restore\n"
        "from artfr_jax.utils import host_memory\n"
        "assert host_memory._applied is None, host_memory._applied\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize(
    "platforms, expected", [("cpu", True), ("cuda", False), ("tpu,cpu", False), ("", True)]
)
def test_applied_only_where_jax_runs_on_the_cpu(platforms, expected):
    """Decided from JAX_PLATFORMS, else from the accelerator plugins installed (none here), before
    JAX starts a backend."""
    code = (
        "from artfr_jax.utils import host_memory\n"
        "print('CPU', host_memory.runs_on_cpu())\n"
        "import jax._src.xla_bridge as xb\n"
        "print('BACKENDS', len(xb._backends))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS=platforms)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"CPU {expected}" in out.stdout and "BACKENDS 0" in out.stdout, out.stdout
