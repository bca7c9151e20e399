"""Reading converted weight files (flax msgpack) with shape checks and one-line errors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from etils import epath
from flax import serialization, traverse_util


def load_params_file(
    path: str | None,
    *,
    label: str,
    user: str,
    filename: str,
    expected: dict[tuple[str, ...], tuple[int, ...]],
    hint: Callable[[str], str],
) -> dict:
    """Loads a params tree written by a converter and checks it against ``expected`` shapes.

    ``label`` names the weights in messages (e.g. 'LPIPS'), ``user`` what needs them, ``filename``
    the usual file name and ``hint(path)`` the command that produces the file. Returns nested
    float32 NumPy arrays. Raises ``ValueError`` for an empty path or a bad file and
    ``FileNotFoundError`` for a missing one; every message names the file and the command.
    """
    if not path:
        raise ValueError(
            f"{user} needs a weights file ({filename}) but none was given; create it with: "
            f"{hint('')}"
        )
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"{label} weights file {path} not found; create it with: {hint(str(path))}"
        )
    try:
        flat = traverse_util.flatten_dict(serialization.msgpack_restore(p.read_bytes()))
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ValueError(
            f"{label} weights file {path} is not a flax msgpack params tree ({type(e).__name__}); "
            f"recreate it with: {hint(str(path))}"
        ) from None
    for key, shape in expected.items():
        got = flat.get(key)
        if got is None or tuple(np.shape(got)) != shape:
            found = "missing" if got is None else f"shape {tuple(np.shape(got))}"
            raise ValueError(
                f"{label} weights file {path}: {'/'.join(key)} is {found}, expected shape {shape}; "
                f"recreate it with: {hint(str(path))}"
            )
    extra = sorted("/".join(k) for k in flat if k not in expected)
    if extra:
        raise ValueError(
            f"{label} weights file {path}: unexpected entries {extra[:3]}; "
            f"recreate it with: {hint(str(path))}"
        )
    return traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()})


def save_params_file(path: str, tree) -> int:
    """Writes a converter's params tree as flax msgpack (atomically, parent folders created).

    Returns the number of array elements, for the converter's summary line.
    """
    out = epath.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / (out.name + ".tmp")
    tmp.write_bytes(serialization.msgpack_serialize(tree))
    tmp.rename(out)
    return sum(int(np.size(v)) for v in traverse_util.flatten_dict(tree).values())
