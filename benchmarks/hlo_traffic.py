r"""Where a compiled program's memory traffic goes: bytes per model scope from its HLO text.

XLA's ``cost_analysis()["bytes accessed"]`` is one number for the whole program. This sums the
same kind of count per instruction of the optimised HLO (``compiled.as_text()``): for every
instruction of the entry computation and of the computations it runs (loop bodies, conditionals,
calls; not the insides of fusions, which stay on chip), the bytes of its operands plus the bytes of
its result, attributed to the model scope in the instruction's ``op_name`` metadata
(``jit(step)/transpose(jvp(ARTFR))/lq_encoder/down_1/conv/...`` -> ``lq_encoder/down_1`` at depth
2; JAX's transformation wrappers are dropped, ``transpose(...)`` marks the backward pass).

    python -m benchmarks.hlo_traffic PROGRAM.hlo.txt [--depth=2] [--top=25]

``benchmarks/aot_compile.py --dump_compiled=DIR`` writes the compiled TPU programs' text.
"""

from __future__ import annotations

import argparse
import collections
import math
import re

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")  # unindented, ends with '{'
_CALLS = re.compile(r"\b(?:body|condition|to_apply|true_computation|false_computation|"
                    r"branch_computations|calls)=(\{[^}]*\}|%?[\w.\-]+)")  # fmt: skip
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# No traffic of their own (aliases, metadata, tuples) or counted where their operands are read.
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
         "partition-id", "replica-id", "iota", "opt-barrier"}  # fmt: skip
# Not counted as instructions: no traffic of their own, or control flow whose bodies are counted.
_NOT_COUNTED = _FREE | {"while", "conditional", "async-start", "async-done"}
_WRAPPERS = re.compile(r"^(jit|pjit|jvp|vmap|remat\d*|checkpoint|custom_jvp_call|"
                       r"custom_vjp_call|shard_map|while|cond|body|closed_call)\b")  # fmt: skip


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (arrays and tuples of arrays)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _DTYPE_BYTES[dtype]
    return int(total)


