"""The jitted pieces of train/steps.py: one train step, the step's key, the losses by name."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

import noisy_softmax_jax as nsj
from train import input_pipeline, models, steps
from train.configs import default


def config_with(**overrides):
    config = default.get_config()
    for key, value in overrides.items():
        config[key] = value
    return config


def jitted_train_step(config, num_steps):
    learning_rate = steps.learning_rate_schedule(config, num_steps)
    return learning_rate, jax.jit(
        lambda s, x, y: steps.train_step(
            s, x, y, config=config, learning_rate=learning_rate,
            alpha_fn=steps.alpha_schedule(config, num_steps)))


@pytest.mark.parametrize(
    "loss",
    # The baselines compile a train step each: slow on a shared CPU, so only noisy runs fast.
    [pytest.param(name, marks=() if name == "noisy" else pytest.mark.slow)
     for name in steps.LOSSES],
)
def test_one_train_step(tmp_path, loss):
    config = config_with(loss=loss, data_dir=str(tmp_path / "no_data_here"), prepare_data=False)
    with tfds.testing.mock_data(num_examples=64):
        images, labels = input_pipeline.load_split("mnist", "train", config.data_dir, prepare=False)
    model = models.create_model(config.model, num_classes=10)
    learning_rate, step = jitted_train_step(config, 4)
    state = steps.create_train_state(
        config, model, steps.create_optimizer(config, learning_rate), (28, 28, 1))
    new_state, metrics = step(state, images[:16], labels[:16])
    assert int(new_state.step) == 1
    assert new_state.key_data.dtype == np.uint32  # raw key data, no typed key in the state
    for name in ("loss", "accuracy", "learning_rate", "alpha", "target_prob", "saturated_fraction",
                 "top_class_fraction"):
        assert np.isfinite(metrics[name]), name
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), state.params, new_state.params)
    assert all(jax.tree.leaves(changed))


def test_noise_key_is_folded_with_the_step():
    state = steps.create_train_state(
        default.get_config(), models.create_model("small_cnn", 10), optax.sgd(0.1), (28, 28, 1))
    key0, key1 = state.step_key(), state.replace(step=state.step + 1).step_key()
    assert not np.array_equal(jax.random.key_data(key0), jax.random.key_data(key1))
    expected = jax.random.fold_in(jax.random.wrap_key_data(state.key_data), 1)
    np.testing.assert_array_equal(jax.random.key_data(key1), jax.random.key_data(expected))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config_name", "image_shape"), [("mnist_paper", (28, 28, 1)), ("cifar10_plus", (32, 32, 3))]
)
def test_paper_configs_take_a_train_step(config_name, image_shape):
    """The VGG nets (batch norm) and the on-device CIFAR-10+ augmentation inside the step."""
    config = importlib.import_module(f"train.configs.{config_name}").get_config("runlocal")
    info = input_pipeline.DATASETS[config.dataset]
    model = models.create_model(config.model, info.num_classes)
    learning_rate, step = jitted_train_step(config, config.num_steps)
    state = steps.create_train_state(
        config, model, steps.create_optimizer(config, learning_rate), image_shape)
    assert state.batch_stats  # the VGG nets use batch norm
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, *image_shape), dtype=np.uint8)
    labels = rng.integers(0, info.num_classes, 8).astype(np.int32)
    new_state, metrics = step(state, images, labels)
    assert np.isfinite(metrics["loss"])
    moved = jax.tree.map(
        lambda a, b: not np.allclose(a, b), state.batch_stats, new_state.batch_stats
    )
    assert all(jax.tree.leaves(moved))


@pytest.mark.slow
def test_fused_head_trains_as_the_dense_head(tmp_path):
    """20 steps on (mock) MNIST with head=fused and head=dense, same seed: the same parameters.

    The fused head computes the loss from features and kernel in blocks of 4 classes (10 = 2 * 4
    + 2: a partial last block), never the logits; only the rounding may differ. Measured: at
    most 6.1e-6 of a parameter's largest entry here (3e-7 on real MNIST), while a 1% change of
    alpha in the fused loss moves them by 2e-3 to 0.26.
    """
    num_steps = 20
    with tfds.testing.mock_data(num_examples=num_steps * 16 + 64):
        images, labels = input_pipeline.load_split(
            "mnist", "train", str(tmp_path / "no_data_here"), prepare=False)
    states, evals = [], []
    for head in ("dense", "fused"):
        config = config_with(head=head, fused_chunk_size=4, num_steps=num_steps)
        model = models.create_model(config.model, 10, head=head, fused_chunk_size=4)
        learning_rate, step = jitted_train_step(config, num_steps)
        state = steps.create_train_state(
            config, model, steps.create_optimizer(config, learning_rate), (28, 28, 1))
        for i in range(num_steps):
            state, metrics = step(state, images[16 * i:16 * (i + 1)], labels[16 * i:16 * (i + 1)])
            assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["accuracy"])
        states.append(state)
        evals.append(jax.jit(functools.partial(steps.eval_step, config=config))(
            state, images[-64:], labels[-64:], np.ones(64, bool)))
    dense, fused = states
    assert jax.tree.structure(dense.params) == jax.tree.structure(fused.params)
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b, rtol=1e-3), states[0].params,
                         steps.create_train_state(config, model, optax.sgd(0.1),
                                                  (28, 28, 1)).params)
    assert all(jax.tree.leaves(moved))  # training moved every parameter
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(
            b, a, rtol=1e-5, atol=2e-5 * np.max(np.abs(a)), err_msg=jax.tree_util.keystr(path)),
        dense.params, fused.params)
    np.testing.assert_allclose(evals[1]["loss_sum"], evals[0]["loss_sum"], rtol=1e-5)
    assert int(evals[1]["correct"]) == int(evals[0]["correct"])


# --------------------------------------------------------------- losses by name


def head_and_features(num_classes=5):
    features = jax.random.normal(jax.random.key(1), (16, 8))
    labels = jax.random.randint(jax.random.key(2), (16,), 0, num_classes)
    head = nsj.NoisySoftmaxHead(num_classes=num_classes)
    params = head.init(jax.random.key(3), features)
    return head, params, features, labels


@pytest.mark.parametrize("loss", steps.LOSSES)
@pytest.mark.parametrize("stop_norm_gradient", [False, True])
def test_compute_losses_gradient_through_the_norms(loss, stop_norm_gradient):
    config = config_with(loss=loss, alpha=0.5, stop_norm_gradient=stop_norm_gradient)
    head, params, features, labels = head_and_features()
    output = head.apply(params, features)

    def total(output):
        return steps.compute_losses(config, output, labels, jax.random.key(0), 0.5).sum()

    grads = jax.grad(total)(output)
    norms_used = loss == "noisy" and not stop_norm_gradient  # only the noisy loss reads them
    for name in ("feature_norm", "class_norm"):
        assert bool(jnp.any(getattr(grads, name) != 0)) == norms_used, name
    # The logits get the same gradient either way.
    other = config_with(loss=loss, alpha=0.5, stop_norm_gradient=not stop_norm_gradient)
    other_grads = jax.grad(lambda o: steps.compute_losses(
        other, o, labels, jax.random.key(0), 0.5).sum())(output)
    np.testing.assert_array_equal(grads.logits, other_grads.logits)


@pytest.mark.parametrize("loss", ["noisy", "softmax"])
def test_compute_losses_of_the_fused_head_equal_the_dense_heads(loss):
    config = config_with(loss=loss, alpha=0.5)
    head, params, features, labels = head_and_features()
    fused = nsj.FusedNoisySoftmaxHead(num_classes=5, chunk_size=2).apply(params, features)
    expected = steps.compute_losses(config, head.apply(params, features), labels,
                                    jax.random.key(0), 0.5)
    np.testing.assert_allclose(
        steps.compute_losses(config, fused, labels, jax.random.key(0), 0.5), expected, rtol=1e-5)


def test_stop_norm_gradient_makes_the_amplitude_a_constant():
    """Parameter gradients equal those of the noisy loss given the amplitude as plain numbers
    (so not differentiated), and differ from those of the default."""
    head, params, features, labels = head_and_features()
    amplitude = head.apply(params, features).amplitude(labels)  # concrete: no gradient through it

    def loss_of(config):
        def total(params, features):
            output = head.apply(params, features)
            return steps.compute_losses(config, output, labels, jax.random.key(0), 0.5).sum()
        return jax.grad(total, argnums=(0, 1))(params, features)

    def constant_amplitude(params, features):
        logits = head.apply(params, features).logits
        return nsj.noisy_softmax_cross_entropy(
            logits, labels, jax.random.key(0), 0.5, amplitude=amplitude).sum()

    stopped = loss_of(config_with(stop_norm_gradient=True))
    reference = jax.grad(constant_amplitude, argnums=(0, 1))(params, features)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 stopped, reference)
    default_grads = loss_of(config_with(stop_norm_gradient=False))
    kernel = lambda grads: grads[0]["params"]["kernel"]
    assert not np.allclose(kernel(stopped), kernel(default_grads), rtol=1e-3)
