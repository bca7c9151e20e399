"""``benchmarks/aot_compile.py``: TPU programs lowered on this CPU host carry none of the CPU kernels.

The TPU part runs the script in a subprocess under the interpreter of a venv that has libtpu
(``ARTFR_TPU_PYTHON``, default ``.tpu-venv/bin/python``, which ``.ci/run`` makes), so libtpu never
enters the test process's environment. It only lowers (compiling even a tiny step for a TPU takes
over a minute here): each tiny step is lowered for a v5e:2x2 slice and for 4 CPU devices, at
128 px so that the CPU programs reach the Winograd and banded weight-gradient kernels, whose named
scopes (``cpu_kernel_*``) and source files (``cpu_kernels/``) mark them in the lowered text.
Those tests are marked ``libtpu`` (``pytest -m libtpu tests/test_aot_compile.py``); without the
venv they skip, and CI, which makes the venv, fails on a skip.
"""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import optax
import pytest

from artfr_jax.train import sharding
from artfr_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PYTHON = os.environ.get("ARTFR_TPU_PYTHON", os.path.join(ROOT, ".tpu-venv", "bin", "python"))
STEPS = ("vqgan_tiny", "art_tiny", "vqfr_tiny", "osdface_tiny")
PROGRAMS = (*STEPS, "art_restore_tiny")
CPU_MARKS = ("cpu_kernel_", "cpu_kernels/")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return env


def _has_libtpu() -> bool:
    if not os.path.exists(TPU_PYTHON):
        return False
    probe = subprocess.run(
        [TPU_PYTHON, "-c", "import libtpu"], env=_env(), capture_output=True, timeout=60
    )
    return probe.returncode == 0


