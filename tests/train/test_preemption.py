"""The SIGTERM guard of train/preemption.py on its own; the end-to-end SIGTERM of
`python -m train` is in tests/train/test_main.py."""

import os
import signal

import pytest

from train import errors, preemption


def test_sigterm_becomes_a_request_and_a_second_one_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_preempted_names_the_step_and_how_to_resume():
    preempted = preemption.Preempted(12)
    assert "step 12" in str(preempted) and "rerun" in str(preempted)
    # main.py reports every RunError as `<prefix>: <message>` and exits with its code.
    assert isinstance(preempted, errors.RunError)
    assert preempted.prefix == "stopped"
    assert preempted.exit_code == preemption.EXIT_PREEMPTED == 128 + signal.SIGTERM


def test_a_multiprocess_guard_leaves_sigterm_to_jax():
    # jax.distributed.initialize() installs JAX's preemption notifier for SIGTERM; replacing it
    # left each host stopping at its own step (tests/train/test_multihost.py runs the real one).
    before = signal.getsignal(signal.SIGTERM)
    with preemption.PreemptionGuard(multiprocess=True) as guard:
        assert signal.getsignal(signal.SIGTERM) is before
        assert not guard.stop_at(3)  # not distributed here: the sync service never fires
    with preemption.PreemptionGuard(multiprocess=False) as guard:
        assert signal.getsignal(signal.SIGTERM) is not before
        assert not guard.stop_at(3)
