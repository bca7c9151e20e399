"""Small helpers shared by the absl command-line entry points."""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags


def underscore_flag_names(argv: Sequence[str], flag_values: flags.FlagValues) -> list[str]:
    """Accepts ``--batch-size`` for a flag defined as ``batch_size`` (absl only takes the latter).

    Only names that become a defined flag once '-' is replaced by '_' are rewritten (also with the
    ``--no`` prefix of booleans); anything after a bare ``--`` is left alone.
    """
    out, rest = [], False
    for i, arg in enumerate(argv):
        if i == 0 or rest or not arg.startswith("--") or "-" not in arg[2:].split("=", 1)[0]:
            rest = rest or arg == "--"
            out.append(arg)
            continue
        name, sep, value = arg[2:].partition("=")
        cand = name.replace("-", "_")
        if cand not in flag_values and name.startswith("no-"):
            cand = "no" + cand[3:]  # --no-side-by-side -> --noside_by_side
        known = cand in flag_values or (cand.startswith("no") and cand[2:] in flag_values)
        out.append(f"--{cand}{sep}{value}" if known else arg)
    return out
