"""Trains a CNN classifier with noisy softmax (or a baseline loss) and evaluates it.

`train_and_evaluate(config, workdir)` is the whole run: it validates the config, loads the data,
trains with data parallelism over all devices (a `Mesh` with one axis `data`: the batch is
sharded, the state replicated), evaluates, and writes into `workdir`:

  metrics.jsonl      one JSON object per log step and per evaluation (on resume, the lines of
                     steps after the restored checkpoint are dropped: each step appears once)
  results.json       the final test accuracy and a sha256 fingerprint of the parameters
  config.json        the config of the run (a resumed run must match it)
  checkpoints/       Orbax checkpoints; rerunning on the same workdir resumes from the latest
  tensorboard/       TensorBoard event files, and complete_through.json: the last step whose
                     events are known to be on disk (`metric_writers`)

The pieces it wires together: `steps` (the jitted state, losses and steps), `checkpointing`,
`metric_writers`, `health` (NaN and collapse checks), `preemption` (SIGTERM) and `files` (writes
that survive kills and full disks).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging

from train import (
    checkpointing,
    config_checks,
    files,
    health,
    input_pipeline,
    metric_writers,
    preemption,
    saturation,
    steps,
)
from train.checkpointing import TrainTime


class Progress:
    """The progress bar of process 0 (where `shown`), and the lines printed above it."""

    def __init__(self, shown: bool, total: int, initial: int):
        self.shown = shown
        self.bar = tqdm.tqdm(
            total=total,
            initial=initial,
            unit="step",
            desc="train",
            disable=not shown,
            dynamic_ncols=True,
            mininterval=1.0,  # fewer redraws: logs of non-interactive runs stay short
        )

    def advance(self) -> None:
        """One step done."""
        self.bar.update(1)

    def show(self, **postfix: str) -> None:
        """Shows `postfix` (the latest training figures) after the bar."""
        self.bar.set_postfix(**postfix)

    def report(self, line: str) -> None:
        """Prints `line` above the bar, or logs it where there is no bar."""
        if self.shown:
            self.bar.write(line)
        else:
            logging.info(line)

    def close(self) -> None:
        self.bar.close()


# How many dispatched steps may wait for the devices. XLA:CPU admits 32 computations in flight
# per device and may launch queued ones out of order; with cross-process (gloo) collectives, a
# host more than 32 steps ahead deadlocked: one device's launch of step k waited for a slot that
# its later steps, themselves waiting for step k, held (seen at step ~40 of 2 processes x 2
# devices on real MNIST, logging every 50 steps). Eight keeps the devices busy all the same.
MAX_STEPS_AHEAD = 8


class TrainLog:
    """The training metrics of each log interval: checked, averaged, timed and written.

    An interval's wall time leaves out what runs inside `paused()` (evaluations, checkpoint
    writes); the first interval includes compilation. `train_time` is the time of the completed
    intervals of every invocation of the run, `earlier` being that of those before this one.
    """

    def __init__(self, writer: metric_writers.MetricWriter, checks: health.HealthChecks,
                 progress: Progress, *, batch_size: int, first_step: int, earlier: TrainTime):
        self.writer, self.checks, self.progress = writer, checks, progress
        self.batch_size = batch_size
        self.train_time = earlier
        self._first_step = first_step  # the step count before the interval's first step
        self._pending: list[dict[str, jax.Array]] = []
        self._start, self._paused = time.perf_counter(), 0.0

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self._pending.append(metrics)
        if len(self._pending) > MAX_STEPS_AHEAD:
            # Waits for an older step so the host stays at most MAX_STEPS_AHEAD steps ahead.
            jax.block_until_ready(self._pending[-MAX_STEPS_AHEAD - 1])
        self.progress.advance()

    def check_finite(self, last_checkpoint: int | None) -> None:
        """Raises health.NonFiniteLossError if a step of the interval so far had a bad loss."""
        self.checks.check_steps(jax.device_get(self._pending), self._first_step, last_checkpoint)

    def write(self, step: int, last_checkpoint: int | None) -> None:
        """Ends the interval at step count `step`: checks, then writes the means of its steps."""
        metrics = jax.device_get(self._pending)  # waits for the steps: the time below is honest
        self.checks.check_steps(metrics, self._first_step, last_checkpoint)
        means = jax.tree.map(lambda *xs: float(np.mean(xs)), *metrics)
        self.checks.check_interval(step, len(metrics), means)
        elapsed = time.perf_counter() - self._start - self._paused
        self.train_time += TrainTime(elapsed, len(metrics))
        means["images_per_sec"] = len(metrics) * self.batch_size / elapsed
        self.writer.write(step, "train", means)
        self.progress.show(
            loss=f"{means['loss']:.4f}",
            acc=f"{means['accuracy']:.3f}",
            img_s=f"{means['images_per_sec']:.0f}",
        )
        self._first_step, self._pending = step, []
        self._start, self._paused = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self):
        """Keeps the block's wall time out of the training time."""
        start = time.perf_counter()
        yield
        self._paused += time.perf_counter() - start


