"""saturation_metrics against a NumPy reference and against autodiff of the loss itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import noisy_softmax_jax as nsj


def batch(seed=0, n=32, c=6):
    k1, k2 = jax.random.split(jax.random.key(seed))
    logits = 4.0 * jax.random.normal(k1, (n, c))
    labels = jax.random.randint(k2, (n,), 0, c)
    amplitude = jnp.abs(logits).sum(-1) + 1.0
    return logits, labels, amplitude


def test_plain_softmax_metrics_match_numpy():
    logits, labels, amplitude = batch()
    m = nsj.saturation_metrics(logits, labels, amplitude=amplitude, threshold=0.9)
    lg = np.asarray(logits, np.float64)
    probs = np.exp(lg - lg.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    p_y = probs[np.arange(len(labels)), labels]
    target = lg[np.arange(len(labels)), labels]
    np.testing.assert_allclose(m["target_prob"], p_y.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["saturated_fraction"], (p_y > 0.9).mean())
    np.testing.assert_allclose(m["target_grad"], (1 - p_y).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["noise"], 0.0)
    np.testing.assert_allclose(m["accuracy"], (lg.argmax(-1) == labels).mean())
    np.testing.assert_allclose(m["logit_std"], lg.std(-1).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["amplitude"], np.asarray(amplitude).mean(), rtol=1e-6)
    np.testing.assert_allclose(m["cos_target"], (target / amplitude).mean(), rtol=1e-5)
    assert all(v.dtype == jnp.float32 and v.shape == () for v in m.values())


def test_without_amplitude_there_is_no_amplitude_or_cosine():
    logits, labels, _ = batch()
    assert not {"amplitude", "cos_target"} & set(nsj.saturation_metrics(logits, labels))


@pytest.mark.parametrize("noise", ["annealed", "amplitude", "free"])
@pytest.mark.parametrize("negative", [False, True])
def test_noisy_metrics_match_the_loss_it_describes(noise, negative):
    logits, labels, amplitude = batch(1)
    rng, alpha = jax.random.key(3), 0.2
    kwargs = dict(amplitude=amplitude, noise=noise, negative=negative)
    m = jax.jit(lambda lg: nsj.saturation_metrics(lg, labels, rng=rng, alpha=alpha, **kwargs))(
        logits)
    # The gradient on the target logit, by autodiff of the loss itself.
    grad = jax.grad(lambda lg: nsj.noisy_softmax_cross_entropy(
        lg, labels, rng, alpha, **kwargs).sum())(logits)
    target_grad = jnp.take_along_axis(grad, labels[:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(m["target_grad"], jnp.abs(target_grad).mean(), rtol=1e-5)
    # The injected noise, from the same key.
    target = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    noisy = nsj.noisy_target_logit(target, rng, alpha, **kwargs)
    np.testing.assert_allclose(m["noise"], (target - noisy).mean(), rtol=1e-5)
    assert (m["noise"] < 0) == negative
    clean = nsj.saturation_metrics(logits, labels, amplitude=amplitude)
    np.testing.assert_allclose(m["target_prob"], clean["target_prob"])


def test_collapse_is_visible():
    # Features driven to zero: every logit equal, amplitude zero, accuracy at chance.
    features = jnp.zeros((100, 8))
    kernel = jax.random.normal(jax.random.key(0), (8, 10))
    labels = jnp.arange(100) % 10
    m = nsj.saturation_metrics(features @ kernel, labels, rng=jax.random.key(1), alpha=0.5,
                               amplitude=nsj.target_amplitude(features, kernel, labels))
    assert float(m["amplitude"]) == 0.0 and float(m["logit_std"]) == 0.0
    np.testing.assert_allclose(m["target_prob"], 0.1, rtol=1e-6)
    np.testing.assert_allclose(m["accuracy"], 0.1)
    assert all(jnp.isfinite(v) for v in m.values())


def test_where_excludes_examples():
    logits, labels, amplitude = batch(2)
    where = jnp.arange(32) < 10
    masked = nsj.saturation_metrics(logits, labels, amplitude=amplitude, where=where)
    subset = nsj.saturation_metrics(logits[:10], labels[:10], amplitude=amplitude[:10])
    for name in subset:
        np.testing.assert_allclose(masked[name], subset[name], rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("shape, num_classes", [((64,), 10), ((4, 16), 3), ((1,), 2)])
def test_top_class_fraction_matches_numpy(shape, num_classes):
    logits = jax.random.normal(jax.random.key(sum(shape)), (*shape, num_classes))
    predictions = np.argmax(np.asarray(logits), -1).reshape(-1)
    expected = np.bincount(predictions, minlength=num_classes).max() / predictions.size
    assert float(jax.jit(nsj.top_class_fraction)(logits)) == pytest.approx(expected)


def test_top_class_fraction_of_one_predicted_class_is_one():
    assert float(nsj.top_class_fraction(jnp.zeros((8, 10)))) == 1.0  # ties go to class 0
    logits = jnp.array([[1.0, 0.0, 0.0], [2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0]])
    assert float(nsj.top_class_fraction(logits)) == 0.75


def test_narrow_labels_with_more_classes_than_their_dtype_holds():
    # uint8 labels and 300 classes: class indices built in the labels' dtype would wrap at
    # 256 and mark class 261 as the target of label 5 as well (issue 19).
    gen = np.random.default_rng(0)
    labels = np.array([5, 44, 255, 0], np.uint8)
    # The classes a wrapped index would mistake for the targets of labels 5 and 0 dominate,
    # so that replacing their logits by the noisy target would change everything.
    logits = jnp.asarray(gen.standard_normal((4, 300)), jnp.float32)
    logits = logits.at[0, 261].set(30.0).at[3, 256].set(30.0)
    amplitude = jnp.full((4,), 30.0)
    rng = jax.random.key(1)
    narrow = nsj.saturation_metrics(logits, labels, amplitude=amplitude, rng=rng, alpha=0.5)
    wide = nsj.saturation_metrics(logits, labels.astype(np.int32), amplitude=amplitude, rng=rng,
                                  alpha=0.5)
    for name in wide:
        np.testing.assert_allclose(narrow[name], wide[name], rtol=1e-6, err_msg=name)
    grad = jax.grad(lambda lg: nsj.noisy_softmax_cross_entropy(
        lg, labels, rng, 0.5, amplitude=amplitude).sum())(logits)
    target_grad = np.abs(np.asarray(grad)[np.arange(4), labels.astype(np.int64)])
    np.testing.assert_allclose(narrow["target_grad"], target_grad.mean(), rtol=1e-5)
