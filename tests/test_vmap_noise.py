"""`jax.vmap` over examples draws what the batched call draws.

Inside `vmap` a function sees one example; a plain draw from one key would give every example
the same noise (per-example gradients, DP-SGD, silently with shared noise). The draw has a
batching rule instead: with one key, `vmap(loss)(x, y)` is `loss(x, y)`; with a key per call,
each key draws for its own call.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import noisy_softmax_jax as nsj
from tests.test_large_class import make_problem
from tests.test_loss import make_batch

KEY = jax.random.key(4)
ALPHA = 0.5
VARIANTS = nsj.NOISE_VARIANTS


def loss_fn(noise, shared=False):
    def loss(logits, labels, amplitude, rng=KEY):
        return nsj.noisy_softmax_cross_entropy(logits, labels, rng, ALPHA, amplitude=amplitude,
                                               noise=noise, shared_noise=shared)
    return loss


@pytest.mark.parametrize("noise", VARIANTS)
def test_vmap_with_one_key_is_the_batched_call(noise):
    _, _, logits, labels, amplitude = make_batch(0, batch=(8,))
    loss = loss_fn(noise)
    mapped = jax.vmap(loss)(logits, labels, amplitude)
    np.testing.assert_array_equal(mapped, loss(logits, labels, amplitude))
    assert np.unique(np.asarray(mapped - nsj.noisy_softmax_cross_entropy(
        logits, labels, None, 0.0))).size == 8  # every example its own noise


def test_vmap_under_jit_is_the_batched_call():
    _, _, logits, labels, amplitude = make_batch(1, batch=(8,))
    loss = loss_fn("annealed")
    np.testing.assert_array_equal(jax.jit(jax.vmap(loss))(logits, labels, amplitude),
                                  jax.jit(loss)(logits, labels, amplitude))


def test_nested_vmap_is_the_call_on_both_batch_axes():
    _, _, logits, labels, amplitude = make_batch(2, batch=(3, 4))
    loss = loss_fn("annealed")
    np.testing.assert_array_equal(jax.vmap(jax.vmap(loss))(logits, labels, amplitude),
                                  loss(logits, labels, amplitude))


def test_vmap_over_blocks_of_examples_is_the_call_on_all_of_them():
    _, _, logits, labels, amplitude = make_batch(3, batch=(3, 4))
    loss = loss_fn("annealed")
    np.testing.assert_array_equal(jax.vmap(loss)(logits, labels, amplitude),
                                  loss(logits, labels, amplitude))


def test_per_example_gradients_are_the_rows_of_the_batched_gradient():
    # The loss of example i depends on row i only, so the gradient of the batched sum has, in
    # row i, example i's own gradient: what vmap(grad) must give with its own noise.
    _, _, logits, labels, amplitude = make_batch(4, batch=(8,))
    loss = loss_fn("annealed")
    per_example = jax.vmap(jax.grad(loss, argnums=(0, 2)))(logits, labels, amplitude)
    batched = jax.grad(lambda lg, amp: loss(lg, labels, amp).sum(), argnums=(0, 1))(
        logits, amplitude)
    for got, want in zip(per_example, batched):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    jitted = jax.jit(jax.vmap(jax.grad(loss)))(logits, labels, amplitude)
    np.testing.assert_allclose(jitted, batched[0], rtol=1e-6, atol=1e-7)


def test_gradient_of_vmap_is_the_gradient_of_the_batched_call():
    _, _, logits, labels, amplitude = make_batch(5, batch=(8,))
    loss = loss_fn("annealed")
    mapped = jax.grad(lambda lg: jax.vmap(loss)(lg, labels, amplitude).sum())(logits)
    batched = jax.grad(lambda lg: loss(lg, labels, amplitude).sum())(logits)
    np.testing.assert_allclose(mapped, batched, rtol=1e-6, atol=1e-7)


def test_vmap_with_a_key_per_call_draws_from_each_key():
    _, _, logits, labels, amplitude = make_batch(6, batch=(5, 3))
    keys = jax.random.split(KEY, 5)
    loss = loss_fn("annealed")
    mapped = jax.vmap(loss)(logits, labels, amplitude, keys)
    for i in range(5):
        np.testing.assert_array_equal(mapped[i], loss(logits[i], labels[i], amplitude[i], keys[i]))
    per_example_keys = jax.vmap(jax.vmap(loss, in_axes=(0, 0, 0, None)))(
        logits, labels, amplitude, keys)
    np.testing.assert_array_equal(per_example_keys, mapped)


def test_shared_noise_under_vmap_with_one_key_is_one_draw_for_all():
    _, _, logits, labels, amplitude = make_batch(7, batch=(8,))
    loss = loss_fn("free", shared=True)
    np.testing.assert_array_equal(jax.vmap(loss)(logits, labels, amplitude),
                                  loss(logits, labels, amplitude))


def test_noisy_target_logit_and_noisy_logits_under_vmap_are_the_batched_call():
    _, _, logits, labels, amplitude = make_batch(8, batch=(6,))
    target = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]

    def perturb(t, amp):
        return nsj.noisy_target_logit(t, KEY, ALPHA, amplitude=amp)

    def noisy(lg, lb, amp):
        return nsj.noisy_logits(lg, lb, KEY, ALPHA, amplitude=amp)

    np.testing.assert_array_equal(jax.vmap(perturb)(target, amplitude), perturb(target, amplitude))
    np.testing.assert_array_equal(jax.vmap(noisy)(logits, labels, amplitude),
                                  noisy(logits, labels, amplitude))


def test_fused_loss_under_vmap_over_blocks_of_rows_is_the_call_on_all_rows():
    features, kernel, labels = make_problem(0, batch=12)

    def fused(f, lb):
        return nsj.fused_noisy_softmax_cross_entropy(f, kernel, lb, KEY, ALPHA, chunk_size=16)

    mapped = jax.vmap(fused)(features.reshape(3, 4, -1), labels.reshape(3, 4))
    np.testing.assert_allclose(mapped.reshape(-1), fused(features, labels), rtol=1e-6)
