"""grain pipeline: shapes, determinism, sharding, epochs, checkpointable state, eval split."""

import cv2
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from artfr_jax.data import pipeline as data


def _cfg(size=32, n=16, **kw):
    c = data.default_config(size)
    c.synthetic_num_train = n
    c.num_workers = 0
    c.update(kw)
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in ("hq", "lq"))


def test_default_config_fields():
    c = data.default_config(512, "vqfr")
    for f in [
        "source",
        "folder",
        "eval_folder",
        "tfds_name",
        "tfds_split",
        "tfds_eval_split",
        "tfds_data_dir",
        "tfds_image_key",
        "synthetic_num_train",
        "image_size",
        "num_workers",
        "shuffle",
        "seed_offset",
    ]:
        assert f in c, f
    assert c.source == "synthetic" and c.image_size == 512 and c.num_workers == -1
    assert tuple(c.degradation.blur_sigma) == (0.2, 10.0)


def test_batches_shape_dtype_and_sharding():
    it = data.make_train_iterator(_cfg(), global_batch_size=8, seed=0, process_count=2)
    b = next(it)
    assert set(b) == {"hq", "lq"}
    for k in ("hq", "lq"):
        assert b[k].shape == (4, 32, 32, 3) and b[k].dtype == np.uint8
    assert not np.array_equal(b["hq"], b["lq"])
    with pytest.raises(
        ValueError, match="global_batch_size=6 must be a positive multiple of process_count=4"
    ):
        data.make_train_iterator(_cfg(), global_batch_size=6, seed=0, process_count=4)


def test_processes_get_disjoint_shards():
    cfg = _cfg(n=8)
    seen = []
    for p in range(2):
        it = data.make_train_iterator(
            cfg, global_batch_size=4, seed=0, process_index=p, process_count=2
        )
        seen.extend(img.tobytes() for b in _take(it, 2) for img in b["hq"])  # one epoch each
    assert len(set(seen)) == 8  # every training face exactly once across both processes


def test_a_global_batch_is_the_same_for_any_process_count():
    """Process i feeds block i of each global batch: concatenated in process order, the
    processes' batches are the one-process batches (same examples, rows and degradations)."""
    cfg = _cfg(n=10)  # not a multiple of the batch: epochs straddle batches
    one = _take(data.make_train_iterator(cfg, global_batch_size=4, seed=1), 4)
    for count in (2, 4):
        its = [
            data.make_train_iterator(
                cfg, global_batch_size=4, seed=1, process_index=p, process_count=count
            )
            for p in range(count)
        ]
        for t in range(4):
            parts = [next(it) for it in its]
            for k in ("hq", "lq"):
                np.testing.assert_array_equal(np.concatenate([b[k] for b in parts]), one[t][k])


def test_deterministic_for_seed():
    a = _take(data.make_train_iterator(_cfg(), global_batch_size=4, seed=3), 3)
    b = _take(data.make_train_iterator(_cfg(), global_batch_size=4, seed=3), 3)
    c = _take(data.make_train_iterator(_cfg(), global_batch_size=4, seed=4), 3)
    assert _equal(a, b)
    assert not _equal(a, c)


def test_repeats_with_fresh_degradations_each_epoch():
    it = data.make_train_iterator(_cfg(n=4, shuffle=False), global_batch_size=4, seed=0)
    e1, e2 = _take(it, 2)  # more batches than one epoch holds: repeats forever
    np.testing.assert_array_equal(e1["hq"], e2["hq"])
    assert not np.array_equal(e1["lq"], e2["lq"])


def test_checkpoint_restore_with_orbax(tmp_path):
    cfg = _cfg()
    it = data.make_train_iterator(cfg, global_batch_size=4, seed=1)
    assert isinstance(it, grain.DatasetIterator)
    _take(it, 3)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    after = _take(it, 4)
    fresh = data.make_train_iterator(cfg, global_batch_size=4, seed=1)
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert _equal(after, _take(fresh, 4))
    mngr.close()


def test_state_roundtrip_with_worker_processes():
    cfg = _cfg(num_workers=2)
    it = data.make_train_iterator(cfg, global_batch_size=2, seed=0)
    try:
        _take(it, 3)
        state = it.get_state()
        after = _take(it, 3)
    finally:
        it.close()
    fresh = data.make_train_iterator(cfg, global_batch_size=2, seed=0)
    try:
        fresh.set_state(state)
        assert _equal(after, _take(fresh, 3))
    finally:
        fresh.close()


def test_eval_batches_deterministic_and_held_out():
    cfg = _cfg()
    ev = data.make_eval_batches(cfg, num_images=5, batch_size=2, seed=0)
    assert [b["hq"].shape[0] for b in ev] == [2, 2, 1]
    assert _equal(ev, data.make_eval_batches(cfg, num_images=5, batch_size=2, seed=0))
    train = {
        img.tobytes()
        for b in _take(data.make_train_iterator(cfg, global_batch_size=16, seed=0), 1)
        for img in b["hq"]
    }
    assert not train & {img.tobytes() for b in ev for img in b["hq"]}


def _folder(tmp_path, n):
    for i in range(n):
        img = np.full((40, 30, 3), 10 * i, np.uint8)
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), img)
    return str(tmp_path)


def test_folder_source_holdout_and_bad_file(tmp_path):
    root = _folder(tmp_path, 10)
    (tmp_path / "03.png").write_bytes(b"broken")
    cfg = _cfg(source="folder", folder=root, eval_holdout=2, shuffle=False)
    it = data.make_train_iterator(cfg, global_batch_size=8, seed=0)
    b = next(it)  # the broken file is skipped (next record substituted), training goes on
    values = sorted({int(v) for v in b["hq"][:, 0, 0, 0]})
    assert values == [0, 10, 20, 40, 50, 60, 70]
    ev = data.make_eval_batches(cfg, num_images=5, batch_size=4, seed=0)
    assert sum(len(e["hq"]) for e in ev) == 2  # capped at the held-out count
    assert sorted(int(v) for e in ev for v in e["hq"][:, 0, 0, 0]) == [80, 90]


