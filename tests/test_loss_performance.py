"""The fused loss keeps no [batch, classes] buffer beyond Optax's, and both of its backward
passes give the reference values and gradients, noise of hundreds of nats included.

Memory is read from XLA's compiled-program analysis, so these tests are deterministic; timings
live in benchmarks/, not here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import noisy_softmax_jax as nsj
from noisy_softmax_jax import _fused
from tests import reference

BATCH, CLASSES = 256, 2000


def _optax_step(logits, labels):
    return jax.value_and_grad(
        lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, labels).mean())(logits)


def _noisy_step(logits, labels, amplitude, alpha):
    return jax.value_and_grad(
        lambda lg, amp: nsj.noisy_softmax_cross_entropy(
            lg, labels, jax.random.key(0), alpha, amplitude=amp).mean(),
        argnums=(0, 1))(logits, amplitude)


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_no_batch_by_classes_buffer_beyond_optax(dtype):
    logits = jax.ShapeDtypeStruct((BATCH, CLASSES), dtype)
    labels = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
    amplitude = jax.ShapeDtypeStruct((BATCH,), jnp.float32)
    alpha = jax.ShapeDtypeStruct((), jnp.float32)
    ours = _temp_bytes(_noisy_step, logits, labels, amplitude, alpha)
    theirs = _temp_bytes(_optax_step, logits, labels)
    per_example_slack = 32 * BATCH * 4  # a few per-example vectors, far below one row block
    assert ours <= theirs + per_example_slack, (ours, theirs)
    # The float32 gradient reuses the buffer of the exponentials: nothing [batch, classes]
    # is left over at all. In half precision one float32 array is (Optax keeps two).
    float32_array = BATCH * CLASSES * 4
    kept = 0 if dtype == jnp.float32 else float32_array
    assert ours <= kept + per_example_slack, (ours, kept)


def _reference_grad(logits, labels, rng, alpha, amplitude, noise):
    abs_xi = -nsj.noisy_target_logit(jnp.zeros(labels.shape), rng, 1.0, noise="free")
    value = reference.noisy_softmax_loss(logits, labels, abs_xi, alpha, amplitude, noise)
    grad = reference.noisy_softmax_target_gradient(logits, labels, abs_xi, alpha, amplitude,
                                                   noise)
    return value, grad


@pytest.mark.parametrize("exact_shift", [True, False])
@pytest.mark.parametrize("keep_exponentials", [True, False])
@pytest.mark.parametrize("noise", ["annealed", "amplitude", "free"])
def test_both_backward_passes_match_the_reference(keep_exponentials, noise, exact_shift):
    k_logits, k_labels = jax.random.split(jax.random.key(1))
    logits = 4.0 * jax.random.normal(k_logits, (32, 50))
    labels = jax.random.randint(k_labels, (32,), 0, 50)
    amplitude = jnp.abs(logits).max(-1) * 1.5
    rng, alpha = jax.random.key(2), 0.3

    @jax.jit
    def value_and_grad(logits):
        return jax.value_and_grad(lambda lg: _fused._noisy_cross_entropy(
            lg, labels, rng, jnp.float32(alpha), jnp.float32(1.0), amplitude,
            noise, False, False, keep_exponentials, exact_shift).sum())(logits)

    loss, grad = value_and_grad(logits)
    expected_loss, expected_grad = _reference_grad(logits, labels, rng, alpha, amplitude, noise)
    np.testing.assert_allclose(loss, expected_loss.sum(), rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("exact_shift", [True, False])
@pytest.mark.parametrize("keep_exponentials", [True, False])
def test_noise_far_below_a_dominant_target_uses_the_exact_maximum(keep_exponentials,
                                                                  exact_shift):
    # Both shifts: the branch-free one (accelerators, several devices) and the one-device
    # CPU shortcut with its fallback.
    # Row 0: the target dominates by 150 and the noise lowers it by ~100s of nats, so the
    # largest logit is no safe shift (every exp(n - 150) would underflow) and the exact
    # maximum of the noisy logits must be the shift. Row 1 is ordinary.
    logits = jnp.array([[150.0, 0.0, -3.0, 1.0], [0.5, 2.0, -1.0, 0.0]])
    labels = jnp.array([0, 3])
    rng, alpha = jax.random.key(3), 200.0

    @jax.jit
    def value_and_grad(logits):
        return jax.value_and_grad(lambda lg: _fused._noisy_cross_entropy(
            lg, labels, rng, jnp.float32(alpha), jnp.float32(1.0), None,
            "free", False, False, keep_exponentials, exact_shift).sum())(logits)

    loss, grad = value_and_grad(logits)
    per_example = nsj.noisy_softmax_cross_entropy(logits, labels, rng, alpha, noise="free")
    expected_loss, expected_grad = _reference_grad(logits, labels, rng, alpha, None, "free")
    assert expected_loss[0] > 30  # noise of more than 30 nats on a dominant target
    np.testing.assert_allclose(per_example, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(loss, expected_loss.sum(), rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_forward_mode_and_hessian_work():
    # A custom JVP (not a custom VJP): forward mode and second derivatives keep working.
    logits = jnp.array([[1.0, -0.5, 2.0], [0.3, 0.1, -1.0]])
    labels = jnp.array([2, 0])
    amplitude = jnp.array([4.0, 3.0])
    def fn(lg):
        return nsj.noisy_softmax_cross_entropy(
            lg, labels, jax.random.key(0), 0.2, amplitude=amplitude).sum()

    hessian = jax.jit(jax.hessian(fn))(logits)
    forward = jax.jacfwd(fn)(logits)
    np.testing.assert_allclose(forward, jax.grad(fn)(logits), rtol=1e-5, atol=1e-7)
    assert hessian.shape == (2, 3, 2, 3) and jnp.all(jnp.isfinite(hessian))
