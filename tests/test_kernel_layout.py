"""Class weights in either layout: Flax's [features, classes], Equinox's [classes, features]."""

import equinox as eqx  # a test-only dependency ([dev] extra)
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import noisy_softmax_jax as nsj


def numpy_amplitude(features, class_weights, labels):
    """||W_y|| ||x|| in float64 from the class weights as rows, [classes, features]."""
    features = np.asarray(features, np.float64)
    class_weights = np.asarray(class_weights, np.float64)
    return np.linalg.norm(features, axis=-1) * np.linalg.norm(class_weights[labels], axis=-1)


def equinox_head(num_features, num_classes, seed=0):
    return eqx.nn.Linear(num_features, num_classes, use_bias=False, key=jax.random.key(seed))


@pytest.mark.parametrize("num_features, num_classes", [(6, 4), (4, 6), (5, 5)])
def test_equinox_weights_with_their_layout_give_the_numpy_amplitude(num_features, num_classes):
    linear = equinox_head(num_features, num_classes)
    assert linear.weight.shape == (num_classes, num_features)  # Equinox: [out, in]
    features = jax.random.normal(jax.random.key(1), (8, num_features))
    labels = jax.random.randint(jax.random.key(2), (8,), 0, num_classes)
    expected = numpy_amplitude(features, linear.weight, labels)
    amplitude = nsj.target_amplitude(features, linear.weight, labels,
                                     kernel_layout="classes_features")
    np.testing.assert_allclose(amplitude, expected, rtol=1e-6)
    # The same numbers from the Flax layout, and from head_output, whose logits are Equinox's.
    np.testing.assert_array_equal(nsj.target_amplitude(features, linear.weight.T, labels),
                                  amplitude)
    out = nsj.head_output(features, linear.weight, kernel_layout="classes_features")
    np.testing.assert_allclose(out.logits, jax.vmap(linear)(features), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out.amplitude(labels), amplitude)


def test_square_equinox_weights_in_the_default_layout_are_silently_wrong():
    # Why the layout must be passed: a square kernel fits both, so nothing can detect the
    # mistake. Read as [features, classes], the norms are those of the columns, not the
    # class weights; the right layout gives the reference, the default does not.
    linear = equinox_head(5, 5)
    features = jax.random.normal(jax.random.key(1), (8, 5))
    labels = jnp.arange(8) % 5
    expected = numpy_amplitude(features, linear.weight, labels)
    right = nsj.target_amplitude(features, linear.weight, labels, kernel_layout="classes_features")
    wrong = nsj.target_amplitude(features, linear.weight, labels)
    np.testing.assert_allclose(right, expected, rtol=1e-6)
    assert np.max(np.abs(np.asarray(wrong) - expected) / expected) > 0.05


# Every function that takes a kernel, as a function of (features, kernel, labels, layout).
KERNEL_FUNCTIONS = {
    "target_amplitude": lambda x, w, y, layout: nsj.target_amplitude(
        x, w, y, kernel_layout=layout),
    "head_output": lambda x, w, y, layout: nsj.head_output(x, w, kernel_layout=layout),
    "fused_noisy_softmax_cross_entropy": lambda x, w, y, layout: (
        nsj.fused_noisy_softmax_cross_entropy(x, w, y, jax.random.key(0), 0.1,
                                              kernel_layout=layout)),
    "checked_fused_noisy_softmax_cross_entropy": lambda x, w, y, layout: (
        nsj.checked_fused_noisy_softmax_cross_entropy(x, w, y, jax.random.key(0), 0.1,
                                                      kernel_layout=layout)),
    "fused_top_k": lambda x, w, y, layout: nsj.fused_top_k(x, w, 2, kernel_layout=layout),
}


@pytest.mark.parametrize("function", list(KERNEL_FUNCTIONS))
@pytest.mark.parametrize("layout, shape, other", [
    ("features_classes", (4, 6), "classes_features"),
    ("classes_features", (6, 4), "features_classes"),
])
def test_kernel_in_the_other_layout_is_reported_with_the_fix(function, layout, shape, other):
    features, labels = jnp.ones((3, 6)), jnp.array([0, 1, 2])
    kernel = jnp.ones(shape)  # 6 features, 4 classes, but in the other layout
    message = (rf"kernel_layout='{layout}'.*kernel.shape = \({shape[0]}, {shape[1]}\).*"
               rf"looks like .*: pass kernel_layout='{other}'")
    with pytest.raises(ValueError, match=message):
        KERNEL_FUNCTIONS[function](features, kernel, labels, layout)


