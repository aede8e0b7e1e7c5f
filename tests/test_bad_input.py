"""Bad input gets an error that names the argument and what was expected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import noisy_softmax_jax as nsj

LOGITS = jnp.zeros((4, 3))
LABELS = jnp.array([0, 1, 2, 0])
AMPLITUDE = jnp.ones((4,))
KEY = jax.random.key(0)


def call(**overrides):
    args = dict(logits=LOGITS, labels=LABELS, rng=KEY, alpha=0.1, amplitude=AMPLITUDE)
    args.update(overrides)
    return nsj.noisy_softmax_cross_entropy(
        args.pop("logits"), args.pop("labels"), args.pop("rng"), args.pop("alpha"), **args)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(logits=jnp.zeros((4, 3), jnp.int32)), TypeError, r"`logits` must be a floating"),
    (dict(labels=LABELS.astype(jnp.float32)), TypeError, r"`labels` must be an integer"),
    (dict(labels=jnp.array([0, 1, 2])), ValueError,
     r"`labels` must have shape logits.shape\[:-1\] = \(4,\); got labels.shape = \(3,\)"),
    (dict(logits=jnp.float32(1.0), labels=jnp.int32(0)), ValueError, r"class axis"),
    (dict(labels=jnp.array([0, 1, 3, 0])), ValueError,
     r"`labels` must lie in \[0, 3\) .* labels\[2\] = 3"),
    (dict(labels=jnp.array([0, -1, 2, 0])), ValueError, r"labels\[1\] = -1"),
    (dict(amplitude=jnp.ones((4, 1))), ValueError,
     r"`amplitude` must have one entry per example, shape \(4,\).*\(4, 1\)"),
    (dict(amplitude=jnp.ones((4,), jnp.int32)), TypeError, r"`amplitude` must be a floating"),
    (dict(where=jnp.ones((3,), bool)), ValueError, r"`where` must have one entry per example"),
    (dict(noise="gaussian"), ValueError,
     r"`noise` must be one of 'annealed', 'amplitude', 'free'; got 'gaussian'"),
    (dict(alpha=-0.1), ValueError, r"`alpha` must be >= 0; got alpha = -0.1"),
    (dict(alpha=jnp.ones(2)), ValueError, r"`alpha` must be a scalar"),
    (dict(sigma=-1.0), ValueError, r"`sigma` must be >= 0"),
    (dict(amplitude=None), ValueError, r"needs `amplitude`.*NoisySoftmaxHead.*target_amplitude"),
    (dict(amplitude=None, noise="amplitude"), ValueError, r"noise='amplitude' needs `amplitude`"),
    (dict(rng=0), TypeError, r"`rng` must be a JAX PRNG key"),
    (dict(rng=jnp.zeros((2,), jnp.float32)), TypeError, r"`rng` must be a JAX PRNG key"),
    (dict(rng=jax.random.split(KEY, 2)), ValueError, r"`rng` must be a single key"),
    (dict(rng=jnp.zeros((3,), jnp.uint32)), ValueError, r"legacy key must have shape \(2,\)"),
    (dict(axis=2), ValueError,
     r"`axis` must lie in \[-2, 2\) for logits of shape \(4, 3\); got axis = 2"),
    (dict(axis=(1, 1)), ValueError, r"`axis` names an axis twice: \(1, 1\)"),
    (dict(axis=()), TypeError, r"`axis` must be an int.*or a non-empty tuple of ints"),
    (dict(axis=(0, 2)), ValueError, r"`axis` must lie in \[-2, 2\)"),
    (dict(axis=1.0), TypeError, r"`axis` must be an int"),
    (dict(axis=0), ValueError,
     r"`labels` must have shape logits.shape without axis 0 = \(3,\); got labels.shape = \(4,\)"),
    (dict(axis=0, labels=jnp.array([0, 4, 1])), ValueError,
     r"`labels` must lie in \[0, 4\) .* labels\[1\] = 4"),
])
def test_eager_bad_input_raises_before_computing(overrides, error, match, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the loss was computed despite bad input")

    monkeypatch.setattr(nsj.loss, "_loss", fail)
    with pytest.raises(error, match=match):
        call(**overrides)


def test_free_noise_needs_no_amplitude():
    loss = call(amplitude=None, noise="free")
    assert loss.shape == (4,) and jnp.all(jnp.isfinite(loss))


def test_under_jit_shapes_and_dtypes_are_still_checked():
    with pytest.raises(ValueError, match=r"`labels` must have shape"):
        jax.jit(lambda lg: call(logits=lg))(jnp.zeros((5, 3)))
    with pytest.raises(TypeError, match=r"`labels` must be an integer"):
        jax.jit(lambda lb: call(labels=lb))(LABELS.astype(jnp.float32))


def test_under_jit_an_out_of_range_label_gives_nan_as_documented():
    loss = jax.jit(lambda lb: call(labels=lb))(jnp.array([0, 1, 7, 0]))
    assert jnp.isnan(loss[2]) and jnp.all(jnp.isfinite(loss[jnp.array([0, 1, 3])]))


@pytest.mark.parametrize("args, match", [
    (dict(labels=jnp.array([0, 1, 7, 0])), r"`labels` must lie in \[0, 3\); found label 7"),
    (dict(labels=jnp.array([0, -2, 1, 0])), r"found label -2"),
    (dict(logits=LOGITS.at[1, 2].set(jnp.nan)), r"`logits` contains NaN or infinity"),
    (dict(logits=LOGITS.at[0, 0].set(jnp.inf)), r"`logits` contains NaN or infinity"),
    (dict(amplitude=AMPLITUDE.at[3].set(jnp.nan)), r"`amplitude` contains NaN"),
    (dict(alpha=-0.5), r"`alpha` must be >= 0; got -0.5"),
])
def test_checked_mode_reports_value_errors_under_jit(args, match):
    full = dict(logits=LOGITS, labels=LABELS, amplitude=AMPLITUDE, alpha=0.1)
    full.update(args)

    @jax.jit
    def step(logits, labels, amplitude, alpha):
        return nsj.checked_noisy_softmax_cross_entropy(logits, labels, KEY, alpha,
                                                       amplitude=amplitude)

    error, _ = step(**full)
    with pytest.raises(Exception, match=match):
        error.throw()


def test_checked_mode_is_silent_and_equal_on_good_input():
    error, loss = jax.jit(lambda lg: nsj.checked_noisy_softmax_cross_entropy(
        lg, LABELS, KEY, 0.1, amplitude=AMPLITUDE))(LOGITS)
    assert error.get() is None
    np.testing.assert_array_equal(loss, call())


def test_target_amplitude_checks_shapes():
    with pytest.raises(ValueError, match=r"`kernel` must have shape \[num_features, num_classes\]"):
        nsj.target_amplitude(jnp.ones((4, 5)), jnp.ones((6, 3)), LABELS)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\)"):
        nsj.target_amplitude(jnp.ones((4, 5)), jnp.ones((5, 3)), jnp.array([0, 1, 2, 3]))


def test_alpha_schedule_rejects_bad_alpha():
    with pytest.raises(ValueError, match=r"`alpha` must be >= 0"):
        nsj.alpha_schedule(-0.1)
    with pytest.raises(TypeError, match=r"number or a schedule"):
        nsj.alpha_schedule("0.1")
