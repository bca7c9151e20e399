"""Device mesh, parameter partitioning rule and batch placement.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallelism whose
parameters and optimizer state are split across devices, ZeRO-3 style). The batch is split over both
axes, so every device computes on its own examples; parameters are split on ``fsdp`` only.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """Builds the ('data', 'fsdp') mesh; a size of -1 takes the remaining devices.

    Axis types are Auto so linen's logical partitioning and GSPMD propagation work.
    """
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("config.mesh: at most one of data/fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data < 1 or fsdp < 1 or data * fsdp > n or n % (data * fsdp):
        raise ValueError(
            f"config.mesh: data={data} x fsdp={fsdp} must divide the number of devices ({n})"
        )
    if data * fsdp < n and jax.process_count() > 1:
        raise ValueError(
            f"config.mesh: data={data} x fsdp={fsdp} uses {data * fsdp} of the {n} devices of "
            f"{jax.process_count()} processes; a multi-process run uses them all (set data=-1)"
        )
    if data * fsdp < n:  # e.g. a 1-device run on a multi-device host
        logging.warning("config.mesh uses %d of %d devices", data * fsdp, n)
    grid = np.asarray(devices[: data * fsdp], dtype=object).reshape(data, fsdp)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """Splits the largest dimension divisible by the fsdp size; small arrays stay replicated."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: Mesh, min_size: int = 2**14):
    """NamedShardings for a pytree of ShapeDtypeStructs following the fsdp rule."""
    fsdp = mesh.shape["fsdp"]

    def leaf(x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, fsdp_spec(tuple(shape), fsdp, min_size))

    return jax.tree.map(leaf, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch_to_devices(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local host batch -> global arrays split over ('data', 'fsdp') (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def process_rows(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of a global batch that this process's devices hold under :func:`batch_sharding`:
    one contiguous range (the mesh lists each process's devices together)."""
    index = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    spans = sorted(
        (s[0].indices(global_batch_size)[0], s[0].indices(global_batch_size)[1])
        for s in index.values()
    )
    spans = list(dict.fromkeys(spans))  # devices of one data row share their rows
    for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
        if stop != start:
            raise ValueError(
                f"config.mesh: this process's devices hold rows {spans} of the batch, not one "
                "block; order the mesh's devices by process"
            )
    return slice(spans[0][0], spans[-1][1])


def data_shard(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """``(index, count)``: this process feeds block ``index`` of ``count`` equal blocks of every
    global batch, so that a global batch holds the same examples in the same rows whatever the
    number of processes (see ``data.pipeline.make_train_dataset``)."""
    rows = process_rows(mesh, global_batch_size)
    local = rows.stop - rows.start
    return rows.start // local, global_batch_size // local


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % n:
        raise ValueError(
            f"config.batch_size={global_batch_size} must be divisible by the number of "
            f"data-parallel devices ({n} = mesh data x fsdp)"
        )


# With 8 or more examples per chip XLA's TPU programs put the batch in the vector registers'
# 8-row tiles; with fewer they cut each image into row blocks with halos, and the 512-px levels
# move 3-6x the bytes per example (docs/performance.md, "Examples per chip").
TPU_BATCH_TILE = 8


def per_device_batch_note(global_batch_size: int, mesh: Mesh) -> str | None:
    """One line of advice where a TPU mesh gets fewer than 8 examples per device, else None."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    platform = mesh.devices.flat[0].platform
    per_device = global_batch_size // n
    if platform != "tpu" or per_device >= TPU_BATCH_TILE:
        return None
    return (
        f"config.batch_size={global_batch_size} on {n} TPU devices is {per_device} examples per "
        f"device; XLA's TPU convolutions move several times the bytes per example below "
        f"{TPU_BATCH_TILE} per device (docs/scaling.md, 'Examples per chip')"
    )
