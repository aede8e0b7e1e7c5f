"""Trains a CNN classifier with noisy softmax (or a baseline loss) and evaluates it.

`train_and_evaluate(config, workdir)` is the whole run: it validates the config, loads the data,
trains with data parallelism over all devices (a `Mesh` with one axis `data`: the batch is
sharded, the state replicated), evaluates, and writes into `workdir`:

  metrics.jsonl      one JSON object per log step and per evaluation (on resume, the lines of
                     steps after the restored checkpoint are dropped: each step appears once)
  results.json       the final test accuracy and a sha256 fingerprint of the parameters
  config.json        the config of the run (a resumed run must match it)
  checkpoints/       Orbax checkpoints; rerunning on the same workdir resumes from the latest
  tensorboard/       TensorBoard event files

Reproducibility: the noise (and augmentation) key of step s is `fold_in(key(seed), s)`, derived
inside the jitted step from raw key data kept in the state, and the batch of step s is a function
of (seed, s). So a resumed run draws exactly what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import logging
from flax.training import train_state

import noisy_softmax_jax
from noisy_softmax_jax import NOISE_VARIANTS
from train import input_pipeline, models, reliability
from train.configs import default as default_config

LOSSES = ("softmax", "noisy", "label_smoothing")
LR_SCHEDULES = ("cosine", "step", "constant")
ALPHA_SCHEDULES = ("constant", "linear", "cosine")
# Keys that change how a run reports or where it reads data, not what it computes: a resumed run
# may change them.
_NON_TRAJECTORY_KEYS = frozenset(
    {
        "data_dir",
        "prepare_data",
        "eval_batch_size",
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "max_checkpoints_to_keep",
        "progress_bar",
        "stop_on_non_finite",
        "stop_on_collapse",
    }
)


class ConfigError(ValueError):
    """The config names an unknown key or holds an impossible value."""


class WorkdirError(OSError):
    """The workdir cannot be written or belongs to a run with another config."""


# --------------------------------------------------------------------------- config checks


def _choice(config, key, allowed):
    if config[key] not in allowed:
        raise ConfigError(
            f"config.{key}={config[key]!r} is not allowed; choose one of "
            f"{', '.join(map(repr, allowed))}"
        )


def _check(condition, key, value, requirement):
    if not condition:
        raise ConfigError(f"config.{key}={value!r} is invalid: it must be {requirement}")


def validate_config(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int | None = None,
    num_processes: int | None = None,
) -> None:
    """Rejects unknown keys and impossible values before anything is compiled.

    Args:
      config: the run's config.
      num_devices: devices the batch is sharded over (default: all).
      num_processes: processes that feed the batch (default: `jax.process_count()`).

    Raises:
      ConfigError: naming the key and what it may be.
    """
    allowed = set(default_config.get_config().keys())
    unknown = sorted(set(config.keys()) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(unknown)}; allowed keys: "
            f"{', '.join(sorted(allowed))}"
        )
    missing = sorted(allowed - set(config.keys()))
    if missing:
        raise ConfigError(
            f"config lacks the key(s) {', '.join(missing)} (start from train/configs/default.py)"
        )
    _choice(config, "dataset", tuple(input_pipeline.DATASETS))
    _choice(config, "model", models.MODELS)
    _choice(config, "loss", LOSSES)
    _choice(config, "noise", NOISE_VARIANTS)
    _choice(config, "lr_schedule", LR_SCHEDULES)
    _choice(config, "alpha_schedule", ALPHA_SCHEDULES)
    _check(config.learning_rate > 0, "learning_rate", config.learning_rate, "> 0")
    _check(
        config.alpha >= 0,
        "alpha",
        config.alpha,
        ">= 0 (use config.negative=True for the negative-noise ablation)",
    )
    _check(config.sigma > 0, "sigma", config.sigma, "> 0")
    _check(0 <= config.momentum < 1, "momentum", config.momentum, "in [0, 1)")
    _check(config.weight_decay >= 0, "weight_decay", config.weight_decay, ">= 0")
    _check(0 <= config.label_smoothing < 1, "label_smoothing", config.label_smoothing, "in [0, 1)")
    _check(
        config.num_steps > 0 or config.num_epochs > 0,
        "num_epochs",
        config.num_epochs,
        "> 0 (or set config.num_steps > 0)",
    )
    _check(config.warmup_steps >= 0, "warmup_steps", config.warmup_steps, ">= 0")
    _check(0 < config.lr_decay_factor <= 1, "lr_decay_factor", config.lr_decay_factor, "in (0, 1]")
    decay_at = tuple(config.lr_decay_at)
    _check(
        all(0 < f < 1 for f in decay_at) and list(decay_at) == sorted(decay_at),
        "lr_decay_at",
        decay_at,
        "increasing fractions of training in (0, 1)",
    )
    for key in ("log_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep"):
        _check(config[key] > 0, key, config[key], "> 0")
    _check(
        config.eval_every_steps == -1 or config.eval_every_steps > 0,
        "eval_every_steps",
        config.eval_every_steps,
        "> 0, or -1 for once per epoch",
    )
    num_devices = jax.device_count() if num_devices is None else num_devices
    num_processes = jax.process_count() if num_processes is None else num_processes
    for key in ("batch_size", "eval_batch_size"):
        _check(
            config[key] > 0 and config[key] % num_devices == 0 and config[key] % num_processes == 0,
            key,
            config[key],
            f"a positive multiple of the device count ({num_devices}) and of the process "
            f"count ({num_processes})",
        )


# --------------------------------------------------------------------------- state and schedules


class TrainState(train_state.TrainState):
    """Flax train state plus batch-norm statistics and the run's base key as raw uint32 data.

    The key is stored as key data, not as a typed key, so checkpoints hold plain arrays.
    """

    batch_stats: Any = None
    key_data: jax.Array | None = None

    def step_key(self) -> jax.Array:
        """The key of the current step: fold_in(base key, step)."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.key_data), self.step)


