"""The health checks of train/health.py: a non-finite loss and a collapsed run."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from train import health


def test_non_finite_loss_names_the_step_and_the_diagnostics():
    metrics = [{"loss": 2.3, "accuracy": 0.1}, {"loss": 1.9, "accuracy": 0.2},
               {"loss": float("nan"), "accuracy": 0.1, "amplitude": 3.0, "alpha": 0.5}]
    with pytest.raises(health.NonFiniteLossError,
                       match=r"loss is nan at step 13; diagnostics at that step: loss=nan, "
                             r"accuracy=0.1, alpha=0.5, amplitude=3.*latest at step 10\) are kept"):
        health.check_finite(metrics, first_step=10, last_good_checkpoint=10)
    health.check_finite(metrics[:2], first_step=10, last_good_checkpoint=10)  # no error
    with pytest.raises(health.NonFiniteLossError, match=r"inf at step 1;.*no checkpoint"):
        health.check_finite([{"loss": np.float32(np.inf)}], 0, None)


def feed(detector, intervals, every=50):
    """Feeds (accuracy, amplitude, top_class_fraction) means, one per `every` steps."""
    for i, (accuracy, amplitude, top) in enumerate(intervals):
        detector.update((i + 1) * every, every, {"accuracy": accuracy, "amplitude": amplitude,
                                                 "top_class_fraction": top})


def test_a_healthy_run_and_a_slow_start_are_not_collapse():
    detector = health.CollapseDetector(10, alpha=0.1, window_steps=300, min_steps=100)
    # Chance accuracy for a while at the start, but features of normal size, mixed predictions.
    feed(detector, [(0.1, 5.0, 0.3)] * 20 + [(0.5 + i / 100, 8.0, 0.12) for i in range(40)])


@pytest.mark.parametrize("symptom", ["amplitude", "one_class"])
def test_collapse_is_detected_after_the_window_with_cause_and_remedy(symptom):
    detector = health.CollapseDetector(10, alpha=2.0, window_steps=300, min_steps=100)
    healthy = [(0.6, 10.0, 0.12)] * 6
    collapsed = (0.1, 0.01, 0.3) if symptom == "amplitude" else (0.1, 5.0, 1.0)
    feed(detector, healthy + [collapsed] * 5)  # 250 steps of collapse: not yet
    with pytest.raises(health.TrainingCollapsedError) as raised:
        feed(detector, healthy + [collapsed] * 7)
    message = str(raised.value)
    assert "alpha = 2 is too large" in message and "use a smaller alpha" in message
    assert "at chance" in message
    assert ("down from a peak of 10" in message) if symptom == "amplitude" else (
        "100% of predictions are one class" in message)


def test_a_recovery_resets_the_window():
    detector = health.CollapseDetector(10, alpha=1.0, window_steps=300, min_steps=0)
    collapsed, healthy = (0.1, 0.01, 1.0), (0.5, 8.0, 0.1)
    feed(detector, [healthy] + [collapsed] * 5 + [healthy] + [collapsed] * 5)  # never 300 in a row


@pytest.mark.parametrize("stop_on_non_finite", [True, False])
@pytest.mark.parametrize("stop_on_collapse", [True, False])
def test_health_checks_follow_the_config_switches(stop_on_non_finite, stop_on_collapse):
    config = ConfigDict({"stop_on_non_finite": stop_on_non_finite,
                         "stop_on_collapse": stop_on_collapse, "loss": "noisy", "alpha": 2.0})
    checks = health.HealthChecks(config, num_classes=10)
    bad_loss = [{"loss": float("nan")}]
    if stop_on_non_finite:
        with pytest.raises(health.NonFiniteLossError):
            checks.check_steps(bad_loss, 0, None)
    else:
        checks.check_steps(bad_loss, 0, None)
    collapsed = {"accuracy": 0.1, "amplitude": 0.0, "top_class_fraction": 1.0}
    checks.check_interval(400, 100, {"accuracy": 0.9, "amplitude": 5.0})
    if stop_on_collapse:
        with pytest.raises(health.TrainingCollapsedError, match="alpha = 2"):
            for step in range(500, 1000, 100):
                checks.check_interval(step, 100, collapsed)
    else:
        for step in range(500, 1000, 100):
            checks.check_interval(step, 100, collapsed)