def parse(hlo: str) -> tuple[dict[str, list[tuple]], str | None]:
    """Computations -> [(name, shape, opcode, rest of line)], and the entry's name."""
    comps: dict[str, list[tuple]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append(m.groups())
    return comps, entry


def scope(op_name: str, depth: int) -> str:
    """``jit(f)/transpose(jvp(M))/enc/dense/dot_general`` -> ``enc/dense (bwd)`` at depth 2."""
    backward = "transpose(" in op_name
    parts = []
    for p in op_name.split("/"):
        if not p or _WRAPPERS.match(p) or p.startswith("transpose(") or "(" in p:
            continue
        parts.append(p)
    key = "/".join(parts[:depth]) or "(no scope)"
    return key + (" (bwd)" if backward else "")


def _op_name(rest: str, comps: dict[str, list[tuple]]) -> str | None:
    """The instruction's op_name, else the first one inside the computation it calls (a fusion
    XLA made from several ops may carry none of its own)."""
    m = _OP_NAME.search(rest)
    if m:
        return m.group(1)
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    for *_, inner in comps.get(called.group(1), []) if called else []:
        m = _OP_NAME.search(inner)
        if m:
            return m.group(1)
    return None


def _operands(rest: str) -> list[str]:
    """Operand names of an instruction (``%a, %b`` in optimised HLO, ``a, b`` before)."""
    args = rest.split(")", 1)[0]
    if "%" in args:
        return re.findall(r"%([\w.\-]+)", args)
    return [a.split()[-1] for a in args.split(",") if a.strip() and not a.strip()[0].isdigit()]


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _constant(instrs: list[tuple], name: str) -> int | None:
    for n, _shape, opcode, rest in instrs:
        if n == name and opcode == "constant":
            m = re.match(r"\s*(-?\d+)\)", rest)
            return int(m.group(1)) if m else None
    return None


def _tuple_index(instrs: list[tuple], name: str) -> int | None:
    """``index`` of a ``get-tuple-element`` named ``name``, else None."""
    for n, _, op, rest in instrs:
        if n == name and op == "get-tuple-element":
            return int(re.search(r"index=(\d+)", rest).group(1))
    return None


def trip_count(comps: dict[str, list[tuple]], caller: str, rest: str) -> int | None:
    """Iterations of a ``while``: XLA's ``known_trip_count`` annotation where there is one, else
    (TPU programs, programs before optimisation) from the form JAX emits for ``scan`` and
    ``fori_loop``: the condition compares a counter (a tuple element) with a constant (``LT`` or
    ``LE``), the body adds a constant step to it (1 if not found), its initial value is a constant
    in the operand tuple (0 if not found). None if not of that form."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)  # XLA:CPU/GPU annotate it
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", rest)
    body = re.search(r"body=%?([\w.\-]+)", rest)
    instrs = comps.get(cond.group(1), []) if cond else []
    for _name, _shape, opcode, crest in instrs:
        direction = re.search(r"direction=(LT|LE)", crest)
        if opcode != "compare" or not direction:
            continue
        lhs, rhs = (_operands(crest) + [None, None])[:2]
        limit, index = _constant(instrs, rhs), _tuple_index(instrs, lhs)
        if limit is None or index is None:
            continue
        start, step = 0, 1
        init = _operands(rest)
        for n, _, op, trest in comps.get(caller, []):
            if init and n == init[0] and op == "tuple" and index < len(_operands(trest)):
                start = _constant(comps[caller], _operands(trest)[index]) or 0
        binstrs = comps.get(body.group(1), []) if body else []
        for _n, _, op, brest in binstrs:
            args = _operands(brest)
            if op == "add" and len(args) == 2 and _tuple_index(binstrs, args[0]) == index:
                step = _constant(binstrs, args[1]) or 1
        span = limit - start + (direction.group(1) == "LE")
        return max(0, -(-span // max(step, 1)))
    return None


def _flops(comps, shapes, opcode: str, shape: str, rest: str) -> float:
    """FLOPs of a ``dot`` or ``convolution`` (2 per multiply-add), or of those inside the fusion
    or call the instruction runs; 0 for anything else (elementwise work is not counted)."""
    if opcode == "dot":
        lhs = _dims(shapes.get(_operands(rest)[0], ""))
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        contract = [lhs[int(i)] for i in m.group(1).split(",") if i] if m and lhs else []
        return 2.0 * math.prod(_dims(shape)) * math.prod(contract)
    if opcode == "convolution":
        rhs = _dims(shapes.get(_operands(rest)[1], ""))
        labels = re.search(r"dim_labels=\w+_(\w+)->", rest)
        if not rhs or not labels or "o" not in labels.group(1):
            return 0.0
        return 2.0 * math.prod(_dims(shape)) * math.prod(rhs) / rhs[labels.group(1).index("o")]
    called = re.search(r"\bcalls=%?([\w.\-]+)", rest)
    if called is None or opcode in ("while", "conditional"):
        return 0.0
    return sum(_flops(comps, shapes, op, sh, r) for _, sh, op, r in comps.get(called.group(1), []))


def _param_index(rest: str) -> int | None:
    m = re.match(r"\s*(\d+)\)", rest)
    return int(m.group(1)) if m else None


def instruction_bytes(comps, shapes, shape: str, opcode: str, rest: str) -> int:
    """Bytes an instruction reads and writes: its operands and result, except the parts of an
    array a slice reads or an in-place update writes (``dynamic-slice``, ``dynamic-update-slice``,
    ``scatter``, at the top level or inside a fusion: a loop body reading its step's slice of a
    stacked array reads that slice, not the array)."""
    operands = _operands(rest)
    sizes = [shape_bytes(shapes.get(o, "")) for o in operands]
    if opcode == "dynamic-slice":
        return 2 * shape_bytes(shape) + sum(sizes[1:])
    if opcode in ("dynamic-update-slice", "scatter"):  # in place: the update, read and written
        return 2 * sum(sizes[1:])
    called = re.search(r"\bcalls=%?([\w.\-]+)", rest) if opcode == "fusion" else None
    inner = comps.get(called.group(1), []) if called else []
    if not inner:
        return shape_bytes(shape) + sum(sizes)
    params = {n: _param_index(r) for n, _, op, r in inner if op == "parameter"}
    users: dict[str, list[tuple]] = collections.defaultdict(list)
    for _n, sh, op, r in inner:
        for position, o in enumerate(_operands(r)):
            if o in params:
                users[o].append((position, sh, op, r))
    total = 0
    for pname, index in params.items():
        if index is None or index >= len(sizes):
            continue
        uses = users.get(pname, [])
        if uses and all(pos == 0 and op == "dynamic-slice" for pos, _, op, _ in uses):
            total += sum(shape_bytes(sh) for _, sh, _, _ in uses)
        elif uses and all(
            pos == 0 and op in ("dynamic-update-slice", "scatter") for pos, *_ in uses
        ):
            total += 0  # updated in place: counted with the result below
        else:
            total += sizes[index]
    root = inner[-1]
    if root[2] in ("dynamic-update-slice", "scatter"):
        total += sum(shape_bytes(shapes.get(o, "")) for o in _operands(root[3])[1:])
    else:
        total += shape_bytes(shape)
    return total


def _walk(hlo: str):
    """``(comps, shapes, [(computation, times it runs per step)])``, one entry per call site, for
    the entry computation and every computation it runs (not fusion insides); a loop body runs
    its trip count times (1 where :func:`trip_count` cannot tell), nested loops multiply."""
    comps, entry = parse(hlo)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    shapes = {name: shape for instrs in comps.values() for name, shape, _, _ in instrs}
    runs, todo = [], [(entry, 1)]
    while todo:
        comp, times = todo.pop()
        if comp not in comps:
            continue
        runs.append((comp, times))
        for _name, _shape, opcode, rest in comps[comp]:
            if opcode not in ("while", "conditional", "call", "async-start", "async-done"):
                continue
            trips = (trip_count(comps, comp, rest) or 1) if opcode == "while" else 1
            for group in _CALLS.findall(rest):
                for c in group.strip("{}").split(","):
                    todo.append((c.strip().lstrip("%"), times * trips))
    return comps, shapes, runs


def traffic_by_scope(hlo: str, depth: int = 2) -> tuple[dict[str, int], int]:
    """Bytes read and written per scope, and the total, of the program's top-level instructions
    (loop bodies times their trip counts)."""
    comps, shapes, runs = _walk(hlo)
    lines = {name: rest for instrs in comps.values() for name, _, _, rest in instrs}
    out = collections.Counter()
    for comp, times in runs:
        for _name, shape, opcode, rest in comps[comp]:
            if opcode in _NOT_COUNTED:
                continue
            operands = _operands(rest)
            nbytes = instruction_bytes(comps, shapes, shape, opcode, rest)
            name = _op_name(rest, comps)
            for o in operands if name is None else ():  # a layout copy: its input's scope
                name = _op_name(lines.get(o, ""), comps)
                if name:
                    break
            out[scope(name, depth) if name else f"({opcode})"] += nbytes * times
    return dict(out), sum(out.values())


def loop_extra(hlo: str) -> dict[str, float]:
    """What XLA's ``cost_analysis()`` leaves out of a program with loops: it counts each loop
    body once, whatever its trip count. Returns the missing ``flops`` (dots and convolutions of
    the bodies' further iterations) and ``bytes`` (their instructions' operands and results),
    ``loops`` (loops found) and ``unknown`` (loops whose trip count could not be read, counted
    once)."""
    comps, shapes, runs = _walk(hlo)
    extra_flops = extra_bytes = 0.0
    loops = unknown = 0
    for comp, instrs in comps.items():
        for _name, _shape, opcode, rest in instrs:
            if opcode == "while":
                loops += 1
                unknown += trip_count(comps, comp, rest) is None
    for comp, times in runs:
        if times <= 1:
            continue
        for _name, shape, opcode, rest in comps[comp]:
            if opcode in _NOT_COUNTED:
                continue
            nbytes = instruction_bytes(comps, shapes, shape, opcode, rest)
            extra_bytes += (times - 1) * nbytes
            extra_flops += (times - 1) * _flops(comps, shapes, opcode, shape, rest)
    return dict(flops=extra_flops, bytes=extra_bytes, loops=loops, unknown=unknown)


# Pallas TPU kernels (``tpu_custom_call``) that carry no cost estimate count no FLOPs in XLA's
# ``cost_analysis()``. The flash attention backward kernels' matrix products, per
# ``2 * B * H * T * S * D`` (q ``[B, H, T, D]``, k ``[B, H, S, D]``: operands 0 and 1): dK/dV
# recompute the scores and probabilities and take four products, dQ three.
_KERNEL_PRODUCTS = {"flash_mha_bwd_dkv": 4, "flash_mha_bwd_dq": 3}


def kernel_extra(hlo: str) -> dict[str, float]:
    """FLOPs of the Pallas TPU kernels that ``cost_analysis()`` counts as none (no cost estimate
    in their backend config): ``flops`` for the kernels named in ``_KERNEL_PRODUCTS``,
    ``kernels`` (such calls found, loop iterations included) and ``unknown`` (of them, the ones
    whose FLOPs are not known here)."""
    comps, shapes, runs = _walk(hlo)
    flops = 0.0
    kernels = unknown = 0
    for comp, times in runs:
        for _name, _shape, opcode, rest in comps[comp]:
            if opcode != "custom-call" or '"tpu_custom_call"' not in rest:
                continue
            if "cost_estimate" in rest:
                continue
            kernels += times
            name = _OP_NAME.search(rest)
            products = next(
                (n for k, n in _KERNEL_PRODUCTS.items() if name and k in name.group(1)), None
            )
            ops = _operands(rest)
            if products is None or len(ops) < 2:
                unknown += times
                continue
            b, h, t, d = _dims(shapes[ops[0]])
            s = _dims(shapes[ops[1]])[2]
            flops += times * products * 2.0 * b * h * t * s * d
    return dict(flops=flops, kernels=kernels, unknown=unknown)


def table(by_scope: dict[str, int], total: int, top: int = 25) -> str:
    rows = sorted(by_scope.items(), key=lambda kv: -kv[1])
    lines = ["| scope | GB | share |", "|---|---|---|"]
    for k, v in rows[:top]:
        lines.append(f"| {k} | {v / 1e9:.2f} | {v / max(total, 1):.1%} |")
    rest = sum(v for _, v in rows[top:])
    if rest:
        lines.append(f"| ({len(rows) - top} more) | {rest / 1e9:.2f} | {rest / total:.1%} |")
    lines.append(f"| total | {total / 1e9:.2f} | 100% |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("hlo", help="a compiled program's HLO text (compiled.as_text())")
    p.add_argument("--depth", type=int, default=2, help="scope components kept")
    p.add_argument("--top", type=int, default=25, help="rows shown")
    args = p.parse_args(argv)
    with open(args.hlo, encoding="utf-8") as f:
        by_scope, total = traffic_by_scope(f.read(), args.depth)
    print(table(by_scope, total, args.top))


if __name__ == "__main__":
    main()
