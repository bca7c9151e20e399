"""Loading one Python config file from another.

``ml_collections.config_flags`` loads config files by path, so ``configs/`` need not be importable
as a package; a stage-II config that embeds its stage-I config loads the sibling file the same way.
"""

import importlib.util
import os

import ml_collections


def sibling_config(
    config_file: str, name: str, arg: str | None = None
) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file ``name`` in the folder of ``config_file``."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
    module_name = "artfr_configs_" + os.path.splitext(name)[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
