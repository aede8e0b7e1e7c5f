"""Switching Flax's MNIST examples (Linen and NNX) to noisy softmax: how many lines, and the value.

The fixtures in tests/mnist_switch/ are our own copies of the examples' models and training
steps, before (`*_softmax.py`) and after (`*_noisy.py`) the switch. The diff between them is
the count the documentation states; the switched code must train with the noisy loss (the
value of `noisy_softmax_cross_entropy` with the head's amplitude, for the key the head drew)
and evaluate with the clean logits.
"""

import difflib
import pathlib
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import noisy_softmax_jax as nsj
from noisy_softmax_jax import nnx as nsj_nnx
from tests.mnist_switch import linen_noisy, linen_softmax, nnx_noisy, nnx_softmax

FIXTURES = pathlib.Path(__file__).parent / "mnist_switch"
CONFIG = types.SimpleNamespace(learning_rate=0.1, momentum=0.9, num_epochs=1, batch_size=16)


def changed_lines(before, after):
    """The removed and added lines of the diff, blank lines (import grouping) left out."""
    diff = difflib.unified_diff((FIXTURES / before).read_text().splitlines(),
                                (FIXTURES / after).read_text().splitlines(), lineterm="")
    lines = [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    return ([line for line in lines if line.startswith("-") and line[1:].strip()],
            [line for line in lines if line.startswith("+") and line[1:].strip()])


@pytest.mark.parametrize("example, removed, added", [
    # The import; the model's signature and last layer; apply_model's signature and its
    # apply_fn call (the labels, alpha and a "noise" key folded with the step: one line
    # becomes two); evaluation at alpha = 0.
    ("linen", 5, 7),
    # The import; the last layer; the model's signature and the head's call; loss_fn's call.
    ("nnx", 4, 5),
])
def test_switching_flax_mnist_example_changes_this_many_lines(example, removed, added):
    minus, plus = changed_lines(f"{example}_softmax.py", f"{example}_noisy.py")
    assert (len(minus), len(plus)) == (removed, added), "\n".join(minus + plus)


def mnist_like(seed, size):
    k_image, k_label = jax.random.split(jax.random.key(seed))
    return {"image": jax.random.uniform(k_image, (size, 28, 28, 1)),
            "label": jax.random.randint(k_label, (size,), 0, 10)}


def recording_linen_head(records):
    """An interceptor for NoisySoftmaxDense: records its input, labels, key and parameters."""
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, nsj.NoisySoftmaxDense) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        key = module.make_rng("noise")  # the key the head would draw, then given to it
        logits = next_fun(*args, **kwargs, rng=key)
        records.append((args[0], args[1], key, module.variables))
        return logits
    return intercept


@pytest.mark.slow
def test_switched_linen_example_trains_on_the_noisy_loss_and_evaluates_clean():
    batch = mnist_like(0, 16)
    state = linen_noisy.create_train_state(jax.random.key(1), CONFIG)
    # The training loss, eagerly, with the head's HeadOutput and key recorded.
    records = []
    with nn.intercept_methods(recording_linen_head(records)):
        logits = state.apply_fn({"params": state.params}, batch["image"], batch["label"], 0.1,
                                rngs={"noise": jax.random.fold_in(jax.random.key(0), 0)})
    (features, labels, key, variables), = records
    out = nsj.NoisySoftmaxHead(10).apply(variables, features)  # the same parameters
    expected = nsj.noisy_softmax_cross_entropy(out.logits, labels, key, 0.1,
                                               amplitude=out.amplitude(labels)).mean()
    loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], 10)).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    # The example's jitted step computes the same loss (step 0, the same key).
    _, step_loss, _ = linen_noisy.apply_model(state, batch["image"], batch["label"])
    np.testing.assert_allclose(step_loss, loss, rtol=1e-5)
    # Evaluation at alpha = 0: the clean logits' softmax cross-entropy, no noise.
    _, test_loss, test_accuracy = linen_noisy.apply_model(state, batch["image"],
                                                          batch["label"], 0.0)
    clean = state.apply_fn({"params": state.params}, batch["image"])
    np.testing.assert_allclose(
        test_loss, optax.softmax_cross_entropy_with_integer_labels(clean, labels).mean(),
        rtol=1e-6)
    np.testing.assert_allclose(test_accuracy, jnp.mean(jnp.argmax(clean, -1) == labels))
    # Both versions train end to end.
    for example in (linen_softmax, linen_noisy):
        _, history = example.train_and_evaluate(CONFIG, mnist_like(2, 64), mnist_like(3, 32))
        assert all(np.isfinite(value) for value in history[-1].values())


@pytest.mark.slow
def test_switched_nnx_example_trains_on_the_noisy_loss_and_evaluates_clean(monkeypatch):
    batch = mnist_like(4, 16)
    model = nnx_noisy.CNN(rngs=nnx.Rngs(0))
    # The training loss, eagerly, with the head's HeadOutput and key recorded.
    records = []
    call = nsj_nnx.NoisySoftmaxLinear.__call__

    def recording_call(self, features, labels=None, *, rngs=None, **kwargs):
        key = rngs["noise"]()  # the key the head would draw, then given to it
        records.append((self._head_output(features), labels, key))
        return call(self, features, labels, rngs=key, **kwargs)

    monkeypatch.setattr(nsj_nnx.NoisySoftmaxLinear, "__call__", recording_call)
    loss, _ = nnx_noisy.loss_fn(model, batch, nnx.Rngs(0, noise=5))
    monkeypatch.setattr(nsj_nnx.NoisySoftmaxLinear, "__call__", call)
    (out, labels, key), = records
    expected = nsj.noisy_softmax_cross_entropy(out.logits, labels, key, 0.1,
                                               amplitude=out.amplitude(labels)).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    # In eval mode, labels or not: the clean logits' softmax cross-entropy.
    model.eval()
    test_loss, logits = nnx_noisy.loss_fn(model, batch, None)
    np.testing.assert_array_equal(logits, model(batch["image"], None))
    np.testing.assert_allclose(
        test_loss, optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
        rtol=1e-6)
    # Both versions train end to end, the noisy one's noise from the example's own Rngs.
    batches = lambda seed, n: [mnist_like(seed + i, CONFIG.batch_size) for i in range(n)]
    for example in (nnx_softmax, nnx_noisy):
        _, history = example.train_and_evaluate(CONFIG, batches(10, 4), batches(20, 2))
        assert all(np.isfinite(float(value)) for metrics in history[-1].values()
                   for value in metrics.values())
