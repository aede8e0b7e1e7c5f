"""The heads that return logits (Linen NoisySoftmaxDense, NNX NoisySoftmaxLinear).

The reference is the HeadOutput head with the same parameters, its logits and amplitude fed
to `noisy_softmax_cross_entropy` with the same key: Optax's cross-entropy of the new heads'
output must give its value and gradients.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import noisy_softmax_jax as nsj
from noisy_softmax_jax import nnx as nsj_nnx
from tests.test_large_class import assert_close

BATCH, DIM, CLASSES = 12, 7, 5

NOISES = [
    dict(noise="annealed"),
    dict(noise="amplitude", shared_noise=True),
    dict(noise="free", negative=True, sigma=0.5),
]


def make_problem(seed=0):
    k_x, k_y = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(k_x, (BATCH, DIM)),
            jax.random.randint(k_y, (BATCH,), 0, CLASSES))


def optax_loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def reference_loss(out, labels, rng, alpha, options):
    """noisy_softmax_cross_entropy with the HeadOutput's amplitude: what the new path must equal."""
    return nsj.noisy_softmax_cross_entropy(out.logits, labels, rng, alpha,
                                           amplitude=out.amplitude(labels), **options).mean()


def value_and_grads(loss_fn, params, features):
    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(params, features)


@pytest.mark.parametrize("options", NOISES, ids=[o["noise"] for o in NOISES])
@pytest.mark.parametrize("use_bias", [False, True])
def test_linen_optax_loss_of_the_noisy_logits_is_the_noisy_softmax_loss(options, use_bias):
    features, labels = make_problem()
    head = nsj.NoisySoftmaxDense(CLASSES, alpha=0.3, use_bias=use_bias, **options)
    reference = nsj.NoisySoftmaxHead(CLASSES, use_bias=use_bias,
                                     bias_init=nn.initializers.normal(1.0))
    params = reference.init(jax.random.key(1), features)
    seed = jax.random.key(2)
    # The key the head draws from its "noise" stream, from a method run in its scope.
    key = head.apply(params, method=lambda module: module.make_rng("noise"),
                     rngs={"noise": seed})
    loss, grads = value_and_grads(
        lambda p, x: optax_loss(head.apply(p, x, labels, rngs={"noise": seed}), labels),
        params, features)
    expected_loss, expected_grads = value_and_grads(
        lambda p, x: reference_loss(reference.apply(p, x), labels, key, 0.3, options),
        params, features)
    assert_close(loss, expected_loss, 1e-6)
    assert_close(grads, expected_grads, 1e-5)
    # An explicit key gives the same; another key another noise.
    explicit = head.apply(params, features, labels, rng=key)
    np.testing.assert_array_equal(explicit, head.apply(params, features, labels,
                                                       rngs={"noise": seed}))
    other = head.apply(params, features, labels, rngs={"noise": jax.random.key(3)})
    assert not np.array_equal(other, explicit)


