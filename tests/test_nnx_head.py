"""The Flax NNX head: the Linen head's outputs, bit for bit, and a float64 NumPy reference."""

import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import noisy_softmax_jax as nsj
from noisy_softmax_jax.nnx import NoisySoftmaxHead
from tests.test_head import RecordingDotGeneral


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
    assert out.logits.dtype == jnp.float32  # the matmul's accumulator, as the Linen head's
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


def promote_to_float16(arrays, /, *, dtype=None):
    """An NNX-style promote_dtype (one tuple of arrays) that ignores `dtype`."""
    return tuple(None if x is None else jnp.asarray(x, jnp.float16) for x in arrays)


def mesh_of_two():
    return jax.make_mesh((2,), ("model",), devices=jax.devices()[:2],
                         axis_types=(jax.sharding.AxisType.Explicit,))


@pytest.mark.parametrize("options", [
    dict(use_bias=False),
    dict(use_bias=True, bias_init=nn.initializers.normal(1.0)),
    dict(use_bias=False, precision=jax.lax.Precision.HIGHEST),
    dict(use_bias=False, dot_general=RecordingDotGeneral()),
    dict(use_bias=True, promote_dtype=promote_to_float16),
    dict(use_bias=False, dtype=jnp.bfloat16),
    dict(use_bias=False, preferred_element_type=jnp.float16, dtype=jnp.float16),
    dict(use_bias=True, kernel_metadata={"out_sharding": (None, "model")},
         bias_metadata={"out_sharding": ("model",)}),
    dict(use_bias=False, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                           (None, "model"))),
], ids=["plain", "bias", "precision", "dot_general", "promote_dtype", "dtype",
        "preferred_element_type", "kernel_metadata", "with_partitioning"])
def test_nnx_head_takes_linear_arguments_and_has_its_parameters(options):
    features = jax.random.normal(jax.random.key(0), (3, 2, 6))
    with jax.set_mesh(mesh_of_two()):  # the sharding metadata's mesh
        linear = nnx.Linear(6, 4, rngs=nnx.Rngs(0), **options)
        head = NoisySoftmaxHead(6, 4, rngs=nnx.Rngs(0), **options)
        expected, out = linear(features), head(features)
    # The same parameters: names, values, dtypes, shardings and metadata.
    state, head_state = nnx.state(linear, nnx.Param), nnx.state(head, nnx.Param)
    assert jax.tree.structure(head_state) == jax.tree.structure(state)
    for name, param in state.items():
        np.testing.assert_array_equal(head_state[name][...], param[...])
        assert head_state[name][...].dtype == param[...].dtype
        assert head_state[name][...].sharding == param[...].sharding
        assert head_state[name].get_metadata() == param.get_metadata()
    assert out.logits.dtype == (options.get("preferred_element_type")
                                or jnp.promote_types(expected.dtype, jnp.float32))
    np.testing.assert_array_equal(out.logits.astype(expected.dtype), expected)
    recorder = options.get("dot_general")
    if recorder is not None:  # nnx.Linear passes out_sharding too, which the head has not
        assert recorder.calls[-1] == {"precision": None}
        assert recorder.calls[-2] == {"precision": None, "out_sharding": None}
    if "promote_dtype" in options:  # the norms are those of the arrays the head multiplies
        np.testing.assert_allclose(out.feature_norm,
                                   nsj.safe_norm(features.astype(jnp.float16)), rtol=1e-6)


def test_nnx_head_error_names_the_nnx_constructor():
    head = NoisySoftmaxHead(6, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"NoisySoftmaxHead\(in_features=6, \.\.\.\) needs "
                       r"features of shape \[\.\.\., 6\]; got shape \(2, 5\)\. Build the head "
                       r"with NoisySoftmaxHead\(5, num_classes, rngs=\.\.\.\)"):
        head(jnp.ones((2, 5)))


def test_nnx_heads_are_an_attribute_of_the_package_loaded_on_first_use():
    # In a fresh interpreter: `import noisy_softmax_jax` leaves flax.nnx unloaded (about a fifth
    # of the package's import time), and `nsj.nnx` loads it.
    code = (
        "import sys; import noisy_softmax_jax as nsj\n"
        "assert 'flax.nnx' not in sys.modules and 'noisy_softmax_jax.nnx' not in sys.modules\n"
        "assert 'nnx' in dir(nsj)\n"
        "from noisy_softmax_jax import nnx as module\n"
        "assert nsj.nnx is module and nsj.nnx.NoisySoftmaxHead is module.NoisySoftmaxHead\n"
        "assert 'flax.nnx' in sys.modules\n"
        "try:\n    nsj.no_such_name\nexcept AttributeError as error:\n"
        "    assert 'no_such_name' in str(error)\nelse:\n    raise AssertionError\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr


def test_missing_amplitude_error_shows_the_nnx_form_beside_the_linen_one():
    # The loss cannot know which API made the logits, so it names both.
    with pytest.raises(ValueError) as error:
        nsj.noisy_softmax_cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 1]),
                                        jax.random.key(0), 0.1)
    message = str(error.value)
    assert "noisy_softmax_jax.nnx.NoisySoftmaxHead(in_features, num_classes, rngs=rngs)" in message
    assert "NoisySoftmaxHead(num_classes).apply(variables, features)" in message
    assert "nnx.NoisySoftmaxLinear" in message and "NoisySoftmaxDense" in message
