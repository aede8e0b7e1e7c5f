"""`axis`: the class axis anywhere, as in Optax; the same as moving it last with jnp.moveaxis."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import noisy_softmax_jax as nsj
from tests.test_loss import make_batch

AXES = [0, 1, -1]


def batch_along(axis):
    """3-D logits with the class axis at `axis`, the same logits with it last, and the rest."""
    _, _, logits, labels, amplitude = make_batch(0, batch=(4, 6), num_classes=5)
    where = jnp.arange(24).reshape(4, 6) % 4 != 0
    return jnp.moveaxis(logits, -1, axis), logits, labels, amplitude, where


@pytest.mark.parametrize("axis", AXES)
def test_loss_along_an_axis_is_the_loss_of_moveaxis(axis):
    logits, last, labels, amplitude, where = batch_along(axis)
    rng = jax.random.key(1)

    @functools.partial(jax.jit, static_argnums=2)
    def loss_and_grads(logits, amplitude, axis_of_logits):
        def loss_fn(logits, amplitude):
            loss = nsj.noisy_softmax_cross_entropy(
                logits, labels, rng, 0.3, amplitude=amplitude, where=where, axis=axis_of_logits)
            return loss.sum(), loss

        (_, loss), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            logits, amplitude)
        return loss, grads

    loss, (grad_logits, grad_amplitude) = loss_and_grads(logits, amplitude, axis)
    expected, (expected_logits, expected_amplitude) = loss_and_grads(last, amplitude, -1)
    assert loss.shape == labels.shape and grad_logits.shape == logits.shape
    np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad_logits, jnp.moveaxis(expected_logits, -1, axis),
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grad_amplitude, expected_amplitude, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(loss[~where], 0.0)
    assert np.all(loss[where] > 0)


@pytest.mark.parametrize("axis", AXES)
def test_noisy_logits_along_an_axis_are_those_of_moveaxis(axis):
    logits, last, labels, amplitude, _ = batch_along(axis)
    rng = jax.random.key(2)
    noisy = jax.jit(lambda lg: nsj.noisy_logits(lg, labels, rng, 0.3, amplitude=amplitude,
                                                axis=axis))(logits)
    expected = nsj.noisy_logits(last, labels, rng, 0.3, amplitude=amplitude)
    np.testing.assert_array_equal(noisy, jnp.moveaxis(expected, -1, axis))
    # And Optax's loss along the same axis gives ours.
    np.testing.assert_allclose(
        optax.softmax_cross_entropy_with_integer_labels(noisy, labels, axis=axis),
        nsj.noisy_softmax_cross_entropy(logits, labels, rng, 0.3, amplitude=amplitude,
                                        axis=axis), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("axis", AXES)
def test_checked_variant_along_an_axis(axis):
    logits, _, labels, amplitude, _ = batch_along(axis)
    rng = jax.random.key(3)

    @jax.jit
    def checked(labels):
        return nsj.checked_noisy_softmax_cross_entropy(logits, labels, rng, 0.3,
                                                       amplitude=amplitude, axis=axis)

    error, loss = checked(labels)
    assert error.get() is None
    np.testing.assert_array_equal(loss, nsj.noisy_softmax_cross_entropy(
        logits, labels, rng, 0.3, amplitude=amplitude, axis=axis))
    error, _ = checked(labels.at[1, 2].set(5))  # 5 classes along `axis`, whatever its place
    with pytest.raises(Exception, match=r"`labels` must lie in \[0, 5\); found label 5"):
        error.throw()
