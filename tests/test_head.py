"""The Flax head and the amplitude helper."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import noisy_softmax_jax as nsj


def test_head_is_a_bias_free_linear_layer_with_norms():
    head = nsj.NoisySoftmaxHead(num_classes=5)
    features = jax.random.normal(jax.random.key(0), (3, 7))
    params = head.init(jax.random.key(1), features)
    assert set(params["params"]) == {"kernel"}
    kernel = params["params"]["kernel"]
    assert kernel.shape == (7, 5)
    out = head.apply(params, features)
    np.testing.assert_allclose(out.logits, features @ kernel, rtol=1e-6)
    np.testing.assert_allclose(out.feature_norm, np.linalg.norm(features, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(out.class_norm, np.linalg.norm(kernel, axis=0), rtol=1e-6)
    labels = jnp.array([4, 0, 2])
    np.testing.assert_allclose(out.amplitude(labels),
                               nsj.target_amplitude(features, kernel, labels), rtol=1e-6)
    # The target logit never exceeds its amplitude (Cauchy-Schwarz).
    target = jnp.take_along_axis(out.logits, labels[:, None], axis=-1)[:, 0]
    assert jnp.all(target <= out.amplitude(labels) * (1 + 1e-6))


def test_head_with_bias():
    head = nsj.NoisySoftmaxHead(num_classes=4, use_bias=True,
                                bias_init=nn.initializers.constant(0.5))
    features = jnp.ones((2, 3))
    params = head.init(jax.random.key(0), features)
    out = head.apply(params, features)
    np.testing.assert_allclose(out.logits, features @ params["params"]["kernel"] + 0.5, rtol=1e-6)


def test_head_bfloat16_compute_keeps_float32_norms():
    head = nsj.NoisySoftmaxHead(num_classes=4, dtype=jnp.bfloat16)
    features = jnp.ones((2, 3), jnp.bfloat16)
    out = head.apply(head.init(jax.random.key(0), features), features)
    assert out.logits.dtype == jnp.bfloat16
    assert out.feature_norm.dtype == jnp.float32 and out.class_norm.dtype == jnp.float32


def test_norm_gradient_at_zero_features_is_zero_not_nan():
    # Features driven to exactly zero (a dead ReLU layer, or a network escaping the noise)
    # must not poison training with NaN.
    kernel = jax.random.normal(jax.random.key(0), (4, 3))
    features = jnp.zeros((2, 4))
    labels = jnp.array([0, 2])

    def loss(features, kernel):
        amplitude = nsj.target_amplitude(features, kernel, labels)
        return nsj.noisy_softmax_cross_entropy(features @ kernel, labels, jax.random.key(1), 0.5,
                                               amplitude=amplitude).sum()

    grads = jax.grad(loss, argnums=(0, 1))(features, kernel)
    assert all(jnp.all(jnp.isfinite(g)) for g in grads)
    np.testing.assert_array_equal(nsj.safe_norm(jnp.zeros(3)), 0.0)
    np.testing.assert_array_equal(jax.grad(nsj.safe_norm)(jnp.zeros(3)), 0.0)
    np.testing.assert_allclose(jax.grad(nsj.safe_norm)(jnp.array([3.0, 4.0])), [0.6, 0.8])


class _Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        return nsj.NoisySoftmaxHead(num_classes=3)(x)


def test_switching_a_training_step_to_noisy_softmax_trains():
    # Three separable blobs: a few SGD steps with the noisy loss must fit them.
    centers = jnp.array([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    labels = jnp.repeat(jnp.arange(3), 32)
    x = centers[labels] + 0.3 * jax.random.normal(jax.random.key(0), (96, 2))
    model = _Model()
    params = model.init(jax.random.key(1), x)
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, rng):
        def loss_fn(params):
            out = model.apply(params, x)
            return nsj.noisy_softmax_cross_entropy(
                out.logits, labels, rng, 0.1, amplitude=out.amplitude(labels)).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    base = jax.random.key(2)
    losses = []
    for i in range(60):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(base, i))
        losses.append(float(loss))
    # Evaluation uses the clean logits: no key, no noise, deterministic.
    logits = model.apply(params, x).logits
    assert losses[-1] < 0.5 * losses[0]
    assert float(jnp.mean(jnp.argmax(logits, -1) == labels)) == 1.0