def total_steps(config, steps_per_epoch: int) -> int:
    return config.num_steps if config.num_steps > 0 else config.num_epochs * steps_per_epoch


def learning_rate_schedule(config, num_steps: int) -> optax.Schedule:
    """Cosine decay, or the step decay of Caffe-era training, after an optional linear warmup."""
    warmup = config.warmup_steps
    decay_steps = max(num_steps - warmup, 1)
    if config.lr_schedule == "cosine":
        schedule = optax.cosine_decay_schedule(config.learning_rate, decay_steps)
    elif config.lr_schedule == "step":
        schedule = optax.piecewise_constant_schedule(
            config.learning_rate,
            {
                int(fraction * decay_steps): config.lr_decay_factor
                for fraction in config.lr_decay_at
            },
        )
    else:
        schedule = optax.constant_schedule(config.learning_rate)
    if warmup:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, config.learning_rate, warmup), schedule], [warmup]
        )
    return schedule


def alpha_schedule(config, num_steps: int) -> optax.Schedule:
    """alpha as a function of the step: constant (the paper), or decayed to 0 over training."""
    if config.alpha_schedule == "linear":
        alpha = optax.linear_schedule(config.alpha, 0.0, num_steps)
    elif config.alpha_schedule == "cosine":
        alpha = optax.cosine_decay_schedule(config.alpha, num_steps)
    else:
        alpha = config.alpha
    return noisy_softmax_jax.alpha_schedule(alpha)


