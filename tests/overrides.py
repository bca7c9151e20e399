"""Dotted-path config overrides for tests: ``apply(config, {'optimizer.eps': 1e-3})``."""


def apply(config, overrides: dict):
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return config
