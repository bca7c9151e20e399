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
                    r"branch_computations|calls)=\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?")  # fmt: skip
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# No traffic of their own (aliases, metadata, tuples) or counted where their operands are read.
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
         "partition-id", "replica-id", "iota", "opt-barrier"}  # fmt: skip
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


def traffic_by_scope(hlo: str, depth: int = 2) -> tuple[dict[str, int], int]:
    """Bytes read and written per scope, and the total, of the program's top-level instructions."""
    comps, entry = parse(hlo)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    shapes = {name: shape for instrs in comps.values() for name, shape, _, _ in instrs}
    lines = {name: rest for instrs in comps.values() for name, _, _, rest in instrs}
    seen, todo, out = set(), [entry], collections.Counter()
    while todo:
        comp = todo.pop()
        if comp in seen or comp not in comps:
            continue
        seen.add(comp)
        for _name, shape, opcode, rest in comps[comp]:
            if opcode in ("while", "conditional", "call", "async-start", "async-done"):
                for group in _CALLS.findall(rest):
                    todo += [c.strip().lstrip("%") for c in group.split(",")]
                if opcode != "call":
                    continue
            if opcode in _FREE:
                continue
            args = rest.split(")", 1)[0]
            operands = re.findall(r"%([\w.\-]+)", args)
            nbytes = shape_bytes(shape) + sum(shape_bytes(shapes.get(o, "")) for o in operands)
            name = _op_name(rest, comps)
            for o in operands if name is None else ():  # a layout copy: its input's scope
                name = _op_name(lines.get(o, ""), comps)
                if name:
                    break
            out[scope(name, depth) if name else f"({opcode})"] += nbytes
    return dict(out), sum(out.values())


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