def create_optimizer(config, learning_rate: optax.Schedule) -> optax.GradientTransformation:
    """SGD with momentum; weight decay (added to the gradient, as Caffe does) on kernels only."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.sgd(learning_rate, momentum=config.momentum),
    )


def create_train_state(
    config, model: nn.Module, tx: optax.GradientTransformation, image_shape: Sequence[int]
) -> TrainState:
    base_key = jax.random.key(config.seed)
    init_key, noise_key = jax.random.split(base_key)
    variables = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
        key_data=jax.random.key_data(noise_key),
    )


# --------------------------------------------------------------------------- losses and steps


def compute_losses(
    config,
    output: noisy_softmax_jax.HeadOutput,
    labels: jax.Array,
    rng: jax.Array,
    alpha: jax.Array,
) -> jax.Array:
    """Per-example training losses of the loss named by `config.loss`."""
    if config.stop_norm_gradient:
        output = output._replace(
            feature_norm=jax.lax.stop_gradient(output.feature_norm),
            class_norm=jax.lax.stop_gradient(output.class_norm),
        )
    if config.loss == "softmax":
        return optax.softmax_cross_entropy_with_integer_labels(output.logits, labels)
    if config.loss == "label_smoothing":
        targets = optax.smooth_labels(
            jax.nn.one_hot(labels, output.logits.shape[-1], dtype=output.logits.dtype),
            config.label_smoothing,
        )
        return optax.softmax_cross_entropy(output.logits, targets)
    return noisy_softmax_jax.noisy_softmax_cross_entropy(
        output.logits,
        labels,
        rng,
        alpha,
        amplitude=output.amplitude(labels),
        noise=config.noise,
        sigma=config.sigma,
        shared_noise=config.shared_noise,
        negative=config.negative,
    )


def _variables(state: TrainState, params) -> dict:
    if state.batch_stats:
        return {"params": params, "batch_stats": state.batch_stats}
    return {"params": params}


def train_step(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    *,
    config,
    learning_rate: optax.Schedule,
    alpha_fn: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a global batch of uint8 images; returns the new state and scalar metrics."""
    noise_key, augment_key = jax.random.split(state.step_key())
    if config.augment:
        images = input_pipeline.augment(augment_key, images)
    inputs = input_pipeline.normalize(images, config.dataset)
    alpha = alpha_fn(state.step)
    has_batch_stats = bool(state.batch_stats)

    def loss_fn(params):
        if has_batch_stats:
            output, updates = state.apply_fn(
                _variables(state, params), inputs, train=True, mutable=["batch_stats"]
            )
        else:
            output, updates = state.apply_fn(_variables(state, params), inputs, train=True), {}
        loss = compute_losses(config, output, labels, noise_key, alpha).mean()
        return loss, (output, updates)

    (loss, (output, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(
        grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats)
    )
    noisy = config.loss == "noisy"
    diagnostics = noisy_softmax_jax.saturation_metrics(
        output.logits,
        labels,
        amplitude=output.amplitude(labels),
        rng=noise_key if noisy else None,
        alpha=alpha if noisy else 0.0,
        noise=config.noise,
        sigma=config.sigma,
        shared_noise=config.shared_noise,
        negative=config.negative,
    )
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(output.logits, -1) == labels),
        "learning_rate": learning_rate(state.step),
        "alpha": jnp.asarray(alpha, jnp.float32),
        "top_class_fraction": reliability.top_class_fraction(output.logits),
        **diagnostics,
    }
    return new_state, metrics


