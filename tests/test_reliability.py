"""The reliability guards of train/reliability.py on their own: SIGTERM, damaged checkpoints,
non-finite losses and collapse. The end-to-end kills of `python -m train` are in
tests/test_preemption.py."""

import glob
import os
import signal

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train import reliability


# ------------------------------------------------------------------------------------ SIGTERM


def test_sigterm_becomes_a_request_and_a_second_one_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with reliability.PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_preempted_names_the_step_and_how_to_resume():
    assert "step 12" in str(reliability.Preempted(12)) and "rerun" in str(reliability.Preempted(12))
    assert reliability.EXIT_PREEMPTED == 128 + signal.SIGTERM


# ------------------------------------------------------------------------ checkpoint integrity


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict
    key_data: jax.Array


def make_state(step):
    params = {"w": jnp.arange(64.0).reshape(8, 8) * (step + 1), "b": jnp.full((8,), step, jnp.float32)}
    return State(step=jnp.asarray(step, jnp.int32), params=params,
                 key_data=jax.random.key_data(jax.random.key(step)))


def save_run(workdir, steps=(1, 2, 3)):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=5, create=True))
    for step in steps:
        state = make_state(step)
        reliability.record_digest(workdir, step, state, keep_steps=manager.all_steps())
        manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    manager.close()


def restore(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=5, create=True))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, make_state(0))
    try:
        return reliability.restore_latest_good(manager, abstract, workdir, ocp.args.StandardRestore)
    finally:
        manager.close()


def data_files(workdir, step):
    """The files that hold the array bytes of a checkpoint, largest first."""
    files = [f for f in glob.glob(os.path.join(workdir, "checkpoints", str(step), "**", "*"),
                                  recursive=True) if os.path.isfile(f)]
    return sorted(files, key=os.path.getsize, reverse=True)


def test_state_digest_is_stable_and_sees_every_leaf():
    assert reliability.state_digest(make_state(1)) == reliability.state_digest(make_state(1))
    changed = make_state(1).replace(key_data=jax.random.key_data(jax.random.key(9)))
    assert reliability.state_digest(changed) != reliability.state_digest(make_state(1))


def test_intact_checkpoints_restore_the_latest(tmp_path, capsys):
    save_run(str(tmp_path))
    state, step = restore(str(tmp_path))
    assert step == 3 and int(state.step) == 3
    np.testing.assert_array_equal(state.params["w"], make_state(3).params["w"])
    assert "warning" not in capsys.readouterr().out


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert restore(str(tmp_path)) == (None, None)


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete_metadata", "empty_dir"])
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
            with open(path, "r+b") as f:
                data = bytearray(f.read())
                for i in range(0, len(data), 7):
                    data[i] ^= 0x5A
                f.seek(0)
                f.write(data)
    elif damage == "delete_metadata":
        for path in glob.glob(os.path.join(latest, "**", "*METADATA*"), recursive=True):
            os.remove(path)
    else:
        for path in data_files(workdir, 3):
            os.remove(path)
    state, step = restore(workdir)
    assert step == 2 and int(state.step) == 2
    np.testing.assert_array_equal(state.params["w"], make_state(2).params["w"])
    out = capsys.readouterr().out
    assert "checkpoint at step 3 is damaged" in out and "falling back" in out
    assert not os.path.exists(latest)  # moved aside, so saving step 3 again cannot collide
    assert len(os.listdir(os.path.join(workdir, reliability.DAMAGED_DIR))) == 1


def test_every_checkpoint_damaged_is_an_error_not_a_silent_fresh_start(tmp_path):
    workdir = str(tmp_path)
    save_run(workdir, steps=(1, 2))
    for step in (1, 2):
        for path in data_files(workdir, step):
            os.remove(path)
    with pytest.raises(reliability.CheckpointError, match=r"every checkpoint .* is damaged"):
        restore(workdir)


def test_a_checkpoint_without_a_recorded_digest_is_still_restored(tmp_path):
    workdir = str(tmp_path)
    save_run(workdir)
    os.remove(os.path.join(workdir, reliability.DIGESTS_FILE))
    assert restore(workdir)[1] == 3


# --------------------------------------------------------------------------------- divergence


def test_non_finite_loss_names_the_step_and_the_diagnostics():
    metrics = [{"loss": 2.3, "accuracy": 0.1}, {"loss": 1.9, "accuracy": 0.2},
               {"loss": float("nan"), "accuracy": 0.1, "amplitude": 3.0, "alpha": 0.5}]
    with pytest.raises(reliability.NonFiniteLossError,
                       match=r"loss is nan at step 13; diagnostics at that step: loss=nan, "
                             r"accuracy=0.1, alpha=0.5, amplitude=3.*latest at step 10\) are kept"):
        reliability.check_finite(metrics, first_step=10, last_good_checkpoint=10)
    reliability.check_finite(metrics[:2], first_step=10, last_good_checkpoint=10)  # no error
    with pytest.raises(reliability.NonFiniteLossError, match=r"inf at step 1;.*no checkpoint"):
        reliability.check_finite([{"loss": np.float32(np.inf)}], 0, None)


# ----------------------------------------------------------------------------------- collapse


def test_top_class_fraction():
    logits = jnp.array([[1.0, 0.0, 0.0], [2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0]])
    assert float(reliability.top_class_fraction(logits)) == 0.75
    assert float(reliability.top_class_fraction(jnp.zeros((8, 10)))) == 1.0


def feed(detector, intervals, every=50):
    """Feeds (accuracy, amplitude, top_class_fraction) means, one per `every` steps."""
    for i, (accuracy, amplitude, top) in enumerate(intervals):
        detector.update((i + 1) * every, every, {"accuracy": accuracy, "amplitude": amplitude,
                                                 "top_class_fraction": top})


def test_a_healthy_run_and_a_slow_start_are_not_collapse():
    detector = reliability.CollapseDetector(10, alpha=0.1, window_steps=300, min_steps=100)
    # Chance accuracy for a while at the start, but features of normal size, mixed predictions.
    feed(detector, [(0.1, 5.0, 0.3)] * 20 + [(0.5 + i / 100, 8.0, 0.12) for i in range(40)])


@pytest.mark.parametrize("symptom", ["amplitude", "one_class"])
def test_collapse_is_detected_after_the_window_with_cause_and_remedy(symptom):
    detector = reliability.CollapseDetector(10, alpha=2.0, window_steps=300, min_steps=100)
    healthy = [(0.6, 10.0, 0.12)] * 6
    collapsed = (0.1, 0.01, 0.3) if symptom == "amplitude" else (0.1, 5.0, 1.0)
    feed(detector, healthy + [collapsed] * 5)  # 250 steps of collapse: not yet
    with pytest.raises(reliability.TrainingCollapsedError) as raised:
        feed(detector, healthy + [collapsed] * 7)
    message = str(raised.value)
    assert "alpha = 2 is too large" in message and "use a smaller alpha" in message
    assert "at chance" in message
    assert ("down from a peak of 10" in message) if symptom == "amplitude" else (
        "100% of predictions are one class" in message)


def test_a_recovery_resets_the_window():
    detector = reliability.CollapseDetector(10, alpha=1.0, window_steps=300, min_steps=0)
    collapsed, healthy = (0.1, 0.01, 1.0), (0.5, 8.0, 0.1)
    feed(detector, [healthy] + [collapsed] * 5 + [healthy] + [collapsed] * 5)  # never 300 in a row
