"""noisy_logits: the loss's noisy logits, for any cross-entropy (Optax's, smoothed, margins)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import noisy_softmax_jax as nsj
from tests import reference
from tests.test_loss import abs_xi_of, make_batch


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shared, negative", [(False, False), (True, True)],
                         ids=["per_example", "shared_negative"])
@pytest.mark.parametrize("noise", nsj.NOISE_VARIANTS)
def test_optax_on_the_noisy_logits_is_the_loss(noise, shared, negative, dtype):
    _, _, logits, labels, amplitude = make_batch(0, batch=(4, 8), num_classes=13, dtype=dtype)
    rng = jax.random.key(5)
    options = {"noise": noise, "shared_noise": shared, "negative": negative}

    def composed(lg, amp):
        noisy = nsj.noisy_logits(lg, labels, rng, 0.3, amplitude=amp, **options)
        return optax.softmax_cross_entropy_with_integer_labels(noisy, labels)

    def fused(lg, amp):
        return nsj.noisy_softmax_cross_entropy(lg, labels, rng, 0.3, amplitude=amp, **options)

    @jax.jit
    def losses_and_grads(lg, amp):
        def grads(fn):
            return jax.grad(lambda lg, amp: fn(lg, amp).sum(), argnums=(0, 1))(lg, amp)

        return composed(lg, amp), grads(composed), fused(lg, amp), grads(fused)

    ours, ours_grads, expected, fused_grads = losses_and_grads(logits, amplitude)
    # Optax's loss of the float32 noisy logits is float32; the loss is in the logits' dtype,
    # the float32 loss of the same values rounded once.
    assert ours.dtype == jnp.float32 and expected.dtype == dtype
    wide = fused(logits.astype(jnp.float32), amplitude)
    np.testing.assert_array_equal(expected, wide.astype(dtype))
    np.testing.assert_allclose(ours, wide, rtol=1e-6, atol=1e-6)
    for got, want in zip(ours_grads, fused_grads):
        assert got.dtype == want.dtype
        rtol = 1e-5 if got.dtype == jnp.float32 else 2 ** -7
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_only_the_target_entry_changes_and_to_the_noisy_target_logit(dtype):
    _, _, logits, labels, amplitude = make_batch(1, batch=(32,), dtype=dtype)
    rng = jax.random.key(2)
    noisy = nsj.noisy_logits(logits, labels, rng, 0.5, amplitude=amplitude)
    assert noisy.shape == logits.shape and noisy.dtype == jnp.float32  # the target unrounded
    is_target = np.asarray(labels)[:, None] == np.arange(logits.shape[-1])
    wide = np.asarray(logits, np.float32)
    np.testing.assert_array_equal(np.asarray(noisy)[~is_target], wide[~is_target])
    target = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    expected = nsj.noisy_target_logit(target, rng, 0.5, amplitude=amplitude)
    np.testing.assert_allclose(np.asarray(noisy)[is_target], expected, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(noisy)[is_target] < wide[is_target])  # the noise lowered them


@pytest.mark.parametrize("noise", nsj.NOISE_VARIANTS)
def test_with_label_smoothing_matches_the_float64_reference(noise):
    _, _, logits, labels, amplitude = make_batch(2, batch=(16,))
    rng, alpha, smoothing = jax.random.key(3), 0.3, 0.1
    smoothed = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)

    @jax.jit
    def smoothed_loss(logits, alpha):
        noisy = nsj.noisy_logits(logits, labels, rng, alpha, amplitude=amplitude, noise=noise)
        return optax.softmax_cross_entropy(noisy, smoothed)

    noisy64 = reference.noisy_logits(logits, labels, abs_xi_of(rng, labels.shape), alpha,
                                     amplitude, noise)
    expected = -(np.asarray(smoothed, np.float64) * reference.log_softmax(noisy64)).sum(-1)
    np.testing.assert_allclose(smoothed_loss(logits, alpha), expected, rtol=2e-5, atol=2e-5)
    # Without noise it is Optax's label-smoothed loss, bit for bit.
    np.testing.assert_array_equal(smoothed_loss(logits, 0.0),
                                  jax.jit(optax.softmax_cross_entropy)(logits, smoothed))


def cosface_loss(features, weights, labels, rng, alpha, *, scale, margin):
    """CosFace (additive cosine margin) with the noisy softmax's noise: noise, then margin."""
    cosines = (features / jnp.linalg.norm(features, axis=-1, keepdims=True)) @ (
        weights / jnp.linalg.norm(weights, axis=0, keepdims=True))
    # Logits s cos(theta_j) of unit features and weights: the amplitude ||W_y|| ||x|| is s.
    amplitude = jnp.full(labels.shape, scale)
    noisy = nsj.noisy_logits(scale * cosines, labels, rng, alpha, amplitude=amplitude)
    margins = scale * margin * jax.nn.one_hot(labels, weights.shape[-1])
    return optax.softmax_cross_entropy_with_integer_labels(noisy - margins, labels)


