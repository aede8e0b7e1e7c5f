"""The loss draws its noise with straight-line threefry on CPU: the same bits as
jax.random.normal, and derivatives through the values it pins with `_computed_once`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import noisy_softmax_jax as nsj
from noisy_softmax_jax import _noise

SHAPES = [(), (1,), (2,), (7,), (3, 5), (2, 3, 4), (1024,), (100_003,)]


def _keys(seed):
    return [jax.random.key(seed), jax.random.PRNGKey(seed), jax.random.key(2**31 + 977 * seed)]


def _bits(x):
    return np.asarray(x).view(np.uint32)


@pytest.mark.parametrize("shape", SHAPES)
def test_standard_normal_is_jax_random_normal_bit_for_bit(shape):
    draw = jax.jit(_noise.standard_normal, static_argnums=(1, 2))
    for seed in range(4):
        for key in _keys(seed):
            expected = _bits(jax.random.normal(key, shape, jnp.float32))
            np.testing.assert_array_equal(_bits(draw(key, shape, jnp.float32)), expected)
            np.testing.assert_array_equal(
                _bits(_noise.standard_normal(key, shape, jnp.float32)), expected)


def test_other_keys_use_jax_random_normal():
    key = jax.random.key(3, impl="rbg")
    np.testing.assert_array_equal(
        _bits(_noise.standard_normal(key, (5,), jnp.float32)),
        _bits(jax.random.normal(key, (5,), jnp.float32)))


def test_the_loss_has_no_loop_on_cpu():
    # The point of the straight-line draw: no while loop (threefry's rolled CPU lowering).
    logits = jnp.zeros((8, 5))
    labels = jnp.zeros((8,), jnp.int32)
    step = jax.jit(lambda lg, alpha: jax.value_and_grad(lambda x: nsj.noisy_softmax_cross_entropy(
        x, labels, jax.random.key(0), alpha, noise="free").mean())(lg))
    hlo = step.lower(logits, 0.1).compile().as_text()
    assert " while(" not in hlo


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
