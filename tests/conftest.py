"""Test session setup.

Two things must happen before anything else imports jax or torchvision:

* jax gets 8 simulated CPU devices, so sharding tests can build a (data=4, fsdp=2) mesh; tests that
  want one device take ``jax.devices()[:1]``.
* PyPI's torchvision wheel for the CPU torch is a CUDA build whose compiled ops do not load. Its
  Python model definitions still work once the operator schemas it registers fake kernels for exist,
  and ``lpips`` and ``diffusers`` import torchvision, so the schemas are defined here, once.
"""

import atexit
import os
import shutil
import tempfile

import pytest

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The tests' programs are tiny and mostly compile time: LLVM without optimisation compiles the
# tiny VQGAN's training command in 35 s instead of 53 s (2 cores). Numerics do not depend on it.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + TEST_XLA_FLAGS
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="artfr_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

from tests import torch_compat  # noqa: E402

torch_compat.register_torchvision_schemas()


def _fail_skips(report) -> None:
    """With ``ARTFR_FAIL_ON_SKIP=1`` (set by ``.ci/run``) a skip is a failure: parity tests may
    skip where a reference package cannot be installed, but never in CI."""
    if report.skipped and os.environ.get("ARTFR_FAIL_ON_SKIP") == "1":
        report.outcome = "failed"
        report.longrepr = f"skipped, but ARTFR_FAIL_ON_SKIP=1: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skips(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skips(outcome.get_result())


# The longest units pytest-xdist's ``loadscope`` hands out (minutes each), in this order.
FIRST = ("tests/test_trainers.py", "tests/test_notebooks.py", "tests/test_aot_compile.py")


def pytest_collection_modifyitems(config, items):
    """The longest units first (trainer classes, the notebooks, the TPU lowering): started last
    they would make the run's tail (one worker busy, one idle). ``--no-loadscope-reorder`` (in
    pyproject's addopts) keeps this order: by default xdist runs the scopes with most tests first,
    which put the trainer classes (1-3 tests each) at the end."""

    def rank(item) -> int:
        return next((i for i, f in enumerate(FIRST) if item.nodeid.startswith(f)), len(FIRST))

    items.sort(key=rank)
