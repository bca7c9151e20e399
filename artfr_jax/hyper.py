"""Sweeps as data: lists of ``{'config.a.b': value}`` trials, built from a few combinators.

The style of the JAX research codebases' ``get_hyper(h)``: a config file (or a sweep file in
``experiments/``) defines ::

    def get_hyper(h):
        return h.product([
            h.sweep("config.seed", [0, 1]),
            h.sweep("config.model.condition_mode", ["prefix", "concat", "cross_attention"]),
        ])

and ``python -m artfr_jax.launch`` runs one training per dict. A key names a config field
(``config.`` is added where it is left out); a value is a Python bool, int, float, str, or a
tuple/list of those.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Trial = dict[str, Any]


def field_key(name: str) -> str:
    """``"model.width"`` -> ``"config.model.width"``; a one-line ValueError for a non-field."""
    if not isinstance(name, str) or not name.strip(".") or " " in name:
        raise ValueError(
            f"hyper: a sweep key must be a config field like 'config.a.b', not {name!r}"
        )
    return name if name.startswith("config.") else "config." + name


def apply(config, trial: Mapping[str, Any]):
    """Sets each ``{'config.a.b': value}`` of ``trial`` on ``config`` (in place; returned): the
    notebooks' and the launcher's way to set fields by the command line's names. A list value is
    stored as a tuple. One-line ValueError for a field that does not exist or a value of another
    type (ml_collections' type check)."""
    for name, value in trial.items():
        key = field_key(name)
        *parents, leaf = key.split(".")[1:]
        node = config
        try:
            for p in parents:
                node = node[p]
            if leaf not in node:
                raise KeyError(leaf)
            node[leaf] = tuple(value) if isinstance(value, list) else value
        except (KeyError, AttributeError, TypeError) as e:
            reason = "no such field" if isinstance(e, KeyError | AttributeError) else str(e)
            raise ValueError(f"{key}={value!r}: {reason}") from None
    return config


def apply_assignment(config, assignment: str):
    """``'model.width=128'`` (a command line's ``--set``): the text after ``=`` read as the type
    of the field's current value (``true``/``1``/``yes`` for a bool, ``1,2`` for a tuple), then
    :func:`apply`. One-line ValueError for a malformed assignment, a missing field or a value
    that does not parse."""
    name, sep, text = assignment.partition("=")
    if not sep:
        raise ValueError(f"--set {assignment!r}: expected KEY=VALUE, e.g. model.width=128")
    key = field_key(name.strip())
    node = config
    try:
        for part in key.split(".")[1:]:
            node = node[part]
    except (KeyError, AttributeError):
        raise ValueError(f"{key}: no such field") from None
    try:
        if isinstance(node, bool):
            value = text.strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(node, tuple | list):
            value = tuple(type(node[0])(v) for v in text.strip("()[]").split(",") if v.strip())
        elif node is None:
            value = text
        else:
            value = type(node)(text)
    except (ValueError, IndexError):
        raise ValueError(f"{key}={text!r}: expected {type(node).__name__}") from None
    return apply(config, {key: value})


def sweep(name: str, values: Iterable[Any]) -> list[Trial]:
    """One trial per value of ``name``."""
    key = field_key(name)
    trials = [{key: v} for v in values]
    if not trials:
        raise ValueError(f"hyper.sweep({name!r}, ...): no values")
    return trials


def fixed(name: str, value: Any, length: int = 1) -> list[Trial]:
    """``length`` trials that all set ``name`` to ``value`` (a constant to zip or multiply)."""
    return [{field_key(name): value} for _ in range(length)]


def _merge(parts: Sequence[Trial]) -> Trial:
    merged: Trial = {}
    for part in parts:
        clash = sorted(k for k in part if k in merged and merged[k] != part[k])
        if clash:
            raise ValueError(f"hyper: {clash} set twice with different values in one trial")
        merged.update(part)
    return merged


def product(sweeps: Sequence[list[Trial]]) -> list[Trial]:
    """Every combination, the last sweep varying fastest (like ``itertools.product``)."""
    return [_merge(parts) for parts in itertools.product(*sweeps)]


def zipit(sweeps: Sequence[list[Trial]]) -> list[Trial]:
    """Trial i takes the i-th trial of every sweep; the sweeps must be equally long."""
    lengths = [len(s) for s in sweeps]
    if len(set(lengths)) > 1:
        raise ValueError(f"hyper.zipit: sweeps of different lengths {lengths}")
    return [_merge(parts) for parts in zip(*sweeps, strict=True)]


def chainit(sweeps: Sequence[list[Trial]]) -> list[Trial]:
    """The trials of each sweep, one sweep after the other."""
    return [dict(t) for s in sweeps for t in s]


def identity() -> list[Trial]:
    """One trial with no overrides (a config without a sweep)."""
    return [{}]