@pytest.mark.parametrize("function", list(KERNEL_FUNCTIONS))
def test_unknown_layout_is_reported_naming_the_choices(function):
    with pytest.raises(ValueError, match=r"`kernel_layout` must be one of 'features_classes', "
                                         r"'classes_features'; got 'torch'"):
        KERNEL_FUNCTIONS[function](jnp.ones((3, 6)), jnp.ones((6, 4)), jnp.array([0, 1, 2]),
                                   "torch")


def test_unrelated_shapes_and_unknown_layouts_are_reported():
    with pytest.raises(ValueError, match=r"must have shape \[num_classes, num_features\]") as info:
        nsj.target_amplitude(jnp.ones((3, 6)), jnp.ones((5, 4)), jnp.array([0, 1, 2]),
                             kernel_layout="classes_features")
    assert "looks like" not in str(info.value)  # neither layout fits: no suggestion
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 4\)"):
        nsj.target_amplitude(jnp.ones((3, 6)), jnp.ones((4, 6)), jnp.array([0, 1, 4]),
                             kernel_layout="classes_features")


def test_gradients_reach_classes_features_weights_as_in_the_flax_layout():
    features = jax.random.normal(jax.random.key(0), (4, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 5))
    labels = jnp.array([0, 4, 2, 2])

    def loss(features, kernel, layout):
        out = nsj.head_output(features, kernel, kernel_layout=layout)
        return nsj.noisy_softmax_cross_entropy(out.logits, labels, jax.random.key(2), 0.3,
                                               amplitude=out.amplitude(labels)).sum()

    flax_grads = jax.grad(loss, argnums=(0, 1))(features, kernel, "features_classes")
    torch_grads = jax.grad(loss, argnums=(0, 1))(features, kernel.T, "classes_features")
    np.testing.assert_allclose(torch_grads[0], flax_grads[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(torch_grads[1], flax_grads[1].T, rtol=1e-5, atol=1e-6)


# -- the large-class functions on an Equinox weight -------------------------------------------


def rows_amplitude(features, weight, labels):
    """||W_y|| ||x|| with the class weights as rows, in jnp (differentiable), not the library's."""
    return jnp.linalg.norm(features, axis=-1) * jnp.linalg.norm(weight[labels], axis=-1)


@pytest.mark.parametrize("num_features, num_classes", [(8, 37), (8, 8)])
def test_fused_loss_on_equinox_weights_equals_the_loss_on_their_logits(num_features,
                                                                       num_classes):
    # The reference uses the Linear itself for the logits, so a kernel read in the wrong
    # layout (possible unnoticed for the square one) would not match it.
    linear = equinox_head(num_features, num_classes, seed=3)
    features = jax.random.normal(jax.random.key(4), (12, num_features))
    labels = jax.random.randint(jax.random.key(5), (12,), 0, num_classes)
    rng = jax.random.key(6)

    def fused(features, weight):
        return nsj.fused_noisy_softmax_cross_entropy(
            features, weight, labels, rng, 0.3, chunk_size=3,
            kernel_layout="classes_features").sum()

    def reference(features, weight):
        logits = jax.vmap(eqx.tree_at(lambda m: m.weight, linear, weight))(features)
        amplitude = rows_amplitude(features, weight, labels)
        return nsj.noisy_softmax_cross_entropy(logits, labels, rng, 0.3,
                                               amplitude=amplitude).sum()

    loss, grads = jax.value_and_grad(fused, argnums=(0, 1))(features, linear.weight)
    expected_loss, expected_grads = jax.value_and_grad(reference, argnums=(0, 1))(
        features, linear.weight)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    for grad, expected in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    values, classes = nsj.fused_top_k(features, linear.weight, 3, chunk_size=3,
                                      kernel_layout="classes_features")
    expected_values, expected_classes = jax.lax.top_k(jax.vmap(linear)(features), 3)
    np.testing.assert_array_equal(classes, expected_classes)
    np.testing.assert_allclose(values, expected_values, rtol=1e-5, atol=1e-6)