def eval_step(
    state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array, *, config
) -> dict[str, jax.Array]:
    """Sums of the clean softmax loss and of correct predictions over the unmasked examples."""
    output = state.apply_fn(
        _variables(state, state.params),
        input_pipeline.normalize(images, config.dataset),
        train=False,
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(output.logits, labels)
    correct = jnp.argmax(output.logits, -1) == labels
    return {
        "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
        "correct": jnp.sum(correct & mask),
        "count": jnp.sum(mask),
    }


# --------------------------------------------------------------------------- helpers


def params_fingerprint(params) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the parameters (replicated arrays)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


TRAIN_TIME_FILE = "train_time.json"


def record_train_time(workdir: str, step: int, seconds: float, timed_steps: int,
                      keep_steps: Sequence[int] = ()) -> None:
    """Records, beside the checkpoint of `step`, the training time spent to reach it.

    `seconds` is the wall time of the `timed_steps` training steps logged so far over every
    invocation of the run (a resumed run starts from the entry of its checkpoint), so that
    `results.json` reports the whole run's time and rate, not only its last segment's.
    """
    reliability.record_step(os.path.join(workdir, TRAIN_TIME_FILE), step,
                            {"train_time_s": seconds, "timed_steps": timed_steps}, keep_steps)


def read_train_times(workdir: str) -> dict[str, dict[str, float]]:
    """The records of `record_train_time` by step; the malformed ones are left out (a missing
    file, as in runs from before this record, gives none)."""
    records = reliability.read_step_records(os.path.join(workdir, TRAIN_TIME_FILE))
    return {
        step: record for step, record in records.items()
        if isinstance(record, dict) and all(
            isinstance(record.get(key), (int, float)) and record[key] >= 0
            for key in ("train_time_s", "timed_steps"))
    }


def check_workdir(workdir: str) -> None:
    """Creates `workdir` and proves it writable, so a bad path fails before any work is done."""
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        if os.path.exists(probe):  # created, then the write failed (a full disk)
            os.remove(probe)
        if reliability.disk_full_cause(error):
            raise reliability.DiskFullError(workdir, reliability.disk_full_cause(error)) from None
        raise WorkdirError(
            f"workdir {workdir!r} is not writable: {error.strerror or error}"
        ) from None


def _config_for_comparison(config) -> dict:
    return {k: v for k, v in json.loads(config.to_json()).items() if k not in _NON_TRAJECTORY_KEYS}


def check_or_write_config(config, workdir: str, *, write: bool) -> None:
    """Refuses to resume a run whose saved config differs in anything that shapes training."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = {k: v for k, v in json.load(f).items() if k not in _NON_TRAJECTORY_KEYS}
        # A key added since the run started (e.g. stop_norm_gradient) had its default value.
        saved = {**_config_for_comparison(default_config.get_config()), **saved}
        current = _config_for_comparison(config)
        differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if differing:
            raise WorkdirError(
                f"workdir {workdir!r} holds a run with a different config ("
                + ", ".join(
                    f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in differing
                )
                + "); use a new workdir or the same config to resume"
            )
    if write:
        text = config.to_json(indent=2, sort_keys=True)
        try:
            with open(path) as f:
                if f.read() == text:
                    return  # unchanged: no write (a rerun on a full disk needs none)
        except OSError:
            pass
        # Atomic: a kill mid-write must not leave a truncated config.json that breaks a resume.
        reliability.atomic_write_text(path, text)


def _append(file, data: bytes, path: str) -> None:
    """Appends `data` to `file` (opened unbuffered, "ab"); on failure cuts the file back to
    where it was, so no half-written line or record is left, and raises DiskFullError for lack
    of space."""
    descriptor = file.fileno()
    position = os.lseek(descriptor, 0, os.SEEK_END)
    try:
        with reliability.disk_full_check(path):
            view = memoryview(data)
            while view:  # a write can be partial: up to the limit, the next one fails
                view = view[os.write(descriptor, view):]
    except BaseException:
        try:  # cutting a file back needs no space
            os.ftruncate(descriptor, position)
        except OSError:
            pass
        raise


class TensorBoardEvents:
    """A TensorBoard event file written synchronously, in the calling thread.

    (tensorboardX's SummaryWriter writes from a daemon thread: a write that fails there, e.g. on
    a full disk, kills the thread with a traceback and later calls block on its full queue.)
    `purge_step` (for a resumed run) tells TensorBoard to discard the events of earlier files
    at that step and after, which the resumed run logs again.
    """

    def __init__(self, logdir: str, purge_step: int | None = None):
        from tensorboardX import summary  # pylint: disable=g-import-not-at-top
        from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

        self._event_pb2, self._summary = event_pb2, summary
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(
            logdir, f"events.out.tfevents.{time.time():.6f}.{os.uname().nodename}.{os.getpid()}"
        )
        with reliability.disk_full_check(self.path):
            self._file = open(self.path, "ab", buffering=0)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(event_pb2.Event(
                wall_time=time.time(), step=purge_step,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def _write(self, *events) -> None:
        from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top

        records = []
        for event in events:
            data = event.SerializeToString()
            header = struct.pack("Q", len(data))
            records += [header, struct.pack("I", masked_crc32c(header)), data,
                        struct.pack("I", masked_crc32c(data))]
        _append(self._file, b"".join(records), self.path)

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        now = time.time()
        self._write(*(
            self._event_pb2.Event(wall_time=now, step=step,
                                  summary=self._summary.scalar(name, value))
            for name, value in scalars.items()))

    def close(self) -> None:
        self._file.close()


class MetricWriter:
    """Writes metrics.jsonl and TensorBoard events; a no-op on every process but process 0.

    Every write is flushed at once and either lands whole or not at all; for lack of space it
    raises reliability.DiskFullError. `resumed_from` (the restored step, 0 for a fresh start)
    first drops the lines of later steps, which the run logs again.
    """

    def __init__(self, workdir: str, enabled: bool, resumed_from: int = 0):
        self.enabled = enabled
        if enabled:
            self._jsonl_path = os.path.join(workdir, "metrics.jsonl")
            reliability.trim_metrics(self._jsonl_path, resumed_from)
            tensorboard_dir = os.path.join(workdir, "tensorboard")
            earlier = os.path.isdir(tensorboard_dir) and any(
                name.startswith("events.") for name in os.listdir(tensorboard_dir))
            with reliability.disk_full_check(self._jsonl_path):
                self._jsonl = open(self._jsonl_path, "ab", buffering=0)
            self._tensorboard = TensorBoardEvents(
                tensorboard_dir, purge_step=resumed_from + 1 if earlier else None)

    def write(self, step: int, kind: str, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, "kind": kind, **scalars}) + "\n"
        _append(self._jsonl, line.encode(), self._jsonl_path)
        self._tensorboard.scalars(step, {f"{kind}/{name}": v for name, v in scalars.items()})

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


class JittedFunctions(NamedTuple):
    """The compiled pieces of a run, for one config, length and set of devices."""

    init: Callable[[], TrainState]
    train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
    eval_step: Callable[..., dict[str, jax.Array]]
    learning_rate: optax.Schedule
    replicated: jax.sharding.NamedSharding
    sharded: jax.sharding.NamedSharding


_JITTED_CACHE: dict[tuple, JittedFunctions] = {}


def jitted_functions(config, num_steps: int, devices: Sequence[jax.Device]) -> JittedFunctions:
    """Builds (or reuses, within a process) the jitted init, train and eval steps.

    Mesh: the batch is split over the 'data' axis and the state is replicated; the train step
    donates the old state. Runs in one process with the same config reuse the compiled code.
    """
    cache_key = (config.to_json(sort_keys=True), num_steps, tuple(d.id for d in devices))
    if cache_key in _JITTED_CACHE:
        return _JITTED_CACHE[cache_key]
    info = input_pipeline.DATASETS[config.dataset]
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    learning_rate = learning_rate_schedule(config, num_steps)
    alpha_fn = alpha_schedule(config, num_steps)
    model = models.create_model(config.model, info.num_classes)
    tx = create_optimizer(config, learning_rate)
    functions = JittedFunctions(
        init=jax.jit(
            lambda: create_train_state(config, model, tx, info.image_shape),
            out_shardings=replicated,
        ),
        train_step=jax.jit(
            functools.partial(
                train_step, config=config, learning_rate=learning_rate, alpha_fn=alpha_fn
            ),
            in_shardings=(replicated, sharded, sharded),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        ),
        eval_step=jax.jit(
            functools.partial(eval_step, config=config),
            in_shardings=(replicated, sharded, sharded, sharded),
            out_shardings=replicated,
        ),
        learning_rate=learning_rate,
        replicated=replicated,
        sharded=sharded,
    )
    if len(_JITTED_CACHE) >= 4:
        _JITTED_CACHE.pop(next(iter(_JITTED_CACHE)))
    _JITTED_CACHE[cache_key] = functions
    return functions


# --------------------------------------------------------------------------- the run


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
      reliability.DiskFullError: a write into `workdir` failed for lack of space. What was
        half-written (an unfinished checkpoint, a temporary file, a partial metrics line) is
        removed first; the finished checkpoints stay, so rerunning once there is space resumes.
    """
    try:
        return _train_and_evaluate(config, workdir, devices=devices)
    except reliability.DiskFullError:
        if jax.process_index() == 0:
            removed = reliability.remove_partial_writes(
                os.path.abspath(os.path.expanduser(workdir)))
            if removed:
                logging.warning("Disk full: removed the half-written %s", ", ".join(removed))
        raise


def _train_and_evaluate(config, workdir, *, devices):
    devices = list(jax.devices() if devices is None else devices)
    validate_config(config, num_devices=len(devices))
    workdir = os.path.abspath(os.path.expanduser(workdir))
    is_writer = jax.process_index() == 0
    if is_writer:
        check_workdir(workdir)
        check_or_write_config(config, workdir, write=False)
        stale = reliability.remove_stale_temporaries(workdir)
        if stale:
            logging.warning("Removed the temporary files of an interrupted write: %s",
                            ", ".join(stale))

    # Data: the whole split in host memory; each process feeds its slice of every global batch.
    train_images, train_labels = input_pipeline.load_split(
        config.dataset, "train", config.data_dir, prepare=config.prepare_data
    )
    test_images, test_labels = input_pipeline.load_split(
        config.dataset, "test", config.data_dir, prepare=config.prepare_data
    )
    batches = input_pipeline.TrainBatches(
        train_images,
        train_labels,
        global_batch_size=config.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    num_steps = total_steps(config, batches.steps_per_epoch)
    eval_every = (
        batches.steps_per_epoch if config.eval_every_steps == -1 else config.eval_every_steps
    )

    functions = jitted_functions(config, num_steps, devices)
    sharded = functions.sharded
    state = functions.init()

    checkpoint_dir = os.path.join(workdir, "checkpoints")
    # A failed save (full disk) is reported at the next save or wait, naming its step directory.
    checkpoint_writes = functools.partial(
        reliability.disk_full_check, reliability.checkpoint_path_of(checkpoint_dir))
    with checkpoint_writes():
        checkpoints = ocp.CheckpointManager(
            checkpoint_dir,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.max_checkpoints_to_keep,
                create=True,
                cleanup_tmp_directories=True,  # unfinished saves of a killed run: free the space
            ),
        )
    start_step = 0
    restored, _ = reliability.restore_latest_good(
        checkpoints,
        jax.tree.map(ocp.utils.to_shape_dtype_struct, state),
        workdir,
        ocp.args.StandardRestore,
    )
    if restored is not None:
        state = restored
        start_step = int(jax.device_get(state.step))
        logging.info("Resumed from the checkpoint at step %d", start_step)
    # The training time of the invocations before this one, if recorded at its checkpoint.
    earlier_times = read_train_times(workdir) if restored is not None else {}
    train_time_complete = restored is None or str(start_step) in earlier_times
    earlier = earlier_times.get(str(start_step), {"train_time_s": 0.0, "timed_steps": 0})
    if is_writer:
        check_or_write_config(config, workdir, write=True)

    p_train_step, p_eval_step = functions.train_step, functions.eval_step

    def global_array(local):
        return jax.make_array_from_process_local_data(sharded, local)

    def evaluate(step):
        sums = []
        for images, labels, mask in tqdm.tqdm(
            input_pipeline.eval_batches(
                test_images,
                test_labels,
                global_batch_size=config.eval_batch_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            ),
            total=math.ceil(len(test_images) / config.eval_batch_size),
            desc=f"eval @{step}",
            leave=False,
            disable=not (is_writer and config.progress_bar),
            unit="batch",
        ):
            sums.append(
                p_eval_step(state, global_array(images), global_array(labels), global_array(mask))
            )
        totals = jax.tree.map(lambda *xs: float(np.sum(xs)), *jax.device_get(sums))
        return {
            "test_loss": totals["loss_sum"] / totals["count"],
            "test_accuracy": totals["correct"] / totals["count"],
        }

    writer = MetricWriter(workdir, is_writer, resumed_from=start_step)
    progress = tqdm.tqdm(
        total=num_steps,
        initial=start_step,
        unit="step",
        desc="train",
        disable=not (is_writer and config.progress_bar),
        dynamic_ncols=True,
        mininterval=1.0,  # fewer redraws: logs of non-interactive runs stay short
    )
    pending: list[dict[str, jax.Array]] = []
    eval_metrics: dict[str, float] = {}
    train_time = 0.0  # wall time of the training steps (first interval includes compilation)
    timed_steps = 0  # the steps that train_time covers (those of completed log intervals)
    interval_start, interval_steps, interval_paused = time.perf_counter(), 0, 0.0
    preemption = reliability.PreemptionGuard()
    collapse = reliability.CollapseDetector(
        input_pipeline.DATASETS[config.dataset].num_classes,
        config.alpha if config.loss == "noisy" else None,
    )

    def check_finite(done):
        if config.stop_on_non_finite:
            reliability.check_finite(
                jax.device_get(pending), done - len(pending), checkpoints.latest_step()
            )

    def record_time(done):
        if is_writer:
            record_train_time(workdir, done, earlier["train_time_s"] + train_time,
                              earlier["timed_steps"] + timed_steps,
                              keep_steps=checkpoints.all_steps())

    def save_checkpoint(done, **kwargs):
        check_finite(done)  # never checkpoint a diverged state
        # The digest is written before the (async) save, so every checkpoint has one.
        if is_writer:
            reliability.record_digest(workdir, done, state, keep_steps=checkpoints.all_steps())
        record_time(done)
        with checkpoint_writes():
            checkpoints.save(done, args=ocp.args.StandardSave(state), **kwargs)

    preemption.__enter__()
    try:
        for step in range(start_step, num_steps):
            images, labels = batches(step)
            state, metrics = p_train_step(state, global_array(images), global_array(labels))
            pending.append(metrics)
            interval_steps += 1
            progress.update(1)
            done = step + 1
            if done % config.log_every_steps == 0 or done == num_steps:
                # device_get waits for the interval's steps, so the wall time below is honest.
                check_finite(done)
                means = jax.tree.map(lambda *xs: float(np.mean(xs)), *jax.device_get(pending))
                if config.stop_on_collapse:
                    collapse.update(done, len(pending), means)
                elapsed = time.perf_counter() - interval_start - interval_paused
                train_time += elapsed
                timed_steps += interval_steps
                means["images_per_sec"] = interval_steps * config.batch_size / elapsed
                writer.write(done, "train", means)
                progress.set_postfix(
                    loss=f"{means['loss']:.4f}",
                    acc=f"{means['accuracy']:.3f}",
                    img_s=f"{means['images_per_sec']:.0f}",
                )
                pending = []
                interval_start, interval_steps, interval_paused = time.perf_counter(), 0, 0.0
            pause_start = time.perf_counter()
            if done % eval_every == 0 or done == num_steps:
                jax.block_until_ready(state)  # keep the pending steps out of the eval's time
                pause_start = time.perf_counter()
                eval_metrics = evaluate(done)
                writer.write(done, "eval", eval_metrics)
                line = (
                    f"step {done}/{num_steps}: test loss {eval_metrics['test_loss']:.4f}, "
                    f"test accuracy {eval_metrics['test_accuracy']:.4f}"
                )
                if is_writer and config.progress_bar:
                    progress.write(line)
                else:
                    logging.info(line)
            if done % config.checkpoint_every_steps == 0 or done == num_steps:
                save_checkpoint(done)
            interval_paused += time.perf_counter() - pause_start
            if preemption.requested and done < num_steps:
                if checkpoints.latest_step() != done:
                    save_checkpoint(done, force=True)
                with checkpoint_writes():
                    checkpoints.wait_until_finished()
                raise reliability.Preempted(done, preemption.signal_name)
    except KeyboardInterrupt:
        # The batch and the noise of a step follow from the step alone, so a checkpoint of the
        # current state resumes exactly. (If the interrupt hit while a step held the donated
        # state, there is nothing consistent to save: the last periodic checkpoint stands.)
        try:
            interrupted_at = int(jax.device_get(state.step))
            if checkpoints.latest_step() != interrupted_at:
                record_time(interrupted_at)
                checkpoints.save(interrupted_at, args=ocp.args.StandardSave(state), force=True)
            progress.write(
                f"Interrupted: checkpoint at step {interrupted_at}; rerun the same command "
                "to resume."
            )
        except Exception:  # pylint: disable=broad-except
            logging.warning("Interrupted; resuming from the last periodic checkpoint.")
        raise
    finally:
        preemption.__exit__(None, None, None)
        progress.close()
        with checkpoint_writes():
            checkpoints.wait_until_finished()

    if not eval_metrics:  # nothing left to train: the run had finished; evaluate again
        eval_metrics = evaluate(num_steps)
    # The whole run's training time and rate, over every invocation that trained it (a rerun
    # of a finished run reports the time it took; "train_time_complete" is false when a resumed
    # checkpoint had no recorded time, as with runs from before this record existed).
    total_time = earlier["train_time_s"] + train_time
    total_timed_steps = earlier["timed_steps"] + timed_steps
    results = {
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
        "train_time_s": total_time,
        "train_time_complete": train_time_complete,
        "images_per_sec": (total_timed_steps * config.batch_size / total_time
                           if total_time else None),
        "num_devices": len(devices),
        "params_sha256": params_fingerprint(state.params),
    }
    if is_writer:  # atomic: a kill or a full disk leaves no truncated results.json
        reliability.atomic_write_text(
            os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
    writer.close()
    with checkpoint_writes():
        checkpoints.close()
    return results
