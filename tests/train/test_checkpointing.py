"""Checkpoints of train/checkpointing.py on their own: the digest and training time saved with
each, the restore that falls back from a damaged checkpoint, and the side files of older
workdirs. The end-to-end kills of `python -m train` are in tests/train/test_main.py."""

import errno
import glob
import hashlib
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train import checkpointing, files
from train.checkpointing import TrainTime


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict
    key_data: jax.Array


def make_state(step):
    params = {"w": jnp.arange(64.0).reshape(8, 8) * (step + 1),
              "b": jnp.full((8,), step, jnp.float32)}
    return State(step=jnp.asarray(step, jnp.int32), params=params,
                 key_data=jax.random.key_data(jax.random.key(step)))


def train_time_at(step):
    return TrainTime(seconds=1.5 * step, timed_steps=step)


def save_run(workdir, steps=(1, 2, 3)):
    checkpoints = checkpointing.Checkpoints(workdir, max_to_keep=5)
    for step in steps:
        checkpoints.save(step, make_state(step), train_time_at(step))
    checkpoints.wait_until_finished()
    checkpoints.close()


def save_legacy_run(workdir, steps=(1, 2, 3), digests=True, train_times=True):
    """Checkpoints as the code before the checkpoint metadata wrote them: plain Orbax saves,
    with the digests and training times in two side files of the workdir."""
    manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=5, create=True))
    for step in steps:
        manager.save(step, args=ocp.args.StandardSave(make_state(step)))
    manager.wait_until_finished()
    manager.close()
    if digests:
        with open(os.path.join(workdir, checkpointing.LEGACY_DIGESTS_FILE), "w") as f:
            json.dump({str(s): checkpointing.tree_sha256(make_state(s)) for s in steps}, f)
    if train_times:
        with open(os.path.join(workdir, checkpointing.LEGACY_TRAIN_TIME_FILE), "w") as f:
            json.dump({str(s): {"train_time_s": 1.5 * s, "timed_steps": s} for s in steps}, f)


def restore(workdir):
    checkpoints = checkpointing.Checkpoints(workdir, max_to_keep=5)
    try:
        return checkpoints.restore_latest_good(make_state(0))
    finally:
        checkpoints.close()


def data_files(workdir, step):
    """The files that hold the array bytes of a checkpoint, largest first."""
    files = [f for f in glob.glob(os.path.join(workdir, "checkpoints", str(step), "**", "*"),
                                  recursive=True) if os.path.isfile(f)]
    return sorted(files, key=os.path.getsize, reverse=True)


def garble(path):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for i in range(0, len(data), 7):
            data[i] ^= 0x5A
        f.seek(0)
        f.write(data)


def test_tree_sha256_is_the_sha256_of_each_leafs_path_dtype_shape_and_bytes():
    # The definition, written out: the fingerprints of results.json and the digests recorded in
    # existing checkpoints depend on it staying exactly this.
    state = make_state(2).replace(params={"w": jnp.arange(6.0).reshape(2, 3).T,  # not C order
                                          "b": jnp.asarray(np.float16(1.5)),
                                          "m": jnp.ones((2, 0), jnp.bfloat16)})
    reference = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        array = np.asarray(leaf)
        reference.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
        reference.update(np.ascontiguousarray(array).tobytes())
    assert checkpointing.tree_sha256(state) == reference.hexdigest()


def test_tree_sha256_is_stable_and_sees_every_leaf():
    assert checkpointing.tree_sha256(make_state(1)) == checkpointing.tree_sha256(make_state(1))
    changed = make_state(1).replace(key_data=jax.random.key_data(jax.random.key(9)))
    assert checkpointing.tree_sha256(changed) != checkpointing.tree_sha256(make_state(1))
    typed = make_state(1).replace(key_data=jax.random.key(1))  # a typed key counts by its data
    assert checkpointing.tree_sha256(typed) == checkpointing.tree_sha256(make_state(1))


def test_intact_checkpoints_restore_the_latest_with_its_training_time(tmp_path, capsys):
    save_run(str(tmp_path))
    restored = restore(str(tmp_path))
    assert restored.step == 3 and int(restored.state.step) == 3
    np.testing.assert_array_equal(restored.state.params["w"], make_state(3).params["w"])
    assert restored.train_time == train_time_at(3)
    assert "warning" not in capsys.readouterr().out
    # The records live in the checkpoint itself: no side file in the workdir.
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]