def test_with_a_cosface_margin_matches_the_float64_reference():
    features, weights, _, labels, _ = make_batch(3, batch=(12,))
    # Half the examples aligned with their class weight (cos theta_y = 1, up to rounding).
    features = features.at[:6].set(weights[:, labels[:6]].T * 2.0)
    rng, alpha, scale, margin = jax.random.key(4), 0.5, 30.0, 0.35

    @jax.jit
    def loss_and_grads(features, weights, alpha):
        def loss_fn(features, weights):
            return cosface_loss(features, weights, labels, rng, alpha, scale=scale,
                                margin=margin)

        grads = jax.grad(lambda f, w: loss_fn(f, w).sum(), argnums=(0, 1))(features, weights)
        return loss_fn(features, weights), grads

    loss, grads = loss_and_grads(features, weights, alpha)

    x = np.asarray(features, np.float64)
    w = np.asarray(weights, np.float64)
    cosines = (x / np.linalg.norm(x, axis=-1, keepdims=True)) @ (
        w / np.linalg.norm(w, axis=0, keepdims=True))
    y = np.asarray(labels)
    cos_y = cosines[np.arange(12), y]
    abs_xi = np.asarray(abs_xi_of(rng, labels.shape), np.float64)
    logits = scale * cosines
    # The paper's annealed noise on s cos(theta_y), amplitude s; then the margin s m.
    logits[np.arange(12), y] = (scale * cos_y - alpha * abs_xi * scale * np.maximum(1 - cos_y, 0)
                                - scale * margin)
    expected = -reference.log_softmax(logits)[np.arange(12), y]
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-4)

    # Noise before the margin keeps the paper's annealing: an aligned feature gets (almost) no
    # noise, a misaligned one does. (Margin first would make the factor s (1 - cos + m).)
    plain, _ = loss_and_grads(features, weights, 0.0)
    np.testing.assert_allclose(loss[:6], plain[:6], rtol=1e-4)
    assert np.all(loss[6:] > plain[6:])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_noisy_logits_checks_its_arguments_like_the_loss():
    logits, labels = jnp.zeros((4, 3)), jnp.array([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"needs `amplitude`"):
        nsj.noisy_logits(logits, labels, jax.random.key(0), 0.1)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\)"):
        nsj.noisy_logits(logits, labels.at[1].set(3), jax.random.key(0), 0.1, noise="free")
    with pytest.raises(ValueError, match=r"`alpha` must be >= 0"):
        nsj.noisy_logits(logits, labels, jax.random.key(0), -0.1, noise="free")
    with pytest.raises(ValueError, match=r"`axis` must lie in \[-2, 2\)"):
        nsj.noisy_logits(logits, labels, jax.random.key(0), 0.1, noise="free", axis=-3)
