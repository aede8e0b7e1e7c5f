"""Half-precision heads: the annealing factor a - f_y where features align with their class weight.

The factor ||W_y|| ||x|| - f_y is what the paper's noise scales with, and it is a small
difference of two large numbers exactly where the paper is interested: features nearly parallel
to their class weight (cos theta near 1). The reference is float64 of the arrays the head
multiplies (the features and the kernel rounded to bfloat16 by its `dtype`): rounding the inputs
is what `dtype=bfloat16` asks for, while the matmul, the norms and the logits must not lose the
factor on top of it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import noisy_softmax_jax as nsj
from noisy_softmax_jax import nnx as nsj_nnx

CLASSES, BATCH = 10, 64


def aligned_problem(dim, cos, seed=0):
    """Features at angle arccos(cos) from their class weight: x = 3 (W_y + tan(theta) u)."""
    k_kernel, k_labels, k_orth = jax.random.split(jax.random.key(seed), 3)
    kernel = np.asarray(jax.random.normal(k_kernel, (dim, CLASSES)), np.float64)
    labels = np.asarray(jax.random.randint(k_labels, (BATCH,), 0, CLASSES))
    weights = kernel[:, labels].T
    other = np.asarray(jax.random.normal(k_orth, (BATCH, dim)), np.float64)
    other -= np.sum(other * weights, -1, keepdims=True) / np.sum(
        weights * weights, -1, keepdims=True) * weights
    other *= np.linalg.norm(weights, axis=-1, keepdims=True) / np.linalg.norm(
        other, axis=-1, keepdims=True)
    features = 3.0 * (weights + np.sqrt(1 - cos**2) / cos * other)
    return (jnp.asarray(features, jnp.float32), jnp.asarray(kernel, jnp.float32),
            jnp.asarray(labels))


def float64_factor(features, kernel, labels, dtype=jnp.bfloat16):
    """a - f_y in float64 of the features and kernel as `dtype` rounds them."""
    x = np.asarray(features.astype(dtype), np.float64)
    w = np.asarray(kernel.astype(dtype), np.float64)
    target = np.sum(x * w[:, labels].T, axis=-1)
    return np.linalg.norm(x, axis=-1) * np.linalg.norm(w, axis=0)[labels] - target


def head_factor(out, labels):
    target = jnp.take_along_axis(out.logits, labels[:, None], axis=-1)[:, 0]
    return np.asarray(out.amplitude(labels), np.float64) - np.asarray(target, np.float64)


def linen_head(kernel, features):
    head = nsj.NoisySoftmaxHead(num_classes=CLASSES, dtype=jnp.bfloat16)
    return head.apply({"params": {"kernel": kernel}}, features)


def nnx_head(kernel, features):
    head = nsj_nnx.NoisySoftmaxHead(kernel.shape[0], CLASSES, dtype=jnp.bfloat16,
                                    rngs=nnx.Rngs(0))
    head.kernel[...] = kernel
    return head(features)


@pytest.mark.parametrize("apply_head", [linen_head, nnx_head], ids=["linen", "nnx"])
@pytest.mark.parametrize("dim", [8, 128, 512])
@pytest.mark.parametrize("cos", [0.9, 0.99])
def test_bfloat16_head_keeps_the_annealing_factor_where_features_align(apply_head, dim, cos):
    features, kernel, labels = aligned_problem(dim, cos)
    expected = float64_factor(features, kernel, labels)
    factor = head_factor(apply_head(kernel, features), labels)
    # float32 accumulation of bfloat16 products and float32 norms of the same arrays: a few
    # float32 roundings of the amplitude, 1e-5 of the factor at cos = 0.99. Norms of other arrays
    # than the logits', or logits rounded to bfloat16, were off by 2-53 % at cos = 0.9-0.99.
    np.testing.assert_allclose(factor, expected, rtol=1e-3)


@pytest.mark.parametrize("dim", [8, 128])
def test_bfloat16_fused_heads_keep_the_annealing_factor_where_features_align(dim):
    features, kernel, labels = aligned_problem(dim, 0.99)
    x = np.asarray(features.astype(jnp.bfloat16), np.float64)
    w = np.asarray(kernel.astype(jnp.bfloat16), np.float64)
    expected_amplitude = np.linalg.norm(x, axis=-1) * np.linalg.norm(w, axis=0)[labels]
    rng, alpha = jax.random.key(3), 0.3
    # The loss of the float64 logits and amplitude of the rounded arrays, with the same noise.
    expected_loss = nsj.noisy_softmax_cross_entropy(
        jnp.asarray(x @ w, jnp.float32), labels, rng, alpha,
        amplitude=jnp.asarray(expected_amplitude, jnp.float32))
    linen = nsj.FusedNoisySoftmaxHead(num_classes=CLASSES, dtype=jnp.bfloat16, chunk_size=4)
    linen_out = linen.apply({"params": {"kernel": kernel}}, features)
    module = nsj_nnx.FusedNoisySoftmaxHead(dim, CLASSES, dtype=jnp.bfloat16, chunk_size=4,
                                           rngs=nnx.Rngs(0))
    module.kernel[...] = kernel
    for out in (linen_out, module(features)):
        np.testing.assert_allclose(out.amplitude(labels), expected_amplitude, rtol=1e-6)
        # The loss changes by alpha |xi| times the error of the factor: float32 roundings.
        np.testing.assert_allclose(out.loss(labels, rng, alpha), expected_loss, rtol=1e-4,
                                   atol=1e-4)
