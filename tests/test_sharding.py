import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from artfr_jax.train import sharding


def test_fsdp_rule_splits_largest_divisible_dim():
    assert sharding.fsdp_spec((3, 3, 64, 128), 2, 0) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((3, 3, 64, 127), 2, 0) == P(None, None, "fsdp", None)
    assert sharding.fsdp_spec((7,), 2, 0) == P()
    assert sharding.fsdp_spec((4096,), 2, 2**14) == P()  # small: replicated
    assert sharding.fsdp_spec((1024, 256), 1, 0) == P()


def test_mesh_shapes_and_errors():
    cfg = ml_collections.ConfigDict(dict(data=4, fsdp=2))
    mesh = sharding.make_mesh(cfg)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2)))
    assert mesh.shape["data"] == len(jax.devices()) // 2
    with pytest.raises(ValueError, match="config.mesh"):
        sharding.make_mesh(ml_collections.ConfigDict(dict(data=3, fsdp=1)))
    with pytest.raises(ValueError, match="batch_size"):
        sharding.check_batch_size(6, sharding.make_mesh(cfg))


def test_batch_is_split_over_all_devices():
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2)))
    batch = {"hq": np.arange(16 * 2 * 2 * 3, dtype=np.uint8).reshape(16, 2, 2, 3)}
    out = sharding.global_batch_to_devices(batch, mesh)["hq"]
    assert out.shape == (16, 2, 2, 3)
    assert {s.data.shape[0] for s in out.addressable_shards} == {2}
    np.testing.assert_array_equal(np.asarray(out), batch["hq"])


def test_one_process_feeds_every_row_of_the_batch():
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2)), jax.devices()[:8])
    assert sharding.process_rows(mesh, 16) == slice(0, 16)
    assert sharding.data_shard(mesh, 16) == (0, 1)


def _mesh_of(platform: str, data: int, fsdp: int):
    """What ``per_device_batch_note`` reads of a mesh: its axis sizes and its devices' platform."""
    device = type("Device", (), {"platform": platform})()
    return type("FakeMesh", (), {"shape": {"data": data, "fsdp": fsdp},
                                 "devices": np.full((data, fsdp), device, dtype=object)})()  # fmt: skip


def test_per_device_batch_note_only_for_tpu_meshes_under_eight_per_device():
    note = sharding.per_device_batch_note(24, _mesh_of("tpu", 4, 1))
    assert note is not None and "config.batch_size=24" in note and "6 examples per device" in note
    assert "2 examples" in sharding.per_device_batch_note(16, _mesh_of("tpu", 4, 2))
    assert sharding.per_device_batch_note(32, _mesh_of("tpu", 2, 2)) is None  # 8 per device
    assert sharding.per_device_batch_note(24, _mesh_of("gpu", 4, 1)) is None
    assert sharding.per_device_batch_note(2, sharding.make_mesh(_mesh_config(-1, 1))) is None


def _mesh_config(data, fsdp):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))
