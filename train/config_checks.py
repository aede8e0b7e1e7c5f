"""The config of a run: checked before anything is compiled, and matched against the workdir's.

  validate_config        rejects unknown keys and impossible values, naming the key.
  check_or_write_config  refuses to resume a workdir whose config.json differs in anything that
                         shapes training; writes config.json (atomically) for a new run.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from noisy_softmax_jax import NOISE_VARIANTS
from train import files, input_pipeline, models, steps
from train.configs import default as default_config
from train.errors import ConfigError, WorkdirError

# Keys that change how a run reports or where it reads data, not what it computes: a resumed run
# may change them.
NON_TRAJECTORY_KEYS = frozenset(
    {
        "data_dir",
        "prepare_data",
        "in_memory_max_mib",
        "eval_batch_size",
        "log_every_steps",
        "eval_every_steps",
        "train_saturation_every_steps",
        "checkpoint_every_steps",
        "max_checkpoints_to_keep",
        "progress_bar",
        "stop_on_non_finite",
        "stop_on_collapse",
    }
)


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
    _check_keys(config)
    _check_data_and_model(config)
    _check_loss(config)
    _check_optimizer(config)
    _check_periodic_work(config)
    _check_batch_sizes(
        config,
        num_devices=jax.device_count() if num_devices is None else num_devices,
        num_processes=jax.process_count() if num_processes is None else num_processes,
    )


def _check_keys(config) -> None:
    """Exactly the keys of train/configs/default.py."""
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


def _check_data_and_model(config) -> None:
    _choice(config, "dataset", tuple(input_pipeline.DATASETS))
    _choice(config, "model", models.MODELS)
    _choice(config, "head", models.HEADS)
    _check(
        isinstance(config.embedding_dim, int) and config.embedding_dim >= 0
        and (config.embedding_dim == 0 or config.model in models.EMBEDDING_MODELS),
        "embedding_dim",
        config.embedding_dim,
        f"an integer >= 0, and 0 unless config.model is one of {models.EMBEDDING_MODELS} "
        "(0: the model's default)",
    )
    _check(
        isinstance(config.fused_chunk_size, int) and config.fused_chunk_size >= 0,
        "fused_chunk_size",
        config.fused_chunk_size,
        "an integer >= 0 (0: the fused loss's default)",
    )
    known_classes = input_pipeline.DATASETS[config.dataset].num_classes
    _check(
        isinstance(config.num_classes, int)
        and 0 <= config.num_classes <= (known_classes or config.num_classes),
        "num_classes",
        config.num_classes,
        "0 (every class) or the number of classes to train on"
        + (f", at most the {known_classes} of {config.dataset}" if known_classes else ""),
    )
    _check(config.in_memory_max_mib >= 0, "in_memory_max_mib", config.in_memory_max_mib,
           ">= 0 (0: always read the batches from disk)")
    classes = config.num_classes or known_classes
    _check(
        isinstance(config.train_subset, int)
        and config.train_subset >= 0
        and (classes is None or config.train_subset % classes == 0),
        "train_subset",
        config.train_subset,
        f"0 (the whole split) or a positive multiple of the {classes or 'prepared'} classes of "
        f"{config.dataset} (the split size is checked when the data is loaded)",
    )


def _check_loss(config) -> None:
    _choice(config, "loss", steps.LOSSES)
    _choice(config, "noise", NOISE_VARIANTS)
    _choice(config, "alpha_schedule", steps.ALPHA_SCHEDULES)
    _check(
        config.alpha >= 0,
        "alpha",
        config.alpha,
        ">= 0 (use config.negative=True for the negative-noise ablation)",
    )
    _check(config.sigma > 0, "sigma", config.sigma, "> 0")
    _check(
        isinstance(config.stop_norm_gradient, bool),
        "stop_norm_gradient",
        config.stop_norm_gradient,
        "True or False",
    )
    _check(0 <= config.label_smoothing < 1, "label_smoothing", config.label_smoothing, "in [0, 1)")
    if config.head == "fused":
        # What the fused head cannot do without the logits it never forms.
        _check(
            config.loss in ("softmax", "noisy"),
            "loss",
            config.loss,
            "'softmax' or 'noisy' with config.head='fused' (label smoothing needs the logits)",
        )
        _check(
            not config.stop_norm_gradient,
            "stop_norm_gradient",
            config.stop_norm_gradient,
            "False with config.head='fused' (its loss computes the norms inside)",
        )
        _check(
            config.train_saturation_every_steps == -1,
            "train_saturation_every_steps",
            config.train_saturation_every_steps,
            "-1 with config.head='fused' (the full-set saturation reads the logits)",
        )


def _check_optimizer(config) -> None:
    _choice(config, "lr_schedule", steps.LR_SCHEDULES)
    _check(config.learning_rate > 0, "learning_rate", config.learning_rate, "> 0")
    _check(0 <= config.momentum < 1, "momentum", config.momentum, "in [0, 1)")
    _check(config.weight_decay >= 0, "weight_decay", config.weight_decay, ">= 0")
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


def _check_periodic_work(config) -> None:
    """Logs, evaluations, checkpoints and whole-set saturation: how often."""
    for key in ("log_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep"):
        _check(config[key] > 0, key, config[key], "> 0")
    _check(
        config.eval_every_steps == -1 or config.eval_every_steps > 0,
        "eval_every_steps",
        config.eval_every_steps,
        "> 0, or -1 for once per epoch",
    )
    _check(
        config.train_saturation_every_steps == -1 or config.train_saturation_every_steps > 0,
        "train_saturation_every_steps",
        config.train_saturation_every_steps,
        "> 0, or -1 for off",
    )


def _check_batch_sizes(config, *, num_devices: int, num_processes: int) -> None:
    """Each batch splits evenly over the devices and over the processes that feed them."""
    for key in ("batch_size", "eval_batch_size"):
        _check(
            config[key] > 0 and config[key] % num_devices == 0 and config[key] % num_processes == 0,
            key,
            config[key],
            f"a positive multiple of the device count ({num_devices}) and of the process "
            f"count ({num_processes})",
        )


def _trajectory_keys(values: dict) -> dict:
    return {k: v for k, v in values.items() if k not in NON_TRAJECTORY_KEYS}


def check_or_write_config(config, workdir: str, *, write: bool) -> None:
    """Refuses to resume a run whose saved config differs in anything that shapes training.

    A key that the saved config.json lacks (one added to the configs after that run started)
    counts as its default value, which keeps what older runs computed.

    Args:
      config: the run's config.
      workdir: the workdir, whose config.json (if any) is compared with `config`.
      write: also write `config` as config.json (atomically; skipped if unchanged).

    Raises:
      WorkdirError: the configs differ; the message names the keys.
    """
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = {**json.loads(default_config.get_config().to_json()), **json.load(f)}
        saved = _trajectory_keys(saved)
        current = _trajectory_keys(json.loads(config.to_json()))
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
        files.atomic_write_text(path, text)
