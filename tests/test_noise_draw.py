"""The loss's noise is jax.random.normal's, bit for bit, and derivatives go through the values
that `_noise.computed_once` pins."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import noisy_softmax_jax as nsj

SHAPES = [(), (1,), (7,), (3, 5), (1024,)]


def _keys(seed):
    return [jax.random.key(seed), jax.random.PRNGKey(seed), jax.random.key(seed, impl="rbg")]


def _bits(x):
    return np.asarray(x).view(np.uint32)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_noise_is_jax_random_normal_bit_for_bit(shape):
    # |xi| comes out exactly as -noisy_target_logit(0, ...) with free noise and alpha = 1.
    def abs_xi(key, shared_noise=False):
        return -nsj.noisy_target_logit(jnp.zeros(shape), key, 1.0, noise="free",
                                       shared_noise=shared_noise)

    for seed in range(3):
        for key in _keys(seed):
            expected = _bits(jnp.abs(jax.random.normal(key, shape, jnp.float32)))
            np.testing.assert_array_equal(_bits(abs_xi(key)), expected)
            np.testing.assert_array_equal(_bits(jax.jit(abs_xi)(key)), expected)
            shared = np.abs(np.asarray(jax.random.normal(key, (), jnp.float32)))
            np.testing.assert_array_equal(
                _bits(abs_xi(key, shared_noise=True)),
                _bits(np.broadcast_to(shared, shape).astype(np.float32)))


@pytest.mark.parametrize("noise", ["annealed", "amplitude", "free"])
def test_mixed_second_derivatives_match_plain_autodiff(noise):
    # d f~_y / d f_y depends on alpha and goes through `_computed_once`: its derivative must
    # reach d^2 loss / (d logits d alpha), d^2 loss / (d logits d amplitude) and the Hessian.
    k_logits, k_labels = jax.random.split(jax.random.key(4))
    logits = 3.0 * jax.random.normal(k_logits, (6, 7))
    labels = jax.random.randint(k_labels, (6,), 0, 7)
    amplitude = jnp.abs(logits).max(-1) * 1.5
    rng = jax.random.key(0)
    abs_xi = -nsj.noisy_target_logit(jnp.zeros(labels.shape), rng, 1.0, noise="free")

    def ours(lg, amp, alpha):
        return nsj.noisy_softmax_cross_entropy(lg, labels, rng, alpha, amplitude=amp,
                                               noise=noise).sum()

    def plain(lg, amp, alpha):
        target = jnp.take_along_axis(lg, labels[:, None], axis=-1)[:, 0]
        scale = {"annealed": jnp.maximum(amp - target, 0.0), "amplitude": jnp.maximum(amp, 0.0),
                 "free": jnp.ones_like(target)}[noise]
        noisy = target - alpha * abs_xi * scale
        is_target = labels[:, None] == jnp.arange(lg.shape[-1])
        noisy_logits = jnp.where(is_target, noisy[:, None], lg)
        return (jax.nn.logsumexp(noisy_logits, axis=-1) - noisy).sum()

    args = (logits, amplitude, jnp.float32(0.2))
    for derivative in (lambda f: jax.hessian(f, argnums=(0, 1, 2)),
                       lambda f: jax.jacfwd(jax.grad(f, argnums=(0, 1)), argnums=2)):
        got, want = derivative(ours)(*args), derivative(plain)(*args)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
