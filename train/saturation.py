"""Saturation of the whole training set (or subset), with clean logits: the paper's claim measured.

The training step's diagnostics describe one noisy mini-batch; whether a network has *fit* its
training data is a property of every training example. `TrainSaturation` evaluates the current
parameters (inference mode, no noise) on the whole training set and writes, as `train_full_*`:

  saturated_fraction  fraction of examples with clean p_y > 0.99
  target_grad         mean |1 - p_y|, the softmax gradient on the target logit
  amplitude           mean ||W_y|| ||x||
  error               fraction of examples whose clean argmax is not the label
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import noisy_softmax_jax
from train import input_pipeline, steps

# The saturation_metrics means summed over the whole set (accuracy is logged as its error).
_SUMMED = ("saturated_fraction", "target_grad", "amplitude", "accuracy")


def batch_sums(apply_fn, variables, images: jax.Array, labels: jax.Array, mask: jax.Array, *,
               dataset: str, threshold: float = 0.99) -> dict[str, jax.Array]:
    """Sums over the unmasked examples of a batch of the per-example saturation quantities."""
    output = apply_fn(variables, input_pipeline.normalize(images, dataset), train=False)
    means = noisy_softmax_jax.saturation_metrics(
        output.logits, labels, amplitude=output.amplitude(labels), where=mask,
        threshold=threshold)
    count = jnp.sum(mask).astype(jnp.float32)
    sums = {key: means[key] * count for key in _SUMMED}
    sums["count"] = count
    return sums


def full_saturation(apply_fn, variables, images, labels: np.ndarray | None = None, *,
                    dataset: str, batch_size: int, global_batch=lambda *arrays: arrays,
                    threshold: float = 0.99, sums_fn=None) -> dict[str, float]:
    r"""The saturation of a classifier over a whole set of examples, with clean logits.

    .. math::
      \mathrm{saturated} = \tfrac1N \textstyle\sum_i [p_{y_i}(x_i) > t], \quad
      \mathrm{target\_grad} = \tfrac1N \textstyle\sum_i (1 - p_{y_i}(x_i)), \quad
      \mathrm{amplitude} = \tfrac1N \textstyle\sum_i \|W_{y_i}\| \|x_i\|

    Args:
      apply_fn: the model's apply, returning a `noisy_softmax_jax.HeadOutput`.
      variables: its variables ({"params": ..., maybe "batch_stats": ...}).
      images: uint8 images [N, H, W, C], or an `input_pipeline.Records` (then `labels` is
        None, and each batch is read when it is evaluated).
      labels: int labels [N] of `images`, or None.
      dataset: the dataset name, for the normalization.
      batch_size: examples per evaluation batch (the last one is padded and masked).
      global_batch: makes device arrays of the process-local batch arrays (a run's
        `JittedFunctions.global_batch`); the default passes them through (one process).
      threshold: p_y above which an example counts as saturated.
      sums_fn: `jitted_batch_sums(apply_fn, dataset, threshold)`, to reuse its compilation
        across calls (default: compiled anew).

    Returns:
      {"train_full_saturated_fraction", "train_full_target_grad", "train_full_amplitude",
      "train_full_error"}: floats.

    Example:
      >>> full_saturation(state.apply_fn, {"params": state.params}, images, labels,
      ...                 dataset="mnist", batch_size=1000)  # doctest: +SKIP
    """
    step = sums_fn or jitted_batch_sums(apply_fn, dataset, threshold)
    batches = input_pipeline.eval_batches(
        images, labels, global_batch_size=batch_size, process_index=jax.process_index(),
        process_count=jax.process_count())
    sums = [step(variables, *global_batch(*batch)) for batch in batches]
    totals = jax.tree.map(lambda *xs: float(np.sum(xs, dtype=np.float64)), *jax.device_get(sums))
    means = {key: totals[key] / totals["count"] for key in _SUMMED}
    means["error"] = 1.0 - means.pop("accuracy")
    return {f"train_full_{key}": value for key, value in means.items()}


def jitted_batch_sums(apply_fn, dataset: str, threshold: float = 0.99):
    """`batch_sums` for one model and dataset, jitted."""
    return jax.jit(functools.partial(batch_sums, apply_fn, dataset=dataset, threshold=threshold))


class TrainSaturation:
    """The periodic whole-training-set saturation of a run, written to metrics as train_full_*."""

    def __init__(self, config, jitted, records: input_pipeline.Records, writer):
        self.config, self.jitted = config, jitted
        self.records, self.writer = records, writer
        self._sums_fn = None

    def is_due(self, step: int) -> bool:
        every = self.config.train_saturation_every_steps
        return every > 0 and (step % every == 0)

    def __call__(self, state, step: int) -> None:
        """Measures and writes the saturation of `state` at `step` if this step is due."""
        if not self.is_due(step):
            return
        if self._sums_fn is None:
            self._sums_fn = jitted_batch_sums(state.apply_fn, self.config.dataset)
        metrics = full_saturation(
            state.apply_fn, steps.model_variables(state, state.params), self.records,
            dataset=self.config.dataset,
            batch_size=self.config.eval_batch_size, global_batch=self.jitted.global_batch,
            sums_fn=self._sums_fn)
        self.writer.write(step, "train_full", metrics)