def test_config_errors(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"unknown data.source 'foo' \(expected synthetic\|folder\|tfds\|array_record\)",
    ):
        data.make_train_iterator(_cfg(source="foo"), global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"data.folder '/no/such' does not exist"):
        data.make_train_iterator(
            _cfg(source="folder", folder="/no/such"), global_batch_size=2, seed=0
        )
    root = _folder(tmp_path, 3)
    with pytest.raises(ValueError, match=r"has 3 images, need more than data.eval_holdout=500"):
        data.make_train_iterator(_cfg(source="folder", folder=root), global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"data.tfds_name is empty"):
        data.make_train_iterator(_cfg(source="tfds"), global_batch_size=2, seed=0)


def test_resume_with_other_worker_count_continues_the_same_batches(tmp_path):
    """Batches do not depend on the worker count, so a state saved with 2 workers resumes
    in-process (another host's auto count) exactly; on two processes with the same global batch
    each continues with its half of the same global batches; another global batch is a one-line
    error naming the checkpoint."""
    import jax
    import jax.numpy as jnp

    from artfr_jax.train import checkpoint as ckpt_lib

    state = {"w": jnp.zeros(2)}
    shardings = {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    saved = data.make_train_iterator(_cfg(num_workers=2), global_batch_size=2, seed=0)
    try:
        before = _take(saved, 2)
        manager = ckpt_lib.make_manager(str(tmp_path), async_save=False)
        ckpt_lib.save(manager, 2, state, saved, _cfg(num_workers=2))
        after = _take(saved, 2)
    finally:
        saved.close()
    in_process = data.make_train_iterator(_cfg(num_workers=0), global_batch_size=2, seed=0)
    assert _equal(before, _take(in_process, 2))
    other = data.make_train_iterator(_cfg(num_workers=0), global_batch_size=2, seed=0)
    _, step = ckpt_lib.restore(manager, state, shardings, other)
    assert step == 2 and _equal(after, _take(other, 2))
    halves = []
    for i in range(2):  # the two hosts of a resized run, one after the other
        host = data.make_train_iterator(
            _cfg(num_workers=0), global_batch_size=2, seed=0, process_index=i, process_count=2
        )
        ckpt_lib.restore(manager, state, shardings, host)
        assert host.get_state()["next_record"] == 2  # two global batches of one row each
        halves.append(_take(host, 2))
    for k in range(2):
        for key in ("hq", "lq"):
            joined = np.concatenate([halves[0][k][key], halves[1][k][key]])
            np.testing.assert_array_equal(joined, after[k][key])
    larger = data.make_train_iterator(
        _cfg(num_workers=0), global_batch_size=4, seed=0, process_count=2
    )
    with pytest.raises(
        ValueError, match=r"checkpoints/2/data: .*global batch of 2, this run's is 4"
    ):
        ckpt_lib.restore(manager, state, shardings, larger)
    manager.close()


def test_state_is_a_position_and_survives_a_batch_size_change():
    it = data.make_train_iterator(_cfg(), global_batch_size=4, seed=2)
    _take(it, 3)
    assert it.get_state()["next_record"] == 12
    flat = [img.tobytes() for b in _take(it, 2) for img in b["lq"]]
    smaller = data.make_train_iterator(_cfg(), global_batch_size=2, seed=2)
    smaller.set_state({"next_index": 12})  # grain's in-process state from older checkpoints
    assert flat == [img.tobytes() for b in _take(smaller, 4) for img in b["lq"]]


def test_resolve_num_workers():
    assert data.resolve_num_workers(0) == 0 and data.resolve_num_workers(3) == 3
    auto = data.AUTO_WORKERS
    assert [data.resolve_num_workers(auto, cpus=n) for n in (1, 2, 3, 8, 200)] == [0, 1, 1, 6, 32]
    assert data.resolve_num_workers(auto) == data.resolve_num_workers(
        auto, cpus=data.available_cpus()
    )
    with pytest.raises(ValueError, match=r"data.num_workers must be >= 0, or -1 for auto, got -2"):
        data.resolve_num_workers(-2)


def test_unreadable_checkpoint_is_a_one_line_error_naming_it(tmp_path):
    """A step whose arrays cannot be read (a truncated file): the error names the step's folder,
    the storage layer's reason and the step to fall back to."""
    import jax
    import jax.numpy as jnp

    from artfr_jax.train import checkpoint as ckpt_lib

    state = {"w": jnp.arange(4096, dtype=jnp.float32)}
    shardings = {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    manager = ckpt_lib.make_manager(str(tmp_path), async_save=False)
    for step in (2, 4):
        ckpt_lib.save(manager, step, state, None, _cfg())
    files = [p for p in (tmp_path / "checkpoints" / "4" / "state").rglob("*") if p.is_file()]
    data_files = [p for p in files if p.parent.name == "d"]
    assert data_files, files
    for p in data_files:
        p.write_bytes(p.read_bytes()[:16])
    with pytest.raises(ValueError) as info:
        ckpt_lib.restore(manager, state, shardings, None)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'checkpoints' / '4' / 'state'}: cannot be read (")
    assert message.endswith(
        "move that step's folder out of the checkpoints folder to resume from step 2"
    )
    restored, step = ckpt_lib.restore(manager, state, shardings, None, step=2)
    assert step == 2 and np.array_equal(restored["w"], state["w"])
    manager.close()