def test_a_step_already_saved_is_not_saved_again(tmp_path):
    checkpoints = checkpointing.Checkpoints(str(tmp_path), max_to_keep=5)
    checkpoints.save(2, make_state(2), train_time_at(2))
    checkpoints.save(2, make_state(5), train_time_at(5))  # e.g. SIGTERM right after a save
    checkpoints.wait_until_finished()
    checkpoints.close()
    restored = restore(str(tmp_path))
    assert restored.train_time == train_time_at(2)
    np.testing.assert_array_equal(restored.state.params["w"], make_state(2).params["w"])


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert restore(str(tmp_path)) is None


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete_metadata", "empty_dir",
                                    "delete_step_metadata"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_with_a_warning(
        tmp_path, capsys, damage):
    workdir = str(tmp_path)
    save_run(workdir)
    latest = os.path.join(workdir, "checkpoints", "3")
    if damage == "truncate":
        for path in data_files(workdir, 3):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    elif damage == "garble":  # bytes that may still decode: only the digest can tell
        for path in data_files(workdir, 3)[:3]:
            garble(path)
    elif damage == "delete_metadata":
        for path in glob.glob(os.path.join(latest, "**", "*METADATA*"), recursive=True):
            os.remove(path)
    elif damage == "delete_step_metadata":  # the file that holds the digest
        os.remove(os.path.join(latest, "_CHECKPOINT_METADATA"))
    else:
        for path in data_files(workdir, 3):
            os.remove(path)
    restored = restore(workdir)
    assert restored.step == 2 and int(restored.state.step) == 2
    np.testing.assert_array_equal(restored.state.params["w"], make_state(2).params["w"])
    out = capsys.readouterr().out
    assert "checkpoint at step 3 is damaged" in out and "falling back" in out
    assert not os.path.exists(latest)  # moved aside, so saving step 3 again cannot collide
    assert len(os.listdir(os.path.join(workdir, checkpointing.DAMAGED_DIR))) == 1


def test_every_checkpoint_damaged_is_an_error_not_a_silent_fresh_start(tmp_path):
    workdir = str(tmp_path)
    save_run(workdir, steps=(1, 2))
    for step in (1, 2):
        for path in data_files(workdir, step):
            os.remove(path)
    with pytest.raises(checkpointing.CheckpointError, match=r"every checkpoint .* is damaged"):
        restore(workdir)


# ------------------------------------------------------- workdirs from before the metadata


def test_a_legacy_checkpoint_restores_with_the_side_files_records(tmp_path):
    save_legacy_run(str(tmp_path))
    restored = restore(str(tmp_path))
    assert restored.step == 3 and restored.train_time == train_time_at(3)


def test_a_garbled_legacy_checkpoint_is_caught_by_the_side_files_digest(tmp_path, capsys):
    save_legacy_run(str(tmp_path))
    for path in data_files(str(tmp_path), 3)[:3]:
        garble(path)
    assert restore(str(tmp_path)).step == 2
    assert "checkpoint at step 3 is damaged" in capsys.readouterr().out


def test_a_checkpoint_without_a_recorded_digest_or_time_is_still_restored(tmp_path):
    save_legacy_run(str(tmp_path), digests=False, train_times=False)
    restored = restore(str(tmp_path))
    assert restored.step == 3 and restored.train_time is None


def test_the_records_saved_with_a_checkpoint_take_precedence_over_side_files(tmp_path):
    save_legacy_run(str(tmp_path), steps=(1, 2))
    save_run(str(tmp_path), steps=(3,))  # a resumed old workdir: new saves carry their records
    with open(tmp_path / checkpointing.LEGACY_TRAIN_TIME_FILE, "w") as f:
        json.dump({"3": {"train_time_s": 99.0, "timed_steps": 99}}, f)
    assert restore(str(tmp_path)).train_time == train_time_at(3)


@pytest.mark.parametrize("record, expected", [
    ({"train_time_s": 2.5, "timed_steps": 4}, TrainTime(2.5, 4)),
    ({"train_time_s": 2.5}, None),
    ({"train_time_s": -1.0, "timed_steps": 4}, None),
    ({"train_time_s": "2.5", "timed_steps": 4}, None),
    ("garbage", None),
])
def test_train_time_from_record(record, expected):
    assert TrainTime.from_record(record) == expected


# ------------------------------------------------------------------- the background part of a save


def test_a_save_holds_the_state_as_it_was_when_the_next_step_reuses_its_buffers(tmp_path):
    # The loop goes on (and donates the state's buffers to the next step) as soon as save()
    # returns; the digest and the write work on a copy.
    checkpoints = checkpointing.Checkpoints(str(tmp_path), max_to_keep=5)
    state = jax.device_put(make_state(4))
    expected = jax.tree.map(np.asarray, jax.device_get(state))
    checkpoints.save(4, state, train_time_at(4))
    assert checkpoints.latest_step() == 4  # before the background part has finished
    step = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 + 7, s), donate_argnums=0)
    jax.block_until_ready(step(state))
    checkpoints.close()
    restored = restore(str(tmp_path))
    assert restored.step == 4
    for got, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)


def test_a_failure_in_the_background_part_is_raised_by_the_next_call(tmp_path, monkeypatch):
    checkpoints = checkpointing.Checkpoints(str(tmp_path), max_to_keep=5)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints._manager, "save", no_space)
    checkpoints.save(1, make_state(1), train_time_at(1))  # returns: the failure comes later
    with pytest.raises(files.DiskFullError, match="ENOSPC"):
        checkpoints.wait_until_finished()
    checkpoints.wait_until_finished()  # raised once
    monkeypatch.undo()
    checkpoints.close()