def test_linen_head_is_clean_without_labels_deterministic_or_at_alpha_zero():
    features, labels = make_problem(1)
    head = nsj.NoisySoftmaxDense(CLASSES, alpha=0.3)
    params = head.init(jax.random.key(1), features)  # no labels, so no "noise" key needed
    # nn.Dense's parameters, and its logits (no noise, no key).
    dense = nn.Dense(CLASSES, use_bias=False)
    assert (jax.tree.map(jnp.shape, params)
            == jax.tree.map(jnp.shape, dense.init(jax.random.key(1), features)))
    clean = dense.apply(params, features)
    np.testing.assert_array_equal(head.apply(params, features), clean)
    for call in (
        lambda: head.apply(params, features, labels, deterministic=True),
        lambda: head.clone(deterministic=True).apply(params, features, labels),
        lambda: head.apply(params, features, labels, alpha=0.0),
    ):
        np.testing.assert_array_equal(call(), clean)
    # With labels, only the target logit moves, and only down (annealed noise).
    noisy = head.apply(params, features, labels, rngs={"noise": jax.random.key(0)})
    is_target = np.arange(CLASSES) == np.asarray(labels)[:, None]
    np.testing.assert_array_equal(noisy[~is_target], clean[~is_target])
    assert np.all(noisy[is_target] <= clean[is_target]) and np.any(noisy != clean)
    # A call's alpha overrides the attribute, traced under jit (to the compiled rounding).
    step = jax.jit(lambda alpha: head.apply(params, features, labels, alpha=alpha,
                                            rngs={"noise": jax.random.key(0)}))
    np.testing.assert_allclose(step(0.3), noisy, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(step(0.0), clean, rtol=1e-6, atol=1e-6)


def test_linen_head_errors_name_the_linen_forms():
    features, labels = make_problem(2)
    params = nsj.NoisySoftmaxDense(CLASSES).init(jax.random.key(1), features)
    with pytest.raises(ValueError, match=r"NoisySoftmaxDense needs `alpha` .*"
                       r"`NoisySoftmaxDense\(num_classes, alpha=0\.1\)`"):
        nsj.NoisySoftmaxDense(CLASSES).apply(params, features, labels,
                                             rngs={"noise": jax.random.key(0)})
    with pytest.raises(ValueError, match=r"from the 'noise' RNG stream: pass "
                       r"`rngs=\{'noise': key\}` to `model\.apply`"):
        nsj.NoisySoftmaxDense(CLASSES, alpha=0.1).apply(params, features, labels)


@pytest.mark.parametrize("options", NOISES, ids=[o["noise"] for o in NOISES])
def test_nnx_optax_loss_of_the_noisy_logits_is_the_noisy_softmax_loss(options):
    features, labels = make_problem(3)
    head = nsj_nnx.NoisySoftmaxLinear(DIM, CLASSES, alpha=0.3, rngs=nnx.Rngs(4), **options)
    reference = nsj_nnx.NoisySoftmaxHead(DIM, CLASSES, rngs=nnx.Rngs(4))
    np.testing.assert_array_equal(head.kernel[...], reference.kernel[...])
    key = jax.random.key(5)

    @nnx.jit(static_argnums=0)
    def value_and_grads(loss_fn, module, features):
        loss, (module_grads, feature_grads) = nnx.value_and_grad(loss_fn, argnums=(0, 1))(
            module, features)
        return loss, (module_grads["kernel"][...], feature_grads)

    loss, grads = value_and_grads(
        lambda m, x: optax_loss(m(x, labels, rngs=key), labels), head, features)
    expected_loss, expected_grads = value_and_grads(
        lambda m, x: reference_loss(m(x), labels, key, 0.3, options), reference, features)
    assert_close(loss, expected_loss, 1e-6)
    assert_close(grads, expected_grads, 1e-5)


def test_nnx_head_draws_from_its_stream_and_is_clean_in_eval_mode():
    features, labels = make_problem(4)
    head = nsj_nnx.NoisySoftmaxLinear(DIM, CLASSES, alpha=0.3, rngs=nnx.Rngs(0))
    # nnx.Linear's kernel from the same Rngs, drawn before the noise stream is forked.
    linear = nnx.Linear(DIM, CLASSES, use_bias=False, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(head.kernel[...], linear.kernel[...])
    clean = linear(features)
    np.testing.assert_array_equal(head(features), clean)  # no labels
    first, second = head(features, labels), head(features, labels)
    assert not np.array_equal(first, second)  # the stream advances, as nnx.Dropout's does
    is_target = np.arange(CLASSES) == np.asarray(labels)[:, None]
    np.testing.assert_array_equal(first[~is_target], clean[~is_target])
    # The held stream is a fork of rngs.noise (here rngs.default): the same keys again.
    again = nsj_nnx.NoisySoftmaxLinear(DIM, CLASSES, alpha=0.3, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(again(features, labels), first)
    # A call's rngs take precedence: an nnx.Rngs, its stream, or a key.
    key = jax.random.fold_in(jax.random.key(9), 0)  # the first key of a stream seeded 9
    by_key = head(features, labels, rngs=key)
    np.testing.assert_array_equal(head(features, labels, rngs=nnx.Rngs(noise=9)), by_key)
    np.testing.assert_array_equal(head(features, labels, rngs=nnx.Rngs(noise=9).noise), by_key)
    assert not np.array_equal(by_key, first)
    head.eval()
    np.testing.assert_array_equal(head(features, labels, rngs=key), clean)
    head.train()
    np.testing.assert_array_equal(head(features, labels, rngs=key), by_key)
    np.testing.assert_array_equal(head(features, labels, deterministic=True), clean)
    np.testing.assert_array_equal(head(features, labels, alpha=0.0), clean)


def test_nnx_head_errors_name_the_nnx_forms():
    features, labels = make_problem(5)
    with pytest.raises(ValueError, match=r"NoisySoftmaxLinear needs `alpha` .*"
                       r"`NoisySoftmaxLinear\(in_features, num_classes, alpha=0\.1, "
                       r"rngs=rngs\)`.*after `model\.eval\(\)`"):
        nsj_nnx.NoisySoftmaxLinear(DIM, CLASSES, rngs=nnx.Rngs(0))(features, labels)
    no_stream = nsj_nnx.NoisySoftmaxLinear(DIM, CLASSES, alpha=0.1, rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match=r"has no 'noise' stream .* `rngs=nnx\.Rngs\(0\)`"):
        no_stream(features, labels)
    np.testing.assert_array_equal(no_stream(features), no_stream(features))  # clean: no key
    with pytest.raises(ValueError, match=r"NoisySoftmaxLinear\(in_features=7, \.\.\.\)"):
        no_stream(jnp.ones((2, 3)))
