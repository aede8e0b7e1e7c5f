"""Health checks of a training run: a non-finite loss and a collapsed network stop it.

  check_finite        A NaN or inf loss stops training, naming the step and its diagnostics,
                      before a checkpoint of the broken state can be written.
  CollapseDetector    Training accuracy at chance for a sustained window while the amplitude
                      has fallen toward zero or every prediction is one class: the known
                      failure of too large an alpha. Stops with the cause and the remedy.
  HealthChecks        Both, switched by `config.stop_on_non_finite` and
                      `config.stop_on_collapse`, as the training loop calls them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from train import errors


class NonFiniteLossError(errors.RunError, FloatingPointError):
    """The training loss became NaN or infinite."""


class TrainingCollapsedError(errors.RunError, RuntimeError):
    """The run collapsed: chance accuracy with the features shrunk away or one predicted class."""


_DIAGNOSTIC_KEYS = ("loss", "accuracy", "learning_rate", "alpha", "amplitude", "logit_std",
                    "target_prob", "saturated_fraction", "target_grad", "noise", "cos_target")


def check_finite(metrics: Sequence[Mapping[str, Any]], first_step: int,
                 last_good_checkpoint: int | None) -> None:
    """Raises NonFiniteLossError at the first step of `metrics` whose loss is not finite.

    Args:
      metrics: per-step metrics (host values) of steps `first_step + 1, first_step + 2, ...`
        (the step count after each step, as logs and checkpoints number them).
      first_step: the step count before the first of them.
      last_good_checkpoint: the newest saved step, named in the message.
    """
    for offset, step_metrics in enumerate(metrics):
        loss = float(np.asarray(step_metrics["loss"]))
        if math.isfinite(loss):
            continue
        step = first_step + offset + 1
        shown = ", ".join(
            f"{k}={float(np.asarray(step_metrics[k])):.6g}"
            for k in _DIAGNOSTIC_KEYS if k in step_metrics)
        kept = (f"the checkpoints (the latest at step {last_good_checkpoint}) are kept; none "
                "is written from a non-finite loss"
                if last_good_checkpoint is not None else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"training loss is {loss} at step {step}; diagnostics at that step: {shown}. "
            f"Training stopped and {kept}. Usual causes: too high a learning rate or alpha; "
            "rerun with smaller values in a new workdir."
        )


class CollapseDetector:
    """Detects the collapse too large an alpha causes, from the logged training metrics.

    The network can escape the noise by shrinking its features (and so the amplitude
    ||W_y|| ||x||) to zero: every logit equal, every prediction the same class, chance accuracy.
    A run is declared collapsed when, over at least `window_steps` consecutive steps after
    `min_steps`, the training accuracy stayed at chance (below `chance_factor / num_classes`)
    and in every log the amplitude was below `amplitude_fraction` of its peak or
    `top_class_fraction` was at least `one_class_fraction`. Feed it the means of each log
    interval; it raises TrainingCollapsedError.
    """

    def __init__(self, num_classes: int, alpha: float | None, *, window_steps: int = 300,
                 min_steps: int = 300, chance_factor: float = 1.5,
                 amplitude_fraction: float = 0.01, one_class_fraction: float = 0.95):
        self.num_classes = num_classes
        self.alpha = alpha
        self.window_steps = window_steps
        self.min_steps = min_steps
        self.chance_factor = chance_factor
        self.amplitude_fraction = amplitude_fraction
        self.one_class_fraction = one_class_fraction
        self.peak_amplitude = 0.0
        self.collapsed_since: int | None = None  # the step count before the first bad interval

    def symptoms(self, means: Mapping[str, float]) -> list[str]:
        """The collapse symptoms present in one interval's means (empty: healthy)."""
        amplitude = means.get("amplitude")
        if amplitude is not None and math.isfinite(amplitude):
            self.peak_amplitude = max(self.peak_amplitude, amplitude)
        accuracy = means.get("accuracy")
        if accuracy is None or self.num_classes < 2:
            return []
        chance = 1.0 / self.num_classes
        if not accuracy < self.chance_factor * chance:
            return []
        found = [f"train accuracy {accuracy:.3f} at chance (1/{self.num_classes} = {chance:.3f})"]
        if amplitude is not None and amplitude < self.amplitude_fraction * self.peak_amplitude:
            found.append(f"amplitude ||W_y|| ||x|| {amplitude:.3g}, down from a peak of "
                         f"{self.peak_amplitude:.3g}")
        fraction = means.get("top_class_fraction")
        if fraction is not None and fraction >= self.one_class_fraction:
            found.append(f"{100 * fraction:.0f}% of predictions are one class")
        return found if len(found) > 1 else []

    def update(self, step: int, interval_steps: int, means: Mapping[str, float]) -> None:
        """Takes the means of the `interval_steps` steps that end at step count `step`."""
        found = self.symptoms(means)
        if not found or step < self.min_steps:
            self.collapsed_since = None
            return
        if self.collapsed_since is None:
            self.collapsed_since = step - interval_steps
        if step - self.collapsed_since >= self.window_steps:
            alpha = f"alpha = {self.alpha:g}" if self.alpha is not None else "the noise"
            raise TrainingCollapsedError(
                f"training collapsed: from step {self.collapsed_since} to step {step}: "
                + "; ".join(found) + ". "
                f"Likely cause: {alpha} is too large, and the network escaped the noise by "
                "shrinking its features toward zero (every logit equal, chance accuracy). "
                "Remedy: use a smaller alpha (the paper reports about 0.1 working well), or "
                "anneal it with --config.alpha_schedule; rerun in a new workdir."
            )


class HealthChecks:
    """The checks of `config`, as the training loop calls them.

    Args:
      config: the run's config (`stop_on_non_finite`, `stop_on_collapse`, `loss`, `alpha`).
      num_classes: classes of the dataset (chance accuracy is their inverse).
    """

    def __init__(self, config, num_classes: int):
        self.stop_on_non_finite = config.stop_on_non_finite
        self.stop_on_collapse = config.stop_on_collapse
        self.collapse = CollapseDetector(
            num_classes, config.alpha if config.loss == "noisy" else None)

    def check_steps(self, metrics: Sequence[Mapping[str, Any]], first_step: int,
                    last_good_checkpoint: int | None) -> None:
        """`check_finite` on the per-step metrics of steps `first_step + 1, ...`."""
        if self.stop_on_non_finite:
            check_finite(metrics, first_step, last_good_checkpoint)

    def check_interval(self, step: int, interval_steps: int, means: Mapping[str, float]) -> None:
        """The collapse check on the means of the log interval that ends at `step`."""
        if self.stop_on_collapse:
            self.collapse.update(step, interval_steps, means)
