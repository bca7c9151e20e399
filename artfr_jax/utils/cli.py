"""Small helpers shared by the absl command-line entry points."""

from __future__ import annotations

import sys
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


def usage_error(message: str) -> int:
    """Prints ``error: <message>`` on stderr; returns exit status 2 (usage error)."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def parse_flags(argv: list[str]) -> list[str]:
    """absl's ``flags.FLAGS(argv)`` that also takes dashed names; a bad flag is a one-line error
    and exit status 2 (pass as ``app.run(..., flags_parser=parse_flags)``)."""
    try:
        return flags.FLAGS(underscore_flag_names(argv, flags.FLAGS))
    except flags.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {first} (see --helpshort)", file=sys.stderr)
        sys.exit(2)