def _command(out, configs, topologies, *extra) -> list[str]:
    return [
        TPU_PYTHON,
        "-m",
        "benchmarks.aot_compile",
        "--config=" + ",".join(configs),
        *[f"--topology={t}" for t in topologies],
        "--lower_only",
        f"--dump_lowered={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """Runs the script twice, side by side: the tiny VQGAN step at 128 px lowered for v5e:2x2
    and cpu:4 (the CPU program must show the kernels' marks, so that their absence means
    something), the other tiny programs at their size for v5e:2x2."""
    if not _has_libtpu():
        pytest.skip(
            f"no libtpu at {TPU_PYTHON} (python -m venv --system-site-packages .tpu-venv; "
            ".tpu-venv/bin/pip install -e '.[tpu]' -c constraints.txt)"
        )
    out = tmp_path_factory.mktemp("aot")
    runs = [
        _command(out, PROGRAMS[:1], ("v5e:2x2", "cpu:4"), "--image_size=128", f"--out={out}/vqgan"),
        _command(out, PROGRAMS[1:], ("v5e:2x2",), f"--out={out}/table"),
    ]
    logs = [open(out / f"run{i}.log", "w+") for i in range(len(runs))]  # noqa: SIM115
    procs = [
        subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        for c, log in zip(runs, logs, strict=True)
    ]
    stdout = ""
    for p, log in zip(procs, logs, strict=True):
        p.wait(timeout=600)
        log.seek(0)
        text = log.read()
        log.close()
        assert p.returncode == 0, text[-6000:]
        stdout += text
    return out, stdout


def _text(out, program: str, topology: str) -> str:
    (path,) = [p for p in os.listdir(out) if p.startswith(f"{program}.{topology}.")]
    with open(os.path.join(out, path)) as f:
        return f.read()


@pytest.mark.libtpu
@pytest.mark.parametrize("program", PROGRAMS)
def test_tpu_program_has_no_cpu_kernels(lowered, program):
    out, _ = lowered
    tpu = _text(out, program, "v5e_2x2")
    assert "mhlo.num_partitions = 4" in tpu  # split over the slice's four chips
    assert not [m for m in CPU_MARKS if m in tpu]


@pytest.mark.libtpu
def test_cpu_program_reaches_winograd_and_banded_gradients(lowered):
    """The same stage-I step lowered for CPU devices takes the CPU kernels, and the marks the
    TPU test looks for are there."""
    cpu = _text(lowered[0], "vqgan_tiny", "cpu_4")
    assert "cpu_kernel_winograd" in cpu and "cpu_kernels/" in cpu
    assert "cpu_kernel_banded_weight_grad" in cpu


@pytest.mark.libtpu
def test_lower_only_table(lowered):
    out, stdout = lowered
    with open(os.path.join(out, "table.json")) as f:
        rows = json.load(f)["results"]
    assert [(r["program"], r["topology"]) for r in rows] == [(p, "v5e:2x2") for p in PROGRAMS[1:]]
    assert all(r["mesh"] == "4x1" and r["lower_s"] > 0 and not r["error"] for r in rows)
    assert all(r["compile_s"] is None and r["flops"] is None for r in rows)
    with open(os.path.join(out, "table.md")) as f:
        table = f.read()
    assert (
        table.startswith("| program | topology |") and "| art_restore_tiny (T=8 steps) |" in table
    )
    assert "command: python -m benchmarks.aot_compile" in stdout


ANALYSIS = """
import types
from benchmarks import aot_compile as a
chip = a.CHIPS["v5e"]
r = a.Result("art", "v5e:2x2", 4, "4x1", "none", 24, "bfloat16")
mem = types.SimpleNamespace(argument_size_in_bytes=3 * 2**30, output_size_in_bytes=2**30,
    temp_size_in_bytes=14 * 2**30, alias_size_in_bytes=2**30, generated_code_size_in_bytes=0)
cost = {"flops": 197e12 * 0.5, "bytes accessed": 819e9 * 0.25}
compiled = types.SimpleNamespace(memory_analysis=lambda: mem, cost_analysis=lambda: cost)
a.add_memory(r, compiled, chip)
a.add_cost(r, compiled, chip)
assert r.peak_bytes == 17 * 2**30 and r.fits is False, r
assert abs(r.roofline_s - 0.5) < 1e-9 and r.bound == "FLOPs", r
assert a.oom_bytes("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. "
                   "Used 21.50G of 15.75G hbm.") == ("peak", int(21.5 * 2**30))
oom = a.Result("vqgan", "v5e:2x2", 4, "4x1", "full", 24, "bfloat16")
assert a.add_oom(oom, "JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total "
    "memory required for HLO temporaries (45.86G) exceeds available HBM (15.75G).", chip)
assert oom.fits is False and oom.temp_bytes == int(45.86 * 2**30), oom
assert not a.add_oom(oom, "ValueError: something else", chip)
assert a.resolve_mesh("auto", 4, 2) == (2, 1) and a.resolve_mesh("-1,2", 8, 24) == (4, 2)
assert a.parse_topology("v5p:2x2x1").num_chips == 4
print(a.markdown([r], "cmd"))
"""


def test_table_numbers_from_an_analysis():
    """The memory and roofline columns from a compiled program's analyses (a stand-in object:
    no libtpu needed, the main interpreter runs it)."""
    res = subprocess.run(
        [sys.executable, "-c", ANALYSIS],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| 17.00 | 16.00 | NO | 98.500 | 204.8 | 500.0 | 250.0 | 500.0 | FLOPs |" in res.stdout


def test_init_state_traces_under_eval_shape():
    """``create_train_state`` under ``jax.eval_shape`` inside the mesh (as the script traces
    ``init_state`` for devices that cannot run it): shapes and fsdp shardings, nothing computed."""
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2)), jax.devices()[:4])
    init = lambda rng: {"w": jax.random.normal(rng, (256, 128))}  # noqa: E731
    found = {}

    def state_only(rng):
        state, found["shardings"] = state_lib.create_train_state(
            init, optax.adam(1e-3), rng, mesh, min_shard_size=0
        )
        return state

    with jax.set_mesh(mesh):
        state = jax.eval_shape(state_only, jax.random.key(0))
    assert isinstance(state.params["w"], jax.ShapeDtypeStruct)
    assert state.opt_state[0].mu["w"].shape == (256, 128)
    assert found["shardings"].params["w"].spec == jax.sharding.PartitionSpec("fsdp", None)


def test_traffic_by_scope_adds_up_to_xlas_bytes_accessed():
    """benchmarks/hlo_traffic.py: per-scope bytes of a compiled program sum to XLA's own count,
    split by layer and pass."""
    import flax.linen as nn

    from benchmarks import hlo_traffic

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jax.nn.silu(nn.Conv(64, (3, 3), name="wide")(x))
            return nn.Conv(4, (3, 3), name="narrow")(x).sum()

    net = Net()
    x = jax.numpy.zeros((2, 32, 32, 8))
    params = net.init(jax.random.key(0), x)
    compiled = jax.jit(jax.grad(lambda p: net.apply(p, x))).lower(params).compile()
    by_scope, total = hlo_traffic.traffic_by_scope(compiled.as_text(), depth=1)
    assert total == pytest.approx(compiled.cost_analysis()["bytes accessed"], rel=0.02)
    assert {"wide", "wide (bwd)", "narrow (bwd)"} <= set(by_scope)
    assert sum(by_scope.values()) == total and min(by_scope.values()) > 0
    assert "| total |" in hlo_traffic.table(by_scope, total)


def test_loop_iterations_counted():
    """XLA's cost_analysis counts a loop body once; ``loop_extra`` adds the further iterations. A
    24-step scan (forward and backward) then costs what the same program unrolled costs: FLOPs
    from the program before optimisation (within 3%), bytes from the compiled one (its loops add
    copies of the carry and stacked outputs, so more than the unrolled program's, within 3x)."""
    import jax.numpy as jnp

    from benchmarks import hlo_traffic

    def program(unroll):
        def f(w, x):
            step = lambda c, wi: (jnp.tanh(c @ wi), None)  # noqa: E731
            return jax.lax.scan(step, x, w, unroll=unroll)[0].sum()

        return jax.jit(jax.grad(f)).lower(jnp.zeros((24, 128, 128)), jnp.zeros((64, 128)))

    rolled, unrolled = program(1), program(True)
    cost = rolled.compile().cost_analysis()
    want = unrolled.compile().cost_analysis()
    assert cost["flops"] < 0.2 * want["flops"]  # the body once
    extra = hlo_traffic.loop_extra(rolled.compiler_ir("hlo").as_hlo_text())
    assert extra["loops"] == 2 and extra["unknown"] == 0
    assert cost["flops"] + extra["flops"] == pytest.approx(want["flops"], rel=0.03)
    assert hlo_traffic.loop_extra(unrolled.compiler_ir("hlo").as_hlo_text())["flops"] == 0
    nbytes = cost["bytes accessed"] + hlo_traffic.loop_extra(rolled.compile().as_text())["bytes"]
    assert want["bytes accessed"] <= nbytes <= 3 * want["bytes accessed"]


TPU_STYLE_LOOP = """HloModule m

%cond (p: (s32[], f32[4,4])) -> pred[] {
  %p = (s32[], f32[4,4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %limit = s32[] constant(11)
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%body (q: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %q = (s32[], f32[4,4]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %three = s32[] constant(3)
  %next = s32[] add(%j, %three)
  %a = f32[4,4] get-tuple-element(%q), index=1
  %d = f32[4,4] dot(%a, %a), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[4,4]) tuple(%next, %d)
}

ENTRY %main (x: f32[4,4]) -> (s32[], f32[4,4]) {
  %x = f32[4,4] parameter(0)
  %two = s32[] constant(2)
  %init = (s32[], f32[4,4]) tuple(%two, %x)
  ROOT %w = (s32[], f32[4,4]) while(%init), condition=%cond, body=%body
}
"""


def test_trip_count_without_annotation():
    """A loop as TPU programs print it (no ``known_trip_count``): counter from 2 by 3 below 11
    runs 3 times, so the dot's 128 FLOPs count twice more than XLA's once; the traffic counts
    every instruction of the loop three times."""
    from benchmarks import hlo_traffic

    comps, _ = hlo_traffic.parse(TPU_STYLE_LOOP)
    while_rest = next(r for _, _, op, r in comps["main"] if op == "while")
    assert hlo_traffic.trip_count(comps, "main", while_rest) == 3
    extra = hlo_traffic.loop_extra(TPU_STYLE_LOOP)
    assert extra["flops"] == 2 * 2 * 4 * 4 * 4 and extra["unknown"] == 0
    by_scope, total = hlo_traffic.traffic_by_scope(TPU_STYLE_LOOP, depth=1)
    # the dot (192 bytes), the counter's add (12) and the condition's compare (9), three times
    assert total == 3 * (192 + 12 + 9)


# The calls of the Pallas flash attention as a compiled TPU program prints them (shortened): the
# forward kernel carries a cost estimate, the two backward kernels none.
FLASH_CALLS = """HloModule m

ENTRY %main (q: bf16[2,3,256,64], k: bf16[2,3,128,64]) -> bf16[2,3,256,64] {
  %q = bf16[2,3,256,64] parameter(0)
  %k = bf16[2,3,128,64] parameter(1)
  %fwd = bf16[2,3,256,64] custom-call(%q, %k, %k), custom_call_target="tpu_custom_call", \
metadata={op_name="jit(f)/jvp(jit(flash_attention))/pallas_call"}, \
backend_config={"custom_call_config": {"cost_estimate":{"flops":"1"}}}
  %dkv = (bf16[2,3,128,64], bf16[2,3,128,64]) custom-call(%q, %k, %k, %fwd), \
custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/transpose(jvp(jit(\
flash_attention)))/flash_mha_bwd_dkv_block_q_major=128/pallas_call"}, backend_config={}
  %dq = bf16[2,3,256,64] custom-call(%q, %k, %k, %fwd), custom_call_target="tpu_custom_call", \
metadata={op_name="jit(f)/transpose(jvp(jit(flash_attention)))/flash_mha_bwd_dq_block_q_major=\
128/pallas_call"}, backend_config={}
  %other = bf16[2,3,256,64] custom-call(%q), custom_call_target="tpu_custom_call", \
metadata={op_name="jit(f)/my_kernel/pallas_call"}, backend_config={}
  ROOT %out = bf16[2,3,256,64] add(%dq, %other)
}
"""


def test_pallas_kernels_without_cost_estimate_get_their_flops():
    """XLA counts no FLOPs for a Pallas kernel without a cost estimate: the flash backward's
    dK/dV kernel takes four [T, S] x D products per head, its dQ kernel three; a kernel not
    known here is counted as unknown, the forward kernel (estimate given) not at all."""
    from benchmarks import hlo_traffic

    extra = hlo_traffic.kernel_extra(FLASH_CALLS)
    per_product = 2 * 2 * 3 * 256 * 128 * 64
    assert extra == dict(flops=(4 + 3) * per_product, kernels=3, unknown=1)


def test_remat_modes_of_the_art_parts_on_the_cpu():
    """``benchmarks/aot_remat.py`` on the tiny ART-FR config for this host's CPU: a row per mode,
    and recomputing whole blocks (``full``) costs more FLOPs than recomputing only the elementwise
    work (``matmuls``), which costs at least as many as keeping everything (``none``)."""
    from benchmarks import aot_remat  # noqa: PLC0415

    for part in aot_remat.PARTS:
        rows = aot_remat.main([f"--part={part}", "--variant=tiny", "--topology=cpu:1", "--batch=2"])
        by_mode = {r["mode"]: r for r in rows}
        assert list(by_mode) == ["none", "matmuls", "full"], rows
        assert all(r["tflop"] > 0 and r["gb_accessed"] > 0 for r in rows), rows
        flops = {m: r["tflop"] for m, r in by_mode.items()}
        assert flops["none"] <= flops["matmuls"] < flops["full"], (part, flops)


def test_fit_search_tries_each_candidate_until_one_fits(monkeypatch):
    """``--fit``: on each slice the candidates in order of memory until one fits (here not the
    ``full`` one), then the cheaper ones, cheapest first; compiles stood in for."""
    from benchmarks import aot_compile as a  # noqa: PLC0415

    fits = {("v5e:2x2", "1,4", "matmuls"), ("v5e:2x2", "4,1", "matmuls")}
    calls = []

    def run_one(name, topo, devices, mesh_spec, remat, args):
        calls.append((topo.name, mesh_spec, remat))
        r = a.Result(name, topo.name, topo.num_chips, mesh_spec, remat, 24, "bfloat16")
        r.fits = (topo.name, mesh_spec, remat) in fits
        return r

    monkeypatch.setattr(a, "run_one", run_one)
    monkeypatch.setattr(a, "topology_devices", lambda topo: [])
    args = a.parse_args(["--fit", "--config=vqgan", "--topology=v5e:2x2"])
    best = a.search_fit("vqgan", a.CHIPS["v5e"], args, lambda r: None)
    assert calls == [
        ("v5e:1x1", "1,1", "full"),
        ("v5e:1x1", "1,1", "matmuls"),
        ("v5e:2x2", "1,4", "full"),
        ("v5e:2x2", "1,4", "matmuls"),
        ("v5e:2x2", "4,1", "matmuls"),
    ]
    assert (best.topology, best.mesh, best.remat) == ("v5e:2x2", "4,1", "matmuls")
    fits.clear()
    assert a.search_fit("vqgan", a.CHIPS["v5e"], args, lambda r: None) is None


FLASH_LOWERING = """
from benchmarks import aot_compile
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from artfr_jax.models import kernels
topo = aot_compile.parse_topology("v5e:2x2")
mesh = aot_compile.make_mesh(aot_compile.topology_devices(topo), 4, 1, 2**14)
rows = NamedSharding(mesh, P(("data", "fsdp")))
qkv = [jax.ShapeDtypeStruct((8, 512, 12, 64), jnp.bfloat16, sharding=rows)] * 3
loss = lambda q, k, v: jnp.sum(kernels.dot_product_attention(q, k, v).astype(jnp.float32))
with jax.set_mesh(mesh):
    print(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*qkv).as_text())
"""


@pytest.mark.libtpu
def test_transformer_attention_lowers_to_the_flash_kernel_per_chip():
    """The transformer's attention (512 tokens, 12 heads of 64) lowered for v5e:2x2 is the Pallas
    flash kernel, forward and backward, inside a shard_map over the batch (each chip its rows)."""
    if not _has_libtpu():
        pytest.skip(f"no libtpu at {TPU_PYTHON}")
    run = subprocess.run(
        [TPU_PYTHON, "-c", FLASH_LOWERING], cwd=ROOT, env=_env(), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    text = run.stdout
    assert text.count("tpu_custom_call") >= 3, "forward, dK/dV and dQ kernels"
    for kernel in ("", "_dkv", "_dq"):  # forward, dK/dV, dQ
        assert f'kernel_name = "_flash_attention{kernel}_kernel"' in text, kernel
    assert "mhlo.num_partitions = 4" in text and "manual" in text
    assert "512x512" not in text  # no [T, S] scores written by XLA
