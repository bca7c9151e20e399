"""Make PyPI's CUDA torchvision importable next to the CPU torch (tests and reference code only)."""

import functools

# Operators torchvision registers fake (meta) kernels for at import time, whether or not its compiled
# library loaded; the schemas mirror torchvision's C++ definitions.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)


@functools.cache
def register_torchvision_schemas() -> bool:
    """Defines the missing ``torchvision::`` schemas. Returns False when torch is not installed."""
    try:
        import torch
    except ImportError:
        return False
    if _compiled_ops_load(torch):
        return True
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        try:
            lib.define(schema)
        except RuntimeError:  # defined already: a torchvision whose compiled ops do load
            pass
    register_torchvision_schemas.lib = lib  # keep the library (and its definitions) alive
    return True


def _compiled_ops_load(torch) -> bool:
    """True where torchvision's own ``_C`` library loads (e.g. a matching GPU build)."""
    import glob
    import importlib.util
    import os

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    if not libs:
        return False
    try:
        torch.ops.load_library(libs[0])
    except (OSError, RuntimeError):
        return False
    return True
