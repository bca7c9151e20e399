"""The commands' persistent compilation cache (utils/compile_cache.py).

JAX reads the cache setting once per process, so each case runs in a fresh interpreter, with the
session's JAX cache variables (conftest) removed: the environment is the case's.
"""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Enables the cache, compiles and runs one program, and reports where the cache is and whether the
# compilation was a cache hit.
_PROBE = textwrap.dedent(
    """
    import json, os, sys
    import jax, jax.numpy as jnp
    from jax import monitoring
    from artfr_jax.utils import compile_cache

    events = []
    monitoring.register_event_listener(lambda name, **kw: events.append(name))
    if len(sys.argv) > 1:  # the user's own setting, made in code
        jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    path = compile_cache.enable_persistent_cache()
    n = int(os.environ.get("PROBE_N", "64"))  # another size: another program
    y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((n, n)))
    print(json.dumps({
        "path": path,
        "hit": "/jax/compilation_cache/cache_hits" in events,
        "miss": "/jax/compilation_cache/cache_misses" in events,
        "value": float(y),
    }))
    """
)


def _probe(tmp_path, *args, **env_vars):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_COMPILATION_CACHE", "ARTFR_JAX_COMPILATION_CACHE", "XDG_"))
    }
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu", **env_vars)
    res = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr


def test_second_process_loads_the_executable_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first, _ = _probe(tmp_path, ARTFR_JAX_COMPILATION_CACHE=str(cache))
    assert first["path"] == str(cache)
    assert first["miss"] and not first["hit"]
    assert any(n.startswith("jit_") for n in os.listdir(cache)), os.listdir(cache)
    second, _ = _probe(tmp_path, ARTFR_JAX_COMPILATION_CACHE=str(cache))
    assert second["hit"] and not second["miss"]
    assert second["value"] == first["value"]


def test_directory_written_without_a_size_limit_still_takes_new_entries(tmp_path):
    """A process with JAX's own unlimited cache (a notebook, the test session) wrote there first:
    JAX's size-limited cache cannot write next to such entries, so the command sets no limit."""
    cache = tmp_path / "cache"
    _probe(tmp_path, JAX_COMPILATION_CACHE_DIR=str(cache))
    assert not any(n.endswith("-atime") for n in os.listdir(cache)), os.listdir(cache)
    before = set(os.listdir(cache))
    first, _ = _probe(tmp_path, ARTFR_JAX_COMPILATION_CACHE=str(cache), PROBE_N="32")
    assert first["miss"] and set(os.listdir(cache)) > before
    second, _ = _probe(tmp_path, ARTFR_JAX_COMPILATION_CACHE=str(cache), PROBE_N="32")
    assert second["hit"] and not second["miss"]


def test_default_directory_is_under_the_user_cache(tmp_path):
    out, _ = _probe(tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert out["path"] == str(tmp_path / "xdg" / "artfr_jax" / "xla")
    assert os.listdir(out["path"])


def test_off_leaves_no_cache(tmp_path):
    out, _ = _probe(
        tmp_path, ARTFR_JAX_COMPILATION_CACHE="off", XDG_CACHE_HOME=str(tmp_path / "xdg")
    )
    assert out["path"] is None and not out["hit"]
    assert not (tmp_path / "xdg").exists()


def test_users_jax_setting_wins(tmp_path):
    # JAX's own environment variable, and the same setting made in code (a notebook).
    out, _ = _probe(
        tmp_path,
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jaxdir"),
        ARTFR_JAX_COMPILATION_CACHE=str(tmp_path / "ours"),
    )
    assert out["path"] == str(tmp_path / "jaxdir")
    assert os.listdir(tmp_path / "jaxdir") and not (tmp_path / "ours").exists()
    user = str(tmp_path / "in_code")
    out, _ = _probe(tmp_path, user, ARTFR_JAX_COMPILATION_CACHE=str(tmp_path / "ours"))
    assert out["path"] == user and os.listdir(user)
    assert not (tmp_path / "ours").exists()


def test_directory_that_cannot_be_made_is_a_warning_and_the_program_runs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out, err = _probe(tmp_path, ARTFR_JAX_COMPILATION_CACHE=str(blocker / "cache"))
    assert out["path"] is None and out["value"] > 0
    assert "cannot create it" in err and str(blocker / "cache") in err
    assert blocker.read_text() == "not a directory"
