"""The Flax NNX head: the Linen head's outputs, bit for bit, and a float64 NumPy reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import noisy_softmax_jax as nsj
from noisy_softmax_jax.nnx import NoisySoftmaxHead


def numpy_head(features, kernel, labels, bias=None):
    """Logits and amplitude ||W_y|| ||x|| in float64, kernel [features, classes]."""
    features, kernel = np.asarray(features, np.float64), np.asarray(kernel, np.float64)
    logits = features @ kernel + (0.0 if bias is None else np.asarray(bias, np.float64))
    amplitude = np.linalg.norm(features, axis=-1) * np.linalg.norm(kernel, axis=0)[labels]
    return logits, amplitude


@pytest.mark.parametrize("use_bias", [False, True])
def test_nnx_head_equals_linen_head_with_the_same_weights(use_bias):
    head = NoisySoftmaxHead(7, 5, use_bias=use_bias, bias_init=nn.initializers.normal(1.0),
                            rngs=nnx.Rngs(0))
    params = {"kernel": head.kernel[...]}
    if use_bias:
        params["bias"] = head.bias[...]
    linen = nsj.NoisySoftmaxHead(num_classes=5, use_bias=use_bias)
    features = jax.random.normal(jax.random.key(1), (3, 4, 7))
    labels = jnp.array([[4, 0, 2, 1], [3, 3, 0, 4], [1, 2, 0, 0]])
    out, expected = head(features), linen.apply({"params": params}, features)
    assert isinstance(out, nsj.HeadOutput)
    for field in nsj.HeadOutput._fields:
        np.testing.assert_array_equal(getattr(out, field), getattr(expected, field))
    np.testing.assert_array_equal(out.amplitude(labels), expected.amplitude(labels))
    logits, amplitude = numpy_head(features, params["kernel"], labels, params.get("bias"))
    np.testing.assert_allclose(out.logits, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.amplitude(labels), amplitude, rtol=1e-6)


def test_nnx_head_parameters_and_options():
    head = NoisySoftmaxHead(6, 4, rngs=nnx.Rngs(0))
    # Bias-free: the kernel alone, in nnx.Linear's layout.
    assert [p.shape for p in jax.tree.leaves(nnx.state(head, nnx.Param))] == [(6, 4)]
    half = NoisySoftmaxHead(6, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    out = half(jnp.ones((2, 6), jnp.bfloat16))
    assert out.logits.dtype == jnp.bfloat16
    assert out.feature_norm.dtype == jnp.float32 and out.class_norm.dtype == jnp.float32
    # Same seed, same initializer: the same kernel as nnx.Linear's.
    linear = nnx.Linear(6, 4, use_bias=False, kernel_init=nnx.initializers.lecun_normal(),
                        rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(head.kernel[...], linear.kernel[...])


def test_nnx_training_step_fits_separable_blobs():
    # Three separable blobs: SGD with momentum on the noisy loss, through nnx.Optimizer.
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(2, 32, rngs=rngs)
            self.head = NoisySoftmaxHead(32, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.hidden(x)))

    centers = jnp.array([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    labels = jnp.repeat(jnp.arange(3), 32)
    x = centers[labels] + 0.3 * jax.random.normal(jax.random.key(0), (96, 2))
    model = Model(nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, rng):
        def loss_fn(model):
            out = model(x)
            return nsj.noisy_softmax_cross_entropy(
                out.logits, labels, rng, 0.1, amplitude=out.amplitude(labels)).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, jax.random.fold_in(jax.random.key(2), i)))
              for i in range(60)]
    assert losses[-1] < 0.5 * losses[0]
    assert float(jnp.mean(jnp.argmax(model(x).logits, -1) == labels)) == 1.0
