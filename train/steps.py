"""The jitted pieces of training: state, optimizer and schedules, the losses by name, the steps.

  TrainState          Flax's train state plus batch-norm statistics and the run's base key.
  compute_losses      the per-example training loss named by `config.loss`.
  train_step          one SGD step on a global batch; returns the new state and its metrics.
  eval_step           sums of the test loss and of correct predictions over a batch.
  jitted_functions    all of them compiled for a mesh of devices: the batch sharded on its
                      `data` axis, the state replicated, the old state donated.

Reproducibility: the noise (and augmentation) key of step s is `fold_in(key(seed), s)`, derived
inside the jitted step from raw key data kept in the state, so a resumed run draws exactly what
an uninterrupted run would have drawn.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import noisy_softmax_jax
from train import input_pipeline, models

LOSSES = ("softmax", "noisy", "label_smoothing")
LR_SCHEDULES = ("cosine", "step", "constant")
ALPHA_SCHEDULES = ("constant", "linear", "cosine")


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
    output: noisy_softmax_jax.HeadOutput | noisy_softmax_jax.FusedHeadOutput,
    labels: jax.Array,
    rng: jax.Array,
    alpha: jax.Array,
) -> jax.Array:
    """Per-example training losses of the loss named by `config.loss`.

    With `config.stop_norm_gradient`, the head's norms ||x|| and ||W_j|| enter the loss as
    constants: the noisy loss's amplitude ||W_y|| ||x|| passes no gradient, while the logits
    still do (an ablation of how the network can shrink its features to escape the noise).
    The fused head's output (config.head = "fused") gives the same losses without logits:
    softmax is its loss at alpha = 0.

    Args:
      config: the run's config (`loss`, `stop_norm_gradient` and the loss's own keys).
      output: the head's logits and norms, or the fused head's features and kernel.
      labels: integer labels, shape `output.logits.shape[:-1]`.
      rng: the key of the noise (noisy loss only).
      alpha: the noise level at this step (noisy loss only).

    Returns:
      The per-example losses, shape `labels.shape`.
    """
    if isinstance(output, noisy_softmax_jax.FusedHeadOutput):
        if config.loss == "softmax":
            return output.loss(labels, rng, 0.0)
        return output.loss(labels, rng, alpha, **_noise_options(config))
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
        **_noise_options(config),
    )


def _noise_options(config) -> dict[str, Any]:
    return dict(noise=config.noise, sigma=config.sigma, shared_noise=config.shared_noise,
                negative=config.negative)


def model_variables(state: TrainState, params) -> dict:
    """The variables `state.apply_fn` takes: `params`, and the state's batch statistics if any."""
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
                model_variables(state, params), inputs, train=True, mutable=["batch_stats"]
            )
        else:
            output, updates = state.apply_fn(model_variables(state, params), inputs, train=True), {}
        loss = compute_losses(config, output, labels, noise_key, alpha).mean()
        return loss, (output, updates)

    (loss, (output, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(
        grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats)
    )
    metrics = {
        "loss": loss,
        "learning_rate": learning_rate(state.step),
        "alpha": jnp.asarray(alpha, jnp.float32),
        **_batch_diagnostics(config, output, labels, noise_key, alpha),
    }
    return new_state, metrics


def _batch_diagnostics(config, output, labels, noise_key, alpha) -> dict[str, jax.Array]:
    """The step's accuracy and saturation diagnostics (fused head: the two that need no logits)."""
    if isinstance(output, noisy_softmax_jax.FusedHeadOutput):
        return {"accuracy": jnp.mean(_top1(output) == labels),
                "amplitude": jnp.mean(output.amplitude(labels)).astype(jnp.float32)}
    noisy = config.loss == "noisy"
    diagnostics = noisy_softmax_jax.saturation_metrics(
        output.logits,
        labels,
        amplitude=output.amplitude(labels),
        rng=noise_key if noisy else None,
        alpha=alpha if noisy else 0.0,
        **_noise_options(config),
    )
    return {
        "accuracy": jnp.mean(jnp.argmax(output.logits, -1) == labels),
        "top_class_fraction": noisy_softmax_jax.top_class_fraction(output.logits),
        **diagnostics,
    }


def _top1(output: noisy_softmax_jax.FusedHeadOutput) -> jax.Array:
    return output.top_k(1)[1][:, 0]


def eval_step(
    state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array, *, config
) -> dict[str, jax.Array]:
    """Sums of the clean softmax loss and of correct predictions over the unmasked examples."""
    output = state.apply_fn(
        model_variables(state, state.params),
        input_pipeline.normalize(images, config.dataset),
        train=False,
    )
    if isinstance(output, noisy_softmax_jax.FusedHeadOutput):
        # alpha = 0: the clean softmax loss, whatever the key.
        losses = output.loss(labels, jax.random.key(0), 0.0)
        correct = _top1(output) == labels
    else:
        losses = optax.softmax_cross_entropy_with_integer_labels(output.logits, labels)
        correct = jnp.argmax(output.logits, -1) == labels
    return {
        "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
        "correct": jnp.sum(correct & mask),
        "count": jnp.sum(mask),
    }


class JittedFunctions(NamedTuple):
    """The compiled pieces of a run, for one config, length and set of devices."""

    init: Callable[[], TrainState]
    train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
    eval_step: Callable[..., dict[str, jax.Array]]
    learning_rate: optax.Schedule
    replicated: jax.sharding.NamedSharding
    sharded: jax.sharding.NamedSharding

    def global_batch(self, *local_arrays: np.ndarray) -> tuple[jax.Array, ...]:
        """The global arrays of which `local_arrays` are this process's slices."""
        return tuple(
            jax.make_array_from_process_local_data(self.sharded, local) for local in local_arrays
        )


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
    model = models.create_model(config.model, input_pipeline.num_classes(config),
                                head=config.head,
                                fused_chunk_size=config.fused_chunk_size or None,
                                embedding_dim=config.embedding_dim or None)
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