class Evaluator:
    """The test loss and accuracy of a state over the whole test split, written and reported."""

    def __init__(self, config, jitted: steps.JittedFunctions, records: input_pipeline.Records,
                 writer: metric_writers.MetricWriter, progress: Progress, num_steps: int):
        self.config, self.jitted = config, jitted
        self.records = records
        self.writer, self.progress = writer, progress
        self.num_steps = num_steps

    def __call__(self, state: steps.TrainState, step: int, *, log: bool = True
                 ) -> dict[str, float]:
        batches = input_pipeline.eval_batches(
            self.records,
            global_batch_size=self.config.eval_batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        sums = [
            self.jitted.eval_step(state, *self.jitted.global_batch(*batch))
            for batch in tqdm.tqdm(
                batches,
                total=math.ceil(len(self.records) / self.config.eval_batch_size),
                desc=f"eval @{step}",
                leave=False,
                disable=not self.progress.shown,
                unit="batch",
            )
        ]
        totals = jax.tree.map(lambda *xs: float(np.sum(xs)), *jax.device_get(sums))
        metrics = {
            "test_loss": totals["loss_sum"] / totals["count"],
            "test_accuracy": totals["correct"] / totals["count"],
        }
        if log:
            self.writer.write(step, "eval", metrics)
            self.progress.report(
                f"step {step}/{self.num_steps}: test loss {metrics['test_loss']:.4f}, "
                f"test accuracy {metrics['test_accuracy']:.4f}")
        return metrics


def save_checkpoint(checkpoints: checkpointing.Checkpoints, step: int, state: steps.TrainState,
                    train_log: TrainLog) -> None:
    """The one save path, of periodic, preemption and interrupt saves alike."""
    train_log.check_finite(checkpoints.latest_step())  # never checkpoint a diverged state
    checkpoints.save(step, state, train_log.train_time)


def save_on_interrupt(checkpoints: checkpointing.Checkpoints, state: steps.TrainState,
                      train_log: TrainLog) -> None:
    """Checkpoints the state a KeyboardInterrupt found, if it is consistent.

    The batch and the noise of a step follow from the step alone, so a checkpoint of the current
    state resumes exactly. (If the interrupt hit while a step held the donated state, there is
    nothing consistent to save: the last periodic checkpoint stands.)
    """
    try:
        step = int(jax.device_get(state.step))
        save_checkpoint(checkpoints, step, state, train_log)
        tqdm.tqdm.write(
            f"Interrupted: checkpoint at step {step}; rerun the same command to resume.")
    except Exception:  # pylint: disable=broad-except
        logging.warning("Interrupted; resuming from the last periodic checkpoint.")


def prepare_workdir(config, workdir: str) -> None:
    """Fails early on an unwritable workdir or one of another run; clears killed writes' litter."""
    files.check_workdir(workdir)
    config_checks.check_or_write_config(config, workdir, write=False)
    stale = files.remove_stale_temporaries(workdir)
    if stale:
        logging.warning("Removed the temporary files of an interrupted write: %s",
                        ", ".join(stale))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, devices: Sequence[jax.Device] | None = None
) -> dict[str, Any]:
    """Trains and evaluates the model of `config`, writing into `workdir`.

    Args:
      config: a config from `train/configs`.
      workdir: where metrics, results, TensorBoard events and checkpoints go; a rerun on the same
        workdir resumes from its latest checkpoint.
      devices: devices to shard the batch over (default: all; for tests).

    Returns:
      The results also written to `<workdir>/results.json`.

    Raises:
      errors.RunError: a failure the message explains in one line: a bad config or workdir,
        missing data, damaged checkpoints, a NaN loss, a collapse, SIGTERM, or a full disk
        (`files.DiskFullError`, after removing what was half-written: an unfinished
        checkpoint, a temporary file; the finished checkpoints stay, so a rerun resumes).
    """
    devices = list(jax.devices() if devices is None else devices)
    config_checks.validate_config(config, num_devices=len(devices))
    workdir = os.path.abspath(os.path.expanduser(workdir))
    is_writer = jax.process_index() == 0
    # On the way out the half-written files go first, then the metric writers close.
    with (contextlib.ExitStack() as closing,
          files.partial_writes_removed_on_disk_full(workdir, enabled=is_writer)):
        if is_writer:
            prepare_workdir(config, workdir)
        # Data: small splits decoded into host memory, large ones read batch by batch from disk
        # (config.in_memory_max_mib); each process reads only its slice of every batch.
        train_records = input_pipeline.in_memory(input_pipeline.training_data(
            config, input_pipeline.open_split(config.dataset, "train", config.data_dir,
                                              prepare=config.prepare_data)),
            config.in_memory_max_mib)
        test_records = input_pipeline.in_memory(input_pipeline.evaluation_data(
            config, input_pipeline.open_split(config.dataset, "test", config.data_dir,
                                              prepare=config.prepare_data)),
            config.in_memory_max_mib)
        batches = input_pipeline.TrainBatches(
            train_records, global_batch_size=config.batch_size, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count())
        num_steps = steps.total_steps(config, batches.steps_per_epoch)
        eval_every = (
            batches.steps_per_epoch if config.eval_every_steps == -1 else config.eval_every_steps)

        jitted = steps.jitted_functions(config, num_steps, devices)
        state = jitted.init()
        checkpoints = checkpointing.Checkpoints(workdir, config.max_checkpoints_to_keep)
        restored = checkpoints.restore_latest_good(state)
        start_step, earlier_time = 0, TrainTime()
        if restored is not None:
            state, start_step = restored.state, restored.step
            earlier_time = restored.train_time or TrainTime()
            logging.info("Resumed from the checkpoint at step %d", start_step)
        if is_writer:
            config_checks.check_or_write_config(config, workdir, write=True)

        progress = Progress(is_writer and config.progress_bar, total=num_steps, initial=start_step)
        writer = closing.enter_context(
            metric_writers.MetricWriter(workdir, is_writer, resumed_from=start_step))
        checks = health.HealthChecks(config, input_pipeline.num_classes(config))
        train_log = TrainLog(writer, checks, progress, batch_size=config.batch_size,
                             first_step=start_step, earlier=earlier_time)
        evaluate = Evaluator(config, jitted, test_records, writer, progress, num_steps)
        train_saturation = saturation.TrainSaturation(config, jitted, train_records, writer)
        is_due = lambda step, every: step % every == 0 or step == num_steps
        eval_metrics: dict[str, float] = {}

        with preemption.PreemptionGuard() as guard:
            try:
                # Batches read from disk are read ahead, in a background thread.
                batch_of_step = input_pipeline.read_ahead(batches, start_step, num_steps)
                for step, batch in zip(range(start_step, num_steps), batch_of_step):
                    state, metrics = jitted.train_step(state, *jitted.global_batch(*batch))
                    train_log.add(metrics)
                    done = step + 1
                    if is_due(done, config.log_every_steps):
                        train_log.write(done, checkpoints.latest_step())
                    if is_due(done, eval_every) or train_saturation.is_due(done):
                        jax.block_until_ready(state)  # the pending steps are training time
                    with train_log.paused():
                        if is_due(done, eval_every):
                            eval_metrics = evaluate(state, done)
                        train_saturation(state, done)
                        if is_due(done, config.checkpoint_every_steps):
                            save_checkpoint(checkpoints, done, state, train_log)
                    if guard.stop_at(done) and done < num_steps:
                        save_checkpoint(checkpoints, done, state, train_log)
                        checkpoints.wait_until_finished()
                        raise preemption.Preempted(done, guard.signal_name)
            except KeyboardInterrupt:
                save_on_interrupt(checkpoints, state, train_log)
                raise
            finally:
                progress.close()
                checkpoints.wait_until_finished()

        if not eval_metrics:  # nothing left to train: the run had finished; evaluate again
            eval_metrics = evaluate(state, num_steps, log=False)
        results = run_results(
            config, eval_metrics, train_log.train_time, state.params, num_steps=num_steps,
            start_step=start_step, num_devices=len(devices),
            train_time_complete=restored is None or restored.train_time is not None)
        if is_writer:  # atomic: a kill or a full disk leaves no truncated results.json
            files.atomic_write_text(
                os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
        checkpoints.close()
        return results


def run_results(config, eval_metrics: dict[str, float], train_time: TrainTime, params, *,
                num_steps: int, start_step: int, num_devices: int,
                train_time_complete: bool) -> dict[str, Any]:
    """What results.json reports of a finished run.

    The training time and rate are those of the whole run, over every invocation that trained
    it (a rerun of a finished run reports the time it took); "train_time_complete" is false when
    a resumed checkpoint had no recorded time, as with runs from before this record existed.
    """
    return {
        "dataset": config.dataset,
        "model": config.model,
        "loss": config.loss,
        "noise": config.noise if config.loss == "noisy" else None,
        "alpha": config.alpha if config.loss == "noisy" else None,
        "alpha_schedule": config.alpha_schedule if config.loss == "noisy" else None,
        "seed": config.seed,
        "steps": num_steps,
        "batch_size": config.batch_size,
        "resumed_from_step": start_step,
        "test_accuracy": eval_metrics["test_accuracy"],
        "test_error": 1.0 - eval_metrics["test_accuracy"],
        "test_loss": eval_metrics["test_loss"],
        "train_time_s": train_time.seconds,
        "train_time_complete": train_time_complete,
        "images_per_sec": (train_time.timed_steps * config.batch_size / train_time.seconds
                           if train_time.seconds else None),
        "num_devices": num_devices,
        "params_sha256": checkpointing.tree_sha256(params),
    }
