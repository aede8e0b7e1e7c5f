"""The Flax head and the amplitude helper."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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


def test_head_bfloat16_compute_keeps_float32_logits_and_norms():
    # The matmul's float32 accumulator is kept: bfloat16 logits would lose the annealing
    # factor a - f_y where features align (tests/test_head_precision.py).
    head = nsj.NoisySoftmaxHead(num_classes=4, dtype=jnp.bfloat16)
    features = jnp.ones((2, 3), jnp.bfloat16)
    out = head.apply(head.init(jax.random.key(0), features), features)
    assert out.logits.dtype == jnp.float32
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


class RecordingDotGeneral:
    """jax.lax.dot_general that records its keyword arguments and doubles its result."""

    def __init__(self):
        self.calls = []

    def __call__(self, lhs, rhs, dimension_numbers, **kwargs):
        self.calls.append(kwargs)
        return 2 * jax.lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)


def promote_to_float16(*arrays, dtype=None):
    """A Linen-style promote_dtype (arrays as positional arguments) that ignores `dtype`."""
    return [None if x is None else jnp.asarray(x, jnp.float16) for x in arrays]


@pytest.mark.parametrize("options", [
    dict(use_bias=False),
    dict(use_bias=True, bias_init=nn.initializers.normal(1.0)),
    dict(use_bias=False, precision=jax.lax.Precision.HIGHEST),
    dict(use_bias=False, dot_general=RecordingDotGeneral()),
    dict(use_bias=True, dot_general_cls=RecordingDotGeneral),
    dict(use_bias=True, promote_dtype=promote_to_float16),
    dict(use_bias=False, dtype=jnp.bfloat16),
    dict(use_bias=False, param_dtype=jnp.bfloat16),
    dict(use_bias=False, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(),
                                                          (None, "model"))),
], ids=["plain", "bias", "precision", "dot_general", "dot_general_cls", "promote_dtype",
        "dtype", "param_dtype", "partitioning"])
def test_head_takes_dense_arguments_and_has_its_parameters(options):
    features = jax.random.normal(jax.random.key(0), (3, 2, 6))
    dense = nn.Dense(5, **options)
    head = nsj.NoisySoftmaxHead(num_classes=5, **options)
    variables = dense.init(jax.random.key(1), features)
    head_variables = head.init(jax.random.key(1), features)
    # The same tree, shapes, dtypes and metadata (nn.Partitioned boxes and their names).
    assert (jax.tree.map(lambda x: (x.shape, x.dtype), head_variables)
            == jax.tree.map(lambda x: (x.shape, x.dtype), variables))
    assert nn.get_partition_spec(head_variables) == nn.get_partition_spec(variables)
    for tree in (head_variables, variables):
        assert jax.tree.structure(tree) == jax.tree.structure(variables)
    for head_leaf, leaf in zip(jax.tree.leaves(head_variables), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(head_leaf, leaf)  # the same initializers, the same key
    expected = dense.apply(variables, features)
    out = head.apply(variables, features)
    # Dense rounds half-precision logits to its dtype; the head keeps the float32 accumulator.
    assert out.logits.dtype == jnp.promote_types(expected.dtype, jnp.float32)
    np.testing.assert_array_equal(out.logits.astype(expected.dtype), expected)
    recorder = options.get("dot_general")
    if recorder is not None:  # the same call, plus the accumulation dtype where it matters
        assert recorder.calls[-1] == recorder.calls[-2] == {"precision": None}
    if "promote_dtype" in options:  # the norms are those of the arrays the head multiplies
        promoted = [jnp.asarray(x, jnp.float16)
                    for x in (features, variables["params"]["kernel"])]
        np.testing.assert_allclose(out.feature_norm, nsj.safe_norm(promoted[0]), rtol=1e-6)
        np.testing.assert_allclose(out.class_norm, nsj.safe_norm(promoted[1], axis=0),
                                   rtol=1e-6)


def test_head_passes_precision_and_the_float32_accumulator_to_dot_general():
    recorder = RecordingDotGeneral()
    head = nsj.NoisySoftmaxHead(num_classes=3, dtype=jnp.bfloat16, dot_general=recorder,
                                precision=jax.lax.Precision.HIGHEST)
    features = jnp.ones((2, 4))
    head.apply(head.init(jax.random.key(0), features), features)
    assert recorder.calls[-1] == {"precision": jax.lax.Precision.HIGHEST,
                                  "preferred_element_type": jnp.float32}
